"""The OpenAI Files and Batches API's objects, read from and written to the spool.

Design §11 is the protocol: every change here is one of its steps, every answer is read
from the spool, and what is cached never changes once written (a job's `created_at`, a
batch record, an uploaded file's record), so several servers may share one spool. No
web framework is imported here: `spoold/serve.py` is the HTTP side, the benchmark and the
tests call this directly.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import structlog

from spoold import fsio
from spoold.heartbeat import parse_time
from spoold.job import CANCEL, CANCELLED, COMPLETED, ERRORS, INPUT, OUTPUT, RUNNING, STATE
from spoold.jobs import read_small_file
from spoold.layout import (
    API_BATCH_RE,
    BATCHES,
    DONE,
    FAILED,
    FILES,
    HEARTBEATS,
    INCOMING,
    JOB_SUFFIX,
    PROCESSING,
    RETRY_PREFIX,
    find_job_dir,
    job_dir_entries,
    parked_entries,
    retrying_entries,
)
from spoold.validate import SUPPORTED_URLS

log = structlog.get_logger()

ENDPOINTS = SUPPORTED_URLS  # what a batch may name: what a job's lines may
COMPLETION_WINDOWS = ("24h",)
FILE_RECORD, CONTENT = "file.json", "content"
UPLOAD_PREFIX, DELETED_PREFIX = ".upload-", ".deleted-"
CANCEL_SUFFIX, RECORD_SUFFIX, WITHDRAWN_SUFFIX = ".cancel", ".json", ".withdrawn.jsonl"
RESULT_KINDS = {"output": OUTPUT, "errors": ERRORS, "input": INPUT}
WRITE_BLOCK = 1 << 20
STALE_UPLOAD_S = 24 * 3600  # an upload dir of another host unchanged this long is dead
ORPHAN_AFTER_S = 3600  # a batch record found nowhere this long after creation (B1)
EXPIRY_S = 24 * 3600  # completion_window "24h": expires_at (spoold never expires a batch)
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
HOST = socket.gethostname()


class ApiError(Exception):
    """An answer in OpenAI's error shape: HTTP status, message, param, code."""

    status = 400
    kind = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class Invalid(ApiError):
    status = 400


class NotFound(ApiError):
    status = 404


class TooLarge(ApiError):
    status = 413


def _ts(value: Any) -> int | None:
    seconds = parse_time(value)
    return None if seconds is None else int(seconds)


def _read_record(path: str | Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is gone, unreadable or not an object."""
    try:
        raw = orjson.loads(read_small_file(str(path)))
    except (OSError, orjson.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def visible(record_owner: Any, owner: str | None) -> bool:
    """A key without an owner (`owner` None) sees everything; one with an owner sees what
    was created with a key of that owner only."""
    return owner is None or record_owner == owner


@dataclass
class Found:
    """Where a batch is now (design §11 "Where a batch is")."""

    where: str  # incoming, processing, done, failed, staging, withdrawn
    path: Path  # the waiting file, the job directory, or the withdrawn input
    state: dict[str, Any] | None  # the job's state.json, when it has one that reads


@dataclass
class Content:
    """What a file's content endpoint streams: `length` bytes of `path` from the start."""

    path: Path
    length: int
    filename: str


class Upload:
    """One upload in progress (design §11 "Upload"): bytes go to a dot-named directory in
    files/, which becomes the file only by its final rename."""

    def __init__(self, store: Store, owner: str | None) -> None:
        self.store, self.owner = store, owner
        self.dir = store.files / f"{UPLOAD_PREFIX}{HOST}-{os.getpid()}-{secrets.token_hex(6)}"
        fsio.make_dir(store.files)
        self.dir.mkdir()  # step 1
        self._f = open(self.dir / CONTENT, "xb", buffering=0)  # noqa: SIM115
        self.size = 0
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        """Step 2: buffered into 1 MiB writes; past limits.max_file_bytes: TooLarge."""
        self.size += len(data)
        if self.size > self.store.max_file_bytes:
            raise TooLarge(
                f"File too large: over {self.store.max_file_bytes} bytes "
                "(limits.max_file_bytes on the server); split it into several batches",
                param="file",
                code="file_too_large",
            )
        self._buf += data

    def pending(self) -> bool:
        """Whether a full block waits for `flush()` (which the server calls off its event
        loop: a write to a hung NFS server must not stop every other request)."""
        return len(self._buf) >= WRITE_BLOCK

    def flush(self) -> None:
        written = 0
        with memoryview(self._buf) as view:
            while written < len(view):
                written += self._f.write(view[written:])
        self._buf.clear()

    def finish(self, filename: str, purpose: str) -> dict[str, Any]:
        """Steps 3 and 4: fsync, the record, the rename. Returns the File object."""
        self.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        file_id = f"file-{secrets.token_hex(12)}"
        record = {
            "id": file_id,
            "object": "file",
            "bytes": self.size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "owner": self.owner,
        }
        fsio.atomic_write(self.dir / FILE_RECORD, orjson.dumps(record))
        fsio.move(self.dir, self.store.files / file_id)  # step 4: the file exists
        return _file_object(record)

    def abort(self) -> None:
        """Remove the upload directory: nothing of a refused upload stays on disk."""
        with contextlib.suppress(OSError):
            self._f.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _file_object(record: dict[str, Any]) -> dict[str, Any]:
    """An uploaded file's record as OpenAI's File object (the owner stays inside)."""
    return {
        "id": record["id"],
        "object": "file",
        "bytes": record["bytes"],
        "created_at": record["created_at"],
        "filename": record["filename"],
        "purpose": record["purpose"],
        "status": "processed",
        "status_details": None,
    }


class Store:
    """Files and batches over one spool."""

    def __init__(self, spool: Path, max_file_bytes: int) -> None:
        self.spool = spool
        self.max_file_bytes = max_file_bytes
        self.files = spool / FILES
        self.batches = spool / BATCHES
        self._lock = threading.Lock()
        # Facts that never change once written (design §11): safe to keep.
        self._created: dict[str, float] = {}  # job id -> its state.json's created_at
        self._records: dict[str, dict[str, Any]] = {}  # batch id -> batches/<id>.json
        self._endpoints: dict[str, str] = {}  # job id -> url of its first request
        # The last listing of the job directories, while they are unchanged (_dirs_key).
        self._listing: tuple[Any, dict[str, str | None], set[str]] | None = None
        self._ordered: tuple[Any, list[tuple[float, str]]] | None = None

    def ensure_layout(self) -> None:
        for d in (self.files, self.batches, self.spool / INCOMING):
            fsio.make_dir(d)

    # -- files ----------------------------------------------------------------------

    def new_upload(self, owner: str | None) -> Upload:
        return Upload(self, owner)

    def _upload_record(self, file_id: str, owner: str | None) -> dict[str, Any]:
        record = None
        if _is_upload_id(file_id):
            record = _read_record(self.files / file_id / FILE_RECORD)
        if record is None or not visible(record.get("owner"), owner):
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return record

    def _result_file(self, file_id: str, owner: str | None) -> tuple[dict[str, Any], Content]:
        """A batch's input, output or errors file, named `file-<batch_id>-<kind>`."""
        stem, _, kind = file_id.removeprefix("file-").rpartition("-")
        found = None
        if file_id.startswith("file-") and kind in RESULT_KINDS and stem:
            found = self.locate(stem) if self._visible_batch(stem, owner) else None
        result = None if found is None else self._result(stem, kind, found)
        if result is None:
            raise NotFound(f"No such File object: {file_id}", param="file_id")
        return result

    def _result(
        self, batch_id: str, kind: str, found: Found
    ) -> tuple[dict[str, Any], Content] | None:
        if kind == "input":
            if self._record(batch_id) is not None or found.where in ("incoming", "withdrawn"):
                return None  # an API batch's input is the file it was created from
            path, length = found.path / INPUT, None
            created = _ts((found.state or {}).get("created_at"))
        else:
            if found.where not in (DONE, FAILED) or found.state is None:
                return None  # results are files once the batch is final
            path = found.path / RESULT_KINDS[kind]
            checkpoint = found.state.get("checkpoint") or {}
            length = checkpoint.get(f"{kind}_bytes")
            created = _ts(found.state.get("finished_at"))
        try:
            size = path.stat().st_size
        except OSError:
            return None
        # What the job committed, never more (a result file is exactly that once final).
        length = size if not isinstance(length, int) else min(length, size)
        if kind != "input" and length == 0:
            return None
        name = f"{batch_id}_{kind}.jsonl"
        obj = {
            "id": f"file-{batch_id}-{kind}",
            "object": "file",
            "bytes": length,
            "created_at": created or 0,
            "filename": name,
            "purpose": "batch" if kind == "input" else "batch_output",
            "status": "processed",
            "status_details": None,
        }
        return obj, Content(path, length, name)

    def get_file(self, file_id: str, owner: str | None) -> dict[str, Any]:
        if not _is_upload_id(file_id):
            return self._result_file(file_id, owner)[0]
        return _file_object(self._upload_record(file_id, owner))

    def file_content(self, file_id: str, owner: str | None) -> Content:
        if not _is_upload_id(file_id):
            return self._result_file(file_id, owner)[1]
        record = self._upload_record(file_id, owner)
        return Content(self.files / file_id / CONTENT, record["bytes"], record["filename"])

    def list_files(
        self,
        owner: str | None,
        purpose: str | None = None,
        limit: int = 10_000,
        after: str | None = None,
        order: str = "desc",
    ) -> tuple[list[dict[str, Any]], bool]:
        """Uploaded files visible to `owner`, by created_at (desc by default). A batch's
        result files are not listed: they are reached from the batch."""
        found = []
        for entry in _dir_entries(self.files):
            if not _is_upload_id(entry.name):
                continue
            record = _read_record(os.path.join(entry.path, FILE_RECORD))
            if record is None or not visible(record.get("owner"), owner):
                continue
            if purpose is not None and record.get("purpose") != purpose:
                continue
            found.append(_file_object(record))
        found.sort(key=lambda f: (f["created_at"], f["id"]), reverse=order != "asc")
        return _page(found, limit, after, "file")

    def delete_file(self, file_id: str, owner: str | None) -> dict[str, Any]:
        if not _is_upload_id(file_id):
            self._result_file(file_id, owner)  # 404 if it is not there for this key
            raise Invalid(
                f"{file_id} is a batch's result file: it is part of the job on the spool "
                "and is not deleted through the API",
                param="file_id",
            )
        self._upload_record(file_id, owner)
        gone = self.files / f"{DELETED_PREFIX}{file_id}-{secrets.token_hex(4)}"
        try:
            fsio.move(self.files / file_id, gone)  # the rename is the lock between deletes
        except FileNotFoundError:
            raise NotFound(f"No such File object: {file_id}", param="file_id") from None
        shutil.rmtree(gone, ignore_errors=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # -- batches: where, and what ----------------------------------------------------

    def _record(self, batch_id: str) -> dict[str, Any] | None:
        record = self._records.get(batch_id)
        if record is None and API_BATCH_RE.fullmatch(batch_id):
            record = _read_record(self.batches / f"{batch_id}{RECORD_SUFFIX}")
            if record is not None:
                with self._lock:
                    self._records[batch_id] = record
        return record

    def _record_ids(self) -> set[str]:
        return {
            e.name[: -len(RECORD_SUFFIX)]
            for e in _dir_entries(self.batches)
            if e.name.endswith(RECORD_SUFFIX) and API_BATCH_RE.fullmatch(e.name[:-5])
        }

    def _visible_batch(self, batch_id: str, owner: str | None) -> bool:
        if owner is None:
            return True
        record = self._record(batch_id)
        return record is not None and record.get("owner") == owner

    def locate(self, batch_id: str) -> Found | None:
        """Where the batch is, looked at in the order jobs move (design §11); twice."""
        if not batch_id or "/" in batch_id or batch_id.startswith("."):
            return None
        for _ in range(2):
            found = self._look(batch_id)
            if found is not None:
                return found
        return None

    def _look(self, batch_id: str) -> Found | None:
        api = API_BATCH_RE.fullmatch(batch_id) is not None
        # A job first, then its file waiting: a file of the same name dropped again by
        # hand must not make a finished batch look new (a move between the two looks is
        # caught by locate's second look).
        job_dir = find_job_dir(self.spool, batch_id)
        if job_dir is None and api:
            waiting = self.spool / INCOMING / f"{batch_id}{JOB_SUFFIX}"
            if os.path.lexists(waiting):
                return Found("incoming", waiting, None)
        if job_dir is not None:
            state = _read_record(job_dir / STATE)
            parent = job_dir.parent.name
            if job_dir.name.startswith(RETRY_PREFIX) or job_dir.parent.parent.name == HEARTBEATS:
                parent = PROCESSING  # in transit between two places: not final yet
            return Found(parent, job_dir, state)
        for base in (PROCESSING, FAILED):
            for entry in _dir_entries(self.spool / base):
                if entry.name.startswith(".") and entry.name.endswith(f"+{batch_id}"):
                    return Found("staging", Path(entry.path), None)
        if api:
            withdrawn = self.batches / f"{batch_id}{WITHDRAWN_SUFFIX}"
            if withdrawn.exists():
                return Found("withdrawn", withdrawn, None)
        return None

    def _status(self, batch_id: str, found: Found) -> str:
        state = found.state or {}
        said = state.get("status")
        if found.where == "withdrawn" or (found.where == FAILED and said == CANCELLED):
            return "cancelled"
        if found.where == FAILED:
            return "failed"
        if found.where == DONE:
            return "completed"
        if (found.where == PROCESSING and (found.path / CANCEL).exists()) or (
            self.batches / f"{batch_id}{CANCEL_SUFFIX}"
        ).exists():
            return "cancelling"
        if found.where == PROCESSING and said in (COMPLETED, FAILED, CANCELLED):
            return "finalizing"
        if found.where == PROCESSING and (said == RUNNING or state.get("started_at")):
            return "in_progress"
        return "validating"

    def _endpoint(self, batch_id: str, found: Found) -> str:
        """A job not created through the API: the url of its first request."""
        if batch_id in self._endpoints:
            return self._endpoints[batch_id]
        url = ENDPOINTS[0]
        with contextlib.suppress(OSError), open(found.path / INPUT, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                with contextlib.suppress(orjson.JSONDecodeError):
                    request = orjson.loads(line)
                    if isinstance(request, dict) and isinstance(request.get("url"), str):
                        url = request["url"]
                break
            with self._lock:
                self._endpoints[batch_id] = url
        return url

    def batch_object(self, batch_id: str, found: Found) -> dict[str, Any]:
        """OpenAI's Batch object for a batch found on the spool."""
        record = self._record(batch_id)
        state = found.state or {}
        status = self._status(batch_id, found)
        created = (record or {}).get("created_at")
        if not isinstance(created, int):
            created = _ts(state.get("created_at"))
        if created is None:
            created = int(_mtime(found.path) or 0)
        finished = _ts(state.get("finished_at"))
        counts = state.get("request_counts") or {}
        cancel_at = None
        markers = [self.batches / f"{batch_id}{CANCEL_SUFFIX}"]
        if found.where in (PROCESSING, FAILED):
            markers.insert(0, found.path / CANCEL)
        for marker in markers:
            if (seen := _mtime(marker)) is not None:
                cancel_at = int(seen)
                break
        withdrawn = found.where == "withdrawn"
        if withdrawn:
            finished = cancel_at or int(_mtime(found.path) or 0)
        final = status in ("completed", "failed", "cancelled")
        errors = None
        if status == "failed" and state.get("error"):
            errors = {
                "object": "list",
                "data": [
                    {"code": "batch_failed", "message": state["error"], "param": None, "line": None}
                ],
            }
        results: dict[str, str | None] = {}
        for kind in ("output", "errors"):
            result = self._result(batch_id, kind, found) if final and not withdrawn else None
            results[kind] = None if result is None else result[0]["id"]
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": (record or {}).get("endpoint") or self._endpoint(batch_id, found),
            "errors": errors,
            "input_file_id": (record or {}).get("input_file_id") or f"file-{batch_id}-input",
            "completion_window": (record or {}).get("completion_window") or "24h",
            "status": status,
            "output_file_id": results["output"],
            "error_file_id": results["errors"],
            "created_at": created,
            "in_progress_at": _ts(state.get("started_at")),
            "expires_at": created + EXPIRY_S,
            "finalizing_at": finished if status == "completed" else None,
            "completed_at": finished if status == "completed" else None,
            "failed_at": finished if status == "failed" else None,
            "expired_at": None,
            "cancelling_at": cancel_at if status in ("cancelling", "cancelled") else None,
            "cancelled_at": finished if status == "cancelled" else None,
            "request_counts": {
                k: counts.get(k, 0) if isinstance(counts.get(k, 0), int) else 0
                for k in ("total", "completed", "failed")
            },
            "metadata": (record or {}).get("metadata"),
            "model": state.get("model"),
        }

    def get_batch(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        found = self.locate(batch_id) if self._visible_batch(batch_id, owner) else None
        if found is None:
            raise NotFound(f"No such Batch object: {batch_id}", param="batch_id")
        return self.batch_object(batch_id, found)

    # -- batches: create, list, cancel -------------------------------------------------

    def create_batch(
        self,
        owner: str | None,
        input_file_id: Any,
        endpoint: Any,
        completion_window: Any,
        metadata: Any,
    ) -> dict[str, Any]:
        """Design §11 "Create a batch"."""
        if not isinstance(input_file_id, str) or not input_file_id:
            raise Invalid("Missing required parameter: 'input_file_id'.", param="input_file_id")
        if endpoint not in ENDPOINTS:
            raise Invalid(
                f"Invalid value for 'endpoint': {endpoint!r}; spoold serves {', '.join(ENDPOINTS)}",
                param="endpoint",
                code="invalid_value",
            )
        if completion_window not in COMPLETION_WINDOWS:
            raise Invalid(
                f"Invalid value for 'completion_window': {completion_window!r}; "
                "the only supported value is '24h'",
                param="completion_window",
                code="invalid_value",
            )
        _check_metadata(metadata)
        if not _is_upload_id(input_file_id):
            raise NotFound(f"No such File object: {input_file_id}", param="input_file_id")
        try:
            file = self._upload_record(input_file_id, owner)
        except NotFound as e:
            e.param = "input_file_id"
            raise
        if file.get("purpose") != "batch":
            raise Invalid(
                f"{input_file_id} was uploaded with purpose {file.get('purpose')!r}, not 'batch'",
                param="input_file_id",
            )
        batch_id = f"batch_{secrets.token_hex(16)}"
        record = {
            "id": batch_id,
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": completion_window,
            "metadata": metadata,
            "owner": owner,
            "created_at": int(time.time()),
        }
        self.ensure_layout()
        fsio.atomic_write(self.batches / f"{batch_id}{RECORD_SUFFIX}", orjson.dumps(record))
        try:
            self._enqueue(self.files / input_file_id / CONTENT, f"{batch_id}{JOB_SUFFIX}")
        except FileNotFoundError:  # deleted meanwhile: the record is a B1 orphan
            raise NotFound(f"No such File object: {input_file_id}", param="input_file_id") from None
        with self._lock:
            self._records[batch_id] = record
        log.info("batch created", job_id=batch_id, input_file_id=input_file_id, owner=owner)
        # Answered from what was just written, not looked up again: a daemon may be
        # claiming it this instant, and a batch just made is `validating` whatever it does.
        waiting = self.spool / INCOMING / f"{batch_id}{JOB_SUFFIX}"
        return self.batch_object(batch_id, Found("incoming", waiting, None))

    def _enqueue(self, content: Path, name: str) -> None:
        """Step 3: the input enters incoming/ whole: a copy in a dot-named temp, fsync,
        then `fsio.publish`. Never a hard link of the upload: a link, unlink or rename of
        any name of an inode changes its ctime, which the daemon reads as an input changed
        under a running job (design §5c) — a delete of the upload, or a second batch made
        from it, would restart the first from scratch."""
        incoming = self.spool / INCOMING
        with open(content, "rb") as f:
            tmp = fsio.write_temp(incoming, name, iter(lambda: f.read(WRITE_BLOCK), b""))
        try:
            fsio.publish(tmp, incoming / name)
        finally:
            tmp.unlink(missing_ok=True)

    def _dirs_key(self) -> tuple[tuple[int, int], ...] | None:
        """The directories a listing reads, as (inode, mtime): unchanged since the last
        listing means the same entries. None when one changed within the last second
        (a directory's mtime is coarse: two changes in one tick look like one), or cannot
        be read: then the listing is read afresh."""
        key = []
        now = time.time_ns()
        for d in (self.spool / PROCESSING, self.spool / DONE, self.spool / FAILED, self.batches):
            try:
                st = d.stat()
            except FileNotFoundError:
                key.append((0, 0))
                continue
            except OSError:
                return None
            if now - st.st_mtime_ns < 1_000_000_000:
                return None
            key.append((st.st_ino, st.st_mtime_ns))
        return tuple(key)

    def _listed(self) -> tuple[dict[str, str | None], set[str]]:
        """Job directories (id -> its directory) and batch records, from the listings of
        processing/, done/, failed/ and batches/ (kept while those are unchanged)."""
        key = self._dirs_key()
        cached = self._listing
        if key is not None and cached is not None and cached[0] == key:
            return cached[1], cached[2]
        jobs: dict[str, str | None] = {}
        for base in (PROCESSING, DONE, FAILED):
            for entry in job_dir_entries(self.spool / base):
                jobs[entry.name] = entry.path
        for entry in retrying_entries(self.spool / FAILED):
            jobs[entry.name[len(RETRY_PREFIX) :]] = entry.path
        records = self._record_ids()
        for batch_id in records:  # waiting, withdrawn, or on its way: its record says when
            jobs.setdefault(batch_id, None)
        with self._lock:
            self._listing = (key, jobs, records) if key is not None else None
        return jobs, records

    def _candidates(self, owner: str | None) -> list[tuple[float, str]]:
        """(created, id) of every batch `owner` may see, unsorted, from directory
        listings and the cached never-changing facts."""
        jobs, records = self._listed()
        for batch_id in records - self._records.keys():
            self._record(batch_id)
        if owner is not None:
            out = []
            for batch_id in records:
                record = self._records.get(batch_id)
                if record is not None and record.get("owner") == owner:
                    out.append((float(record.get("created_at") or 0), batch_id))
            return out
        ids = dict(jobs)
        for entry in parked_entries(self.spool):  # changes with heartbeats/: never cached
            ids[entry.name] = entry.path
        out = []
        created: dict[str, float] = {}
        known, records_known = self._created, self._records
        for batch_id, job_dir in ids.items():
            when = known.get(batch_id)
            if when is None:
                record = records_known.get(batch_id)
                if record is not None and isinstance(record.get("created_at"), int):
                    when = float(record["created_at"])
                elif job_dir is not None:
                    state = _read_record(os.path.join(job_dir, STATE))
                    when = parse_time((state or {}).get("created_at"))
                    if when is None:
                        when = _mtime(Path(job_dir)) or 0.0  # not cached: it may mend
                    else:
                        created[batch_id] = when
                else:
                    continue
            out.append((when, batch_id))
        if created or len(known) > len(ids) + 1000:
            with self._lock:
                # Only jobs still there: the cache does not outgrow the spool.
                merged = {**known, **created}
                self._created = {k: v for k, v in merged.items() if k in ids}
        return out

    def list_batches(
        self, owner: str | None, limit: int = 20, after: str | None = None
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first; `after`: the id of the last batch of the previous page."""
        # The order, kept while no directory it came from changed (an operator's key
        # lists every job: 10,000 of them sort in milliseconds, but not in none).
        key = (owner, self._dirs_key(), tuple(sorted(e.name for e in parked_entries(self.spool))))
        if key[1] is not None and self._ordered is not None and self._ordered[0] == key:
            ordered = self._ordered[1]
        else:
            ordered = sorted(self._candidates(owner), reverse=True)
            with self._lock:
                self._ordered = (key, ordered) if key[1] is not None else None
        start = 0
        if after is not None:
            keys = {batch_id: i for i, (_, batch_id) in enumerate(ordered)}
            if after not in keys:
                raise Invalid(f"after: no such batch {after!r}", param="after")
            start = keys[after] + 1
        page: list[dict[str, Any]] = []
        for _, batch_id in ordered[start:]:
            found = self.locate(batch_id)
            if found is None:
                continue  # a record found nowhere (B1), or a job removed meanwhile
            if len(page) == limit:
                return page, True
            page.append(self.batch_object(batch_id, found))
        return page, False

    def cancel_batch(self, batch_id: str, owner: str | None) -> dict[str, Any]:
        """Design §11 "Cancel"."""
        batch = self.get_batch(batch_id, owner)  # step 1
        if batch["status"] in ("completed", "failed", "cancelled"):
            return batch
        self.ensure_layout()
        fsio.create_exclusive(self.batches / f"{batch_id}{CANCEL_SUFFIX}", b"")  # step 2
        self._carry_cancel(batch_id)
        log.info("batch cancel requested", job_id=batch_id, owner=owner)
        return self.get_batch(batch_id, owner)

    def _carry_cancel(self, batch_id: str) -> None:
        """Steps 3 to 5 (and the sweep's): the cancel taken as far as it can go now."""
        marker = self.batches / f"{batch_id}{CANCEL_SUFFIX}"
        found = self.locate(batch_id)
        if found is None:
            return
        if found.where == "incoming":
            withdrawn = self.batches / f"{batch_id}{WITHDRAWN_SUFFIX}"
            try:
                fsio.move(found.path, withdrawn)  # step 3: the rename is the lock
            except FileNotFoundError:
                found = self.locate(batch_id)  # a daemon claimed it first
            else:
                log.info("batch cancelled before any claim", job_id=batch_id)
                return
            if found is None:
                return
        if found.where == PROCESSING:
            with contextlib.suppress(FileNotFoundError):  # filed meanwhile
                fsio.create_exclusive(found.path / CANCEL, b"")  # step 4
        elif found.where in (DONE, FAILED):
            fsio.remove(marker)  # a withdrawn batch keeps it: its cancelled_at

    # -- the sweep -------------------------------------------------------------------

    def sweep(self, now: float | None = None) -> None:
        """Carry cancels forward; remove what crashed uploads, deletes and creates left."""
        now = time.time() if now is None else now
        for entry in _dir_entries(self.batches):
            try:
                self._sweep_batch(entry, now)
            except OSError as e:  # one entry that cannot be handled stops no other
                log.warning("sweep: cannot handle", path=entry.path, error=str(e))
        self._sweep_files(now)

    def _sweep_batch(self, entry: os.DirEntry[str], now: float) -> None:
        name = entry.name
        if name.endswith(CANCEL_SUFFIX):
            self._carry_cancel(name[: -len(CANCEL_SUFFIX)])
        elif name.endswith(RECORD_SUFFIX):
            batch_id = name[: -len(RECORD_SUFFIX)]
            record = self._record(batch_id)
            created = (record or {}).get("created_at")
            # The creating server's clock and the filesystem's: both must say it is old.
            born = max(created if isinstance(created, int) else 0, _mtime(Path(entry.path)) or now)
            if now - born > ORPHAN_AFTER_S and self.locate(batch_id) is None:
                log.warning("batch record without input removed (B1)", job_id=batch_id)
                fsio.remove(Path(entry.path))
                with self._lock:
                    self._records.pop(batch_id, None)

    def _sweep_files(self, now: float) -> None:
        for entry in _dir_entries(self.spool / INCOMING):
            # A create's copy that a crash left (B2): dot-named, never a job.
            if entry.name.startswith(".batch_") and entry.name.endswith(fsio.TMP_SUFFIX):
                mtime = _mtime(Path(entry.path))
                if mtime is not None and now - mtime > ORPHAN_AFTER_S:
                    fsio.remove(Path(entry.path))
        for entry in _dir_entries(self.files):
            if entry.name.startswith(DELETED_PREFIX):
                shutil.rmtree(entry.path, ignore_errors=True)
            elif entry.name.startswith(UPLOAD_PREFIX) and _dead_upload(entry, now):
                log.info("removing an interrupted upload (A1)", path=entry.path)
                shutil.rmtree(entry.path, ignore_errors=True)


def _dead_upload(entry: os.DirEntry[str], now: float) -> bool:
    """An upload directory whose server is gone: on this host, its pid is not alive; on
    any host, nothing written for STALE_UPLOAD_S."""
    host, _, rest = entry.name[len(UPLOAD_PREFIX) :].rpartition("-")[0].rpartition("-")
    pid = rest
    mtime = _mtime(Path(entry.path) / CONTENT) or _mtime(Path(entry.path)) or now
    if now - mtime > STALE_UPLOAD_S:
        return True
    if host != HOST or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _is_upload_id(file_id: str) -> bool:
    rest = file_id.removeprefix("file-")
    return (
        file_id.startswith("file-")
        and len(rest) == 24
        and all(c in "0123456789abcdef" for c in rest)
    )


def _dir_entries(path: Path) -> Iterator[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            yield from list(it)
    except FileNotFoundError:
        return


def _check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    bad = Invalid(
        f"Invalid 'metadata': up to {MAX_METADATA_PAIRS} pairs of strings, keys up to "
        f"{MAX_METADATA_KEY} characters, values up to {MAX_METADATA_VALUE}",
        param="metadata",
        code="invalid_value",
    )
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
        raise bad
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > MAX_METADATA_KEY:
            raise bad
        if len(value) > MAX_METADATA_VALUE:
            raise bad


def _page(
    items: list[dict[str, Any]], limit: int, after: str | None, what: str
) -> tuple[list[dict[str, Any]], bool]:
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise Invalid(f"after: no such {what} {after!r}", param="after")
        start = ids.index(after) + 1
    return items[start : start + limit], len(items) > start + limit
