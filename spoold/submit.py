"""Putting work into incoming/ safely: `spoold submit` and `spoold retry`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from spoold import fsio
from spoold.job import (
    CANCEL,
    CANCELLED,
    ERRORS,
    FAILED,
    INPUT,
    OWNER,
    QUEUED,
    load_state,
    save_state,
)
from spoold.layout import RETRY_PREFIX, find_job_dir, in_transit_note
from spoold.spool import Spool
from spoold.validate import Request, scan_file

# Errors worth running again: the engine failed, not the request's content.
RETRYABLE_CODES = {"engine_error", "engine_timeout"}


class SubmitError(Exception):
    """A submission that cannot be made; the message says what to do."""


def _publish(incoming: Path, name: str, chunks: Iterable[bytes]) -> str:
    """Write under a temp name, fsync, then take `name` (or `name-1`, …) without replacing."""
    tmp = fsio.write_temp(incoming, name, chunks)
    stem = name[: -len(".jsonl")]
    try:
        for candidate in (name, *(f"{stem}-{i}.jsonl" for i in range(1, 1000))):
            try:
                fsio.publish(tmp, incoming / candidate)
            except FileExistsError:
                continue
            return candidate
    finally:
        tmp.unlink(missing_ok=True)
    raise SubmitError(f"incoming/ already holds too many files named like {name}")


def _read_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            yield block


def submit_file(spool: Spool, path: Path) -> str:
    """Copy `path` into incoming/ (temp name, fsync, publish). Returns the name used."""
    if not path.name.endswith(".jsonl"):
        raise SubmitError(f"{path}: only .jsonl files are jobs; rename it to end in .jsonl")
    if not path.is_file():
        raise SubmitError(f"{path}: no such file")
    spool.ensure_layout()
    # A name starting with "." is an upload in progress to the daemon: it loses its dots.
    name = (path.name[: -len(".jsonl")].lstrip(".") or "job") + ".jsonl"
    return _publish(spool.incoming, name, _read_chunks(path))


def find_job(spool: Spool, job_id: str) -> Path:
    """The directory of a job, wherever it is. Raises SubmitError if there is none."""
    found = find_job_dir(spool.root, job_id)
    if found is None:
        raise SubmitError(
            f"no job {job_id!r} in {spool.root} (looked in processing/, done/, failed/)"
        )
    return found


def retry_job(spool: Spool, job_id: str, max_line_bytes: int) -> str:
    """`spoold retry`: a cancelled or wholly failed job goes back in the queue under its
    id (design §6a); a finished one gets a new file in incoming/ with its retryable
    failed requests. Returns what was done, as the line to print."""
    job_dir = find_job(spool, job_id)
    staging = spool.failed / f"{RETRY_PREFIX}{job_id}"
    if job_dir == staging:  # R1 (design §6a)
        return _requeue(spool, staging, job_id) + " (it finishes a retry that was interrupted)"
    if job_dir.parent.parent == spool.heartbeats:  # parked (design §2 C23)
        raise SubmitError(f"{in_transit_note(job_dir)}; retry it once it is filed")
    if job_dir.parent == spool.processing:
        # Its errors.jsonl may hold an uncommitted tail, and its run is not over.
        raise SubmitError(
            f"job {job_id} is still in processing/ (queued or running): retry it once it "
            "has finished, or `spoold cancel` it first"
        )
    if job_dir.parent == spool.failed:
        try:
            state = load_state(job_dir)
        except (OSError, ValueError) as e:
            if not job_dir.exists():  # another retry took it aside since we found it
                raise _moved(job_id) from None
            raise SubmitError(f"job {job_id}: cannot read its state.json ({e})") from None
        if state.input_size < 0:
            raise SubmitError(
                f"job {job_id} was rejected before it was queued ({state.error}): fix the "
                "file (or the limit) and submit it again"
            )
        if not (job_dir / INPUT).is_file():
            if not job_dir.exists():
                raise _moved(job_id)
            raise SubmitError(
                f"job {job_id} has no {INPUT} any more: submit the file again as a new job"
            )
        if state.status in (FAILED, CANCELLED):
            try:
                fsio.move(job_dir, staging)  # step 1: the rename is the lock
            except FileNotFoundError:
                raise _moved(job_id) from None
            return _requeue(spool, staging, job_id)
    return _new_file_of_failures(spool, job_dir, job_id, max_line_bytes)


def _moved(job_id: str) -> SubmitError:
    return SubmitError(f"job {job_id} moved meanwhile (is another `spoold retry` at work?)")


def _requeue(spool: Spool, staging: Path, job_id: str) -> str:
    """Design §6a steps 2-4, from failed/.retry-<job_id>/ into processing/."""
    try:
        fsio.remove(staging / CANCEL)  # step 2
        fsio.remove(staging / OWNER)
        try:
            state = load_state(staging)
        except ValueError as e:
            raise SubmitError(f"job {job_id}: cannot read its state.json ({e})") from None
        if state.status != QUEUED:  # a run of ours interrupted after step 3 wrote it
            state.requeue()
            save_state(staging, state)  # step 3
        spool.ensure_layout()
        fsio.move(staging, spool.processing / job_id)  # step 4
    except (FileNotFoundError, FileExistsError):
        raise SubmitError(
            f"job {job_id} moved meanwhile (is another `spoold retry` at work?): "
            "`spoold jobs` shows where it is"
        ) from None
    c = state.request_counts
    return (
        f"job {job_id} is queued again: it resumes from its checkpoint "
        f"({c.completed + c.failed} of {c.total} requests done)"
    )


def _new_file_of_failures(spool: Spool, job_dir: Path, job_id: str, max_line_bytes: int) -> str:
    """A new file in incoming/ with the job's retryable failed requests."""
    wanted: set[str] = set()
    try:
        with open(job_dir / ERRORS, "rb") as f:
            for raw in f:
                record = json.loads(raw)
                if (record.get("error") or {}).get("code") in RETRYABLE_CODES:
                    wanted.add(record["custom_id"])
    except FileNotFoundError:
        pass
    if not wanted:
        raise SubmitError(
            f"job {job_id} has no failed requests that can be retried "
            f"(only {', '.join(sorted(RETRYABLE_CODES))} errors are; invalid requests "
            "must be fixed and submitted as a new file)"
        )
    count = 0

    def lines() -> Iterator[bytes]:
        nonlocal count
        with open(job_dir / INPUT, "rb") as f:
            for item in scan_file(f, max_line_bytes):
                # First occurrence only: a repeated custom_id was never run.
                if isinstance(item, Request) and item.custom_id in wanted:
                    wanted.discard(item.custom_id)
                    count += 1
                    record = {
                        "custom_id": item.custom_id,
                        "method": "POST",
                        "url": item.url,
                        "body": item.body,
                    }
                    yield json.dumps(record, ensure_ascii=False).encode() + b"\n"

    spool.ensure_layout()
    name = _publish(spool.incoming, f"{job_id}.retry.jsonl", lines())
    return f"{spool.incoming / name} ({count} {'request' if count == 1 else 'requests'})"
