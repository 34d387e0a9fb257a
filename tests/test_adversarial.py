"""A reviewer's attempts to break SPEC §3 "Every line accounted for": each test
failed on the code it was written against (issue 10, before the review's fixes); its
docstring says what SPEC/design promise and what happened instead."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from spoold.config import parse_config
from spoold.daemon import Daemon
from spoold.engines.fake import FakeEngine
from spoold.job import new_job_id
from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    job_dirs,
    make_config,
    only_job,
    state,
    write_jsonl,
)
from tests.test_crash import _requests, _stage_job_dir


def _staged(tmp: Path, n: int, **fields: Any) -> tuple[Path, Path, list[dict[str, Any]]]:
    cfg = make_config(tmp)
    spool = tmp / "spool"
    recs = _requests("h", n)
    src = write_jsonl(tmp / "h.jsonl", recs)
    job_id = new_job_id("h.jsonl")
    _stage_job_dir(spool / "processing" / job_id, "h.jsonl", src.read_bytes(), job_id, **fields)
    return cfg, spool, recs


def _drain_or_fail(cfg: Path, spool: Path, timeout: float, what: str) -> int:
    """One `spoold run --drain`; a drain that does not end fails the test, showing
    where the job's isolation stands."""
    proc = subprocess.Popen(
        [*SPOOLD, "run", "--config", str(cfg), "--drain"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )  # fmt: skip
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        st = state(only_job(spool, "processing"))
        proc.kill()
        proc.wait()
        pytest.fail(f"{what} after {timeout} s; isolation now {st['isolation']}")


@pytest.mark.parametrize(
    "isolation",
    [
        # groups that sum to more than the suspects
        {"suspects": [3], "groups": [1, 1], "strikes": 0, "trying": False},
        # a suspect past the end of the input (the file is 10 lines)
        {"suspects": [99], "groups": [1], "strikes": 0, "trying": False},
        # a line number that is no line
        {"suspects": [0], "groups": [1], "strikes": 0, "trying": False},
        # an empty group
        {"suspects": [3], "groups": [0], "strikes": 0, "trying": False},
    ],
    ids=["groups-sum-past-suspects", "suspect-past-eof", "suspect-zero", "empty-group"],
)
def test_an_inconsistent_isolation_record_never_wedges_the_daemon(
    tmp_path: Path, isolation: dict[str, Any]
) -> None:
    """SPEC §3 "Records from other versions, or broken ones, stop nothing" (and "a job
    ever loop forever?"): a state.json whose `isolation` is of the right types but does
    not add up (hand-edited, or written by a buggy/newer spoold). Expected: the job
    completes (the bogus suspects are dropped, every real line runs once) or is
    reported/failed, and `--drain` ends. Found: Execution.go() spins forever — either
    in isolation mode (a group whose lines the feed never meets: it never leaves
    `groups`, each turn rewrites state.json twice and sets attempts = 0, so
    max_job_attempts never fires) or in normal mode (first_group() is [] but
    `groups` is not, so `continue` re-runs an exhausted feed). The daemon never gets
    to another job. Fault: execution.Execution.go / isolation.finished (nothing
    reconciles `groups` with `suspects`, or a group with lines the input has)."""
    cfg, spool, recs = _staged(tmp_path, 10, isolation=isolation)
    assert _drain_or_fail(cfg, spool, 15, "--drain still running") == 0
    done = only_job(spool, "done")
    assert_exactly_once(done, {r["custom_id"] for r in recs})


def test_a_stop_while_waiting_to_reload_a_dead_engine_exits_0(tmp_path: Path) -> None:
    """SPEC §3 "Stopping is always clean": SIGTERM at any moment ends the process with
    exit 0, and a stop is not counted as a crash of the job. Here the engine dies
    in-process (die_marker) and the reload waits in the gate (GPU memory still held by
    the dead engine core / disk low: here, disk) when the stop comes. Found: gate()
    returns False, _Engines.reload raises EngineFatal("stopping while the engine was
    being reloaded"), Daemon.run returns 1, and the job's attempt is not given back
    (state.json keeps `running`, attempts counted, fed_through set). Fault:
    daemon._Engines.reload treats a stop like a failed reload; execution._engine_died
    has no way to halt with "stop"."""
    died = threading.Event()

    class Dying(FakeEngine):
        def _run_batch(self, batch):  # type: ignore[no-untyped-def]
            try:
                return super()._run_batch(batch)
            except Exception:
                died.set()
                raise

    cfg = parse_config(
        {
            "spool_dir": str(tmp_path / "spool"),
            "watch": {"settle_seconds": 0},
            "heartbeat": {"interval_s": 0.05, "stale_after_s": 5},
            "processing": {"chunk_size": 20},
            "limits": {"min_free_disk_mb": 1},
            "engine": {"backend": "fake", "fake": {"die_marker": "<<DIE>>", "batch_size": 8}},
        }
    )
    d = Daemon(
        cfg,
        lambda model, runner: Dying(model, cfg.engine.fake, runner),
        disk_free=lambda path: 0 if died.is_set() else 1 << 40,
    )
    d.poll_s = 0.02
    d.spool.ensure_layout()
    recs = [chat(f"r{i}", "q <<DIE>>" if i == 30 else f"q{i}") for i in range(60)]
    write_jsonl(d.spool.incoming / "die.jsonl", recs)

    def stop_when_throttled() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if json.loads(cfg.heartbeat_path.read_text()).get("status") == "throttled":
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        d.request_stop("SIGTERM")

    t = threading.Thread(target=stop_when_throttled)
    t.start()
    code = d.run(drain=False)
    t.join()
    assert died.is_set()
    (job,) = job_dirs(cfg.spool_dir, "processing")
    st = state(job)
    assert code == 0, f"exit {code} on a stop; job left {st['status']}, attempts {st['attempts']}"
    assert st["status"] == "queued" and st["attempts"] == 0


def test_drain_ends_when_a_jobs_input_is_gone_for_good(tmp_path: Path) -> None:
    """SPEC §5: `--drain` processes everything claimable "then exit[s]". A queued job
    whose input.jsonl has disappeared (deleted by hand, a broken mount) fails every run
    with FileNotFoundError, which the runner classes as a transient I/O error
    (IOFailure: attempt given back, job_retries backoff 5 s doubling to 300 s, no
    limit). Expected: --drain reports the job (problems / failed / exit 1) and ends, as
    it does for an unreadable record (design §9). Found: --drain never exits: it
    waits on job_retries forever (daemon._drain_should_wait: `bool(len(self.job_retries))`),
    retrying the job every 300 s. Fault: runner.Runner.run's `except OSError` (no
    retry limit, ENOENT on the input is not transient) and daemon._drain_should_wait."""
    cfg, spool, _ = _staged(tmp_path, 10)
    (only_job(spool, "processing") / "input.jsonl").unlink()
    try:
        proc = subprocess.run(
            [*SPOOLD, "run", "--config", str(cfg), "--drain"],
            capture_output=True, text=True, timeout=40, env=_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("--drain still waiting after 40 s for a job whose input is gone")
    assert proc.returncode == 0  # processed: filed as failed, saying why
    st = state(only_job(spool, "failed"))
    assert "input.jsonl is missing" in st["error"], st["error"]


def test_drain_ends_when_a_jobs_input_keeps_failing_to_read(tmp_path: Path) -> None:
    """An I/O error that does not pass (here EINVAL: a checkpoint offset that no seek
    takes) is not given back: --drain waits the I/O backoff a bounded number of times,
    then the job is quarantined by processing.max_job_attempts, and the drain ends."""
    cfg, spool, _ = _staged(tmp_path, 10)
    job = only_job(spool, "processing")
    raw = json.loads((job / "state.json").read_text())
    raw["checkpoint"].update(validated=True, input_offset=-5)
    (job / "state.json").write_text(json.dumps(raw))
    make_config(tmp_path, processing={"io_retry_s": 0.2, "max_job_attempts": 2})
    proc = subprocess.run(
        [*SPOOLD, "run", "--config", str(cfg), "--drain"],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:]
    st = state(only_job(spool, "failed"))
    assert "crashed the daemon 2 times" in st["error"], st["error"]


def test_a_line_of_ascii_separator_whitespace_near_a_crash_never_wedges_the_job(
    tmp_path: Path,
) -> None:
    """Validation skips a line holding only U+001C..U+001F (Python's str.strip() calls
    them whitespace: validate._load) as blank, so it is in `blank_lines`, not counted,
    not an error. ledger.is_blank, which Runner._suspects uses to leave blanks out of
    the suspects, says it is NOT blank (bytes.lstrip() strips ASCII whitespace only,
    and the first byte is < 0x80). So after any crash with that line inside the
    fed_through window it becomes a suspect; its group is fed, read_request() returns
    None (blank) and the feed `continue`s without marking it done; the group never
    leaves `groups` and Execution.go() loops forever (state.json rewritten twice a
    turn, attempts reset, so never quarantined). Expected (SPEC §3): the culprit is
    dead-lettered, everything else completes. Fault: ledger.is_blank disagrees with
    validate._load (and execution._feed / isolation.finished never resolve a suspect
    the feed skips)."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 100},
        engine={"fake": {"crash_marker": "<<CRASH>>", "batch_size": 4}},
    )
    spool = tmp_path / "spool"
    recs = _requests("r", 20)
    lines: list[Any] = list(recs)
    lines[12] = chat("r-12", "this one <<CRASH>>es")
    lines.insert(6, "\x1f")  # the input's line 7: blank to validation
    write_jsonl(spool / "incoming" / "sep.jsonl", lines)
    runs = 0
    while True:
        runs += 1
        assert runs <= 15, "more than 15 runs"
        rc = _drain_or_fail(cfg, spool, 20, f"run {runs} spins")
        if rc == 0:
            break
        assert rc == 70  # the culprit crashed the process
    done = only_job(spool, "done")
    assert_exactly_once(done, {r["custom_id"] for r in recs})
