"""The ledger audit (spoold/ledger.py, design §5b) against the line-by-line truth."""

from __future__ import annotations

import io
import random
from pathlib import Path

import pytest

from spoold import formats, ledger
from spoold.engines.base import Choice, Completion
from spoold.validate import Request, iter_lines


def _truth(data: bytes) -> tuple[int, list[int]]:
    """What validation sees: every line, and the ones it skips as blank."""
    lines, blank = 0, []
    for line_no, _, raw in iter_lines(io.BytesIO(data), 0, 1, 1 << 30):
        lines = line_no
        if raw is not None and ledger.is_blank(raw, line_no):
            blank.append(line_no)
    return lines, blank


_PIECES = [
    b'{"custom_id": "a"}',
    b"",
    b"   ",
    b"\t\r",
    "\u00a0".encode(),
    b"not json",
    b'  {"x": 1}',
    b"x" * 300,
    b" " * 300,
    b" " * 200 + b"{",
]


@pytest.mark.parametrize("seed", range(40))
def test_scanning_in_blocks_finds_the_lines_validation_skips(seed: int) -> None:
    rng = random.Random(seed)
    lines = [rng.choice(_PIECES) for _ in range(rng.randrange(0, 60))]
    if lines and rng.random() < 0.3:
        lines[0] = b"\xef\xbb\xbf" + lines[0]  # a BOM
    data = b"\n".join(lines) + (b"\n" if rng.random() < 0.7 else b"")
    for size in (1, 3, 7, 64, 1 << 20):
        assert ledger._scan_input(io.BytesIO(data), size) == _truth(data), (seed, size)


def _job(tmp_path: Path, lines: list[bytes], answered: list[int], errors: list[int]) -> Path:
    job = tmp_path / "job"
    job.mkdir()
    (job / "input.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    with open(job / "output.jsonl", "wb") as out:
        for n in answered:
            req = Request(n, f"c{n}", "/v1/completions", {"prompt": "p"})
            out.write(
                formats.output_line("job-1", Completion(req, "m", [Choice("t", "stop")], 1, 1), 0)
            )
    with open(job / "errors.jsonl", "wb") as err:
        for n in errors:
            err.write(formats.error_line("job-1", n, None, "invalid_json", "bad"))
    return job


def test_balanced_books(tmp_path: Path) -> None:
    job = _job(tmp_path, [b"{}", b"", b"{}", b"bad"], answered=[1, 3], errors=[4])
    report = ledger.audit(job, "job-1")
    assert report.balanced and report.total == 3 and report.accounted == 3


def test_a_missing_a_repeated_and_a_foreign_line_are_each_named(tmp_path: Path) -> None:
    job = _job(tmp_path, [b"{}"] * 5, answered=[1, 2, 2, 9], errors=[3])
    (job / "errors.jsonl").open("ab").write(b'{"id": "something else"}\n')
    report = ledger.audit(job, "job-1")
    assert report.missing == [4, 5] and report.repeated == [2] and report.foreign == 2
    text = report.describe()
    assert "2 of 5 input lines are unaccounted for" in text and "4, 5" in text
    assert "more than one result (2)" in text and "2 result lines" in text
    other = ledger.audit(job, "another-job")  # another job's ids are not this job's
    assert other.accounted == 0 and other.foreign == 6
