"""The spool's layout and rules: scan incoming/, settle, classify, admit, claim, recover.

Every step follows docs/design.md; the durability primitives live in fsio.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import structlog

from spoold import fsio
from spoold.heartbeat import heartbeat_age
from spoold.job import (
    CANCEL,
    COMPLETED,
    ERRORS,
    FAILED,
    INPUT,
    OUTPUT,
    OWNER,
    STATE,
    TERMINAL,
    JobState,
    Unreadable,
    new_job_id,
    read_job,
    save_state,
)
from spoold.layout import (
    DONE,
    HEARTBEATS,
    INCOMING,
    JOB_SUFFIX,
    PROCESSING,
    is_upload_in_progress,
    job_dir_entries,
)
from spoold.layout import (
    FAILED as FAILED_DIR,
)

log = structlog.get_logger("spoold.spool")

CLAIM_PREFIX = ".claim-"
# owner.json.<taker's instance>.<random>.stale: what a take-over buried (design §2).
GRAVE_PREFIX, GRAVE_SUFFIX = f"{OWNER}.", ".stale"
# The names a job directory uses itself: a rejected entry never takes one of them.
_JOB_FILES = frozenset({INPUT, STATE, OUTPUT, ERRORS, OWNER, CANCEL})
REJECT_PREFIX = ".reject-"


class Kind(Enum):
    JOB = "job"  # a .jsonl regular file: admit once settled
    UPLOADING = "uploading"  # dot name or in-progress suffix: leave alone
    NOT_A_JOB = "not_a_job"  # anything else: route to failed/


@dataclass(frozen=True)
class Entry:
    """One directory entry of incoming/, looked at with lstat (never followed or opened)."""

    path: Path
    kind: Kind
    size: int
    mtime_ns: int
    reason: str | None = None
    regular: bool = True

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def fingerprint(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


def classify(path: Path) -> Entry | None:
    """What an entry of incoming/ is. None if it vanished meanwhile."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    name = path.name
    if is_upload_in_progress(name):
        return Entry(path, Kind.UPLOADING, st.st_size, st.st_mtime_ns)
    mode = st.st_mode
    regular = stat.S_ISREG(mode)
    reason = None
    if stat.S_ISLNK(mode):
        reason = "a symbolic link; spoold never follows links: copy the file itself into incoming/"
    elif stat.S_ISDIR(mode):
        reason = "a directory, not a file: drop .jsonl files directly into incoming/"
    elif not regular:
        reason = "not a regular file (a FIFO, socket or device); it was never opened"
    elif not name.endswith(JOB_SUFFIX):
        reason = "not a .jsonl file: only files named *.jsonl are jobs"
    elif not os.access(path, os.R_OK):
        reason = "the daemon cannot read this file: check its permissions"
    kind = Kind.NOT_A_JOB if reason else Kind.JOB
    return Entry(path, kind, st.st_size, st.st_mtime_ns, reason, regular)


class SettleTracker:
    """A file is settled once its size and mtime have not changed for `settle_s`.

    Time is the daemon's own monotonic clock, not the file's mtime, so clock skew on
    a network filesystem and preserved mtimes (SMB copies) cannot make it early.
    """

    def __init__(self, settle_s: float) -> None:
        self.settle_s = settle_s
        self._seen: dict[str, tuple[tuple[int, int], float]] = {}
        self.changed: set[str] = set()  # names seen changing: uploads in progress

    def settled(self, entry: Entry, now: float) -> bool:
        seen = self._seen.get(entry.name)
        if seen is not None and seen[0] != entry.fingerprint:
            self.changed.add(entry.name)
        if seen is None or seen[0] != entry.fingerprint:
            self._seen[entry.name] = (entry.fingerprint, now)
            return self.settle_s <= 0
        return now - seen[1] >= self.settle_s

    def wait_left(self, entry: Entry, now: float) -> float:
        seen = self._seen.get(entry.name)
        return self.settle_s if seen is None else max(0.0, self.settle_s - (now - seen[1]))

    def prune(self, names: set[str]) -> None:
        for name in list(self._seen):
            if name not in names:
                del self._seen[name]
        self.changed &= names


def count_requests(path: Path, max_file_bytes: int) -> tuple[int, int]:
    """(non-blank lines, bytes) of a file, streamed; opened without following links."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        if st.st_size > max_file_bytes:
            return -1, st.st_size
        count = 0
        has_content = False
        while block := f.read(1 << 20):
            pieces = block.split(b"\n")
            for piece in pieces[:-1]:
                if has_content or piece.strip():
                    count += 1
                has_content = False
            has_content = has_content or bool(pieces[-1].strip())
        return count + has_content, st.st_size


@dataclass
class QueueLoad:
    jobs: int = 0
    requests: int = 0


def _instance(owner: dict[str, Any]) -> str | None:
    """The instance named by an owner.json record, or None."""
    instance = owner.get("instance")
    return instance if isinstance(instance, str) else None


class Spool:
    def __init__(self, root: Path, instance: str = "default") -> None:
        self.root = root
        self.instance = instance
        self.incoming = root / INCOMING
        self.processing = root / PROCESSING
        self.done = root / DONE
        self.failed = root / FAILED_DIR
        self.heartbeats = root / HEARTBEATS
        # Jobs in processing/ whose records cannot be read (job id -> why), as of the last
        # active_jobs(): left where they are, for the daemon to report (heartbeat problems).
        self.unreadable: dict[str, str] = {}
        self._logged_unreadable: dict[str, str] = {}  # what was said, to say it once

    def ensure_layout(self) -> None:
        for d in (self.incoming, self.processing, self.done, self.failed, self.heartbeats):
            fsio.make_dir(d)

    # -- incoming -----------------------------------------------------------------

    def scan_incoming(self) -> list[Entry]:
        """Entries of incoming/, oldest first (mtime, then name)."""
        entries = []
        with os.scandir(self.incoming) as it:
            for d in it:
                e = classify(Path(d.path))
                if e is not None:
                    entries.append(e)
        entries.sort(key=lambda e: (e.mtime_ns, e.name))
        return entries

    def claim(self, entry: Entry, total: int, file_bytes: int) -> str | None:
        """Move an admitted file into processing/<job_id>/ (design §1). None if we lost."""
        state = JobState(id=new_job_id(entry.name), source_name=entry.name, file_bytes=file_bytes)
        state.request_counts.total = state.requests_in_file = total
        state.input_size, state.input_mtime_ns = entry.fingerprint  # frozen (design §5c)
        return self._stage(self.processing, CLAIM_PREFIX, entry, INPUT, state)

    def reject(self, entry: Entry, reason: str, total: int | None = None) -> str | None:
        """Move an entry that will never run to failed/<job_id>/ with the reason."""
        state = JobState(id=new_job_id(entry.name), source_name=entry.name, status=FAILED)
        state.error = reason
        state.file_bytes = entry.size if entry.regular else 0
        state.requests_in_file = total or 0
        state.finished_at = state.created_at
        target = INPUT if entry.kind is Kind.JOB else entry.name
        if target != INPUT and target in _JOB_FILES:  # e.g. a stray "state.json" dropped
            target = f"rejected-{target}"
        return self._stage(self.failed, REJECT_PREFIX, entry, target, state)

    def _stage(
        self, base: Path, prefix: str, entry: Entry, target: str, state: JobState
    ) -> str | None:
        """The four steps of design §1 into `base`/<job_id>/. None if another daemon won."""
        staging = base / f"{prefix}{self.instance}+{state.id}"
        fsio.make_dir(staging)  # step 1
        save_state(staging, state)  # step 2
        try:
            fsio.move(entry.path, staging / target)  # step 3: the rename is the lock
        except FileNotFoundError:
            fsio.remove_tree(staging)
            return None
        except OSError:
            # EXDEV, EACCES, …: the entry is still in incoming/, untouched. But if the
            # rename happened and only the fsync after it failed, the file is in the
            # staging dir now: that is C3, left for recovery to finish, never removed.
            if not os.path.lexists(staging / target):
                fsio.remove_tree(staging)
            raise
        fsio.move(staging, base / state.id)  # step 4
        return state.id

    # -- processing ---------------------------------------------------------------

    def job_dirs(self, where: Path | None = None) -> Iterator[Path]:
        for d in job_dir_entries(where or self.processing):
            yield Path(d.path)

    def active_jobs(self) -> list[tuple[Path, JobState]]:
        """Jobs in processing/ whose records can be read, in arrival (claim) order. Those
        that cannot be read are skipped, never touched, and named in `self.unreadable`."""
        jobs = []
        unreadable: dict[str, str] = {}
        for d in self.job_dirs():
            found = read_job(d)
            if isinstance(found, Unreadable):
                unreadable[d.name] = found.why
            elif found is not None:  # None: moved meanwhile (finished by another daemon)
                jobs.append((d, found))
        jobs.sort(key=lambda j: (j[1].created_at, j[1].id))
        self.unreadable = unreadable
        readable = {d.name for d, _ in jobs}
        for name in self._logged_unreadable.keys() - unreadable.keys():
            del self._logged_unreadable[name]
            if name in readable:
                log.info("job record readable again", job_id=name)
        for name, why in unreadable.items():
            self._log_unreadable(name, why)
        return jobs

    def _log_unreadable(self, name: str, why: str) -> None:
        """Said once per job (again only if the reason changes), not at every rescan."""
        if self._logged_unreadable.get(name) != why:
            self._logged_unreadable[name] = why
            log.error("job record cannot be read; job left in processing/", job_id=name, error=why)

    def queue_load(self) -> QueueLoad:
        load = QueueLoad()
        for _, state in self.active_jobs():
            if state.status not in TERMINAL:
                load.jobs += 1
                load.requests += state.remaining
        return load

    def finish(self, job_dir: Path, state: JobState) -> Path:
        """Record a terminal state, then move the whole job directory (design §6)."""
        save_state(job_dir, state)
        target = (self.done if state.status == COMPLETED else self.failed) / job_dir.name
        fsio.move(job_dir, target)
        return target

    def request_cancel(self, job_dir: Path) -> None:
        """Ask the daemon to stop a job at its next chunk boundary."""
        fsio.create_exclusive(job_dir / CANCEL, b"")

    def cancel_requested(self, job_dir: Path) -> bool:
        return (job_dir / CANCEL).exists()

    # -- ownership (design §2) ----------------------------------------------------

    def _owner_record(self) -> bytes:
        return json.dumps(
            {"instance": self.instance, "hostname": socket.gethostname(), "pid": os.getpid()}
        ).encode()

    def _owner(self, job_dir: Path) -> dict[str, Any]:
        """owner.json's record; empty when missing or unreadable."""
        try:
            owner = fsio.read_json(job_dir / OWNER)
        except (OSError, ValueError, RecursionError):  # RecursionError: nested too deep
            return {}
        return owner if isinstance(owner, dict) else {}

    def owner_of(self, job_dir: Path) -> str | None:
        return _instance(self._owner(job_dir))

    def instance_is_stale(self, instance: str, stale_after_s: float) -> bool:
        age = heartbeat_age(self.heartbeats / f"{instance}.json")
        return age is None or age > stale_after_s

    def acquire(self, job_dir: Path, stale_after_s: float) -> bool:
        """Become the one daemon that runs this job. False if a live peer has it."""
        try:
            return self._acquire(job_dir, stale_after_s)
        except FileNotFoundError:
            return False  # the job moved on meanwhile (finished or cancelled by a peer)

    def _acquire(self, job_dir: Path, stale_after_s: float) -> bool:
        owner_path = job_dir / OWNER
        if fsio.create_exclusive(owner_path, self._owner_record()):
            self._remove_graves(job_dir, stale_after_s)  # a taker's that crashed (C10)
            return True
        judged = self._owner(job_dir)  # one read: what is judged is what must be buried
        owner = _instance(judged)
        if owner is None:
            # Half-written or unreadable owner file: judge it by its age.
            try:
                age = time.time() - owner_path.stat().st_mtime
            except FileNotFoundError:
                age = stale_after_s + 1
            if age <= stale_after_s:
                return False
        elif owner != self.instance and not self.instance_is_stale(owner, stale_after_s):
            return False
        grave = job_dir / f"{GRAVE_PREFIX}{self.instance}.{secrets.token_hex(3)}{GRAVE_SUFFIX}"
        try:
            try:
                fsio.move(owner_path, grave)
            except FileNotFoundError:
                return False  # another daemon took it over first
            if not fsio.create_exclusive(owner_path, self._owner_record()):
                return False  # one found no owner.json and created it first
            try:
                buried = fsio.read_json(grave)
            except (OSError, ValueError, RecursionError):
                buried = {}  # removed by a peer's repair: it judged us stale
            if buried != judged:
                # Between our look and our rename another daemon took the job over: we
                # buried its fresh record. Step back; it finds itself no longer owner at
                # its next check, and the job is acquired afresh (never by two at once).
                self._step_back(job_dir)
                return False
        finally:
            # Step 5: the grave has been read; kept, one would pile up per take-over.
            # A crash before this is repaired by recovery (C10, C11).
            fsio.remove(grave)
        self._remove_graves(job_dir, stale_after_s)  # of takers that crashed (C10, C11)
        return True

    def _step_back(self, job_dir: Path) -> None:
        """Remove owner.json if it is still the record we created, and only then: a
        taker that judged us stale meanwhile may have put its own there."""
        owner_path = job_dir / OWNER
        try:
            mine = owner_path.read_bytes() == self._owner_record()
        except FileNotFoundError:
            return
        if mine:
            fsio.remove(owner_path)

    def _remove_graves(self, job_dir: Path, stale_after_s: float) -> None:
        """Remove the graves (design §2) left by takers that crashed before removing
        theirs (C10, C11), whoever owns the job now: a grave is read by its taker
        only. This instance's (a previous life: this one is never in the middle of a
        take-over when it calls this) and a stale instance's; a live peer's may be
        between its rename and its read, and is left alone."""
        for entry in job_dir.iterdir():
            name = entry.name
            if not (name.startswith(GRAVE_PREFIX) and name.endswith(GRAVE_SUFFIX)):
                continue
            taker = name[len(GRAVE_PREFIX) : -len(GRAVE_SUFFIX)].rpartition(".")[0]
            if taker == self.instance or self.instance_is_stale(taker, stale_after_s):
                fsio.remove(entry)

    def still_owner(self, job_dir: Path) -> bool:
        owner = self._owner(job_dir)
        return owner.get("instance") == self.instance and owner.get("pid") == os.getpid()

    # -- recovery (design §7) -----------------------------------------------------

    def recover(self, stale_after_s: float) -> None:
        """Turn whatever a crash left into a correct state, before any new work."""
        self.ensure_layout()
        for base in (self.processing, self.done, self.failed):
            fsio.remove_stray_temps(base)
        # heartbeats/ is shared: only this instance's own temp files are ours.
        fsio.remove_stray_temps(self.heartbeats, prefix=f".{self.instance}.json.")
        self.take_over(stale_after_s)

    def _ours_to_repair(self, job_dir: Path, stale_after_s: float) -> bool:
        """A job whose leftovers we may clean: ours (a previous life at start-up),
        a stale peer's, or nobody's (queued, never acquired)."""
        owner = self.owner_of(job_dir)
        if owner is None:
            return not (job_dir / OWNER).exists()  # half-written: acquire() judges it
        return owner == self.instance or self.instance_is_stale(owner, stale_after_s)

    def take_over(self, stale_after_s: float) -> None:
        """Repair what a crashed daemon left: at start-up (our own previous life, and
        stale peers), and while running (peers that died since). Never touches a live
        peer's jobs, staging dirs or temp files. Must not run while this daemon is in
        the middle of a job: it would count its own temp files as leftovers."""
        # Several daemons may repair the same stale peer's leftovers at once (all the
        # spoold@N of a host start together after a reboot): whatever another one did
        # first (FileNotFoundError, FileExistsError) is simply done.
        for base, prefix in ((self.processing, CLAIM_PREFIX), (self.failed, REJECT_PREFIX)):
            for staging in base.iterdir():
                if staging.name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError, FileExistsError):
                        self._recover_staging(staging, prefix, stale_after_s)
        for d in self.job_dirs():
            with contextlib.suppress(FileNotFoundError, FileExistsError):
                self._repair_job(d, stale_after_s)

    def _repair_job(self, d: Path, stale_after_s: float) -> None:
        self._remove_graves(d, stale_after_s)  # by their taker, also in a live peer's job
        if not self._ours_to_repair(d, stale_after_s):
            return
        state = read_job(d)
        if state is None:
            return  # moved on meanwhile
        if isinstance(state, Unreadable):
            self._log_unreadable(d.name, state.why)  # and left untouched
            return
        fsio.remove_stray_temps(d)
        if state.status in TERMINAL:  # C9: terminal state written, move not done
            log.info("finishing interrupted move", job_id=state.id, status=state.status)
            self.finish(d, state)

    def _recover_staging(self, staging: Path, prefix: str, stale_after_s: float) -> None:
        rest = staging.name[len(prefix) :]
        owner, _, job_id = rest.partition("+")
        if owner != self.instance and not self.instance_is_stale(owner, stale_after_s):
            return  # a live peer is in the middle of its claim
        if not (staging / "state.json").exists() or not any(
            p.name != "state.json" and not p.name.startswith(".") for p in staging.iterdir()
        ):
            fsio.remove_tree(staging)  # C1/C2: the file is still in incoming/
            return
        target = staging.parent / job_id
        log.info("finishing interrupted claim", job_id=job_id)
        fsio.move(staging, target)  # C3
