"""The books of a job: every non-blank input line in output ∪ errors exactly once.

Checked before a job is filed as completed (design §5b). Each result line names its
input line through its `id` (formats: `batch_req_<job hash><line, 8 hex>`), so the
audit streams the two result files and needs two bytes per input line.
"""

from __future__ import annotations

import array
import re
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from spoold import formats
from spoold.job import ERRORS, INPUT, OUTPUT

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


def audit(job_dir: Path, job_id: str, lines: int = -1, blank: list[int] | None = None) -> Audit:
    """Compare the input's non-blank lines with the lines the result files answer.
    `lines` and `blank` (the input's line count and its blank lines, as validation
    saw them) spare reading the input again; without them it is scanned."""
    if lines < 0 or blank is None:
        with open(job_dir / INPUT, "rb") as f:
            lines, blank = _scan_input(f)
    skipped = set(blank)
    prefix = formats.batch_request_id(job_id, 0)[:-8].encode()
    # One match per line: its line number in hex, or b"" for a line that names no line
    # of this job. A literal newline starts it (each block is given one), so the
    # regex engine goes from line to line in C.
    per_line = re.compile(rb'\n(?:\{"id":"' + re.escape(prefix) + rb'([0-9a-f]{8})")?')
    hexes: list[bytes] = []
    unnamed = 0
    for name in (OUTPUT, ERRORS):
        try:
            f = open(job_dir / name, "rb")  # noqa: SIM115 - closed by the with below
        except FileNotFoundError:
            continue
        with f:
            for block in _whole_lines(f):
                found = per_line.findall(block)
                unnamed += found.count(b"") - 1  # the newline ending the block starts no line
                hexes.append(b"".join(found))
    named = array.array("I", bytes.fromhex(b"".join(hexes).decode()))
    if sys.byteorder == "little":
        named.byteswap()  # fromhex gives big-endian numbers
    report = Audit(total=lines - len(skipped), accounted=len(named), foreign=unnamed)
    # How many results name each line (index = line number), against what balanced
    # books have: one for every non-blank line. Two bytes a line, compared in C.
    seen = bytearray(lines + 1)
    want = bytearray(b"\x01") * (lines + 1)
    want[0] = 0
    for line in skipped:
        want[line] = 0
    try:
        for line in named:
            seen[line] += 1
        if seen == want:
            return report  # the common case
    except (IndexError, ValueError):  # a line number past the input; 256 results a line
        pass
    counts = Counter(named)
    ours = {n: c for n, c in counts.items() if 0 < n <= lines and want[n]}
    report.repeated = sorted(n for n, c in ours.items() if c > 1)
    report.foreign += sum(counts.values()) - sum(ours.values())
    report.accounted = len(ours)
    report.missing = [n for n in range(1, lines + 1) if want[n] and n not in ours]
    return report


_BLOCK = 1 << 20
_HEAD = 1 << 16  # how much of a line is kept to judge whether it is blank
# A newline not followed by "{": the lines after these are the only ones that can be
# blank (rare).
_NOT_OBJECT = re.compile(rb"\n(?!\{)")


def _whole_lines(f: BinaryIO) -> Iterator[memoryview]:
    """A result file in blocks of whole lines (a torn last line included), each given a
    newline in front; views, not copies."""
    carry = b""
    while block := f.read(_BLOCK):
        data = b"\n" + carry + block
        cut = data.rfind(b"\n") + 1
        carry = data[cut:]
        if cut > 1:
            yield memoryview(data)[:cut]
        else:  # a line longer than the block: keep reading it (without the newline)
            carry = data[1:]
    if carry:
        yield memoryview(b"\n" + carry + b"\n")


def _scan_input(f: BinaryIO, size: int = _BLOCK) -> tuple[int, list[int]]:
    """(number of lines, the blank ones) of an input, in blocks rather than line by
    line: the lines that start with "{" (nearly all) are not even looked at. A line
    longer than 64 KiB is judged by its first 64 KiB and whether anything follows."""
    lines = 0
    blank: list[int] = []
    head = b""  # the start of the line the last block ended inside
    more = False  # that line has content past `head`

    def carry(rest: bytes) -> None:
        nonlocal head, more
        taken = max(0, _HEAD - len(head))
        head += rest[:taken]
        more = more or bool(rest[taken:].strip())

    while block := f.read(size):
        cut = block.find(b"\n") + 1
        if not cut:  # still inside one long line
            carry(block)
            continue
        carry(block[:cut])  # the line that spanned the blocks ends here
        if not more and is_blank(head, lines + 1):
            blank.append(lines + 1)
        lines += 1
        end = block.rfind(b"\n") + 1
        body = block[cut:end]
        for m in _NOT_OBJECT.finditer(b"\n" + body):
            pos = m.start()  # where the line starts in `body`
            if pos == len(body):
                break
            line_no = lines + body.count(b"\n", 0, pos) + 1
            if is_blank(body[pos : body.index(b"\n", pos)], line_no):
                blank.append(line_no)
        lines += body.count(b"\n")
        head, more = b"", False
        carry(block[end:])
    if head or more:  # a last line without a newline
        lines += 1
        if not more and is_blank(head, lines):
            blank.append(lines)
    return lines, blank


def is_blank(raw: bytes, line_no: int) -> bool:
    """Blank as validation sees it (`validate._load`): nothing but whitespace, Unicode
    whitespace included, after a first line's BOM. The common case, a line starting
    with a visible ASCII character, is decided without decoding."""
    head = raw.lstrip()
    # str.strip() also takes 0x1C-0x1F (and non-ASCII spaces) for whitespace.
    if head and 0x20 <= head[0] < 0x80:
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
