"""One job: count the attempt → validate → run (spoold.execution) → check the books → file.

Design §3 (attempts), §4 (validation), §5a (narrowing the suspects of a crash at the
start of the next attempt), §5b (the ledger), §6 (finish).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

import structlog

from spoold import formats, isolation, ledger
from spoold.config import Config
from spoold.engines.base import ClusterUnavailable, ModelLoadError
from spoold.execution import (
    ENGINE_CRASH,
    EngineSource,
    Execution,
    Hooks,
    input_changed,
    request_on_line,
)
from spoold.fsio import AppendLog, Fenced
from spoold.job import (
    CANCELLED,
    COMPLETED,
    ERRORS,
    FAILED,
    INPUT,
    OUTPUT,
    QUEUED,
    RUNNING,
    Checkpoint,
    Isolation,
    JobState,
    load_state,
    utcnow,
)
from spoold.spool import Spool
from spoold.validate import (
    DUPLICATE,
    NotUtf8Error,
    Request,
    Shape,
    iter_lines,
    one_model,
)
from spoold.validate import scan_file as scan_input

log = structlog.get_logger("spoold.runner")


class DiskFull(Exception):
    """The spool's filesystem is full; the job is intact and waits for room."""


class IOFailure(Exception):
    """Reading the input or writing results failed (EIO, EACCES, ESTALE, …): not the
    job's fault. Its attempt was given back; the daemon tries it again later."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# I/O errors that pass by themselves (a flaky or remounted network filesystem).
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EACCES,
        errno.EPERM,
        errno.ESTALE,
        errno.ETIMEDOUT,
        errno.EAGAIN,
        errno.EBUSY,
        errno.EINTR,
        errno.ENOLCK,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTDOWN,
        errno.EHOSTUNREACH,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
    }
)


class JobFailed(Exception):
    """The whole job cannot run (not UTF-8, no valid line); the message says why."""


class _InputChanged(Exception):
    """The input changed after the claim (design §5c)."""


def finish_job(
    spool: Spool, job_dir: Path, state: JobState, status: str, jlog: structlog.BoundLogger
) -> None:
    """Give a job its terminal status and file it under done/ or failed/. The counts
    are what the files hold; `total` stays the input's line count (SPEC §3: nothing
    may hide a gap)."""
    state.transition(status)
    spool.finish(job_dir, state)
    c = state.request_counts
    jlog.info(
        "job finished",
        status=status,
        completed=c.completed,
        failed=c.failed,
        total=c.total,
        error=state.error,
    )


def cut_to_checkpoint(spool: Spool, job_dir: Path, state: JobState) -> None:
    """Before a job is filed without running on (cancelled, or failed after crashes):
    results past its last checkpoint were never committed, and may end in a torn line.
    Cut them off, and count from the checkpoint."""
    ck = state.checkpoint
    for name, keep in ((OUTPUT, ck.output_bytes), (ERRORS, ck.errors_bytes)):
        if (job_dir / name).exists():
            try:
                AppendLog(job_dir / name, keep, spool.results_check()).close()
            except RuntimeError as e:  # shorter than its checkpoint: leave it as it is
                log.error("result file shorter than its checkpoint", job_id=state.id, error=str(e))
    state.request_counts.completed, state.request_counts.failed = ck.completed, ck.failed


def give_back(spool: Spool, job_dir: Path) -> None:
    """The run ended for a reason that is not the job's (design §3): the record as
    last committed, its attempt returned and its crash evidence cleared."""
    committed = load_state(job_dir)
    if committed.status == RUNNING:
        committed.transition(QUEUED)
    committed.attempts = max(0, committed.attempts - 1)
    committed.fed_through = 0
    committed.isolation.trying = False
    spool.save(job_dir, committed)


def restart_from_scratch(
    spool: Spool, job_dir: Path, state: JobState, size: int, mtime_ns: int
) -> None:
    """The input changed after the claim and has settled again (design §5c): forget
    every result and validate and run it afresh, from the new input. The record first:
    committed is then nothing, so cutting the files to 0 never cuts a committed byte
    (also when a taker fenced us in between: design §2 W2)."""
    state.checkpoint = Checkpoint()
    state.rejected_lines = []
    state.input_lines, state.blank_lines = -1, []
    state.request_counts.completed = state.request_counts.failed = 0
    state.fed_through = 0
    state.isolation = Isolation()
    state.attempts = 0
    state.model = state.runner = None  # the new input's first request picks them again
    state.input_size, state.input_mtime_ns, state.input_ctime_ns = size, mtime_ns, 0
    if state.status == RUNNING:
        state.transition(QUEUED)
    spool.save(job_dir, state)
    for name in (OUTPUT, ERRORS):
        if (job_dir / name).exists():
            AppendLog(job_dir / name, 0, spool.results_check()).close()


class Runner:
    def __init__(self, spool: Spool, cfg: Config, engines: EngineSource, hooks: Hooks) -> None:
        self.spool = spool
        self.cfg = cfg
        self.engines = engines
        self.hooks = hooks

    # -- the job -------------------------------------------------------------------

    def run(self, job_dir: Path) -> str:
        """Run (or resume) one job we own. Returns its status when this run ended."""
        state = load_state(job_dir)
        jlog = log.bind(job_id=state.id)
        if not self.spool.still_owner(job_dir):  # taken from us since we acquired it
            jlog.warning("another daemon took this job over before it started")
            return RUNNING
        self.spool.lease.check()  # state.json as read is all that was committed (§2)
        if not (job_dir / INPUT).exists():
            state.error = (
                f"processing/{state.id}/{INPUT} is missing (removed by hand?): nothing to "
                "run; the results so far are kept"
            )
            cut_to_checkpoint(self.spool, job_dir, state)
            return self._finish(job_dir, state, FAILED, jlog)
        if self._narrow(job_dir, state, jlog):
            state.attempts = 0  # narrowing the suspects is progress (design §5a)
        limit = self.cfg.processing.max_job_attempts
        if state.attempts >= limit:
            state.error = (
                f"the job crashed the daemon {state.attempts} times without progress "
                f"(processing.max_job_attempts = {limit}); its partial results are kept"
            )
            cut_to_checkpoint(self.spool, job_dir, state)
            return self._finish(job_dir, state, FAILED, jlog)
        state.attempts += 1
        state.transition(RUNNING)
        state.started_at = state.started_at or utcnow()
        state.instance = self.spool.instance
        state.model, state.runner = self.engines.model, self.engines.runner
        counted = False
        try:
            self.spool.save(job_dir, state)
            counted = True
            jlog.info("job started", attempt=state.attempts, resume=state.checkpoint.validated)
            if not state.checkpoint.validated:
                self._validate(job_dir, state)
            if not self.spool.still_owner(job_dir):  # validation takes a while
                jlog.warning("another daemon took this job over; stopped without running it")
                return RUNNING
            if self.spool.cancel_requested(job_dir):
                cut_to_checkpoint(self.spool, job_dir, state)
                return self._finish(job_dir, state, CANCELLED, jlog)
            engine = self.engines.get()  # after the attempt is counted (design §3, C12)
            if engine is None:  # asked to stop while waiting to load it
                give_back(self.spool, job_dir)
                return QUEUED
            check = self.spool.results_check()
            ck = state.checkpoint
            with (
                AppendLog(job_dir / OUTPUT, ck.output_bytes, check) as out,
                AppendLog(job_dir / ERRORS, ck.errors_bytes, check) as err,
                open(job_dir / INPUT, "rb") as f,
            ):
                execution = Execution(
                    self.spool, self.cfg, self.engines, engine, self.hooks, job_dir, state,
                    (out, err, f),
                )  # fmt: skip
                run = execution.go()
                if run.halt is None:
                    self._check_books(job_dir, state, execution)
            # Inside the try: a give-back or a filing that meets a full disk or a flaky
            # mount is handled like any other I/O error of the run (below).
            return self._after_run(job_dir, state, run.halt, jlog)
        except JobFailed as e:
            state.error = str(e)
            return self._finish(job_dir, state, FAILED, jlog)
        except (ModelLoadError, ClusterUnavailable, _InputChanged) as e:
            if isinstance(e, _InputChanged):
                jlog.warning("the input changed after the claim; the job waits for it to settle")
            give_back(self.spool, job_dir)  # nothing uncommitted counts (design §3, §10)
            if not isinstance(e, _InputChanged):
                raise
            return QUEUED
        except OSError as e:
            if not self.spool.lease.dir.is_dir():
                # A file in our lease dir (a unique-id bucket) went with a fence.
                self.spool.lease.fenced = True
                raise Fenced(f"{self.spool.lease.dir} is gone: {e}") from e
            # Nothing past the checkpoint counts, so the chunk (or the validation) is
            # redone later. A full disk or a flaky mount is not the job's fault: the
            # attempt is given back. Other errors (EINVAL, EISDIR…) will not pass by
            # themselves: the attempt stays counted, and max_job_attempts ends them.
            if counted and (e.errno in DISK_FULL_ERRNOS or e.errno in TRANSIENT_ERRNOS):
                with contextlib.suppress(OSError, ValueError, Fenced):
                    give_back(self.spool, job_dir)
            if e.errno in DISK_FULL_ERRNOS:
                jlog.error("disk full; the job will resume from its checkpoint", error=str(e))
                raise DiskFull(str(e)) from e
            jlog.error("I/O error; the job will resume from its checkpoint", error=str(e))
            raise IOFailure(f"{type(e).__name__}: {e}") from e

    def _after_run(
        self, job_dir: Path, state: JobState, halt: str | None, jlog: structlog.BoundLogger
    ) -> str:
        """What a run that ended (or was halted, `halt`) leaves: filed, or queued again."""
        if halt == "lost":
            jlog.warning("another daemon took this job over; stopped without committing")
            return RUNNING
        if halt == "changed":
            jlog.warning("the input changed after the claim; the job waits for it to settle")
            give_back(self.spool, job_dir)
            return QUEUED
        if halt == "lapsed":
            # Our lease was not fresh at a commit (design §2): nothing was committed.
            # Beat now (Fenced if we were taken over meanwhile), give the attempt back;
            # the daemon acquires the job again before going on.
            jlog.warning("lease not fresh at a commit; the chunk is abandoned and redone")
            self.hooks.refresh()
            give_back(self.spool, job_dir)
            return QUEUED
        if halt == "cancel":
            return self._finish(job_dir, state, CANCELLED, jlog)
        if halt == "stop":
            give_back(self.spool, job_dir)  # a clean stop is not a crash
            jlog.info("job paused for shutdown", completed=state.request_counts.completed)
            return QUEUED
        return self._finish(job_dir, state, COMPLETED, jlog)

    def _finish(
        self, job_dir: Path, state: JobState, status: str, jlog: structlog.BoundLogger
    ) -> str:
        state.fed_through = 0
        finish_job(self.spool, job_dir, state, status, jlog)
        return status

    # -- narrowing the suspects of a crash (design §5a) ------------------------------

    def _narrow(self, job_dir: Path, state: JobState, jlog: structlog.BoundLogger) -> bool:
        """Read what the last run left as crash evidence: True if it narrowed the
        suspects (split a group, struck or dead-lettered a lone request)."""
        iso = state.isolation
        if iso.trying and iso.groups:
            size = iso.groups[0]
            culprit = isolation.blame(iso)
            jlog.warning("the process died running suspects alone", suspects=size)
            if culprit is not None:
                self._dead_letter_committed(job_dir, state, culprit, jlog)
            return True
        if not state.fed_through:
            return False
        suspects = self._suspects(job_dir, state)
        state.fed_through = 0
        if not suspects:
            return False
        jlog.warning("the process died with requests in flight", suspects=len(suspects))
        state.isolation = isolation.begin(suspects)
        return True

    def _suspects(self, job_dir: Path, state: JobState) -> list[int]:
        """Request lines after the checkpoint, up to fed_through, not yet finished."""
        ck = state.checkpoint
        finished = set(ck.done_lines) | set(state.rejected_lines)
        cap = self.cfg.limits.max_line_bytes
        lines = []
        with open(job_dir / INPUT, "rb") as f:
            for line_no, _, raw in iter_lines(f, ck.input_offset, ck.next_line, cap):
                if line_no > state.fed_through:
                    break
                if line_no not in finished and (raw is None or not ledger.is_blank(raw, line_no)):
                    lines.append(line_no)
        return lines

    def _dead_letter_committed(
        self, job_dir: Path, state: JobState, line: int, jlog: structlog.BoundLogger
    ) -> None:
        """Commit the engine_crash error line of a request that killed the process on
        its own twice (design §5a)."""
        ck = state.checkpoint
        cap = self.cfg.limits.max_line_bytes
        with open(job_dir / INPUT, "rb") as f:
            request = request_on_line(f, ck.input_offset, ck.next_line, line, cap)
        custom_id = request.custom_id if request is not None else None
        message = isolation.culprit_message(line)
        with AppendLog(job_dir / ERRORS, ck.errors_bytes, self.spool.results_check()) as err:
            err.append(formats.error_line(state.id, line, custom_id, ENGINE_CRASH, message, 500))
            err.sync()
            ck.errors_bytes = err.size
        ck.failed += 1
        ck.done_lines = sorted({*ck.done_lines, line})
        jlog.error("request crashes the engine; dead-lettered", line=line, custom_id=custom_id)

    # -- validation (design §4) ------------------------------------------------------

    def _validate(self, job_dir: Path, state: JobState) -> None:
        counts = state.request_counts
        expected = counts.total
        counts.total = counts.failed = counts.completed = 0
        rejected: list[int] = []
        with (
            AppendLog(job_dir / ERRORS, 0, self.spool.results_check()) as errors,
            open(job_dir / INPUT, "rb") as f,
        ):
            if input_changed(f, state):
                raise _InputChanged
            state.input_ctime_ns = os.fstat(f.fileno()).st_ctime_ns  # frozen from here
            try:
                shape = Shape()
                # Unique-id buckets go in our lease dir (design §2 W5): a fence removes them.
                buckets = self.spool.lease.dir
                items = scan_input(f, self.cfg.limits.max_line_bytes, buckets, expected, shape)
                resolve = self.cfg.engine.resolve_model
                engines = self.engines
                for item in one_model(items, resolve, engines.model, job_runner=engines.runner):
                    if isinstance(item, Request):
                        counts.total += 1
                        continue
                    if item.code != DUPLICATE:  # a duplicate replaces a line already counted
                        counts.total += 1
                    counts.failed += 1
                    rejected.append(item.line)
                    errors.append(
                        formats.error_line(
                            state.id, item.line, item.custom_id, item.code, item.message
                        )
                    )
            except NotUtf8Error as e:
                errors.sync()  # the lines already dead-lettered stay counted and kept
                state.requests_in_file = counts.total
                raise JobFailed(
                    f"{state.source_name}: {e}; save the file as UTF-8 and submit it again"
                ) from None
            if input_changed(f, state):
                raise _InputChanged
            errors.sync()
            state.requests_in_file = counts.total
            if counts.total == 0:  # errors.jsonl is empty: the reason is all there is
                what = (
                    "it is empty"
                    if shape.lines == 0
                    else "its one line is blank"
                    if shape.lines == 1
                    else f"its {shape.lines} lines are blank"
                )
                raise JobFailed(
                    f"{state.source_name} has no request lines: {what}; put one JSON "
                    "request on each line and submit it again"
                )
            if counts.total == counts.failed:
                why = (
                    "its one line is invalid"
                    if counts.total == 1
                    else f"all {counts.total} lines are invalid"
                )
                raise JobFailed(
                    f"{state.source_name}: no valid request ({why}); errors.jsonl says "
                    "what is wrong with each line"
                )
            state.rejected_lines = rejected
            state.input_lines, state.blank_lines = shape.lines, shape.blank
            state.checkpoint = Checkpoint(
                validated=True, errors_bytes=errors.size, failed=counts.failed
            )
        self.spool.save(job_dir, state)

    # -- the books (design §5b) ------------------------------------------------------

    def _check_books(self, job_dir: Path, state: JobState, execution: Execution) -> None:
        """A run that was not stopped ends done only when every line was read, every
        request answered, and the result files account for every input line exactly
        once; anything else fails the job, loudly, with what was committed kept."""
        run = execution.run
        size = os.fstat(execution.input.fileno()).st_size
        if run.pending or run.next_offset < size:
            raise JobFailed(
                f"{state.source_name}: the engine run ended at byte {run.next_offset} of {size} "
                f"with {len(run.pending)} request(s) unanswered; results so far are kept"
            )
        audit = ledger.audit(job_dir, state.id, state.input_lines, state.blank_lines)
        c = state.request_counts
        if audit.balanced and audit.total == c.total == c.completed + c.failed:
            return
        detail = audit.describe() or (
            f"the input has {audit.total} request lines, the record counts {c.total} "
            f"({c.completed} completed + {c.failed} failed)"
        )
        log.error("the books do not balance", job_id=state.id, detail=detail)
        raise JobFailed(
            f"{state.source_name}: the books do not balance: {detail}; results are kept, "
            "nothing was filed as completed"
        )
