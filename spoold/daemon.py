"""The daemon: recover → (admit → run one job → heartbeat)* → shut down.

Signals reach request_stop from spoold.signals' thread; the loop checks the flag
between steps. While a job runs, spoold.admission's AdmitWhileRunning admits files and
files other jobs' cancels in a thread of its own; every way out ends in shutdown, whose
last heartbeat says `stopped` and why.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from spoold.admission import Admission, AdmitReport, AdmitWhileRunning
from spoold.backoff import Backoff
from spoold.config import Config
from spoold.engines.base import ClusterUnavailable, Engine, EngineFatal, ModelLoadError
from spoold.execution import Hooks, input_matches
from spoold.fsio import Fenced
from spoold.gpu import GpuGuard, GpuReader
from spoold.heartbeat import Heartbeat
from spoold.job import (
    CANCELLED,
    FAILED,
    INPUT,
    QUEUED,
    RUNNING,
    TERMINAL,
    JobState,
    load_state,
    unreadable_problem,
)
from spoold.lease import InstanceTaken, Lease
from spoold.metrics import MetricsWriter
from spoold.notify import Notifier
from spoold.runner import (
    DISK_FULL_ERRNOS,
    DiskFull,
    IOFailure,
    Runner,
    cut_to_checkpoint,
    finish_job,
    give_back,
    restart_from_scratch,
)
from spoold.signals import SignalWatcher
from spoold.spool import Spool
from spoold.validate import GENERATE, first_request, runner_of
from spoold.watch import Watcher

log = structlog.get_logger("spoold.daemon")

EngineFactory = Callable[[str, str], Engine]  # (model, runner) → engine


def load_key(model: str, runner: str) -> str:
    """What a model's loads are counted under: one model loaded with the pooling runner
    (for embeddings jobs) is another load than the same model as a generator."""
    return model if runner == GENERATE else f"{model} (runner {runner})"


MODEL_RETRY_CAP_S = 1800.0
JOB_RETRY_CAP_S = 300.0  # a job whose run hit an I/O error
# --drain waits out an I/O error's backoff this many times per job (default config:
# 5 + 10 + 20 + 40 s), or until max_job_attempts has quarantined a persistent one.
DRAIN_IO_TRIES = 5


class _Engines:
    """The runner's engine source for one job's model (execution.EngineSource)."""

    def __init__(self, daemon: Daemon, model: str, runner: str) -> None:
        self.daemon = daemon
        self.model = model
        self.runner = runner

    def get(self) -> Engine | None:
        return self.daemon._engine_for(self.model, self.runner)

    def reload(self) -> Engine | None:
        """After an engine death: close what is left and load afresh (None: asked to
        stop meanwhile). A daemon that cannot load its model again exits (the service
        manager restarts it)."""
        daemon = self.daemon
        engine = daemon.engine
        if engine is not None and engine.revive():  # the ray backend: a replica replaced
            log.warning("replacing what died of the engine", model=self.model)
            return engine
        if engine is not None:
            with contextlib.suppress(Exception):
                daemon.close_engine()
        log.warning("reloading the engine after its death", model=self.model)
        try:
            return daemon._engine_for(self.model, self.runner)
        except ModelLoadError as e:
            raise EngineFatal(f"the engine died and cannot be reloaded: {e}") from e


class Daemon:
    def __init__(
        self,
        cfg: Config,
        engine_factory: EngineFactory,
        clock: Callable[[], float] = time.monotonic,
        gpu_reader: GpuReader | None = None,
        disk_free: Callable[[Path], int] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spool = Spool(cfg.spool_dir, cfg.instance, cfg.heartbeat.stale_after_s)
        self.engine_factory = engine_factory
        self.engine: Engine | None = None
        self.clock = clock
        self.stop_requested = threading.Event()
        self.stop_reason: str | None = None  # what asked (SIGTERM…), for the last heartbeat
        self._stop_lock = threading.Lock()  # request_stop may come from any thread
        self._stop_timer: threading.Timer | None = None
        self._signals: SignalWatcher | None = None
        self.wake = threading.Event()  # set by filesystem events and signals
        self.notifier = Notifier()
        # Without a watcher (--drain) poll briskly; with one, events wake us and the
        # full rescan every watch.rescan_interval_s is the safety net.
        self._max_idle_s = 1.0
        self._job_models: dict[str, tuple[str, str]] = {}  # job id → (model, runner)
        # What is wrong now, by topic ("model:…", "job:…", "incoming:…"): the heartbeat's
        # `problems`, so spool-status shows it. Set from the loop and the side thread.
        self._problems: dict[str, str] = {}
        self._problems_lock = threading.Lock()
        p = cfg.processing
        self.model_loads = Backoff(p.model_retry_s, max(p.model_retry_s, MODEL_RETRY_CAP_S), clock)
        self.job_retries = Backoff(p.io_retry_s, max(p.io_retry_s, JOB_RETRY_CAP_S), clock)
        self.models_failed = 0  # jobs filed as failed because their model never loaded
        # The ray backend's cluster, while it cannot be reached (design §10): every job
        # waits; nothing is counted against a model or a job.
        self.cluster = Backoff(p.model_retry_s, max(p.model_retry_s, MODEL_RETRY_CAP_S), clock)
        self._engine_seen: dict[str, Any] | None = None  # the last engine section
        self._drain_io_tries = max(DRAIN_IO_TRIES, p.max_job_attempts + 1)
        # Jobs whose input changed after the claim, settling again (design §5c): job id →
        # (the input's size, mtime and ctime, when first seen so).
        self._resettle: dict[str, tuple[tuple[int, int, int], float]] = {}
        self._current_job: str | None = None  # the job this daemon is running, and where
        self._current_dir: Path | None = None
        self.hooks = Hooks(
            self.stop_requested.is_set, self._progress, self.gate, refresh=self._refresh_lease
        )
        limits = {k: getattr(cfg.limits, k) for k in vars(cfg.limits)}
        limits["chunk_size"] = cfg.processing.chunk_size
        # At least every stale_after_s / 3, so that our lease stays fresh between beats.
        beat_s = min(cfg.heartbeat.interval_s, cfg.heartbeat.stale_after_s / 3)
        self.heartbeat = Heartbeat(cfg.heartbeat_path, beat_s, limits)
        self._lend_lease()
        self.heartbeat.on_fenced = self.wake.set
        self.heartbeat.on_error = self._beat_failed
        self._beat_error_said = -1e9  # when a failing heartbeat write was last logged
        self.lease_lost = False  # --drain gave up: its heartbeat could not be written
        self.guard = GpuGuard(cfg.gpu, gpu_reader)
        self.heartbeat.sampler = lambda: {
            "gpu": self.guard.sample(),
            "engine": self._engine_section(),
        }
        self.disk_free = disk_free or (lambda path: shutil.disk_usage(path).free)
        self.admission = Admission(
            self.spool,
            cfg.limits,
            cfg.watch.settle_seconds,
            clock,
            disk_problem=self._disk_problem,
            on_problem=self._problem,
        )
        # One pass over the spool's queue at a time: the loop's (take-overs, admission,
        # picking the next job), or the side thread's while a job runs. Never held
        # while a job runs or the daemon waits.
        self._pass_lock = threading.RLock()
        self._side = AdmitWhileRunning(
            self.admission,
            self._pass_lock,
            lambda: self._current_job is not None and not self.stop_requested.is_set(),
            self._beside_job,
            "cannot file the cancelled jobs in processing/",
        )
        self._exit_reason: str | None = None  # why run() exits non-zero, for the last beat
        self.metrics: MetricsWriter | None = None
        if cfg.metrics.textfile:
            self.metrics = MetricsWriter(Path(cfg.metrics.textfile), cfg.spool_dir, cfg.instance)
        self.heartbeat.on_beat = self._on_beat
        self.poll_s = 5.0  # how often a throttled daemon looks again
        # recover() has just done it at start-up.
        self._next_take_over = clock() + cfg.heartbeat.stale_after_s / 2

    # -- life cycle ---------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the loop at the next chunk boundary (from the main thread).

        The handlers do nothing themselves: a handler runs inside whatever the main
        thread was doing, locks held included, and request_stop takes locks. The
        signals' own thread calls it (spoold.signals); shutdown closes that thread."""
        if self._signals is None:
            self._signals = SignalWatcher(lambda signum: self.request_stop(signum.name))
            self._signals.start()

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop taking work; abandon the current chunk if it outlives stop_timeout_s.
        Once only (a second request changes nothing); from any thread, never from a
        signal handler."""
        with self._stop_lock:
            if self.stop_requested.is_set():
                return
            self.stop_reason = reason
            # `stopping` before the flag: the loop, seeing the flag, may write `stopped`.
            self.heartbeat.set(status="stopping", reason=reason)
            self.stop_requested.set()
            timer = threading.Timer(self.cfg.processing.stop_timeout_s, self._abandon)
            timer.daemon = True
            timer.start()
            self._stop_timer = timer
        self.wake.set()
        log.info("stop requested", reason=reason)

    def _abandon(self) -> None:
        # The chunk did not finish in time: exit without committing it. Its results
        # are past the checkpoint, so the next start truncates and redoes them.
        log.warning(
            "stop timeout: abandoning the current chunk",
            stop_timeout_s=self.cfg.processing.stop_timeout_s,
        )
        self.notifier.stopping()
        # Not a crash of the job (SPEC §3): its attempt is given back, under the commit
        # lock so that no commit is half done (design §3). A commit stuck in a hung
        # fsync keeps the lock: then the attempt stays counted, and we go anyway.
        # Whatever fails here (a fence, a full disk), the process exits: this thread is
        # the stop's last resort.
        try:
            job_dir = self._current_dir
            if job_dir is not None and self.hooks.commit_lock.acquire(timeout=2.0):
                with contextlib.suppress(Exception):
                    if self.spool.still_owner(job_dir):
                        give_back(self.spool, job_dir)
            engine = self.engine
            if engine is not None:
                with contextlib.suppress(Exception):
                    engine.kill_now()
            with contextlib.suppress(Exception):
                self.heartbeat.stop("stopped", reason=f"{self.stop_reason}; stop timeout")
            with contextlib.suppress(Exception):
                self.spool.lease.release()
        finally:
            os._exit(0)

    def run(self, drain: bool = False) -> int:
        """recover → (admit → run one job)* until stopped (or drained). The exit code.
        Once the instance is ours, every way out goes through shutdown: the last
        heartbeat says `stopped` and why (SPEC §4)."""
        self.spool.ensure_layout()
        self.spool.lease.ensure_dir()  # our lease directory first, then the instance lease
        try:
            claimed = self._claim_instance()
        except InstanceTaken:
            self._let_go()  # without the instance lease: no heartbeat is ours
            raise
        if not claimed:  # asked to stop while waiting for the instance
            self._let_go()  # without the instance lease: no heartbeat is ours
            return 0
        self.heartbeat.start()  # before recovery, which may take a while
        watcher = None
        code = 1
        try:
            if not self._recover():
                return code
            if not drain:
                watcher = Watcher(
                    [self.spool.incoming, self.spool.processing], self.wake, self.cfg.watch.polling
                )
                watcher.start()
                self._max_idle_s = self.cfg.watch.rescan_interval_s
            self._side.start()
            log.info(
                "spoold started",
                spool=str(self.spool.root),
                instance=self.cfg.instance,
                drain=drain,
            )
            self.notifier.ready("recovered; watching incoming/")
            code = self._loop(drain)
        finally:
            if watcher is not None:
                try:
                    watcher.stop()
                except Exception as e:  # the last heartbeat is still due
                    log.warning("cannot stop watching incoming/", error=str(e))
            self.shutdown(code)
        return code

    def _recover(self) -> bool:
        """Start-up recovery (design §7). False, said, if the spool cannot be repaired (a
        leftover the daemon may not remove, a failing filesystem): nothing runs on a
        half-repaired spool, and the last heartbeat names the cause."""
        try:
            self.spool.recover()
        except Fenced as e:  # stalled in recovery, judged stale: the loop starts anew
            self._fenced(e)
        except OSError as e:
            log.error("cannot recover the spool; fix the cause and start again", error=str(e))
            self._exit_reason = f"cannot recover the spool: {e}; fix that and start again"
            return False
        return True

    def _loop(self, drain: bool) -> int:
        """The loop proper, until stopped (or drained); its exit code."""
        try:
            while not self.stop_requested.is_set():
                self.notifier.watchdog()
                if self.spool.lease.fenced and not self._reincarnate():
                    break
                self._watch_lease()
                self._take_over_dead_peers()
                with self._pass_lock:
                    report = self._shown(self.admission.try_admit())
                try:
                    ran = self.run_next_job()
                except Fenced as e:
                    self._fenced(e)
                    continue
                except (DiskFull, OSError) as e:
                    # A full disk in a job's run (DiskFull) or around it (acquire, filing).
                    if isinstance(e, OSError) and e.errno not in DISK_FULL_ERRNOS:
                        raise
                    if drain and isinstance(e, DiskFull):
                        raise
                    if drain:
                        raise DiskFull(str(e)) from e
                    self._wait_throttled(f"disk full: {e}")  # then try again
                    continue
                if ran:
                    continue
                try:
                    if drain and len(self.model_loads) and self.run_next_job(ignore_backoff=True):
                        continue  # only jobs of models that failed to load are left: try now
                except Fenced as e:
                    self._fenced(e)
                    continue
                if drain and not self._lease_holds():
                    break
                if drain and self._cluster_given_up():
                    break
                if drain and not self._drain_should_wait(report):
                    break
                self._idle(report)
        except EngineFatal as e:
            log.error("the engine died; exiting so the service manager restarts us", error=str(e))
            return self._exiting(1, str(e))
        except InstanceTaken as e:  # fenced, and another daemon holds our instance now
            log.error("another daemon holds this instance", error=str(e))
            return self._exiting(2, str(e))
        except DiskFull as e:  # only with --drain: the live loop waits for room instead
            log.error("the spool's disk is full; stopping the drain", error=str(e))
            return self._exiting(1, f"the spool's disk is full: {e}")
        return self._drain_code() if drain else 0

    def _drain_code(self) -> int:
        """--drain's exit code: 1 if it left work behind, failed jobs it could have run
        or could not look at incoming/ (said to cron and scripts, and in the last
        heartbeat), else 0."""
        left = []
        if self.models_failed:
            log.error("jobs failed because their model could not load", jobs=self.models_failed)
            left.append(f"{self.models_failed} job(s) failed: their model could not load")
        if len(self.job_retries):
            # They kept failing with I/O errors: left queued for the next run.
            jobs = sorted(job_id for job_id, _ in self.job_retries)
            log.error("jobs left in processing/ after repeated I/O errors", jobs=jobs)
            left.append(f"left in processing/ after repeated I/O errors: {', '.join(jobs)}")
        cluster = self.cluster.get("ray")
        if cluster is not None:
            left.append(f"jobs left queued: {cluster.error}")
        if self.lease_lost:  # said when it gave up: work may be left in processing/
            left.append("the heartbeat could not be written; work left in processing/")
        cannot_admit = self.admission.cannot_admit()
        if cannot_admit:
            left.append(cannot_admit)
        if self.spool.unreadable:
            jobs = sorted(self.spool.unreadable)
            log.error("jobs left in processing/: their records cannot be read", jobs=jobs)
            left.append(f"left in processing/, records unreadable: {', '.join(jobs)}")
        if left:
            return self._exiting(1, "drained, but " + "; ".join(left))
        return 0

    def _exiting(self, code: int, reason: str) -> int:
        self._exit_reason = reason
        return code

    def _take_over_dead_peers(self) -> None:
        """Peers die while we run: their half-done claims and unmoved finished jobs
        are repaired here too, not only at our next start (about every
        heartbeat.stale_after_s / 2; their unfinished jobs are taken over by acquire)."""
        now = self.clock()
        if now < self._next_take_over:
            return
        self._next_take_over = now + self.cfg.heartbeat.stale_after_s / 2
        try:
            with self._pass_lock:  # never in the middle of our own claims (spool.take_over)
                self.spool.take_over()
        except OSError as e:  # a peer moved something meanwhile: next time
            log.warning("cannot repair a dead peer's leftovers yet", error=str(e))
        except Fenced as e:  # we stalled in a repair and were judged stale: a new life
            self._fenced(e)

    def _lend_lease(self) -> None:
        """Our heartbeat carries our incarnation and lands through its lease (design §2)."""
        lease = self.spool.lease
        self.heartbeat.set(token=lease.token, host_id=lease.identity()["host_id"])
        self.heartbeat.writer = lease.beat

    def _claim_instance(self) -> bool:
        """One live daemon per instance name (design §2, the instance lease); raises
        InstanceTaken naming the holder. False if asked to stop while waiting."""
        lease = self.spool.lease
        log.info("taking the instance lease", instance=lease.instance, token=lease.token)
        return lease.claim_instance(
            self.spool.observer, self._first_beat, self.stop_requested.is_set
        )

    def _first_beat(self) -> bytes:
        """The beat that takes the instance: `starting`, or `stopping` if asked already."""
        with self._stop_lock:
            status = "stopping" if self.stop_requested.is_set() else "starting"
            return self.heartbeat.record(status=status)[0]

    def _let_go(self) -> None:
        """The last of an exit: our lease directory goes, the signals are let go, the
        stop timer has nothing left to abandon."""
        self.spool.lease.release()
        if self._signals is not None:
            # The process is on its way out: a late SIGTERM must not kill it (it
            # exits 0), so the signals keep doing nothing.
            self._signals.close(restore_handlers=False)
            self._signals = None
        with self._stop_lock:
            if self._stop_timer is not None:
                self._stop_timer.cancel()  # stopped in time: nothing to abandon

    def _fenced(self, error: Exception) -> None:
        """A write found our lease directory gone: another daemon judged us dead and took
        our work over. Drop what we held without touching it; a new incarnation goes on."""
        log.info("a write found the lease directory gone", error=str(error))
        self.spool.lease.fenced = True

    def _reincarnate(self) -> bool:
        """Go on as a new incarnation: new token and lease directory, the instance lease
        taken again (the engine stays loaded). Raises InstanceTaken if another live daemon
        holds our instance now; False if asked to stop meanwhile."""
        old = self.spool.lease.token
        log.warning(
            "fenced",
            token=old,
            detail="another daemon judged this one dead and took its work over; going on "
            "as a new incarnation",
        )
        with self._pass_lock:  # a side pass may be ending: not under its feet
            self.spool.lease = Lease(
                self.spool.heartbeats, self.cfg.instance, self.cfg.heartbeat.stale_after_s
            )
        self.spool.lease.ensure_dir()
        self._lend_lease()
        if not self._claim_instance():
            return False
        log.warning("new incarnation after being fenced", old_token=old)
        self._resettle.clear()
        return True

    def _beat_failed(self, error: OSError) -> None:
        """A heartbeat could not be written (a full disk, a flaky mount): said once a
        minute. While it lasts our lease is not fresh: nothing is committed or acquired."""
        now = time.monotonic()
        if now - self._beat_error_said >= 60:
            self._beat_error_said = now
            log.error(
                "cannot write the heartbeat; no commit until one lands",
                path=str(self.heartbeat.path),
                error=str(error),
            )

    def _watch_lease(self) -> None:
        """Say so when our heartbeat lands but too late to keep the lease fresh (a write
        slower than stale_after_s / 2): the daemon then commits and acquires nothing,
        and its peers still see it alive."""
        lease = self.spool.lease
        slow = lease.last_write_s >= self.cfg.heartbeat.stale_after_s / 2
        self._problem(
            "lease",
            f"heartbeat writes take {lease.last_write_s:.1f} s, more than half of "
            f"heartbeat.stale_after_s ({self.cfg.heartbeat.stale_after_s:g} s): nothing is "
            "committed or started until they are faster (a slow or hung spool filesystem)"
            if slow
            else None,
        )

    def _lease_holds(self) -> bool:
        """--drain: False once no heartbeat has landed for stale_after_s past the end of
        our lease's freshness (it cannot be written): it stops then, exit 1, rather than
        report as drained what it could not run. Waits meanwhile (the write may come
        back)."""
        lease = self.spool.lease
        if lease.fresh() or lease.fenced or lease.ok_at is None:
            return True
        stale_after_s = self.cfg.heartbeat.stale_after_s
        if time.monotonic() - lease.ok_at < 1.5 * stale_after_s:
            return True
        log.error(
            "the heartbeat could not be written for heartbeat.stale_after_s; stopping the "
            "drain with work left",
            path=str(self.heartbeat.path),
        )
        self.lease_lost = True
        return False

    def _refresh_lease(self) -> None:
        """A run found our lease not fresh (a pause, a hung write): beat now; raises
        Fenced if another daemon took our work over meanwhile."""
        lease = self.spool.lease
        lease.check()
        with contextlib.suppress(OSError):
            self.heartbeat.write()
        lease.check()

    def shutdown(self, code: int = 0) -> None:
        """Close the engine, then write the heartbeat a last time (`stopped`, and why:
        SIGTERM, drained…) and let go of the signals. `code`: run's exit code."""
        self._side.stop()
        reason = self._stopped_because(code)
        self.notifier.stopping()
        self.heartbeat.set(status="stopping", reason=reason, current_job=None)
        try:
            # Before `stopped`: a daemon that starts as this instance once it reads
            # `stopped` must find the GPU memory given back.
            self.close_engine()
        finally:
            try:
                self.heartbeat.stop("stopped", reason=reason)
            except (OSError, Fenced) as e:  # a full disk: the exit is clean all the same
                log.warning("cannot write the last heartbeat", error=str(e))
            self._let_go()
        log.info("spoold stopped", reason=reason)

    def _stopped_because(self, code: int) -> str:
        """The last heartbeat's `reason`: what asked to stop (SIGTERM…), why run exits
        non-zero, an error on its way out of run; else `drained` (--drain's end)."""
        error = sys.exc_info()[1]  # shutdown runs in run's `finally`
        crash = f"crashed: {type(error).__name__}: {error}" if error is not None else None
        reasons = [r for r in (self.stop_reason, self._exit_reason, crash) if r]
        if reasons:
            return "; ".join(reasons)
        return "drained" if code == 0 else f"exited with code {code}: see the log"

    def _idle(self, report: AdmitReport) -> None:
        waiting = len(report.waiting)
        self._show(status="idle", current_job=None, waiting=waiting)
        self.notifier.status(f"idle; {waiting} file(s) waiting for room" if waiting else "idle")
        now = self.clock()
        with self._pass_lock:  # a side pass may be ending
            settles = self.admission.settle_wait_s(report)
        waits = [] if settles is None else [settles]
        backoffs = (self.model_loads, self.job_retries, self.cluster)
        due = [d - now for d in (b.next_due() for b in backoffs) if d]
        timeout = min([*waits, *due, self._max_idle_s, self._next_take_over - now])
        if self._resettle:
            timeout = min(timeout, self.cfg.watch.settle_seconds)
        self.wake.wait(max(0.05, timeout))
        self.wake.clear()

    def _drain_should_wait(self, report: AdmitReport) -> bool:
        """--drain waits for files about to settle (not for uploads still growing), for
        claimed inputs settling again, and for jobs waiting out an I/O error's backoff."""
        with self._pass_lock:  # a side pass may be ending
            settling = self.admission.about_to_settle(report)
        return (
            settling
            or bool(report.waiting)
            or bool(self._resettle)
            or any(f.attempts < self._drain_io_tries for _, f in self.job_retries)
            or bool(self.cluster)  # a lost ray cluster, until _cluster_given_up
            # Jobs of peers not judged yet: alive (seen beating) or dead (stale_after_s).
            or bool(self.spool.owners_undecided())
            # Our heartbeat does not land: we acquire nothing meanwhile (_lease_holds).
            or not self.spool.lease.fresh()
        )

    # -- admission (spoold.admission) and the side work while a job runs -------------

    def admit(self) -> AdmitReport:
        """One pass over incoming/ (spoold.admission). Raises OSError when incoming/ or
        processing/ cannot be listed."""
        with self._pass_lock:
            return self._shown(self.admission.admit())

    def _shown(self, report: AdmitReport) -> AdmitReport:
        """A pass's report in the heartbeat: how many files wait, and why if all do."""
        self.heartbeat.set(waiting=len(report.waiting))
        if report.held:
            self._show(reason=report.held)
        return report

    def _beside_job(self, report: AdmitReport) -> None:
        """After each pass while a job runs (the side thread): the files waiting for
        room, and the cancelled jobs nobody runs filed (the running one stops at its
        next chunk boundary)."""
        self._shown(report)
        cancels = []
        for d in self.spool.job_dirs():
            if self.spool.cancel_requested(d):
                with contextlib.suppress(OSError, ValueError):
                    cancels.append((d, load_state(d)))
        self._finish_cancelled(cancels)

    def _problem(self, topic: str, text: str | None) -> None:
        """Say (or, with None, stop saying) what is wrong about `topic` in the heartbeat.
        From the loop and the side thread."""
        with self._problems_lock:
            if text is None:
                if self._problems.pop(topic, None) is None:
                    return
            elif self._problems.get(topic) == text:
                return
            else:
                self._problems[topic] = text
            self.heartbeat.set(problems=[self._problems[k] for k in sorted(self._problems)])

    def _show(self, **fields: Any) -> None:
        """Heartbeat fields. From the stop request on, `status` and `reason` stay the
        stop's: `stopping` until the last beat says `stopped` (SPEC §3, §4)."""
        with self._stop_lock:
            if self.stop_requested.is_set():
                fields.pop("status", None)
                fields.pop("reason", None)
            self.heartbeat.set(**fields)

    def _on_beat(self, beat: dict[str, Any]) -> None:
        """After each heartbeat (its own thread): metrics, and the watchdog while a model
        loads. Loading a big model outlasts WatchdogSec, and nothing else pings then;
        the beats prove the process is alive meanwhile."""
        if beat.get("status") == "loading_model":
            self.notifier.watchdog()
        if self.metrics is None:
            return
        try:
            self.metrics.write(beat)
        except OSError as e:  # a metrics file is never a reason to stop working
            log.warning("cannot write metrics.textfile", path=str(self.metrics.path), error=str(e))

    # -- protection (GPU, disk) -----------------------------------------------------

    def _disk_problem(self) -> str | None:
        need_mb = self.cfg.limits.min_free_disk_mb
        if need_mb <= 0:
            return None
        free_mb = self.disk_free(self.spool.root) // (1 << 20)
        if free_mb >= need_mb:
            return None
        return f"{free_mb} MB free on the spool's filesystem < limits.min_free_disk_mb {need_mb}"

    def gate(self) -> bool:
        """Wait while a GPU is too hot or full, or the disk too full. False if stopping."""
        throttled = False
        while not self.stop_requested.is_set():
            gpu = None if self.guard.check() else self.guard.reason
            reason = "; ".join(r for r in (gpu, self._disk_problem()) if r)
            if not reason:
                if throttled:
                    log.info("throttling over")
                    self._show(status="processing", reason=None)
                return True
            if not throttled:
                log.warning("throttled", reason=reason)
                throttled = True
            self._wait_throttled(reason)
        return False

    def _wait_throttled(self, reason: str) -> None:
        """Say why work waits (heartbeat, systemd), stay alive, sleep one poll."""
        self._show(status="throttled", reason=reason)
        self.notifier.status(f"throttled: {reason}")
        self.notifier.watchdog()  # alive, waiting on purpose
        self.wake.wait(self.poll_s)
        self.wake.clear()

    # -- running --------------------------------------------------------------------

    def run_next_job(self, ignore_backoff: bool = False) -> bool:
        """Run the oldest job we can own (SPEC: arrival order; with
        processing.prefer_loaded_model, the loaded model's first). False if none.
        Jobs of a model in its load backoff, and jobs waiting out an I/O error, wait
        (design §8); `ignore_backoff` tries them now (--drain, nothing else left)."""
        with self._pass_lock:  # picked while no side pass files cancels or claims
            picked = self._pick_job(ignore_backoff)
            if picked is None:
                return False
            job_dir, state, (model, runner) = picked
            # Not to be filed as a cancelled "queued" job under its runner (side work).
            self._current_job, self._current_dir = state.id, job_dir
        try:
            self._run_acquired(job_dir, state, model, runner)
        finally:
            self._current_job = self._current_dir = None
        return True

    def _pick_job(self, ignore_backoff: bool) -> tuple[Path, JobState, tuple[str, str]] | None:
        """The next job to run, acquired, with its (model, runner); cancelled ones filed
        first."""
        jobs = [(d, st) for d, st in self.spool.active_jobs() if st.status not in TERMINAL]
        self._report_unreadable()
        jobs = self._finish_cancelled(jobs)
        if self.metrics is not None:
            self.metrics.running = sum(st.status == RUNNING for _, st in jobs)
            self.metrics.queued = len(jobs) - self.metrics.running
        self._job_models = {
            st.id: self._job_models.get(st.id) or self._model_of(d, st) for d, st in jobs
        }
        jobs = self._fail_unloadable(jobs)
        active = {st.id for _, st in jobs}
        for job_id, _ in self.job_retries:  # finished meanwhile (cancelled, by a peer)
            if job_id not in active and self.job_retries.succeeded(job_id):
                self._problem(f"job:{job_id}", None)
        if self.cfg.processing.prefer_loaded_model:
            # Don't switch back and forth: jobs for the loaded model go first.
            loaded = (self.engine.model, self.engine.runner) if self.engine is not None else None
            jobs.sort(key=lambda j: self._job_models[j[1].id] != loaded)
        if not jobs and self.cluster.succeeded("ray"):
            self._problem("engine:ray", None)  # no job waits for it any more
        if self.cluster.waiting("ray"):
            return None  # the ray cluster is away: every job waits for it (design §10)
        for job_dir, state in jobs:
            want = self._job_models[state.id]
            key = load_key(*want)
            if not ignore_backoff and (
                self.model_loads.waiting(key) or self.job_retries.waiting(state.id)
            ):
                continue
            if ignore_backoff and self.model_loads.get(key) is None:
                continue
            if not self._input_settled(job_dir, state):
                continue
            if not self.spool.acquire(job_dir):
                continue
            return job_dir, state, self._job_models[state.id]  # a restart may change it
        return None

    def _report_unreadable(self) -> None:
        """Jobs whose records cannot be read stay where they are (SPEC §3), listed in
        the heartbeat's problems while they are so (the spool logs each once)."""
        unreadable = self.spool.unreadable
        with self._problems_lock:  # the side thread sets problems too
            topics = [k for k in self._problems if k.startswith("record:")]
        for topic in topics:
            if topic[len("record:") :] not in unreadable:
                self._problem(topic, None)
        for job_id, why in unreadable.items():
            self._problem(f"record:{job_id}", unreadable_problem(job_id, why))

    def _fail_unloadable(self, jobs: list[tuple[Path, JobState]]) -> list[tuple[Path, JobState]]:
        """File the queued jobs of a model that failed processing.max_model_load_attempts
        loads in failed/, naming the model and its last error; the jobs left to run."""
        limit = self.cfg.processing.max_model_load_attempts
        given_up = {m for m, f in self.model_loads if f.attempts >= limit}
        if not given_up:
            return jobs
        left = []
        for job_dir, state in jobs:
            model = load_key(*self._job_models[state.id])
            failing = self.model_loads.get(model)
            if model not in given_up or failing is None:
                left.append((job_dir, state))
                continue
            if not self.spool.acquire(job_dir):
                continue
            try:
                state = load_state(job_dir)  # as owner: the record as last committed
                cut_to_checkpoint(self.spool, job_dir, state)
                state.error = (
                    f"model {model!r} could not be loaded ({failing.attempts} attempts, "
                    f"processing.max_model_load_attempts = {limit}): {failing.error}; "
                    f"check engine.model / engine.models, then submit {state.source_name} "
                    f"again (it is kept as failed/{state.id}/input.jsonl)"
                )
                finish_job(self.spool, job_dir, state, FAILED, log.bind(job_id=state.id))
                self.models_failed += 1
            except (OSError, ValueError) as e:  # a full disk, a peer first: next pass
                log.warning("cannot file a job of an unloadable model yet", error=str(e))
        # The jobs queued then are failed; one that arrives later gets a fresh round of
        # loads (the cause may have passed: a network back, memory freed, a fixed path).
        for model in given_up:
            self.model_loads.succeeded(model)
            self._problem(f"model:{model}", None)
        return left

    def _input_settled(self, job_dir: Path, state: JobState) -> bool:
        """Whether a job's input is as claimed, or has settled again after a change
        (design §5c): then the job restarts from the start, here, before it runs."""
        try:
            st = os.lstat(job_dir / INPUT)
        except OSError:
            return True  # the run reports what is wrong with it
        if input_matches(st, state):
            self._resettle.pop(state.id, None)
            return True
        now_fp = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        seen = self._resettle.get(state.id)
        now = self.clock()
        if seen is None or seen[0] != now_fp:
            self._resettle[state.id] = (now_fp, now)
            return False
        if now - seen[1] < self.cfg.watch.settle_seconds:
            return False
        if not self.spool.acquire(job_dir):
            return False
        del self._resettle[state.id]
        log.warning(
            "the input changed after the claim and has settled again; restarting the job "
            "from the start",
            job_id=state.id,
            claimed_bytes=state.input_size,
            now_bytes=st.st_size,
        )
        fresh = load_state(job_dir)
        restart_from_scratch(self.spool, job_dir, fresh, st.st_size, st.st_mtime_ns)
        state.input_size, state.input_mtime_ns, state.input_ctime_ns = *now_fp[:2], 0
        state.model = state.runner = None
        self._job_models[state.id] = self._model_of(job_dir, state)  # the new input's
        return True

    def _finish_cancelled(self, jobs: list[tuple[Path, JobState]]) -> list[tuple[Path, JobState]]:
        """File jobs with a CANCEL request that nobody is running (queued, or left
        running by a crash) under failed/ now, without loading a model or validating
        them; the jobs left to run. Jobs a live daemon runs stop at its next chunk."""
        left = []
        for job_dir, state in jobs:
            if (
                state.status not in (QUEUED, RUNNING)
                or state.id == self._current_job
                or not self.spool.cancel_requested(job_dir)
            ):
                left.append((job_dir, state))
            elif self.spool.acquire(job_dir):
                try:
                    state = load_state(job_dir)  # as owner: the record as last committed
                    cut_to_checkpoint(self.spool, job_dir, state)  # a paused run's tail
                    finish_job(self.spool, job_dir, state, CANCELLED, log.bind(job_id=state.id))
                except (OSError, ValueError) as e:  # a full disk, a peer first: next pass
                    log.warning("cannot file a cancelled job yet", job_id=state.id, error=str(e))
        return left

    def _model_of(self, job_dir: Path, state: JobState) -> tuple[str, str]:
        """The engine model a job needs, and its runner: its first request's body.model,
        resolved, and the kind of work of its url (SPEC §6 Endpoints)."""
        if state.model and state.runner:  # as it first ran: its answers came from them
            return state.model, state.runner
        if state.model:  # recorded by a spoold before embeddings: it ran generation
            return state.model, GENERATE
        try:
            with open(job_dir / INPUT, "rb") as f:
                first = first_request(f, self.cfg.limits.max_line_bytes)
        except OSError:
            first = None
        runner = runner_of(first.url if first else None)
        return self.cfg.engine.resolve_model(first.body.get("model") if first else None), runner

    def _engine_for(self, model: str, runner: str) -> Engine | None:
        """The engine for `model`, loaded if needed; None when asked to stop while
        waiting to load it. A load that fails is remembered for its backoff (design §8)
        and raised as ModelLoadError."""
        if self.engine is not None and not self.engine.usable():
            log.warning("the engine is gone; starting it again", model=self.engine.model)
            with contextlib.suppress(Exception):
                self.close_engine()
        if self.engine is not None and (self.engine.model, self.engine.runner) != (model, runner):
            log.info(
                "switching model",
                old=self.engine.model,
                new=model,
                old_runner=self.engine.runner,
                runner=runner,
            )
            self.close_engine()
        if self.engine is None:
            if not self.gate():  # SPEC §7: no model load onto a hot or full GPU
                return None
            self._show(status="loading_model", model=model)
            self.notifier.status(f"loading model {model}")
            began = self.clock()
            try:
                self.engine = self.engine_factory(model, runner)
            except ClusterUnavailable as e:
                self._cluster_lost(e)
                raise
            except Exception as e:
                error = f"{type(e).__name__}: {e}".replace("\n", " ")[:1000]
                key = load_key(model, runner)
                failing = self.model_loads.failed(key, error)
                limit = self.cfg.processing.max_model_load_attempts
                wait = max(0.0, failing.retry_at - self.clock())
                log.error(
                    "cannot load model",
                    model=model,
                    runner=runner,
                    attempt=failing.attempts,
                    max_attempts=limit,
                    retry_in_s=round(wait),
                    error=error,
                )
                self._problem(
                    f"model:{key}",
                    f"model {key!r} cannot be loaded ({failing.attempts} of {limit} attempts"
                    f"; next in {wait:.0f} s; engine.model / engine.models): {error}",
                )
                raise ModelLoadError(error) from e
            log.info(
                "model loaded", model=model, runner=runner, load_s=round(self.clock() - began, 2)
            )
            if self.model_loads.succeeded(key := load_key(model, runner)):
                self._problem(f"model:{key}", None)
            if self.cluster.succeeded("ray"):
                log.info("the ray cluster is back", address=self.cfg.engine.ray.address)
                self._problem("engine:ray", None)
            self._show(status="processing")  # loads happen inside a job's run
            self.engine.on_step = self.notifier.watchdog
        return self.engine

    def _run_acquired(self, job_dir: Path, state: JobState, model: str, kind: str) -> None:
        self._show(status="processing")
        self._progress(state, 0, 0.0)
        runner = Runner(self.spool, self.cfg, _Engines(self, model, kind), self.hooks)
        topic = f"job:{state.id}"
        # Every log line while the job runs carries job_id, the engine's own included.
        with structlog.contextvars.bound_contextvars(job_id=state.id):
            try:
                runner.run(job_dir)
            except (EngineFatal, DiskFull, Fenced):
                raise  # the main loop's to handle
            except ModelLoadError:
                return  # remembered by _engine_for; the job waits for the next try
            except ClusterUnavailable as e:
                if self.engine is not None:  # lost mid-run (_engine_for saw a failed load)
                    self._cluster_lost(e)
                return  # the job waits, its attempt given back (design §10)
            except Exception as e:
                # Never die for one job, and never retry it at once: an I/O error (its
                # attempt given back) or a bug (its attempt counted) waits a backoff.
                failing = self.job_retries.failed(state.id, f"{type(e).__name__}: {e}")
                wait = failing.retry_at - self.clock()
                if isinstance(e, IOFailure):
                    log.error("job run hit an I/O error", error=str(e), retry_in_s=round(wait))
                else:
                    log.exception("job run failed", retry_in_s=round(wait))
                self._problem(
                    topic, f"job {state.id}: {failing.error} (tried again in {wait:.0f} s)"
                )
                return
        if self.job_retries.succeeded(state.id):
            self._problem(topic, None)

    def close_engine(self) -> None:
        """Close the engine (GPU memory given back, the ray replicas stopped); the
        heartbeat keeps its last section, as closed."""
        engine, self.engine = self.engine, None
        if engine is not None:
            try:
                engine.close()
            finally:
                self._engine_seen = engine.describe()

    def _cluster_lost(self, error: ClusterUnavailable) -> None:
        """The ray cluster cannot be reached: drop the engine (its driver is gone or
        going), and wait a backoff before the next try; every job waits meanwhile."""
        with contextlib.suppress(Exception):
            self.close_engine()
        failing = self.cluster.failed("ray", str(error))
        wait = max(0.0, failing.retry_at - self.clock())
        log.error(
            "the ray cluster is unavailable; jobs wait for it",
            attempt=failing.attempts,
            retry_in_s=round(wait),
            error=str(error),
        )
        self._problem(
            "engine:ray",
            f"{error}; jobs wait (their attempts are not counted), next try in {wait:.0f} s",
        )

    def _cluster_given_up(self) -> bool:
        """--drain stops waiting for a lost ray cluster after as many tries as for an
        I/O error, and exits 1 with the jobs left queued."""
        failing = self.cluster.get("ray")
        return failing is not None and failing.attempts >= self._drain_io_tries

    def _engine_section(self) -> dict[str, Any]:
        """The heartbeat's `engine`: the backend, its model and (ray) its replicas; after
        a close, the last one seen, its replicas no longer alive."""
        engine = self.engine
        if engine is not None:
            self._engine_seen = engine.describe()
        if self._engine_seen is not None:
            return self._engine_seen if engine is not None else _closed(self._engine_seen)
        return {"backend": self.cfg.engine.backend, "model": None}

    def _progress(self, state: JobState, tokens: int, rate: float) -> None:
        """Work moved (the runner's progress callback): heartbeat fields, metrics,
        systemd status and watchdog; nothing else (the side thread admits meanwhile)."""
        c = state.request_counts
        done = c.completed + c.failed
        if self.metrics is not None:
            self.metrics.job_progress(state.id, c.completed, c.failed, tokens)
        self.heartbeat.progress(
            {
                "id": state.id,
                "completed": c.completed,
                "failed": c.failed,
                "total": c.total,
                "tokens_per_s": round(rate, 1),
            }
        )
        self.notifier.status(f"processing {state.id}: {done}/{c.total}")
        self.notifier.watchdog()


def _closed(section: dict[str, Any]) -> dict[str, Any]:
    """An engine section as left after its engine closed."""
    out = dict(section)
    if "replicas" in out:
        out["replicas"] = [{**r, "alive": False} for r in out["replicas"]]
    return out
