"""The books of a job: every non-blank input line in output ∪ errors exactly once.

Checked before a job is filed as completed (design §5b). Each result line names its
input line through its `id` (formats: `batch_req_<job hash><line, 8 hex>`), so the
audit streams the two result files and needs one byte per input line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from spoold import formats
from spoold.job import ERRORS, INPUT, OUTPUT
from spoold.validate import iter_lines

_SHOWN = 5  # line numbers named in a message


@dataclass
class Audit:
    total: int = 0  # non-blank input lines
    accounted: int = 0
    missing: list[int] = field(default_factory=list)
    repeated: list[int] = field(default_factory=list)
    foreign: int = 0  # result lines that name no line of this input

    @property
    def balanced(self) -> bool:
        return not (self.missing or self.repeated or self.foreign)

    def describe(self) -> str:
        parts = []
        if self.missing:
            shown = ", ".join(map(str, self.missing[:_SHOWN]))
            parts.append(
                f"{len(self.missing)} of {self.total} input lines are unaccounted for "
                f"(in neither output.jsonl nor errors.jsonl; lines {shown}"
                f"{', …' if len(self.missing) > _SHOWN else ''})"
            )
        if self.repeated:
            shown = ", ".join(map(str, self.repeated[:_SHOWN]))
            parts.append(f"{len(self.repeated)} input lines have more than one result ({shown})")
        if self.foreign:
            parts.append(f"{self.foreign} result lines name no line of this input")
        return "; ".join(parts)


def audit(job_dir: Path, job_id: str, max_line_bytes: int) -> Audit:
    """Compare the input's non-blank lines with the lines the result files answer."""
    report = Audit()
    wanted = bytearray()  # per input line (index = line - 1): 1 if non-blank
    with open(job_dir / INPUT, "rb") as f:
        for line_no, _, raw in iter_lines(f, 0, 1, max_line_bytes):
            wanted.append(0 if raw is not None and is_blank(raw, line_no) else 1)
    report.total = sum(wanted)
    seen = bytearray(len(wanted))
    prefix = formats.batch_request_id(job_id, 0)[:-8].encode()
    start = len(b'{"id":"') + len(prefix)
    for name in (OUTPUT, ERRORS):
        try:
            f = open(job_dir / name, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            continue
        with f:
            for record in f:
                line = _line_of(record, prefix, start)
                if line is None or not 0 < line <= len(wanted) or not wanted[line - 1]:
                    report.foreign += 1
                    continue
                if seen[line - 1]:
                    report.repeated.append(line)
                seen[line - 1] = 1
                report.accounted += 1
    report.missing = [i + 1 for i, want in enumerate(wanted) if want and not seen[i]]
    return report


def is_blank(raw: bytes, line_no: int) -> bool:
    """Blank as validation sees it (`validate._load`): nothing but whitespace, Unicode
    whitespace included, after a first line's BOM. The common case, a line starting
    with a visible ASCII character, is decided without decoding."""
    head = raw.lstrip()
    if head and head[0] < 0x80:
        return False
    text = raw.decode("utf-8", "replace")
    if line_no == 1:
        text = text.removeprefix("\ufeff")
    return not text.strip()


def _line_of(record: bytes, prefix: bytes, start: int) -> int | None:
    if record[7:start] != prefix or not record.startswith(b'{"id":"'):
        return None
    try:
        return int(record[start : start + 8], 16)
    except ValueError:
        return None
