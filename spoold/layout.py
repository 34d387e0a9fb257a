"""The spool's names, shared by the daemon and `spool-status` (imports nothing heavy)."""

import os
from pathlib import Path

INCOMING, PROCESSING, DONE, FAILED, HEARTBEATS = (
    "incoming",
    "processing",
    "done",
    "failed",
    "heartbeats",
)
# Uploads in progress (rsync, WinSCP, `spoold submit`…) are left alone.
IN_PROGRESS_SUFFIXES = (".tmp", ".part", ".partial", ".filepart")
JOB_SUFFIX = ".jsonl"
# A job `spoold retry` is putting back in the queue (design §6a).
RETRY_PREFIX = ".retry-"


def is_upload_in_progress(name: str) -> bool:
    return name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES)


def find_job_dir(spool: Path, job_id: str) -> Path | None:
    """Where a job is (processing/, done/ or failed/), or None. Never follows a path."""
    if not job_id or "/" in job_id or job_id.startswith("."):
        return None
    for where in (PROCESSING, DONE, FAILED):
        if (spool / where / job_id).is_dir():
            return spool / where / job_id
    return None


def job_dir_entries(base: Path) -> list[os.DirEntry[str]]:
    """Job directories directly in `base` (dot-named staging dirs excluded), unsorted."""
    try:
        with os.scandir(base) as it:
            return [d for d in it if not d.name.startswith(".") and d.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def waiting_files(incoming: Path) -> list[os.DirEntry[str]]:
    """Files in incoming/ that are jobs not yet claimed (uploads in progress excluded),
    unsorted. Symlinks are not jobs (never followed)."""
    try:
        with os.scandir(incoming) as it:
            return [
                e
                for e in it
                if e.name.endswith(JOB_SUFFIX)
                and not is_upload_in_progress(e.name)
                and e.is_file(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []


def count_waiting(incoming: Path) -> int:
    """How many jobs wait in incoming/ (see waiting_files)."""
    return len(waiting_files(incoming))
