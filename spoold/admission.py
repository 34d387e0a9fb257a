"""Admission (SPEC §2): one pass over incoming/ turns what arrived into queued jobs.

Settled `.jsonl` files are claimed into processing/<job_id>/ in arrival order while the
queue limits allow; the queue's load is looked at again before every claim, so several
daemons on one spool keep the limits to within one file each (design §2, "Queue limits
across daemons"). What will never run (not a job, too big, too many requests) goes to
failed/ with the reason; a file waiting for room stays in incoming/ untouched. An entry
that cannot be moved out (a full disk, a permission, another filesystem) is said once
and tried again every UNMOVABLE_RETRY_S; it never stops the pass.

One pass at a time, under the daemon's spool lock: between jobs its loop's, while a job
runs AdmitWhileRunning's, in a thread of its own, off the runner's path.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from spoold.config import LimitsConfig
from spoold.fsio import Fenced
from spoold.spool import Entry, Kind, QueueLoad, SettleTracker, Spool, count_requests

log = structlog.get_logger("spoold.admission")

UNMOVABLE_RETRY_S = 60.0
WHILE_RUNNING_S = 1.0  # while a job runs, a pass about once a second
JOIN_S = 2.0  # how long stop() waits for a pass in flight (one on a hung mount: not longer)

ProblemFn = Callable[[str, str | None], None]  # (topic, text or None: solved)


@dataclass
class AdmitReport:
    """What one pass over incoming/ saw."""

    claimed: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # settled, held back by queue limits
    settling: list[Entry] = field(default_factory=list)
    held: str | None = None  # why every job waits (the disk is too full), if it does


class Admission:
    """Pick-up of incoming/ for one daemon: what it has seen settling, the request
    counts of files it has read, the entries it could not move."""

    def __init__(
        self,
        spool: Spool,
        limits: LimitsConfig,
        settle_s: float,
        clock: Callable[[], float] = time.monotonic,
        disk_problem: Callable[[], str | None] = lambda: None,
        on_problem: ProblemFn = lambda topic, text: None,
    ) -> None:
        self.spool = spool
        self.limits = limits
        self.clock = clock
        self.settle = SettleTracker(settle_s)
        # What keeps every file waiting (limits.min_free_disk_mb), None when nothing.
        self.disk_problem = disk_problem
        # Problems by topic ("incoming:<name>"), for the heartbeat's `problems`.
        self.on_problem = on_problem
        self._counts: dict[str, tuple[tuple[int, int], int, int]] = {}
        # Entries we could not move out of incoming/: name → when to try again. Said
        # once in the log; a problem while they stay.
        self._unmovable: dict[str, float] = {}
        self._failing: dict[str, str] = {}  # topic → what was said about its failure

    def admit(self) -> AdmitReport:
        """One pass over incoming/: reject what will never run, claim what fits, in order.
        Raises OSError only when incoming/ or processing/ cannot be listed."""
        report = AdmitReport()
        entries = self.spool.scan_incoming()
        names = {e.name for e in entries}
        self.settle.prune(names)
        self._counts = {k: v for k, v in self._counts.items() if k in names}
        for gone in self._unmovable.keys() - names:  # gone or renamed: no longer a problem
            del self._unmovable[gone]
            self.on_problem(f"incoming:{gone}", None)
        load: QueueLoad | None = None
        now = self.clock()
        for entry in entries:
            if entry.kind is Kind.UPLOADING or self._unmovable.get(entry.name, 0.0) > now:
                continue
            if not self.settle.settled(entry, now):
                report.settling.append(entry)
                continue
            if entry.kind is Kind.NOT_A_JOB:
                self._reject(entry, entry.reason or "not a job")
                continue
            sized = self._count(entry)
            if sized is None:
                continue
            total, nbytes = sized
            limits = self.limits
            if total < 0:
                self._reject(
                    entry,
                    f"{entry.name} is {nbytes} bytes, over limits.max_file_bytes "
                    f"({limits.max_file_bytes}): split it into smaller files",
                )
                continue
            if total > limits.max_requests_per_job:
                self._reject(
                    entry,
                    f"{entry.name} has {total} requests, over limits.max_requests_per_job "
                    f"({limits.max_requests_per_job}): split it into smaller files",
                    total,
                )
                continue
            first = load is None
            # Looked at again before every claim: what other daemons claimed meanwhile
            # counts, so the limits hold to within one file per daemon (design §2).
            load = self.spool.queue_load(fresh=first)
            if first:
                disk = self.disk_problem()
                if disk:
                    report.waiting.extend(e.name for e in entries if e.kind is Kind.JOB)
                    report.held = disk
                    break
            if load.jobs >= limits.max_queue_depth or (
                load.jobs > 0 and load.requests + total > limits.max_total_queued_requests
            ):
                # Arrival order is kept: nothing behind a waiting file jumps the queue.
                report.waiting.extend(
                    e.name for e in entries[entries.index(entry) :] if e.kind is Kind.JOB
                )
                break
            try:
                job_id = self.spool.claim(entry, total, nbytes)
            except OSError as e:
                hint = ""
                if e.errno == errno.EXDEV:
                    hint = (
                        ": incoming/ and processing/ are on different filesystems; "
                        "keep the whole spool on one filesystem"
                    )
                self._report_unmovable(entry, f"cannot claim {entry.name}{hint}", e)
                continue
            self._movable_again(entry.name)
            if job_id is not None:
                log.info("job claimed", job_id=job_id, source=entry.name, requests=total)
                report.claimed.append(job_id)
        return report

    def try_admit(self) -> AdmitReport:
        """admit(), what goes wrong said and shown as a problem, never raised: the
        daemon goes on with the jobs it has, and the next pass tries again."""
        try:
            report = self.admit()
        except Exception as e:
            self.failed(
                "admission",
                "cannot admit files from incoming/",
                e,
                f"check that {self.spool.incoming} and {self.spool.processing} are "
                "directories this daemon can read and write",
            )
            return AdmitReport()
        self.ok("admission")
        return report

    def failed(self, topic: str, what: str, error: Exception, hint: str = "") -> None:
        """A pass's work on `topic` failed: said once (again if it changes; a bug with
        its traceback), a problem until ok(topic). Called from an `except` block."""
        if isinstance(error, Fenced):
            # Another daemon took our work over: the loop starts a new incarnation and
            # the next pass goes on with it. Not a problem to show, nor a bug.
            log.info("fenced during a pass", what=what, error=str(error))
            return
        said = f"{type(error).__name__}: {error}"
        text = f"{what}: {said}" + (f"; {hint}" if hint else "") + " (tried again at each pass)"
        if self._failing.get(topic) != text:
            self._failing[topic] = text
            if isinstance(error, OSError):
                log.error(what, error=said, hint=hint or None)
            else:
                log.exception(what, hint=hint or None)
        self.on_problem(topic, text)

    def cannot_admit(self) -> str | None:
        """Why the last pass could not look at incoming/, if it could not."""
        return self._failing.get("admission")

    def ok(self, topic: str) -> None:
        if self._failing.pop(topic, None) is not None:
            log.info("working again", what=topic)
            self.on_problem(topic, None)

    def settle_wait_s(self, report: AdmitReport) -> float | None:
        """Seconds until the first of the report's settling files may be claimed."""
        now = self.clock()
        return min((self.settle.wait_left(e, now) for e in report.settling), default=None)

    def about_to_settle(self, report: AdmitReport) -> bool:
        """Whether a settling file is not an upload still growing (--drain waits for it)."""
        return any(e.name not in self.settle.changed for e in report.settling)

    def _count(self, entry: Entry) -> tuple[int, int] | None:
        cached = self._counts.get(entry.name)
        if cached is not None and cached[0] == entry.fingerprint:
            return cached[1], cached[2]
        try:
            total, nbytes = count_requests(entry.path, self.limits.max_file_bytes)
        except FileNotFoundError:
            return None  # taken by another daemon meanwhile
        except OSError as e:
            self._reject(entry, f"the daemon cannot read {entry.name}: {e}")
            return None
        self._counts[entry.name] = (entry.fingerprint, total, nbytes)
        return total, nbytes

    def _reject(self, entry: Entry, reason: str, total: int | None = None) -> None:
        try:
            job_id = self.spool.reject(entry, reason, total)
        except OSError as e:
            self._report_unmovable(entry, reason, e)
            return
        self._movable_again(entry.name)
        if job_id is not None:
            log.warning("rejected", job_id=job_id, source=entry.name, reason=reason)

    def _report_unmovable(self, entry: Entry, reason: str, error: OSError) -> None:
        """An entry we cannot move out of incoming/: said once (log, and the heartbeat's
        `problems`, so spool-status shows it), tried again every UNMOVABLE_RETRY_S (the
        cause may pass: a full disk, a fixed permission, a flaky mount)."""
        if entry.name not in self._unmovable:
            log.error(
                "cannot move entry out of incoming/",
                entry=entry.name,
                reason=reason,
                error=str(error),
            )
        self._unmovable[entry.name] = self.clock() + UNMOVABLE_RETRY_S
        self.on_problem(
            f"incoming:{entry.name}", f"cannot move incoming/{entry.name}: {reason}: {error}"
        )

    def _movable_again(self, name: str) -> None:
        if self._unmovable.pop(name, None) is not None:
            log.info("entry moved out of incoming/ after all", entry=name)
            self.on_problem(f"incoming:{name}", None)


class AdmitWhileRunning:
    """A thread that, while a job runs, passes over incoming/ about once a second
    (sooner when a file is due to settle), so that a file dropped behind a long job is
    queued with its job_id within a second of settling, and can be cancelled from
    there; then `also` (the daemon files the other jobs' cancels). Each pass under
    `lock`. What goes wrong is a problem (log, heartbeat): never the running job's
    failure, and none of its time."""

    def __init__(
        self,
        admission: Admission,
        lock: threading.RLock,
        busy: Callable[[], bool],
        also: Callable[[AdmitReport], None],
        also_what: str,
    ) -> None:
        self.admission = admission
        self.lock = lock
        self.busy = busy  # a job runs, and no stop was asked for (stopping: no new work)
        self.also, self.also_what = also, also_what
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._done.clear()
        self._thread = threading.Thread(target=self._loop, name="admission", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(JOIN_S)
            self._thread = None

    def _loop(self) -> None:
        wait = WHILE_RUNNING_S
        while not self._done.wait(wait):
            wait = WHILE_RUNNING_S
            with self.lock:
                if not self.busy():
                    # Between jobs the daemon's loop admits and files cancels itself.
                    self.admission.ok("while-running")
                    continue
                report = self.admission.try_admit()
                try:
                    self.also(report)
                except Exception as e:
                    self.admission.failed("while-running", self.also_what, e)
                else:
                    self.admission.ok("while-running")
                due = self.admission.settle_wait_s(report)
            if due is not None:
                wait = min(wait, max(0.05, due))
