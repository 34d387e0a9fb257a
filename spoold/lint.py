"""`spoold validate FILE`: every problem of every line, in line order, as the daemon
would judge the file (validation, unique custom_ids, one model per job).

Pure over an open file; the command prints what this yields and adds the file-level
checks (name, size, limits).
"""

from __future__ import annotations

import heapq
import tempfile
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

import orjson

from spoold.validate import DUPLICATE, NotUtf8Error, Request, one_model, scan_file


@dataclass
class Tally:
    """What the lines came to: `requests` non-blank lines, `invalid` of them with a problem."""

    requests: int = 0
    invalid: int = 0


def counted(n: int, noun: str) -> str:
    """'1 request', '2 requests'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def line_problems(
    f: BinaryIO,
    max_line_bytes: int,
    resolve: Callable[[object], str],
    tally: Tally,
    expected: int = 0,
) -> Iterator[tuple[int, str]]:
    """(line, problem) for every problem of every line of `f`, in line order; `tally` is
    complete once all are out. A file that is not UTF-8 raises NotUtf8Error after the
    problems of the lines before it.

    Streamed: a repeated custom_id is known only at the end of the pass (past
    `expected` ids, `scan_file` checks them from files on disk), so the lines' own
    problems wait in a temporary file and the repeats are merged in by line number
    (memory: 16 bytes a repeated id).
    """
    with tempfile.TemporaryFile() as own, tempfile.TemporaryFile() as repeats:
        lines, offsets = array("q"), array("q")
        late: NotUtf8Error | None = None
        try:
            items = scan_file(f, max_line_bytes, expected=expected, every_duplicate=True)
            for item in one_model(items, resolve, one_error_a_line=False):
                if isinstance(item, Request):
                    tally.requests += 1
                elif item.code == DUPLICATE:  # a second look at a line already counted
                    lines.append(item.line)
                    offsets.append(repeats.tell())
                    repeats.write(orjson.dumps(item.problems[0]) + b"\n")
                else:
                    tally.requests += 1
                    for problem in item.problems:
                        own.write(orjson.dumps([item.line, problem]) + b"\n")
        except NotUtf8Error as e:
            late = e
        own.seek(0)
        last = 0
        # heapq.merge is stable: a line's own problems come before its repeated id.
        for line, problem in heapq.merge(_read(own), _in_order(repeats, lines, offsets), key=_line):
            if line != last:
                tally.invalid += 1
                last = line
            yield line, problem
        if late is not None:
            raise late


def _line(record: tuple[int, str]) -> int:
    return record[0]


def _read(own: BinaryIO) -> Iterator[tuple[int, str]]:
    for record in own:
        line, problem = orjson.loads(record)
        yield line, problem


def _in_order(
    repeats: BinaryIO, lines: array[int], offsets: array[int]
) -> Iterator[tuple[int, str]]:
    """The repeated ids' problems by line: as written when they came in order (the ids
    fitted in memory), else sorted."""
    repeats.seek(0)
    if all(lines[i] < lines[i + 1] for i in range(len(lines) - 1)):
        for line in lines:
            yield line, orjson.loads(repeats.readline())
        return
    for i in sorted(range(len(lines)), key=lines.__getitem__):
        repeats.seek(offsets[i])
        yield lines[i], orjson.loads(repeats.readline())
