"""The spool's names, shared by the daemon and `spool-status` (imports nothing heavy)."""

import contextlib
import os
import re
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
# `spoold serve`'s own (design §11): uploaded files, and the records of batches.
FILES, BATCHES = "files", "batches"
# The name `spoold serve` gives a batch's input in incoming/: its job id is the batch id.
API_BATCH_RE = re.compile(r"batch_[0-9a-f]{32}")


def api_batch_id(name: str) -> str | None:
    """The batch id an incoming/ file name reserves as its job id (design §11), or None."""
    stem = name[: -len(JOB_SUFFIX)] if name.endswith(JOB_SUFFIX) else None
    return stem if stem is not None and API_BATCH_RE.fullmatch(stem) else None


def is_upload_in_progress(name: str) -> bool:
    return name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES)


def is_job_name(name: str) -> bool:
    """A name in incoming/ that is a job once its file settles (not an upload in progress)."""
    return name.endswith(JOB_SUFFIX) and not is_upload_in_progress(name)


def find_job_dir(spool: Path, job_id: str) -> Path | None:
    """Where a job is (processing/, done/ or failed/), or None. Never follows a path."""
    if not job_id or "/" in job_id or job_id.startswith("."):
        return None
    for where in (PROCESSING, DONE, FAILED):
        if (spool / where / job_id).is_dir():
            return spool / where / job_id
    retrying = spool / FAILED / f"{RETRY_PREFIX}{job_id}"  # an interrupted retry (R1)
    if retrying.is_dir():
        return retrying
    for entry in parked_entries(spool):
        if entry.name == job_id:
            return Path(entry.path)
    return None


def parked_entries(spool: Path) -> list[os.DirEntry[str]]:
    """Jobs parked in a lease directory (design §2 W3, C23): their daemon stopped
    between the two moves that file a job; the next recovery puts them back."""
    found: list[os.DirEntry[str]] = []
    try:
        with os.scandir(spool / HEARTBEATS) as it:
            leases = [e.path for e in it if e.name.startswith(".") and ".lease" in e.name]
    except FileNotFoundError:
        return found
    for lease in leases:
        # Not a directory, or gone meanwhile: nothing parked there.
        with contextlib.suppress(OSError), os.scandir(lease) as inner:
            found += [e for e in inner if e.is_dir(follow_symlinks=False)]
    return found


def retrying_entries(failed: Path) -> list[os.DirEntry[str]]:
    """Jobs a `spoold retry` was putting back in the queue when it was interrupted
    (`failed/.retry-<job_id>`, design §6a R1): still jobs, to every command."""
    try:
        with os.scandir(failed) as it:
            return [
                d for d in it if d.name.startswith(RETRY_PREFIX) and d.is_dir(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []


def in_transit_note(job_dir: Path) -> str | None:
    """What to do about a job caught between two places: in failed/.retry-<job_id> (an
    interrupted retry) or parked in a lease directory; None for a job in its place."""
    if job_dir.parent.parent.name == HEARTBEATS:
        return (
            f"{job_dir.name} is parked in {job_dir.parent.name} (its daemon was interrupted "
            "while filing it): the next recovery files it (a daemon's start, or a running "
            "daemon's next pass)"
        )
    if not job_dir.name.startswith(RETRY_PREFIX):
        return None
    job_id = job_dir.name[len(RETRY_PREFIX) :]
    return f"a `spoold retry` of {job_id} was interrupted: run `spoold retry {job_id}` again"


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
            return [e for e in it if is_job_name(e.name) and e.is_file(follow_symlinks=False)]
    except FileNotFoundError:
        return []


def count_waiting(incoming: Path) -> int:
    """How many jobs wait in incoming/ (see waiting_files)."""
    return len(waiting_files(incoming))
