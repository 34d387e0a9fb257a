import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultshim import faketime as faketime
from tests.faultshim import faultshim as faultshim


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """The tiny Llama of tests/tinymodel.py (built once, cached outside the repository):
    the real-engine tests' model (test_vllm, test_ray)."""
    from tests import tinymodel

    return tinymodel.build(tinymodel.default_cache_dir())


@pytest.fixture(scope="session")
def tiny_bert() -> Path:
    """The tiny BERT embedding model of tests/tinymodel.py (built once, cached)."""
    from tests import tinymodel

    return tinymodel.build_bert(tinymodel.default_bert_dir())


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """A test must not leave threads running (as in watchdog's own suite)."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
    for t in leaked:
        t.join(timeout=2)
    leaked = [t for t in leaked if t.is_alive()]
    assert not leaked, f"leaked threads: {leaked}"
