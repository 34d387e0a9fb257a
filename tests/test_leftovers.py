"""Nothing accumulates (SPEC §3): whatever restarts, take-overs and full disks a job went
through, its directory holds only the documented files, and the spool no temp files.

Real processes, real SIGKILLs, a real full filesystem (a small tmpfs filled up).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from spoold.unique import IN_MEMORY, UniqueIds
from tests.test_fsio import fill, mounted_tmpfs


def test_id_buckets_are_removed_when_the_disk_fills_during_validation(tmp_path: Path) -> None:
    """A job of more than IN_MEMORY ids spills them to `.ids-*.tmp` buckets in its job
    directory; a full disk fails the bucket writes (and the flush at close): every bucket
    is still removed."""
    with mounted_tmpfs(tmp_path / "job", size="512k") as job:
        fill(job / "filler")
        with pytest.raises(OSError), UniqueIds(IN_MEMORY * 4, job) as ids:
            for line in range(1, 200_000):
                ids.add(line, f"custom-id-{line}", True)
        assert [p.name for p in job.iterdir()] == ["filler"]
        os.unlink(job / "filler")
        with UniqueIds(IN_MEMORY * 4, job) as ids:  # and with room, after the pass
            for line in range(1, 1000):
                ids.add(line, f"custom-id-{line % 500}", True)
            assert len(list(ids.duplicates())) == 499
        assert list(job.iterdir()) == []
