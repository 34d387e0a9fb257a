"""The spool's names, shared by the daemon and `spool-status` (imports nothing heavy)."""

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
