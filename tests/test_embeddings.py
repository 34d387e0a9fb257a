"""Real-vLLM embeddings: `spoold run --drain` on a pooling model against `vllm serve`.

The model is the tiny BERT of tests/tinymodel.py (random weights, its own WordPiece
tokenizer, Matryoshka sizes declared), loaded by vLLM as its BertEmbeddingModel with
the pooling runner; the reference is a real `vllm serve --runner pooling` on loopback,
asked the same bodies over HTTP. One drain (`shared`) runs the fidelity job (every
input shape, float and base64, `dimensions`, truncation, a too-long input, a chat
line); the kill test adds two spoold processes; the shipped config/embeddings.yaml runs
the real all-MiniLM-L6-v2 that `make` fetches from PyPI (Makefile MINILM_*).

Skipped when vLLM is not installed, unless SPOOLD_REQUIRE_VLLM=1 (`make test`).
"""

from __future__ import annotations

import base64
import math
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    drain,
    kill_once_committed,
    make_config,
    only_job,
    read_results,
    state,
    write_jsonl,
)
from tests.test_vllm import KV_CACHE_BYTES, REQUIRE_VLLM, Server, start_server
from tests.test_vllm import vllm_env as vllm_env

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parent.parent
MAX_MODEL_LEN = 128
SERVED = "tiny-bert"  # the served name: the bodies name it, so both answer for it
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"
WORDS = ["dragon", "castle", "knight", "sea", "fox", "numbers", "paris", "morning"]


def embed(custom_id: str, given: Any, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": SERVED, "input": given, **body},
    }


def embeddings_config(tmp: Path, model: Path, **processing: Any) -> Path:
    return make_config(
        tmp,
        engine={
            "backend": "vllm",
            "model": str(model),
            "dtype": "float32",
            "max_model_len": MAX_MODEL_LEN,
            "enforce_eager": True,
            "seed": 0,
            # On CPU a memory budget is needed, else vLLM's start-up checks free memory.
            "kv_cache_memory_bytes": KV_CACHE_BYTES,
        },
        processing={"chunk_size": 5000, **processing},
    )


@pytest.fixture(scope="module")
def server(
    vllm_env: None, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """`vllm serve --runner pooling` (not waited for: it loads while the drain runs)."""
    log = tmp_path_factory.mktemp("serve-embed") / "serve.log"
    srv = start_server(
        tiny_bert, log, MAX_MODEL_LEN, "--runner", "pooling", "--served-model-name", SERVED
    )
    try:
        yield srv
    finally:
        srv.stop()


def _ask(server: Server, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import httpx

    r = httpx.post(f"http://127.0.0.1:{server.port}/v1/embeddings", json=body, timeout=60)
    return r.status_code, r.json()


def _sentence(i: int) -> str:
    return f"the {WORDS[i % 8]} and the {WORDS[(i * 3 + 1) % 8]} went to sea {i}"


def _fidelity_requests() -> tuple[list[dict[str, Any]], dict[str, str]]:
    """~40 valid bodies of every shape and option, and the lines that must fail:
    {custom_id: error code}."""
    reqs = []
    for i in range(40):
        shape = i % 5
        given: Any
        if shape == 0:
            given = _sentence(i)
        elif shape == 1:
            given = [_sentence(i), _sentence(i + 1), "a"]
        elif shape == 2:
            given = [5 + (i * 7 + j) % 400 for j in range(3 + i % 9)]
        elif shape == 3:
            given = [[5 + (i + j) % 400 for j in range(1 + k)] for k in range(3)]
        else:
            given = _sentence(i)
        body: dict[str, Any] = {}
        if shape == 4 or i % 7 == 2:
            body["encoding_format"] = "base64"
        if i % 6 == 1:
            body["dimensions"] = 16 if i % 12 == 1 else 32
        if i % 9 == 4:
            body["truncate_prompt_tokens"] = 6
        reqs.append(embed(f"fid-{i}", given, **body))
    reqs.insert(10, embed("too-long", "dragon castle " * 200))
    reqs.insert(20, embed("bad-dimensions", "sea", dimensions=20))
    reqs.insert(30, chat("a-chat", "Hello!"))
    # Refused for a later input: nothing of the line's earlier inputs is answered.
    reqs.insert(35, embed("second-too-long", ["fine", "dragon castle " * 200]))
    reqs.insert(38, embed("unknown-token", [[5, 6], [5, 10**6]]))
    return reqs, {
        "too-long": "invalid_request",
        "bad-dimensions": "invalid_request",
        "a-chat": "endpoint_mismatch",
        "second-too-long": "invalid_request",
        "unknown-token": "invalid_request",
    }


@dataclass
class Shared:
    job: Path
    requests: list[dict[str, Any]]
    failing: dict[str, str]


@pytest.fixture(scope="module")
def shared(server: Server, tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Shared:
    tmp = tmp_path_factory.mktemp("shared-embed")
    config = embeddings_config(tmp, tiny_bert)
    reqs, failing = _fidelity_requests()
    write_jsonl(tmp / "spool" / "incoming" / "fidelity.jsonl", reqs)
    drain(config, timeout=300)
    return Shared(only_job(tmp / "spool", "done"), reqs, failing)


def _vector(value: Any) -> list[float]:
    if isinstance(value, str):
        raw = base64.b64decode(value)
        return [x for (x,) in struct.iter_unpack("<f", raw)]
    return list(value)


def _close(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= 1e-5 for x, y in zip(a, b, strict=True))


def _same_answer(ours: dict[str, Any], theirs: dict[str, Any], where: str) -> None:
    """Body against body: vectors (float within 1e-5 a component, base64 the same
    bytes), usage, shape; `id` and `created` are each server's own."""
    assert set(ours) == set(theirs), (where, sorted(ours), sorted(theirs))
    assert ours["object"] == theirs["object"] == "list", where
    assert ours["model"] == theirs["model"] == SERVED, where
    assert ours["usage"] == theirs["usage"], (where, ours["usage"], theirs["usage"])
    assert len(ours["data"]) == len(theirs["data"]), where
    for mine, ref in zip(ours["data"], theirs["data"], strict=True):
        assert set(mine) == set(ref) and mine["index"] == ref["index"], (where, mine.keys())
        assert mine["object"] == ref["object"] == "embedding", where
        if isinstance(ref["embedding"], str):
            assert mine["embedding"] == ref["embedding"], f"{where}: base64 differs"
        else:
            assert _close(mine["embedding"], ref["embedding"]), (
                f"{where}: vectors differ by more than 1e-5"
            )


def test_embeddings_equal_what_vllm_serve_answers(shared: Shared, server: Server) -> None:
    """SPEC §6 Endpoints: the output body of every valid line is the body `vllm serve`
    answers at /v1/embeddings for the same body, for every input shape, float and
    base64, Matryoshka `dimensions` and `truncate_prompt_tokens`."""
    server.wait_healthy()
    out = {r["custom_id"]: r for r in read_results(shared.job, "output.jsonl")}
    asked = [r for r in shared.requests if r["custom_id"] not in shared.failing]
    assert set(out) == {r["custom_id"] for r in asked}
    for req in asked:
        rec = out[req["custom_id"]]
        assert rec["response"]["status_code"] == 200 and rec["error"] is None
        status, theirs = _ask(server, req["body"])
        assert status == 200, (req["custom_id"], theirs)
        _same_answer(rec["response"]["body"], theirs, req["custom_id"])
        dims = req["body"].get("dimensions")
        if dims:
            assert {len(_vector(d["embedding"])) for d in theirs["data"]} == {dims}


def test_refused_lines_are_error_lines_and_the_rest_is_done(
    shared: Shared, server: Server, tiny_bert: Path
) -> None:
    """A too-long input and a `dimensions` the model does not offer are per-request
    400s, as the server gives (its message, in the error line); a chat line in an
    embeddings job is endpoint_mismatch; every other line is answered once."""
    st = state(shared.job)
    assert st["status"] == "completed", st
    n = len(shared.requests)
    failed = len(shared.failing)
    assert st["request_counts"] == {"total": n, "completed": n - failed, "failed": failed}
    assert_exactly_once(shared.job, [r["custom_id"] for r in shared.requests])
    errors = {r["custom_id"]: r for r in read_results(shared.job, "errors.jsonl")}
    assert {cid: e["error"]["code"] for cid, e in errors.items()} == shared.failing
    server.wait_healthy()
    by_id = {r["custom_id"]: r for r in shared.requests}
    for cid in ("too-long", "bad-dimensions", "second-too-long", "unknown-token"):
        status, theirs = _ask(server, by_id[cid]["body"])
        assert status == 400, theirs
        ours = errors[cid]
        assert ours["response"]["status_code"] == 400
        # The server names its served model; spoold the model it loaded.
        said = theirs["error"]["message"].split(" (parameter=")[0]
        said = said.replace(repr(SERVED), repr(str(tiny_bert)))
        assert said in ours["error"]["message"], (said, ours["error"]["message"])
    assert "maximum context length is 128 tokens" in errors["too-long"]["error"]["message"]


def test_kill9_mid_embeddings_job_resumes_exactly_once(
    server: Server, tiny_bert: Path, tmp_path: Path
) -> None:
    """SIGKILL a drain once results are committed, drain again: every line is answered
    exactly once, the committed bytes stay, and vectors on both sides of the kill are
    the server's."""
    reqs = [
        embed(f"k-{i}", [_sentence(i), _sentence(i + 7), f"{WORDS[i % 8]} {i}"])
        for i in range(4000)
    ]
    config = embeddings_config(tmp_path, tiny_bert, chunk_size=100)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "kill.jsonl", reqs)
    log = tmp_path / "spoold-1.log"

    kill_once_committed(config, log, 100)
    job = only_job(spool, "processing")
    st = state(job)
    kept = (job / "output.jsonl").read_bytes()[: st["checkpoint"]["output_bytes"]]
    assert 100 <= st["request_counts"]["completed"] < len(reqs), st["request_counts"]

    drain(config, timeout=400)
    done = only_job(spool, "done")
    assert state(done)["request_counts"] == {"total": 4000, "completed": 4000, "failed": 0}
    assert_exactly_once(done, [r["custom_id"] for r in reqs])
    assert (done / "output.jsonl").read_bytes().startswith(kept), "committed bytes rewritten"
    out = {r["custom_id"]: r["response"]["body"] for r in read_results(done, "output.jsonl")}
    boundary = st["request_counts"]["completed"]
    server.wait_healthy()
    for i in sorted({0, boundary - 1, boundary, boundary + 1, *range(0, 4000, 400)}):
        req = reqs[i]
        status, theirs = _ask(server, req["body"])
        assert status == 200
        _same_answer(out[req["custom_id"]], theirs, req["custom_id"])


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_the_shipped_embeddings_config_embeds_with_the_real_packaged_model(
    vllm_env: None, tmp_path: Path
) -> None:
    """config/embeddings.yaml as shipped (`make run CONFIG=config/embeddings.yaml`, its
    spool moved to a temp dir): all-MiniLM-L6-v2 from PyPI embeds a dropped file, and the
    model is really used: sentences about one thing are closer than unrelated ones."""
    if not (MINILM / "config.json").exists():
        if REQUIRE_VLLM:
            pytest.fail(f"{MINILM} is missing: `make {MINILM.relative_to(ROOT)}/config.json`")
        pytest.skip(f"{MINILM} is missing (the Makefile fetches it)")
    spool = tmp_path / "spool"
    (spool / "incoming").mkdir(parents=True)
    sentences = [
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The new movie is awesome.",
        "A man is playing a guitar.",
        "The stock market fell sharply today.",
    ]
    write_jsonl(
        spool / "incoming" / "sentences.jsonl",
        [
            {
                "custom_id": "s",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "all-MiniLM-L6-v2", "input": sentences},
            },
            {
                "custom_id": "one",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "sentence-transformers/all-MiniLM-L6-v2", "input": "Hi"},
            },
        ],
    )
    proc = subprocess.run(
        [*SPOOLD, "run", "--config", "config/embeddings.yaml", "--spool", str(spool), "--drain"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    done = only_job(spool, "done")
    out = {r["custom_id"]: r["response"]["body"] for r in read_results(done, "output.jsonl")}
    vectors = [d["embedding"] for d in out["s"]["data"]]
    assert [len(v) for v in vectors] == [384] * 5
    assert all(abs(math.sqrt(sum(x * x for x in v)) - 1) < 1e-4 for v in vectors)
    food = _cosine(vectors[0], vectors[1])
    for other in vectors[2:]:
        assert food > _cosine(vectors[0], other) + 0.2, (food, _cosine(vectors[0], other))
    assert out["s"]["model"] == "all-MiniLM-L6-v2"
    assert len(out["one"]["data"]) == 1 and out["one"]["usage"]["prompt_tokens"] == 3
