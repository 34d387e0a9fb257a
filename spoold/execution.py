"""One run of a validated job over the engine: feed, record, commit, isolate.

The commit protocol (design §5): sync output.jsonl and errors.jsonl, then replace
state.json with the checkpoint. Engine deaths are isolated by bisection (§5a), the
input is checked unchanged before every commit (§5c), and a chunk commits early once
its results pass processing.max_chunk_bytes (§5d).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import structlog

from spoold import formats, isolation
from spoold.config import Config
from spoold.engines.base import (
    ClusterUnavailable,
    Completion,
    Embedding,
    Engine,
    EngineDied,
    Failure,
    Outcome,
)
from spoold.fsio import AppendLog
from spoold.job import Checkpoint, JobState, RequestCounts
from spoold.spool import Spool
from spoold.validate import MODEL_MISMATCH, Request, iter_lines, read_request

log = structlog.get_logger("spoold.runner")

ProgressFn = Callable[[JobState, int, float], None]  # (state, tokens this run, tokens/s)
ENGINE_CRASH = "engine_crash"
_CUSTOM_ID = re.compile(rb'"custom_id"\s*:\s*("(?:[^"\\]|\\.)*")')


class EngineSource(Protocol):
    """Where a run gets its engine (the daemon: loaded once, kept across jobs)."""

    model: str
    runner: str  # the vLLM runner the job's kind of work needs (validate.runner_of)

    def get(self) -> Engine | None:
        """The engine, loaded if needed; None when asked to stop meanwhile.
        Raises engines.base.ModelLoadError."""

    def reload(self) -> Engine | None:
        """A fresh engine after the last one died; None when asked to stop while
        waiting to load it. Raises engines.base.EngineFatal."""


@dataclass
class Hooks:
    """What the daemon lends a run: stop flag, progress, the chunk gate, the lock the
    stop timer takes so that it never gives an attempt back in the middle of a commit."""

    should_stop: Callable[[], bool] = lambda: False
    on_progress: ProgressFn | None = None
    gate: Callable[[], bool] | None = None  # blocks while throttled; False: stop
    commit_lock: threading.Lock = field(default_factory=threading.Lock)
    # Beat now, after a commit found the lease not fresh (raises fsio.Fenced).
    refresh: Callable[[], None] = lambda: None


@dataclass
class RunState:
    """Mutable bookkeeping of one run of a job: what was handed out, what came back."""

    next_line: int
    next_offset: int
    pending: dict[int, tuple[int, Request]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    since_commit: int = 0
    unsynced: int = 0  # result bytes appended since the last commit (design §5d)
    # Why feeding stopped: "stop", "cancel", "lost" (taken over), "changed" (the input),
    # "lapsed" (our lease was not fresh at a commit: design §2).
    halt: str | None = None
    failure: Exception | None = None  # an error of ours (input, results), not the engine's
    tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    next_report: float = 0.0


def request_on_line(
    f: BinaryIO, offset: int, first_line: int, line: int, max_line_bytes: int
) -> Request | None:
    """The request on `line` of an input read from `offset` (line `first_line`): a
    culprit's, to name it in its error line. None if it cannot be read now."""
    for line_no, _, raw in iter_lines(f, offset, first_line, max_line_bytes):
        if line_no == line:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return read_request(raw, line) if raw is not None else None
            return None
    return None


def input_matches(st: os.stat_result, state: JobState) -> bool:
    """Whether an input is as claimed (size, mtime) and, once validated, not written
    since (ctime: also changed by a rewrite whose mtime was put back) (design §5c)."""
    if state.input_size < 0:  # a record from before the input was fingerprinted
        return True
    if (st.st_size, st.st_mtime_ns) != (state.input_size, state.input_mtime_ns):
        return False
    return not state.input_ctime_ns or st.st_ctime_ns == state.input_ctime_ns


def input_changed(f: BinaryIO, state: JobState) -> bool:
    """Whether the open input differs from what was claimed and validated."""
    return not input_matches(os.fstat(f.fileno()), state)


class Execution:
    """The run pass of one job (design §5, §5a): opened on the job's files at its
    checkpoint, fed to the engine until the input ends or the run is halted."""

    def __init__(
        self,
        spool: Spool,
        cfg: Config,
        engines: EngineSource,
        engine: Engine,
        hooks: Hooks,
        job_dir: Path,
        state: JobState,
        files: tuple[AppendLog, AppendLog, BinaryIO],
    ) -> None:
        self.spool, self.cfg, self.engines, self.hooks = spool, cfg, engines, hooks
        self.engine = engine
        self.job_dir, self.state = job_dir, state
        self.out, self.err, self.input = files
        ck = state.checkpoint
        # What was counted after the checkpoint is being redone: count from it.
        state.request_counts.completed, state.request_counts.failed = ck.completed, ck.failed
        self.run = RunState(ck.next_line, ck.input_offset, done=set(ck.done_lines))
        isolation.normalize(state.isolation)
        self.deaths = 0  # engine deaths in this run
        self.rejected = set(state.rejected_lines)
        self.reserve = max(cfg.processing.chunk_size // 2, 1)
        self.chunk_size = cfg.processing.chunk_size
        self.max_chunk_bytes = cfg.processing.max_chunk_bytes
        self.models_ok: set[object] = set()  # body.model values that resolve to ours

    # -- the run -----------------------------------------------------------------

    def go(self) -> RunState:
        """Groups of suspects first, alone (design §5a), then the rest of the input."""
        run = self.run
        while run.halt is None:
            group = isolation.first_group(self.state.isolation)
            if not group:
                self._drive(self._feed())
                if run.halt is None and isolation.first_group(self.state.isolation):
                    continue  # the engine died: its requests are suspects now
                break
            gate = self.hooks.gate
            if gate is not None and not gate():
                run.halt = "stop"
                break
            log.info("running suspects alone", job_id=self.state.id, lines=len(group))
            self.state.isolation.trying = True
            if not self._save_record():
                break
            deaths, lines = self.deaths, set(group)
            self._drive(self._feed(lines, group[-1]))
            left = isolation.first_group(self.state.isolation)
            if run.halt is None and self.deaths == deaths and left and set(left) <= lines:
                # Ran to its end, nobody died: what is left of it was never a request.
                isolation.resolve_first(self.state.isolation)
            if run.halt is None:
                self.commit()
        if run.halt not in ("lost", "changed", "lapsed"):
            self.commit()
        return run

    def _drive(self, source: Iterator[Request]) -> None:
        """Run `source` through the engine: a batch the engine raises for is bisected
        (it survived); an engine that died is reloaded and its requests isolated."""
        run = self.run
        try:
            while True:
                try:
                    for outcome in self.engine.run(source):
                        self.record(outcome)
                    return
                except (EngineDied, ClusterUnavailable):
                    raise  # not the batch's fault: nothing to bisect
                except Exception as e:
                    # Only the engine's own failures are bisected. An error reading the
                    # input or writing results ends the run: bisecting it would let the
                    # job finish without the lines the feed never handed out.
                    if run.failure is not None:
                        raise run.failure from None
                    log.warning("engine failed for a batch; isolating", error=str(e))
                    self._bisect([req for _, req in run.pending.values()], e)
        except EngineDied as e:
            if run.failure is not None:
                raise run.failure from None
            self._engine_died(e)

    def _bisect(self, requests: list[Request], error: Exception) -> None:
        """Find the request(s) that make a surviving engine fail, by bisection."""
        run = self.run
        if len(requests) == 1:
            log.warning("request fails the engine", job_id=self.state.id, error=str(error))
            msg = f"line {requests[0].line}: the engine failed on this request: {error}"
            self.record(Failure(requests[0], "engine_error", msg, status=500))
            return
        mid = len(requests) // 2
        for half in (requests[:mid], requests[mid:]):
            try:
                for outcome in self.engine.run(iter(half)):
                    self.record(outcome)
            except (EngineDied, ClusterUnavailable):
                raise
            except Exception as e:
                if run.failure is not None:
                    raise run.failure from None
                self._bisect([r for r in half if r.line in run.pending], e)

    def _engine_died(self, error: EngineDied) -> None:
        """The engine died in-process: what it held is suspect (or, in isolation, its
        group is blamed); a fresh engine goes on with the groups (design §5a)."""
        run, state = self.run, self.state
        held = {line: req for line, (_, req) in run.pending.items()}
        iso = state.isolation
        if not held:
            # Nothing in flight (the ray backend: no replica left to run the group):
            # nobody to suspect, and a group that never ran is not blamed, now or by
            # the next start if the reload fails (design §5a, §10).
            culprit = None
            if iso.trying:
                iso.trying = False
                self._save_record()
        elif iso.groups and iso.trying:
            isolation.finished(iso, run.done)
            culprit = isolation.blame(iso)
        else:
            # Normal feeding read past these lines: step back to the first of them.
            first = min(run.pending)
            run.next_line, run.next_offset = first, run.pending[first][0]
            state.isolation = isolation.begin(sorted(held))
            state.fed_through = 0
            culprit = None
        run.pending.clear()
        log.warning(
            "the engine died with requests in flight; reloading it",
            job_id=state.id,
            suspects=len(held),
            error=str(error),
        )
        self.deaths += 1
        if culprit is not None:
            run = self.run
            found = held.get(culprit) or request_on_line(
                self.input, run.next_offset, run.next_line, culprit, self.cfg.limits.max_line_bytes
            )
            self._dead_letter(culprit, found)
        engine = self.engines.reload()
        if engine is None:  # asked to stop while waiting to reload it
            run.halt = "stop"
        else:
            self.engine = engine
        self.commit()  # the narrowed suspects (and a culprit's error line) are durable

    def _dead_letter(self, line: int, req: Request | None) -> None:
        msg = isolation.culprit_message(line)
        log.error("request crashes the engine; dead-lettered", job_id=self.state.id, line=line)
        if req is None:
            self._error_now(line, None, ENGINE_CRASH, msg, 500)
            return
        self.run.pending[line] = (0, req)
        self.record(Failure(req, ENGINE_CRASH, msg, status=500))

    # -- feeding -----------------------------------------------------------------

    def _feed(self, only: set[int] | None = None, last: int = 0) -> Iterator[Request]:
        """Hand requests to the engine as it pulls them: the rest of the input (normal
        mode, `only` None) or exactly the lines in `only` (a group of suspects).

        Runs once per request: what can be is looked up once, before the loop."""
        run, state = self.run, self.state
        cap = self.cfg.limits.max_line_bytes
        chunk = self.cfg.processing.chunk_size
        gate = self.hooks.gate if only is None else None
        should_stop = self.hooks.should_stop
        pending = run.pending
        # Lines finished before this feed began; those finished later were handed out
        # by it, behind where it reads.
        skip = self.rejected | run.done
        models_ok = self.models_ok
        handed = 0
        offset = run.next_offset
        try:
            for line_no, end, raw in iter_lines(self.input, run.next_offset, run.next_line, cap):
                start, offset = offset, end
                if only is not None and line_no > last:
                    return
                if run.halt is None and should_stop():
                    run.halt = "stop"
                if run.halt is None and gate is not None and handed % chunk == 0:
                    run.halt = None if gate() else "stop"  # before each chunk
                if run.halt is not None:
                    return
                if only is None:
                    run.next_line, run.next_offset = line_no + 1, end
                elif line_no not in only:
                    continue
                if line_no in skip:
                    continue
                if only is None and line_no > state.fed_through:
                    # Recorded before the line is fed: a crash from here on knows it
                    # had this line in flight (design §5a).
                    state.fed_through = line_no + self.reserve
                    if not self._save_record():
                        return
                try:
                    request = None if raw is None else read_request(raw, line_no)
                except (ValueError, KeyError, TypeError) as e:
                    self._judged_now(line_no, start, None, e)
                    continue
                if request is None:
                    if raw is None:
                        self._judged_now(line_no, start, None, None)
                    continue  # else blank
                if request.body.get("model") not in models_ok and not self._our_model(request):
                    continue
                pending[line_no] = (start, request)
                handed += 1
                yield request
        except Exception as e:
            run.failure = e  # reading the input failed: not the engine's doing
            raise

    def _our_model(self, request: Request) -> bool:
        """Whether a request's body.model runs on the job's model with the config in
        force now; if not, it becomes a model_mismatch error line (an alias changed)."""
        name = request.body.get("model")
        wanted = self.cfg.engine.resolve_model(name)
        if wanted == self.engines.model:
            self.models_ok.add(name)
            return True
        self._judged_now(request.line, 0, request, None, wanted)
        return False

    def _judged_now(
        self,
        line_no: int,
        start: int,
        request: Request | None,
        error: Exception | None,
        model: str | None = None,
    ) -> None:
        """A line validation accepted that the config in force now judges differently
        (a lower limits.max_line_bytes, an alias that now names another model, a line
        that cannot be read): an error line with the reason, never nothing (SPEC §3)."""
        if model is not None and request is not None:
            code = MODEL_MISMATCH
            message = (
                f"line {line_no}: body.model {request.body.get('model')!r} runs on "
                f"{model!r} with the config in force now, but this job runs on "
                f"{self.engines.model!r}"
            )
        elif error is not None:
            code, message = "invalid_request", f"line {line_no}: cannot be read now: {error}"
        else:
            code = "line_too_long"
            message = (
                f"line {line_no}: longer than {self.cfg.limits.max_line_bytes} bytes "
                "(limits.max_line_bytes, lowered since the job was validated)"
            )
        custom_id = request.custom_id if request is not None else self._custom_id_at(start)
        self._error_now(line_no, custom_id, code, message)

    def _custom_id_at(self, offset: int) -> str | None:
        """The custom_id of a line too long to read whole: validation saw it, so its
        error line should name it (found in the line's first 64 KiB, or None)."""
        head = os.pread(self.input.fileno(), 1 << 16, offset)
        match = _CUSTOM_ID.search(head)
        if match is None:
            return None
        try:
            value = json.loads(match.group(1))
        except ValueError:
            return None
        return value if isinstance(value, str) else None

    def _error_now(
        self,
        line_no: int,
        custom_id: str | None,
        code: str,
        message: str,
        status: int | None = None,
    ) -> None:
        """An error line for a line the feed will not hand out (counted as an outcome)."""
        data = formats.error_line(self.state.id, line_no, custom_id, code, message, status)
        self.err.append(data)
        self.run.unsynced += len(data)
        self.run.done.add(line_no)
        self.state.request_counts.failed += 1
        self.run.since_commit += 1

    # -- outcomes and commits ------------------------------------------------------

    def record(self, outcome: Outcome) -> None:
        try:
            self._record(outcome)
        except Exception as e:
            self.run.failure = e  # writing or committing failed: not the engine's doing
            raise

    def _record(self, outcome: Outcome) -> None:
        run, state = self.run, self.state
        line = outcome.request.line
        del run.pending[line]
        run.done.add(line)
        counts = state.request_counts
        if isinstance(outcome, Completion | Embedding):
            data = formats.output_line(state.id, outcome, int(time.time()))
            self.out.append(data)
            counts.completed += 1
            # An embedding's work is its input; a completion's, what it generated.
            run.tokens += (
                outcome.prompt_tokens
                if isinstance(outcome, Embedding)
                else outcome.completion_tokens
            )
        else:
            data = formats.error_line(
                state.id,
                line,
                outcome.request.custom_id,
                outcome.code,
                outcome.message,
                outcome.status,
            )
            self.err.append(data)
            counts.failed += 1
        run.since_commit += 1
        run.unsynced += len(data)
        if run.since_commit >= self.chunk_size or run.unsynced >= self.max_chunk_bytes:
            self.commit()
        elif self.hooks.on_progress is not None and time.monotonic() >= run.next_report:
            self.report()

    def commit(self) -> None:
        """Sync both result files, then checkpoint in state.json (the commit)."""
        run, state = self.run, self.state
        if not self.spool.still_owner(self.job_dir):
            run.halt = "lost"
            return
        if input_changed(self.input, state):
            run.halt = "changed"  # nothing computed from a changed file is committed
            return
        with self.hooks.commit_lock:
            self.out.sync()
            self.err.sync()
            # As late as it can be, after the syncs (where a hung mount stalls): commit
            # only while our lease is fresh. A stall after this is what the fence is for.
            if not self.spool.lease.fresh():
                run.halt = "lapsed"
                return
            low, low_offset = run.next_line, run.next_offset
            if run.pending:
                first = next(iter(run.pending))
                if first < low:
                    low, low_offset = first, run.pending[first][0]
            isolation.finished(state.isolation, run.done)
            run.done = {line for line in run.done if line >= low}
            state.checkpoint = Checkpoint(
                validated=True,
                next_line=low,
                input_offset=low_offset,
                done_lines=sorted(run.done),
                output_bytes=self.out.size,
                errors_bytes=self.err.size,
                completed=state.request_counts.completed,
                failed=state.request_counts.failed,
            )
            state.attempts = 0
            self.spool.save(self.job_dir, state)
        run.since_commit = run.unsynced = 0
        if run.halt is None and self.spool.cancel_requested(self.job_dir):
            run.halt = "cancel"
        if self.hooks.on_progress is not None:
            self.report()

    def _save_record(self) -> bool:
        """Write state.json as last committed plus the crash evidence (fed_through,
        isolation.trying), before feeding. False (halt) if the job is no longer ours."""
        if not self.spool.still_owner(self.job_dir):
            self.run.halt = "lost"
            return False
        if not self.spool.lease.fresh():
            self.run.halt = "lapsed"
            return False
        state, ck = self.state, self.state.checkpoint
        live = state.request_counts  # counted past the checkpoint: not committed yet
        state.request_counts = RequestCounts(live.total, ck.completed, ck.failed)
        try:
            with self.hooks.commit_lock:
                self.spool.save(self.job_dir, state)
        finally:
            state.request_counts = live
        return True

    def report(self) -> None:
        """Progress and tokens/s to the heartbeat: at commits and about once a second."""
        assert self.hooks.on_progress is not None
        now = time.monotonic()
        run = self.run
        run.next_report = now + 1.0
        self.hooks.on_progress(self.state, run.tokens, run.tokens / max(now - run.started, 1e-9))
