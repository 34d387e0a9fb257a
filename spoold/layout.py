"""The spool's names, shared by the daemon and `spool-status` (imports nothing)."""

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
