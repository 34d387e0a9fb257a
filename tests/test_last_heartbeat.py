"""SPEC §4: a daemon that exits cleanly writes its heartbeat a last time as `stopped`,
with a `reason`, whichever way it exits: a signal while idle, in a job, in a model load
or in recovery, Ctrl-C to `make run`, the stop timeout, a signal before the daemon could
hear it, --drain, and the exit-1 paths (a spool it cannot recover, an engine that
cannot be reloaded, jobs whose model could not load). Real processes, real signals."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    SPOOLD,
    _env,
    chat,
    job_dirs,
    make_config,
    run_spoold,
    state,
    wait_for,
    write_jsonl,
)
from tests.test_admission import unmovable
from tests.test_stopping import catches, read_beat, spawn, stop_within_bound

# A daemon with an engine factory of the test's: loads that take a while, or an engine
# that dies and cannot be loaded again.
_WITH_FACTORY = """
import sys, time
from pathlib import Path
from spoold.config import load_config
from spoold.daemon import Daemon
from spoold.engines.fake import FakeEngine

cfg = load_config(Path(sys.argv[1]))
mode, load_s = sys.argv[2], float(sys.argv[3])
loads = []

def factory(model, runner):
    loads.append(model)
    if mode == "reload-fails" and len(loads) > 1:
        raise RuntimeError("CUDA out of memory")
    time.sleep(load_s)
    return FakeEngine(model, cfg.engine.fake, runner)

d = Daemon(cfg, factory)
d.install_signal_handlers()
sys.exit(d.run())
"""


def with_factory(cfg: Path, log: Path, mode: str, load_s: float) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", _WITH_FACTORY, str(cfg), mode, str(load_s)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )


def last_beat(spool: Path, pid: int) -> dict[str, Any]:
    """The last heartbeat, checked to be the one of process `pid`, `stopped`, with a
    reason; the process must be gone."""
    beat = read_beat(spool)
    assert beat is not None, "no heartbeat"
    assert beat["pid"] == pid, beat
    assert beat["status"] == "stopped", beat
    assert isinstance(beat["reason"], str) and beat["reason"], beat
    assert beat["current_job"] is None
    leases = [p.name for p in (spool / "heartbeats").iterdir() if p.name.endswith(".lease")]
    assert leases == [], f"lease directories left: {leases}"
    return beat


def status_of(spool: Path) -> str | None:
    return (read_beat(spool) or {}).get("status")


def test_sigint_to_make_run_like_ctrl_c_leaves_stopped(tmp_path: Path) -> None:
    """Ctrl-C in a terminal sends SIGINT to its whole foreground process group: `make`
    and the spoold it runs (the README's `make run`), here in the middle of a job."""
    if shutil.which("make") is None:
        pytest.skip("no make")
    cfg = make_config(
        tmp_path,
        heartbeat={"interval_s": 0.1, "stale_after_s": 5},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.005, "batch_size": 10}},
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "long.jsonl", [chat(f"r{i}") for i in range(2000)])
    (tmp_path / "Makefile").write_text(
        f"run:\n\t{sys.executable} -m spoold run --config $(CONFIG) --spool $(SPOOL)\n"
    )
    with open(tmp_path / "make.log", "ab") as out:
        make = subprocess.Popen(
            ["make", "-C", str(tmp_path), "run", f"CONFIG={cfg}", f"SPOOL={spool}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
            start_new_session=True,  # a process group of its own, as a terminal's job
        )
    try:
        wait_for(lambda: status_of(spool) == "processing", what="the job to run")
        pid = read_beat(spool)["pid"]  # type: ignore[index]
        assert pid != make.pid
        os.killpg(make.pid, signal.SIGINT)
        make.wait(30)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    assert last_beat(spool, pid)["reason"] == "SIGINT"
    (job,) = job_dirs(spool, "processing")
    assert state(job)["status"] == "queued"  # resumes at the next start


def test_a_signal_before_the_daemon_can_hear_it_leaves_stopped(tmp_path: Path) -> None:
    """cli.cmd_run remembers a SIGTERM that lands while spoold still imports and reads
    its config; the daemon then takes its instance, recovers and stops at once."""
    cfg = make_config(tmp_path)
    proc = spawn(cfg, tmp_path / "daemon.log")
    wait_for(lambda: catches(proc.pid, signal.SIGTERM), poll=0.002, what="the early handler")
    assert read_beat(tmp_path / "spool") is None  # not even the first beat yet
    assert stop_within_bound(proc, signal.SIGTERM, tmp_path / "daemon.log", "early") == 0
    assert last_beat(tmp_path / "spool", proc.pid)["reason"] == "SIGTERM"


def test_a_stop_during_recovery_leaves_stopped(tmp_path: Path) -> None:
    """Recovery of thousands of half-done claims of a dead incarnation takes seconds; a
    SIGTERM meanwhile lets it finish and the daemon stops before taking any work."""
    cfg = make_config(tmp_path, processing={"stop_timeout_s": 60})
    spool = tmp_path / "spool"
    for i in range(3000):
        staging = spool / "processing" / f".claim-old.0123456789ab+j{i}"
        staging.mkdir(parents=True)
        (staging / "state.json").write_text("{}")
    log = tmp_path / "daemon.log"
    proc = spawn(cfg, log)
    wait_for(lambda: (read_beat(spool) or {}).get("pid") == proc.pid, poll=0.002)
    said = status_of(spool)
    assert stop_within_bound(proc, signal.SIGTERM, log, "in recovery") == 0
    assert said == "starting", "the signal landed after recovery: more staging dirs"
    assert last_beat(spool, proc.pid)["reason"] == "SIGTERM"
    assert [p for p in (spool / "processing").iterdir() if p.name.startswith(".claim")] == []


@pytest.mark.parametrize(("load_s", "reason"), [(2.0, "SIGTERM"), (60.0, "SIGTERM; stop timeout")])
def test_a_stop_during_a_model_load_leaves_stopped(
    tmp_path: Path, load_s: float, reason: str
) -> None:
    """A SIGTERM while the model loads: a load that ends within stop_timeout_s is not
    used (the job is not started), one that does not is abandoned by the stop timer.
    Either way the heartbeat says `stopping` until its last beat says `stopped`, and
    the job's attempt is given back."""
    cfg = make_config(
        tmp_path,
        heartbeat={"interval_s": 0.05, "stale_after_s": 5},
        processing={"stop_timeout_s": 4},
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "a.jsonl", [chat(f"r{i}") for i in range(10)])
    log = tmp_path / "daemon.log"
    proc = with_factory(cfg, log, "slow-load", load_s)
    try:
        wait_for(lambda: status_of(spool) == "loading_model", what="the model load")
        proc.send_signal(signal.SIGTERM)
        seen = []
        deadline = time.monotonic() + 4 + 5
        while proc.poll() is None and time.monotonic() < deadline:
            seen.append(status_of(spool))
            time.sleep(0.01)
        assert proc.wait(1) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "stopping" in seen, seen
    after = seen[seen.index("stopping") :]
    assert set(after) <= {"stopping", "stopped", None}, after  # None: between two beats
    assert last_beat(spool, proc.pid)["reason"] == reason
    (job,) = job_dirs(spool, "processing")
    st = state(job)
    assert st["status"] == "queued" and st["attempts"] == 0, st


def test_the_stop_timeout_leaves_stopped_and_says_so(tmp_path: Path) -> None:
    """A chunk that outlives processing.stop_timeout_s is abandoned: exit 0, `stopped`,
    the reason says the stop timed out."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 1000, "stop_timeout_s": 1},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.05, "batch_size": 200}},
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "slow.jsonl", [chat(f"r{i}") for i in range(400)])
    log = tmp_path / "daemon.log"
    proc = spawn(cfg, log)
    wait_for(lambda: status_of(spool) == "processing", what="the 10 s engine batch")
    assert stop_within_bound(proc, signal.SIGTERM, log, "in a long batch") == 0
    assert last_beat(spool, proc.pid)["reason"] == "SIGTERM; stop timeout"


def test_drain_exits_leave_stopped_with_what_they_left(tmp_path: Path) -> None:
    """--drain: `drained` when it filed everything; exit 1 and why when it failed jobs
    (their model could not load)."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "a.jsonl", [chat("a")])
    assert run_spoold("run", "--config", str(cfg), "--drain").returncode == 0
    assert read_beat(spool)["reason"] == "drained"  # type: ignore[index]
    bad = make_config(
        tmp_path,
        engine={"backend": "fake", "model": "missing-model", "fake": {"load_fail_marker": "miss"}},
        processing={"max_model_load_attempts": 1},
    )
    write_jsonl(spool / "incoming" / "b.jsonl", [chat("b")])
    ran = run_spoold("run", "--config", str(bad), "--drain")
    assert ran.returncode == 1, ran.stdout
    beat = read_beat(spool)
    assert beat is not None and beat["status"] == "stopped"
    assert beat["reason"] == "drained, but 1 job(s) failed: their model could not load"


def test_a_spool_that_cannot_be_recovered_exits_1_and_leaves_stopped(tmp_path: Path) -> None:
    """Start-up recovery meets a leftover it may not remove (an immutable temp file, or
    a read-only processing/): exit 1, one error naming the file, no traceback, and the
    last beat says `stopped` and why, not `starting` for ever with a lease dir left."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    (spool / "processing").mkdir(parents=True)
    stray = spool / "processing" / ".state.json.0badc0de.tmp"
    stray.write_text("half a record")
    with unmovable(stray):
        ran = subprocess.run(
            [*SPOOLD, "run", "--config", str(cfg)],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=60,
        )
    assert ran.returncode == 1, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stdout + ran.stderr
    assert "cannot recover the spool" in ran.stdout and str(stray) in ran.stdout
    beat = read_beat(spool)
    assert beat is not None
    reason = last_beat(spool, beat["pid"])["reason"]
    assert reason.startswith("cannot recover the spool") and str(stray) in reason


def test_an_engine_that_cannot_be_reloaded_exits_1_and_leaves_stopped(tmp_path: Path) -> None:
    """The engine dies in-process and loading it again fails: exit 1 (the service
    manager restarts spoold), the last beat names the engine's death and the error."""
    cfg = make_config(
        tmp_path,
        engine={"backend": "fake", "fake": {"die_marker": "<<DIE>>", "batch_size": 1}},
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "a.jsonl", [chat("ok"), chat("dies", content="<<DIE>>")])
    proc = with_factory(cfg, tmp_path / "daemon.log", "reload-fails", 0.0)
    try:
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reason = last_beat(spool, proc.pid)["reason"]
    assert reason.startswith("the engine died and cannot be reloaded"), reason
    assert "CUDA out of memory" in reason
