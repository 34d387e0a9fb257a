"""One job: validate → stream input → engine → formatted lines → commit → finish.

The commit protocol (design §5): sync output.jsonl and errors.jsonl, then replace
state.json with the checkpoint. Anything after the checkpoint is redone on resume.
"""

from __future__ import annotations

import contextlib
import errno
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from spoold import formats
from spoold.config import Config
from spoold.engines.base import Completion, Engine, EngineFatal, Failure, Outcome
from spoold.fsio import AppendLog
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
    JobState,
    load_state,
    save_state,
    utcnow,
)
from spoold.spool import Spool
from spoold.validate import (
    DUPLICATE,
    NotUtf8Error,
    Request,
    iter_lines,
    one_model,
    read_request,
    scan_file,
)

log = structlog.get_logger("spoold.runner")

ProgressFn = Callable[[JobState, int, float], None]  # (state, tokens this run, tokens/s)


class DiskFull(Exception):
    """The spool's filesystem is full; the job is intact and waits for room."""


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class JobFailed(Exception):
    """The whole job cannot run (not UTF-8, no valid line); the message says why."""


@dataclass
class _Run:
    """Mutable bookkeeping of one run of a job: what was handed out, what came back."""

    next_line: int
    next_offset: int
    pending: dict[int, tuple[int, Request]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    since_commit: int = 0
    halt: str | None = None  # why feeding stopped: "stop", "cancel", "lost"
    failure: Exception | None = None  # an error of ours (input, results), not the engine's
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    next_report: float = 0.0


def finish_job(
    spool: Spool, job_dir: Path, state: JobState, status: str, jlog: structlog.BoundLogger
) -> None:
    """Give a job its terminal status and file it under done/ or failed/."""
    state.transition(status)
    # Once finished, total = completed + failed (SPEC §4); what the file held
    # stays in requests_in_file.
    c = state.request_counts
    c.total = c.completed + c.failed
    spool.finish(job_dir, state)
    jlog.info(
        "job finished", status=status, completed=c.completed, failed=c.failed, error=state.error
    )


def _check_complete(job_dir: Path, state: JobState, run: _Run) -> None:
    """A run that was not stopped ends done only when every line was read and every
    request answered; anything else (an engine that lost a request) fails the job,
    with what was committed kept, rather than completing it short or retrying forever."""
    size = (job_dir / INPUT).stat().st_size
    if run.pending or run.next_offset < size:
        raise JobFailed(
            f"{state.source_name}: the engine run ended at byte {run.next_offset} of {size} "
            f"with {len(run.pending)} request(s) unanswered; results so far are kept"
        )


def cut_to_checkpoint(job_dir: Path, state: JobState) -> None:
    """Before a job is filed without running on (cancelled, or failed after crashes):
    results past its last checkpoint were never committed, and may end in a torn line.
    Cut them off, and count from the checkpoint."""
    ck = state.checkpoint
    for name, keep in ((OUTPUT, ck.output_bytes), (ERRORS, ck.errors_bytes)):
        if (job_dir / name).exists():
            try:
                AppendLog(job_dir / name, keep).close()
            except RuntimeError as e:  # shorter than its checkpoint: leave it as it is
                log.error("result file shorter than its checkpoint", job_id=state.id, error=str(e))
    state.request_counts.completed, state.request_counts.failed = ck.completed, ck.failed


class Runner:
    def __init__(
        self,
        spool: Spool,
        cfg: Config,
        engine: Engine,
        should_stop: Callable[[], bool] = lambda: False,
        on_progress: ProgressFn | None = None,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        self.spool = spool
        self.cfg = cfg
        self.engine = engine
        self.should_stop = should_stop
        self.on_progress = on_progress
        # Called before each chunk is handed to the engine; blocks while the GPU is
        # too hot or the disk too full, and says False if we must stop meanwhile.
        self.gate = gate

    # -- the job -------------------------------------------------------------------

    def run(self, job_dir: Path) -> str:
        """Run (or resume) one job we own. Returns its status when this run ended."""
        state = load_state(job_dir)
        jlog = log.bind(job_id=state.id)
        if not self.spool.still_owner(job_dir):  # taken from us since we acquired it
            jlog.warning("another daemon took this job over before it started")
            return RUNNING
        limit = self.cfg.processing.max_job_attempts
        if state.attempts >= limit:
            state.error = (
                f"the job crashed the daemon {state.attempts} times without progress "
                f"(processing.max_job_attempts = {limit}); its partial results are kept"
            )
            cut_to_checkpoint(job_dir, state)
            return self._finish(job_dir, state, FAILED, jlog)
        state.attempts += 1
        state.transition(RUNNING)
        state.started_at = state.started_at or utcnow()
        state.instance = self.spool.instance
        state.model = self.engine.model
        attempt_counted = False
        try:
            save_state(job_dir, state)
            attempt_counted = True
            jlog.info("job started", attempt=state.attempts, resume=state.checkpoint.validated)
            if not state.checkpoint.validated:
                self._validate(job_dir, state)
            if not self.spool.still_owner(job_dir):  # validation takes a while
                jlog.warning("another daemon took this job over; stopped without running it")
                return RUNNING
            if self.spool.cancel_requested(job_dir):
                cut_to_checkpoint(job_dir, state)
                return self._finish(job_dir, state, CANCELLED, jlog)
            run = self._execute(job_dir, state)
            if run.halt is None:
                _check_complete(job_dir, state, run)
        except JobFailed as e:
            state.error = str(e)
            return self._finish(job_dir, state, FAILED, jlog)
        except OSError as e:
            if e.errno not in DISK_FULL_ERRNOS:
                raise
            # Disk full: nothing past the checkpoint counts, so the chunk (or the
            # validation) is redone once there is room. Not the job's fault: the
            # attempt is given back.
            jlog.error("disk full; the job will resume from its checkpoint", error=str(e))
            with contextlib.suppress(OSError, ValueError):
                # The record as last committed (not this run's uncommitted counts).
                committed = load_state(job_dir)
                committed.transition(QUEUED)
                if attempt_counted:
                    committed.attempts = max(0, committed.attempts - 1)
                save_state(job_dir, committed)
            raise DiskFull(str(e)) from e
        if run.halt == "lost":
            jlog.warning("another daemon took this job over; stopped without committing")
            return RUNNING
        if run.halt == "cancel":
            return self._finish(job_dir, state, CANCELLED, jlog)
        if run.halt == "stop":
            state.transition(QUEUED)
            state.attempts = 0  # a clean stop is not a crash
            save_state(job_dir, state)
            jlog.info("job paused for shutdown", completed=state.request_counts.completed)
            return QUEUED
        return self._finish(job_dir, state, COMPLETED, jlog)

    def _finish(
        self, job_dir: Path, state: JobState, status: str, jlog: structlog.BoundLogger
    ) -> str:
        finish_job(self.spool, job_dir, state, status, jlog)
        return status

    # -- validation (design §4) ------------------------------------------------------

    def _validate(self, job_dir: Path, state: JobState) -> None:
        counts = state.request_counts
        expected = counts.total
        counts.total = counts.failed = counts.completed = 0
        rejected: list[int] = []
        with AppendLog(job_dir / ERRORS, 0) as errors, open(job_dir / INPUT, "rb") as f:
            try:
                items = scan_file(f, self.cfg.limits.max_line_bytes, job_dir, expected)
                resolve = self.cfg.engine.resolve_model
                for item in one_model(items, resolve, self.engine.model):
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
            errors.sync()
            state.requests_in_file = counts.total
            if counts.total == counts.failed:
                why = (
                    "it has no request lines"
                    if counts.total == 0
                    else f"all {counts.total} lines are invalid"
                )
                raise JobFailed(f"{state.source_name}: no valid request ({why}); see errors.jsonl")
            state.rejected_lines = rejected
            state.checkpoint = Checkpoint(
                validated=True, errors_bytes=errors.size, failed=counts.failed
            )
        save_state(job_dir, state)

    # -- running (design §5) ---------------------------------------------------------

    def _execute(self, job_dir: Path, state: JobState) -> _Run:
        ck = state.checkpoint
        # What was counted after the checkpoint is being redone: count from it.
        state.request_counts.completed, state.request_counts.failed = ck.completed, ck.failed
        run = _Run(next_line=ck.next_line, next_offset=ck.input_offset, done=set(ck.done_lines))
        skip = set(state.rejected_lines) | run.done
        chunk_size = self.cfg.processing.chunk_size
        with (
            AppendLog(job_dir / OUTPUT, ck.output_bytes) as out,
            AppendLog(job_dir / ERRORS, ck.errors_bytes) as err,
            open(job_dir / INPUT, "rb") as f,
        ):

            def feed() -> Iterator[Request]:
                cap = self.cfg.limits.max_line_bytes
                gate = self.gate
                handed = 0
                try:
                    for line_no, end, raw in iter_lines(f, run.next_offset, run.next_line, cap):
                        if run.halt is None and self.should_stop():
                            run.halt = "stop"
                        if run.halt is None and gate is not None and handed % chunk_size == 0:
                            run.halt = None if gate() else "stop"  # before each chunk
                        if run.halt is not None:
                            return
                        parsed = None
                        if line_no not in skip and raw is not None:
                            parsed = read_request(raw, line_no)
                        start = run.next_offset
                        run.next_line, run.next_offset = line_no + 1, end
                        if parsed is not None:
                            run.pending[line_no] = (start, parsed)
                            handed += 1
                            yield parsed
                except Exception as e:
                    run.failure = e  # reading the input failed: not the engine's doing
                    raise

            counts = state.request_counts
            chunk = self.cfg.processing.chunk_size

            def record(outcome: Outcome) -> None:
                try:
                    _record(outcome)
                except Exception as e:
                    run.failure = e  # writing or committing failed: not the engine's doing
                    raise

            def _record(outcome: Outcome) -> None:
                line = outcome.request.line
                del run.pending[line]
                run.done.add(line)
                if isinstance(outcome, Completion):
                    out.append(formats.output_line(state.id, outcome, int(time.time())))
                    counts.completed += 1
                    run.tokens += outcome.completion_tokens
                else:
                    err.append(
                        formats.error_line(
                            state.id,
                            line,
                            outcome.request.custom_id,
                            outcome.code,
                            outcome.message,
                            outcome.status,
                        )
                    )
                    counts.failed += 1
                run.since_commit += 1
                if run.since_commit >= chunk:
                    self._commit(job_dir, state, run, out, err)
                elif self.on_progress is not None and time.monotonic() >= run.next_report:
                    self._report(state, run)

            def isolate(requests: list[Request], error: Exception) -> None:
                """Find the request(s) that make the engine fail, by bisection."""
                if len(requests) == 1:
                    log.warning("request fails the engine", job_id=state.id, error=str(error))
                    msg = f"line {requests[0].line}: the engine failed on this request: {error}"
                    record(Failure(requests[0], "engine_error", msg, status=500))
                    return
                mid = len(requests) // 2
                for half in (requests[:mid], requests[mid:]):
                    try:
                        for outcome in self.engine.run(iter(half)):
                            record(outcome)
                    except EngineFatal:
                        raise
                    except Exception as e:
                        if run.failure is not None:
                            raise run.failure from None
                        isolate([r for r in half if r.line in run.pending], e)

            source = feed()
            while True:
                try:
                    for outcome in self.engine.run(source):
                        record(outcome)
                    break
                except EngineFatal:
                    raise
                except Exception as e:
                    # Only the engine's own failures are bisected. An error reading the
                    # input or writing results ends the run (a crash, as far as the job's
                    # attempts go): bisecting it would let the job finish without the
                    # lines the feed never handed out.
                    if run.failure is not None:
                        raise run.failure from None
                    log.warning("engine failed for a batch; isolating", error=str(e))
                    isolate([req for _, req in run.pending.values()], e)
            if run.halt != "lost":
                self._commit(job_dir, state, run, out, err)
        return run

    def _commit(
        self, job_dir: Path, state: JobState, run: _Run, out: AppendLog, err: AppendLog
    ) -> None:
        """Sync both result files, then checkpoint in state.json (the commit)."""
        if not self.spool.still_owner(job_dir):
            run.halt = "lost"
            return
        out.sync()
        err.sync()
        if run.pending:
            low = next(iter(run.pending))
            low_offset = run.pending[low][0]
        else:
            low, low_offset = run.next_line, run.next_offset
        run.done = {line for line in run.done if line >= low}
        state.checkpoint = Checkpoint(
            validated=True,
            next_line=low,
            input_offset=low_offset,
            done_lines=sorted(run.done),
            output_bytes=out.size,
            errors_bytes=err.size,
            completed=state.request_counts.completed,
            failed=state.request_counts.failed,
        )
        state.attempts = 0
        save_state(job_dir, state)
        run.since_commit = 0
        if run.halt is None and self.spool.cancel_requested(job_dir):
            run.halt = "cancel"
        if self.on_progress is not None:
            self._report(state, run)

    def _report(self, state: JobState, run: _Run) -> None:
        """Progress and tokens/s to the heartbeat: at commits and about once a second."""
        assert self.on_progress is not None
        now = time.monotonic()
        run.next_report = now + 1.0
        self.on_progress(state, run.tokens, run.tokens / max(now - run.started, 1e-9))
