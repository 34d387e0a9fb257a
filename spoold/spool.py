"""The spool's layout and rules: scan incoming/, settle, classify, admit, claim, recover.

Every step follows docs/design.md; the durability primitives live in fsio.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import structlog

from spoold import fsio
from spoold.fsio import Fenced
from spoold.job import (
    CANCEL,
    COMPLETED,
    ERRORS,
    FAILED,
    INPUT,
    OUTPUT,
    OWNER,
    RUNNING,
    STATE,
    TERMINAL,
    JobState,
    Unreadable,
    new_job_id,
    read_job,
    save_state,
    utcnow,
)
from spoold.layout import (
    BATCHES,
    DONE,
    HEARTBEATS,
    INCOMING,
    JOB_SUFFIX,
    PROCESSING,
    api_batch_id,
    find_job_dir,
    is_upload_in_progress,
    job_dir_entries,
)
from spoold.layout import (
    FAILED as FAILED_DIR,
)
from spoold.lease import (
    FENCED_MARK,
    Holder,
    Lease,
    Observer,
    fence,
    heartbeat_grave_taker,
    holds,
    lease_dir_name,
    parse_lease_dir,
    read_raw,
    read_record,
    remove_fenced,
    rescue_parked,
    take_record,
)

log = structlog.get_logger("spoold.spool")

CLAIM_PREFIX = ".claim-"
# owner.json.<taker's instance>.<taker's token>.stale: what a take-over buried (design §2).
GRAVE_PREFIX, GRAVE_SUFFIX = f"{OWNER}.", ".stale"
RECOVERING = ".recovering-"  # a staging dir renamed by its recoverer before it looks inside
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
    def __init__(
        self,
        root: Path,
        instance: str = "default",
        stale_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.instance = instance
        self.stale_after_s = stale_after_s
        self.incoming = root / INCOMING
        self.processing = root / PROCESSING
        self.done = root / DONE
        self.failed = root / FAILED_DIR
        self.heartbeats = root / HEARTBEATS
        # Jobs in processing/ whose records cannot be read (job id -> why), as of the last
        # active_jobs(): left where they are, for the daemon to report (heartbeat problems).
        self.unreadable: dict[str, str] = {}
        self._logged_unreadable: dict[str, str] = {}  # what was said, to say it once
        self.observer = Observer(self.heartbeats, stale_after_s, clock)
        # This incarnation (design §2). A daemon makes it and takes its instance lease
        # before anything else; a Spool used by a command or a test makes one here.
        self.lease = Lease(self.heartbeats, instance, stale_after_s, clock)
        self._owned: dict[str, tuple[int, bytes]] = {}  # job id -> (generation, owner.json)
        self._remaining: dict[str, int] = {}  # queue load per job (only shrinks while run)

    def ensure_layout(self) -> None:
        for d in (self.incoming, self.processing, self.done, self.failed, self.heartbeats):
            fsio.make_dir(d)

    def save(self, job_dir: Path, state: JobState) -> None:
        """Write a job's state.json as its owner: through our lease directory (design §2
        W1: fails with Fenced once another daemon took our work over), recording the
        generation that wrote it."""
        owned = self._owned.get(job_dir.name)
        if owned is not None:
            state.owner_generation = owned[0]
        self.lease.ensure_dir()
        save_state(job_dir, state, write=self.lease.write)

    def results_check(self) -> Callable[[], None]:
        """The fence check a result file runs between its open and its first change."""
        return self.lease.check

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
        state = JobState(id=self._new_id(entry.name), source_name=entry.name, file_bytes=file_bytes)
        state.request_counts.total = state.requests_in_file = total
        state.input_size, state.input_mtime_ns = entry.fingerprint  # frozen (design §5c)
        return self._stage(self.processing, CLAIM_PREFIX, entry, INPUT, state)

    def reject(self, entry: Entry, reason: str, total: int | None = None) -> str | None:
        """Move an entry that will never run to failed/<job_id>/ with the reason."""
        state = JobState(id=self._new_id(entry.name), source_name=entry.name, status=FAILED)
        state.error = reason
        state.file_bytes = entry.size if entry.regular else 0
        state.requests_in_file = total or 0
        state.finished_at = state.created_at
        target = INPUT if entry.kind is Kind.JOB else entry.name
        if target != INPUT and target in _JOB_FILES:  # e.g. a stray "state.json" dropped
            target = f"rejected-{target}"
        return self._stage(self.failed, REJECT_PREFIX, entry, target, state)

    def _new_id(self, name: str) -> str:
        """A new job's id: the batch id an API batch's input name reserves (design §11),
        unless a job has it, a batch of that id was withdrawn, or another file of that
        name is past its claim's step 3 (a staging dir holding an input); else
        `new_job_id`. A competing claim of this same file (a staging dir still empty)
        keeps the id: only one of the two renames wins."""
        reserved = api_batch_id(name)
        withdrawn = self.root / BATCHES / f"{reserved}.withdrawn.jsonl"
        if reserved is None or find_job_dir(self.root, reserved) is not None:
            return new_job_id(name)
        if withdrawn.exists():
            return new_job_id(name)
        for base in (self.processing, self.failed):
            with contextlib.suppress(FileNotFoundError), os.scandir(base) as it:
                staged = [
                    e.path for e in it if e.name.startswith(".") and e.name.endswith(f"+{reserved}")
                ]
            if any(os.path.lexists(os.path.join(path, INPUT)) for path in staged):
                return new_job_id(name)
        return reserved

    def _stage(
        self, base: Path, prefix: str, entry: Entry, target: str, state: JobState
    ) -> str | None:
        """The four steps of design §1 into `base`/<job_id>/. None if another daemon won."""
        self.lease.ensure_dir()
        staging = base / f"{prefix}{self.instance}.{self.lease.token}+{state.id}"
        fsio.make_dir(staging)  # step 1
        save_state(staging, state)  # step 2
        try:
            fsio.move(entry.path, staging / target)  # step 3: the rename is the lock
        except OSError as e:
            # Whatever the rename said, look where the file is (design §1): in the
            # staging dir, it moved (an NFS RENAME that answers ENOENT after succeeding,
            # or only the fsync after it failed), and the claim goes on.
            if not os.path.lexists(staging / target):
                self._take_down(staging)
                if isinstance(e, FileNotFoundError):
                    return None  # another daemon's rename won
                raise  # EXDEV, EACCES, …: the entry is still in incoming/, untouched
        try:
            fsio.move(staging, base / state.id)  # step 4
        except (FileNotFoundError, FileExistsError):
            # A recovery that judged us dead finished the claim for us: the job is there.
            if os.path.lexists(staging) or not (base / state.id).is_dir():
                raise
        return state.id

    @staticmethod
    def _take_down(staging: Path) -> None:
        """Remove a staging dir that holds no submitted file: its state.json and temps,
        then the directory, never anything else (rmdir fails on anything left, and the
        dir stays for recovery, which looks inside)."""
        with contextlib.suppress(FileNotFoundError):
            for child in staging.iterdir():
                if child.name == STATE or child.name.endswith(fsio.TMP_SUFFIX):
                    fsio.remove(child)
        with contextlib.suppress(OSError):
            fsio.remove_dir(staging)

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

    def queue_load(self, fresh: bool = True) -> QueueLoad:
        """Jobs in processing/ and their unfinished requests. `fresh` reads every job's
        record; otherwise only those of jobs not seen before (a job's remaining requests
        only shrink while it runs, so an older count is an over-estimate): cheap enough
        to look again before every claim, so that several daemons keep the limits to
        within one file each (design §2)."""
        if fresh:
            self._remaining = {
                st.id: st.remaining for _, st in self.active_jobs() if st.status not in TERMINAL
            }
        else:
            names = {d.name for d in self.job_dirs()}
            self._remaining = {k: v for k, v in self._remaining.items() if k in names}
            for name in names - self._remaining.keys():
                found = read_job(self.processing / name)
                if isinstance(found, JobState) and found.status not in TERMINAL:
                    self._remaining[name] = found.remaining
        return QueueLoad(len(self._remaining), sum(self._remaining.values()))

    def finish(self, job_dir: Path, state: JobState) -> Path:
        """Record a terminal state, then move the whole job directory (design §6; §2
        W3: the move only follows a terminal record that landed)."""
        self.save(job_dir, state)
        target = (self.done if state.status == COMPLETED else self.failed) / job_dir.name
        status, generation = state.status, state.owner_generation
        if not self._file(job_dir, target, status, generation):
            raise Fenced(f"job {job_dir.name} changed hands before it could be filed")
        return target

    def _file(self, job_dir: Path, target: Path, status: str, generation: int) -> bool:
        """Move a job whose terminal record (`status`, written by owner `generation`) we
        saw, from processing/ to `target`, through our lease directory (design §2 W3):
        a fenced daemon's move fails, however long it stalled; a job that came back to
        processing/ meanwhile (`spoold retry`) is not the one we saw: it goes back, and
        False. True once the job is filed (by us, or by a peer's recovery, C9)."""
        parked = self.lease.dir / job_dir.name
        try:
            fsio.move(job_dir, parked)
        except FileNotFoundError:
            self.lease.check()  # our lease directory is gone: Fenced
            if os.path.lexists(job_dir) or not target.is_dir():
                raise
            return True  # a peer's recovery completed the move (C9) while we stalled
        found = read_job(parked)
        if not (
            isinstance(found, JobState)
            and found.status == status
            and found.owner_generation == generation
        ):
            fsio.move(parked, job_dir)  # not the record we judged: back where it was
            return False
        try:
            fsio.move(parked, target)
        except FileNotFoundError:
            self.lease.check()  # fenced between the two moves: the fencer puts it back
            raise
        except OSError:
            # A full disk, a failing mount: the job waits in processing/, where every
            # command sees it and recovery files it (C9), not hidden in our lease dir.
            with contextlib.suppress(OSError):
                fsio.move(parked, job_dir)
            raise
        return True

    def request_cancel(self, job_dir: Path) -> None:
        """Ask the daemon to stop a job at its next chunk boundary."""
        fsio.create_exclusive(job_dir / CANCEL, b"")

    def cancel_requested(self, job_dir: Path) -> bool:
        return (job_dir / CANCEL).exists()

    # -- ownership (design §2) ----------------------------------------------------

    def _owner_record(self, generation: int) -> bytes:
        return json.dumps(
            {**self.lease.identity(), "generation": generation, "acquired_at": utcnow()}
        ).encode()

    def _owner(self, job_dir: Path) -> dict[str, Any]:
        """owner.json's record; empty when missing or unreadable."""
        return read_record(job_dir / OWNER) or {}

    def owner_of(self, job_dir: Path) -> str | None:
        return _instance(self._owner(job_dir))

    def _gone(self, holder: Holder | None, key: str, fingerprint: Any) -> bool:
        """Whether a record's incarnation lost its claims (dead or stale); an unreadable
        record (None) is judged by its bytes, unchanged for stale_after_s on our clock."""
        if holder is None:
            return self.observer.stale(key, fingerprint)
        if holder.token == self.lease.token:
            return True  # ours: a previous run in this incarnation
        if holder.token is None and holder.instance == self.instance:
            return True  # a spoold of our instance from before incarnations: our past
        return self.observer.gone(holder)

    def acquire(self, job_dir: Path) -> bool:
        """Become the one daemon that runs this job (design §2). False if a live peer
        has it, or our own lease is not fresh (we may be judged stale by now)."""
        if not self.lease.fresh():
            return False
        try:
            return self._acquire(job_dir)
        except FileNotFoundError:
            return False  # the job moved on meanwhile (finished or cancelled by a peer)

    def _acquire(self, job_dir: Path) -> bool:
        owner_path = job_dir / OWNER
        found = read_job(job_dir)
        last = found.owner_generation if isinstance(found, JobState) else 0
        self.lease.ensure_dir()
        mine = self._owner_record(last + 1)
        if fsio.create_exclusive(owner_path, mine):  # step 1
            if not holds(owner_path, mine):
                return False  # buried before our last check by a taker of the last owner
            self._owned[job_dir.name] = (last + 1, mine)
            self._secure(job_dir, None)
            self._remove_graves(job_dir)  # of takers that crashed (C10)
            return True
        raw, judged = read_raw(owner_path)  # step 2: one read; what is judged is buried
        if raw is None:
            return False  # stepped back meanwhile: next pass
        holder = Holder.from_record(judged) if judged is not None else None
        generation = judged.get("generation") if judged else None
        prior = generation if isinstance(generation, int) else None
        if holder is not None and holder.token == self.lease.token:
            self._owned[job_dir.name] = (last + 1 if prior is None else prior, raw)
            return True  # ours already
        if not self._gone(holder, f"owner:{job_dir}", raw):
            return False
        if holder is not None:
            fence(self.heartbeats, holder)  # step 3
        gen = max(last, prior or 0) + 1
        mine = self._owner_record(gen)
        grave = self.lease.dir / f"{OWNER}.{job_dir.name}{GRAVE_SUFFIX}"
        if not take_record(owner_path, grave, raw, mine, self.lease.fence_displaced):  # step 4
            return False
        self._owned[job_dir.name] = (gen, mine)
        secured = self._secure(job_dir, holder or Holder(""))  # step 5
        log.info(
            "job taken over",
            job_id=job_dir.name,
            from_instance=holder.instance if holder else None,
            from_host=holder.hostname if holder else None,
            from_pid=holder.pid if holder else None,
            generation=gen,
            secured=secured,
        )
        self._remove_graves(job_dir)  # step 6: of takers that crashed (C10, C11)
        return True

    def _secure(self, job_dir: Path, took_from: Holder | None) -> bool:
        """Step 5 (design §2): if anyone who may still hold the job's result files open
        (its `writers`, not provably dead) is not us, give the job files of its own: a
        copy of each one's committed prefix, renamed over it through our lease
        directory; their descriptors then point at files nobody reads. Then we are its
        only writer. True if it copied."""
        state = read_job(job_dir)  # after the fence: all it committed, nothing later
        if not isinstance(state, JobState) or state.status in TERMINAL:
            return False  # unreadable: never run; terminal: finished before the fence (C22)
        me = self.lease.identity()
        for writer in state.writers:
            # Every earlier owner must be harmless before we read what it committed:
            # its taker fenced it, unless a race left one unfenced (design §2 step 5).
            h = Holder.from_record(writer)
            if h is not None and h.token != self.lease.token:
                fence(self.heartbeats, h)
        state = read_job(job_dir)
        if not isinstance(state, JobState) or state.status in TERMINAL:
            return False
        others = [
            w
            for w in state.writers
            if (h := Holder.from_record(w)) is None
            or (h.token != self.lease.token and not h.provably_dead())
        ]
        contested = took_from is not None and not took_from.provably_dead()
        if not state.writers and contested:
            others.append({})  # a record from before `writers`: its owner counts
        ck = state.checkpoint
        if others:
            for name, keep in ((OUTPUT, ck.output_bytes), (ERRORS, ck.errors_bytes)):
                path = job_dir / name
                if not path.exists() and not keep:
                    continue
                try:
                    self.lease.write(path, fsio.prefix_blocks(path, keep))
                except (FileNotFoundError, ValueError) as e:
                    # Missing or shorter than its checkpoint: left as it is; the run says
                    # so loudly (AppendLog), and the job fails rather than lose a line.
                    log.error("result file not as committed", job_id=state.id, error=str(e))
        if contested and state.attempts > 0 and state.status == RUNNING:
            # A stall is not a crash of the job: the old owner's attempt is given back
            # (its crash evidence is kept: a request that hangs or kills whole hosts is
            # still isolated, design §5a).
            state.attempts -= 1
        elif not others and state.writers == [me]:
            return False
        state.writers = [me]
        self.save(job_dir, state)
        return bool(others)

    def owners_undecided(self) -> list[str]:
        """Unfinished jobs held by an incarnation we have not judged yet either way (its
        heartbeat not seen changing, not stale yet): --drain waits for the verdict, at
        most stale_after_s, rather than leave a dead peer's job behind."""
        undecided = []
        for d, state in self.active_jobs():
            if state.status in TERMINAL:
                continue
            raw, judged = read_raw(d / OWNER)
            if raw is None:
                continue
            holder = Holder.from_record(judged) if judged is not None else None
            if holder is None:
                if not self.observer.stale(f"owner:{d}", raw):
                    undecided.append(d.name)
            elif holder.token != self.lease.token and self.observer.undecided(holder):
                undecided.append(d.name)
        return undecided

    def still_owner(self, job_dir: Path) -> bool:
        """owner.json names this incarnation (its token)."""
        return self._owner(job_dir).get("token") == self.lease.token

    def _remove_graves(self, job_dir: Path) -> None:
        """Remove the graves (design §2) left by takers that crashed before removing
        theirs (C10, C11), whoever owns the job now: ours (we are never in the middle
        of a take-over when we call this) and those of dead or stale incarnations; a
        live taker's may be between its rename and its read, and is left alone."""
        for entry in job_dir.iterdir():
            name = entry.name
            if not (name.startswith(GRAVE_PREFIX) and name.endswith(GRAVE_SUFFIX)):
                continue
            instance, _, token = name[len(GRAVE_PREFIX) : -len(GRAVE_SUFFIX)].rpartition(".")
            taker = Holder.from_record({"instance": instance, "token": token})
            if taker is None or self._gone(taker, "", None):
                if taker is not None and taker.token != self.lease.token:
                    fence(self.heartbeats, taker)  # it may be between its rename and read
                fsio.remove(entry)

    # -- recovery (design §7) -----------------------------------------------------

    def recover(self) -> None:
        """Turn whatever a crash left into a correct state, before any new work."""
        self.ensure_layout()
        for base in (self.processing, self.done, self.failed):
            fsio.remove_stray_temps(base)
        # heartbeats/ is shared: only this instance's own temp files are ours.
        fsio.remove_stray_temps(self.heartbeats, prefix=f".{self.instance}.json.")
        self.take_over()

    def _ours_to_repair(self, job_dir: Path) -> tuple[bool, bytes | None, Holder | None]:
        """Whether a job's leftovers are ours to clean (ours, a dead or stale
        incarnation's, or nobody's: queued, never acquired), with the owner record
        judged (its bytes, its holder)."""
        raw, judged = read_raw(job_dir / OWNER)
        if raw is None:
            return True, None, None
        holder = Holder.from_record(judged) if judged is not None else None
        return self._gone(holder, f"owner:{job_dir}", raw), raw, holder

    def take_over(self) -> None:
        """Repair what a crashed daemon left: at start-up (our own previous life, and
        stale peers), and while running (peers that died since). Never touches a live
        peer's jobs, staging dirs or temp files. Must not run while this daemon is in
        the middle of a job: it would count its own temp files as leftovers."""
        # Several daemons may repair the same stale peer's leftovers at once (all the
        # spoold@N of a host start together after a reboot): whatever another one did
        # first (FileNotFoundError, FileExistsError) is simply done.
        self._fence_orphans()
        # A job of ours parked in our own lease dir (a second filing move and its
        # put-back both failed, design §2 W3): back to processing/, then filed below.
        rescue_parked(self.lease.dir)
        for base, prefix in ((self.processing, CLAIM_PREFIX), (self.failed, REJECT_PREFIX)):
            for staging in base.iterdir():
                if staging.name.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError, FileExistsError):
                        self._recover_staging(staging, prefix)
        for d in self.job_dirs():
            with contextlib.suppress(FileNotFoundError, FileExistsError):
                self._repair_job(d)

    def _fence_orphans(self) -> None:
        """Lease dirs and heartbeat graves that no live incarnation will clean up (L1,
        L2): of other incarnations of our instance (we hold the instance lease now), of
        dead ones, and those no heartbeat has named for stale_after_s; the trees of
        fences that crashed halfway."""
        beats: dict[str, Any] = {}
        for entry in self.heartbeats.iterdir():
            name = entry.name
            with contextlib.suppress(FileNotFoundError):
                if FENCED_MARK in name and name.startswith("."):
                    remove_fenced(entry)
                    continue
                taker = heartbeat_grave_taker(name)
                if taker is not None:
                    instance = name[1:].split(".json.", 1)[0]
                    if (
                        taker == self.lease.token
                        or not (self.heartbeats / lease_dir_name(instance, taker)).is_dir()
                    ):
                        fsio.remove(entry)
                    continue
                parsed = parse_lease_dir(name)
                if parsed is None or parsed[1] == self.lease.token:
                    continue
                instance, token = parsed
                holder = Holder(instance, token)
                if instance == self.instance:
                    fence(self.heartbeats, holder)
                    continue
                if instance not in beats:
                    beats[instance] = self.observer.beat(instance)
                beat = beats[instance] or {}
                if beat.get("token") == token:
                    if self.observer.gone(Holder.from_record(beat) or holder):
                        fence(self.heartbeats, holder)
                elif self.observer.unchanged_for(f"orphan:{name}", "unnamed") >= (
                    2 * self.stale_after_s  # a starter may wait stale_after_s to be named
                ):
                    fence(self.heartbeats, holder)

    def _repair_job(self, d: Path) -> None:
        self._remove_graves(d)  # by their taker, also in a live peer's job
        ours, judged_raw, holder = self._ours_to_repair(d)
        if not ours:
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
            # Its owner may only be stalled before its own move: fenced first, that
            # move fails (W3) and cannot carry off the job once it is back (§6a). Only
            # the owner judged, and only while owner.json still names it: if it changed
            # since (we stalled; the job was filed, retried, and runs again), the job is
            # a live daemon's now, and not ours to touch.
            if read_raw(d / OWNER)[0] != judged_raw:
                return
            if holder is not None and holder.token != self.lease.token:
                fence(self.heartbeats, holder)
            target = (self.done if state.status == COMPLETED else self.failed) / d.name
            self.lease.ensure_dir()
            self._file(d, target, state.status, state.owner_generation)

    def _staging_holder(self, staging: Path, prefix: str) -> tuple[Holder | None, str]:
        """Whose staging dir this is, and the job id it stages."""
        rest = staging.name[len(prefix) :]
        who, _, job_id = rest.partition("+")
        job_id = job_id.split(RECOVERING, 1)[0]
        instance, _, token = who.rpartition(".")
        if not instance or len(token) != 12:
            instance, token = who, ""  # a name from before incarnations
        return Holder.from_record({"instance": instance, "token": token}), job_id

    def _recover_staging(self, staging: Path, prefix: str) -> None:
        holder, job_id = self._staging_holder(staging, prefix)
        if RECOVERING not in staging.name:
            # Ours are leftovers too: take_over never runs in the middle of our claims.
            if holder is not None and not self._gone(holder, "", None):
                return  # a live peer is in the middle of its claim
            # Renamed first, looked into after (design §1): a claimer stalled before its
            # rename can no longer put the file in; one that did left it inside.
            grave = staging.with_name(f"{staging.name}{RECOVERING}{secrets.token_hex(3)}")
            fsio.move(staging, grave)
            staging = grave
        if (staging / STATE).exists() and any(
            p.name != STATE and not p.name.startswith(".") for p in staging.iterdir()
        ):
            log.info("finishing interrupted claim", job_id=job_id)
            fsio.move(staging, staging.parent / job_id)  # C3
            return
        self._take_down(staging)  # C1/C2: the file is still in incoming/
