import io
import json
from pathlib import Path

import pytest

from spoold import unique, validate
from spoold.lint import Tally, counted, line_problems
from spoold.validate import NotUtf8Error
from tests.helpers import chat

HOT = 'body.temperature must be a number in [0, 2], got "hot"'


def _any_model(name: object) -> str:
    return "m"


@pytest.mark.parametrize("spill", [False, True])
def test_every_problem_comes_in_line_order_in_memory_and_spilled(
    spill: bool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A repeated custom_id is known only after the pass, from bucket files on disk past
    IN_MEMORY ids (in bucket order, not line order); it still comes out with its line,
    after the line's own problems, also for a line that is invalid already."""
    if spill:
        monkeypatch.setattr(validate, "IN_MEMORY", 10)
        monkeypatch.setattr(unique, "IN_MEMORY", 10)
        monkeypatch.setattr(unique, "PER_BUCKET", 16)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # buckets and spills land here
    n = 200
    records = [
        chat(f"id-{i % 150}", temperature="hot") if i % 7 == 0 else chat(f"id-{i % 150}")
        for i in range(n)
    ]
    data = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    expected: list[tuple[int, str]] = []
    for i in range(n):
        if i % 7 == 0:
            expected.append((i + 1, HOT))
        if i >= 150:
            first = i - 150 + 1
            expected.append(
                (
                    i + 1,
                    f"custom_id 'id-{i % 150}' is already used on line {first} "
                    "(a custom_id must be unique in the file)",
                )
            )
    tally = Tally()
    got = list(line_problems(io.BytesIO(data), 1 << 20, _any_model, tally, expected=n))
    assert got == expected
    assert tally == Tally(requests=n, invalid=len({line for line, _ in expected}))
    assert not list(tmp_path.iterdir())  # temporary files removed


def test_lines_before_a_byte_that_is_not_utf8_are_reported_first() -> None:
    data = json.dumps(chat("a", temperature="hot")).encode() + b'\n{"custom_id": "\xff"}\n'
    got: list[tuple[int, str]] = []
    with pytest.raises(NotUtf8Error):
        got.extend(line_problems(io.BytesIO(data), 1 << 20, _any_model, Tally()))
    assert got == [(1, HOT)]


def test_counted() -> None:
    assert [counted(n, "request") for n in (0, 1, 2)] == ["0 requests", "1 request", "2 requests"]
