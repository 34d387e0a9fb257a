"""custom_id uniqueness across a whole file, in memory that does not grow with the file.

Up to `IN_MEMORY` ids are kept in a dict. Beyond that, each id is appended to one of
several bucket files (by the id's hash) and the buckets are checked one at a
time after the pass, so memory is bounded by one bucket (~32K ids), whatever the job
size. Bucket files are dot-named `.tmp` files: start-up recovery removes strays.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

IN_MEMORY = 65_536  # ids checked in a dict (the default max_requests_per_job fits)
PER_BUCKET = 32_768
MAX_BUCKETS = 512
# A bucket record: the line number (negative for a line that is already invalid), the
# id's length, then the id's UTF-8 bytes.
_HEADER = struct.Struct("<qI")


class UniqueIds:
    """Collects (line, custom_id, valid) in line order; says which valid lines repeat an id.

    A line is a duplicate when its custom_id appeared on an earlier line (valid or not);
    only valid lines are reported (an invalid one already has its own error), unless
    every one is asked for.
    """

    def __init__(self, expected: int, spill_dir: Path | None) -> None:
        self._memory: dict[str, int] | None = {}
        self._dupes: list[tuple[int, str, int, bool]] = []
        self._files: list[BinaryIO] = []
        self._paths: list[Path] = []
        if expected > IN_MEMORY:
            if spill_dir is None:
                raise ValueError("more ids than fit in memory need a spill directory")
            self._memory = None
            buckets = min(MAX_BUCKETS, math.ceil(expected / PER_BUCKET))
            try:
                for i in range(buckets):
                    path = spill_dir / f".ids-{os.getpid()}-{i}.tmp"
                    self._paths.append(path)
                    self._files.append(open(path, "wb", buffering=1 << 16))  # noqa: SIM115
            except BaseException:
                self.close()  # no inode left for the next bucket: the first ones go too
                raise

    def add(self, line: int, custom_id: str, valid: bool) -> None:
        if self._memory is not None:
            first = self._memory.setdefault(custom_id, line)
            if first != line:
                self._dupes.append((line, custom_id, first, valid))
            return
        data = custom_id.encode("utf-8", "surrogatepass")
        # hash() differs between processes but not within one, and one pass is one
        # process: the same id always lands in the same bucket.
        bucket = self._files[hash(custom_id) % len(self._files)]
        bucket.write(_HEADER.pack(line if valid else -line, len(data)) + data)

    def duplicates(self, every: bool = False) -> Iterator[tuple[int, str, int]]:
        """(line, custom_id, first line) of every valid line (`every`: every line) that
        repeats an earlier id; in line order within one bucket."""
        if self._memory is not None:
            yield from ((line, i, first) for line, i, first, valid in self._dupes if valid or every)
            return
        for f, path in zip(self._files, self._paths, strict=True):
            f.close()
            data = path.read_bytes()  # one bucket: ~PER_BUCKET ids
            path.unlink()
            seen: dict[bytes, int] = {}
            pos, end, size = 0, len(data), _HEADER.size
            while pos < end:
                signed, length = _HEADER.unpack_from(data, pos)
                key = data[pos + size : pos + size + length]
                pos += size + length
                line = abs(signed)
                first = seen.setdefault(key, line)
                if first != line and (signed > 0 or every):
                    yield line, key.decode("utf-8", "surrogatepass"), first
        self._files = []

    def close(self) -> None:
        """Close and remove every bucket, also when closing one fails: on a full disk
        the flush of its buffered records raises, and the buckets must go all the same."""
        error: OSError | None = None
        for f in self._files:
            try:
                f.close()  # closes the descriptor even when the flush before it fails
            except OSError as e:
                error = error or e
        self._files = []
        for path in self._paths:
            path.unlink(missing_ok=True)
        self._paths = []
        if error is not None:
            raise error

    def __enter__(self) -> UniqueIds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
