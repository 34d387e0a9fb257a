"""Stopping is always clean (SPEC §3, §4): SIGTERM or SIGINT at any moment ends the real
`spoold run` within processing.stop_timeout_s + 5 s with exit 0, its last heartbeat
says `stopped` and why, and spool-status then reports the daemon down."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from spoold.heartbeat import Heartbeat
from spoold.signals import STOP_SIGNALS, SignalWatcher
from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    drain,
    job_dirs,
    make_config,
    run_spoold,
    state,
    wait_for,
    write_jsonl,
)

# Rounds stop in ~0.05 s (chunks of 20 requests take 0.04 s). Not less than 5: on a
# loaded 2-core VM, closing watchdog's inotify fd at shutdown was seen to take > 2 s,
# and past stop_timeout_s the stop is an abandon (reason `SIGTERM; stop timeout`).
STOP_TIMEOUT_S = 5.0
BOUND_S = STOP_TIMEOUT_S + 5  # SPEC §3: stop_timeout_s + 5 s


def read_beat(spool: Path) -> dict[str, Any] | None:
    try:
        beat = json.loads((spool / "heartbeats" / "default.json").read_text())
    except (OSError, ValueError):
        return None
    return beat if isinstance(beat, dict) else None


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` now (/proc/PID/status SigCgt)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return False
    for line in lines:
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


def spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*SPOOLD, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )


def stop_within_bound(proc: subprocess.Popen[bytes], signum: int, log: Path, what: str) -> int:
    """Send `signum`; the exit code, or fail (killing the process) past the bound."""
    proc.send_signal(signum)
    try:
        return proc.wait(BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail = log.read_text(errors="replace")[-2000:]
        raise AssertionError(
            f"{what}: still running {BOUND_S} s after {signal.Signals(signum).name}:\n{tail}"
        ) from None


def signal_one_daemon(
    cfg: Path, log: Path, signum: signal.Signals, delay_s: float | None
) -> tuple[int, str | None]:
    """Start a daemon, signal it `delay_s` after its first heartbeat (None: the moment
    it handles the signal, before its first heartbeat); its pid and what it last said
    before the signal. Fails unless it exits 0 in time, its last beat `stopped`."""
    spool = cfg.parent / "spool"
    proc = spawn(cfg, log)
    try:
        wait_for(lambda: catches(proc.pid, signal.SIGTERM) or proc.poll() is not None, poll=0.005)
        said: str | None = "before a beat"
        if delay_s is not None:
            wait_for(
                lambda: (read_beat(spool) or {}).get("pid") == proc.pid,
                what="the daemon's first heartbeat",
                poll=0.005,
            )
            time.sleep(delay_s)
            said = (read_beat(spool) or {}).get("status")
        what = f"{signum.name} {delay_s} s after the first heartbeat (it said {said})"
        assert stop_within_bound(proc, signum, log, what) == 0, f"{what}: exit code"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    beat = read_beat(spool)
    assert beat is not None and beat["pid"] == proc.pid, what
    assert beat["status"] == "stopped" and beat["reason"] == signum.name, (what, beat)
    assert isinstance(beat["seq"], int) and beat["seq"] >= 1, beat
    return proc.pid, said


@pytest.mark.slow
def test_a_signal_at_any_moment_stops_cleanly_and_the_job_completes_once(
    tmp_path: Path,
) -> None:
    """Dozens of real daemons, each signalled at a random moment (seeded): while it
    recovers, right after its first heartbeat, while it validates, loads the model,
    runs, commits — with a heartbeat written 100 times a second, so many signals land
    inside a heartbeat write. Every one exits 0 in time and leaves `stopped`."""
    cfg = make_config(
        tmp_path,
        heartbeat={"interval_s": 0.01, "stale_after_s": 1},
        processing={"chunk_size": 20, "stop_timeout_s": STOP_TIMEOUT_S},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.002, "batch_size": 10}},
    )
    spool = tmp_path / "spool"
    ids = [f"r{i}" for i in range(6000)]
    write_jsonl(spool / "incoming" / "long.jsonl", [chat(i) for i in ids])
    log = tmp_path / "daemon.log"
    rng = random.Random(20260301)
    said: Counter[str | None] = Counter()  # what the daemon last said before each signal
    for round_ in range(42):
        signum = signal.SIGINT if round_ % 3 == 2 else signal.SIGTERM
        delay_s = None
        if round_ % 7:
            delay_s = rng.choice((rng.uniform(0, 0.05), rng.uniform(0, 0.8)))
        said[signal_one_daemon(cfg, log, signum, delay_s)[1]] += 1
    assert said["processing"] >= 10, said  # the signals did land in running jobs
    (job,) = job_dirs(spool, "processing")
    assert state(job)["request_counts"]["completed"] > 0, "no round got as far as a commit"
    fast = make_config(tmp_path, processing={"chunk_size": 1000})
    drain(fast)
    (done,) = job_dirs(spool, "done")
    assert state(done)["status"] == "completed"
    assert_exactly_once(done, ids)


# -- the signal handler takes no lock (the deadlock) ----------------------------------

_SIGNAL_INSIDE = """
import os, signal, sys
from pathlib import Path
from spoold.config import load_config
from spoold.daemon import Daemon
from spoold.engines import make_engine

cfg = load_config(Path(sys.argv[1]))
d = Daemon(cfg, lambda model, runner: make_engine(cfg.engine, model, runner))
d.spool.ensure_layout()
assert d._claim_instance()  # the instance lease: the heartbeat is ours to write
d.install_signal_handlers()
lock = {
    "heartbeat": d.heartbeat._lock,
    "wake": d.wake._cond,
    "stop_requested": d.stop_requested._cond,
}[sys.argv[2]]
with lock:
    # The Python-level handler runs in this thread right after os.kill returns: here,
    # with the lock held, as it would land inside any `with lock:` of the daemon.
    os.kill(os.getpid(), signal.SIGTERM)
    sum(range(100_000))
print(f"stop requested: {d.stop_requested.wait(10)}", flush=True)
d.shutdown()
"""


@pytest.mark.parametrize("held", ["heartbeat", "wake", "stop_requested"])
def test_sigterm_while_the_main_thread_holds_a_lock_does_not_hang(
    tmp_path: Path, held: str
) -> None:
    """The handler runs between two bytecodes of whatever the main thread was doing. A
    handler that took the heartbeat's lock or an Event's (request_stop did) waited
    forever on its own thread; every time, when the signal lands inside the lock."""
    cfg = make_config(tmp_path)
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGNAL_INSIDE, str(cfg), held],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=_env(),
    )
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise AssertionError(f"SIGTERM inside the {held} lock hung the process") from None
    assert proc.returncode == 0, out.decode()
    assert b"stop requested: True" in out, out.decode()
    beat = read_beat(tmp_path / "spool")
    assert beat is not None and beat["status"] == "stopped" and beat["reason"] == "SIGTERM"


# -- the last heartbeat, spool-status, the next start ------------------------------------


def spool_status(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    status = str(Path(sys.executable).parent / "spool-status")
    return subprocess.run(
        [status, "--config", str(cfg), *extra],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )


def test_a_clean_stop_leaves_stopped_and_spool_status_says_down(tmp_path: Path) -> None:
    """SPEC §4/§5: a daemon that exits cleanly writes its heartbeat a last time as
    `stopped` with a reason; spool-status then exits 2 (down) and says so, at once,
    not only once the heartbeat has gone stale."""
    cfg = make_config(tmp_path, heartbeat={"interval_s": 0.1, "stale_after_s": 60})
    spool = tmp_path / "spool"
    log = tmp_path / "daemon.log"
    proc = spawn(cfg, log)
    try:
        wait_for(
            lambda: (read_beat(spool) or {}).get("pid") == proc.pid, what="a heartbeat", poll=0.005
        )
        first = read_beat(spool)
        assert first is not None and first["problems"] == [] and first["seq"] >= 1
        live = wait_for(
            lambda: (read_beat(spool) or {}).get("status") == "idle" and read_beat(spool)
        )
        assert spool_status(cfg).returncode == 0
        assert stop_within_bound(proc, signal.SIGTERM, log, "idle daemon") == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = read_beat(spool)
    assert last is not None
    assert last["status"] == "stopped" and last["reason"] == "SIGTERM"
    assert last["seq"] > live["seq"] and last["problems"] == []
    shown = spool_status(cfg)
    assert shown.returncode == 2, shown.stdout
    assert "DOWN" in shown.stdout and "stopped" in shown.stdout and "SIGTERM" in shown.stdout
    report = json.loads(spool_status(cfg, "--json").stdout)
    assert report["health"] == "down"
    (daemon,) = report["daemons"]
    assert daemon["status"] == "stopped" and daemon["reason"] == "SIGTERM"
    assert daemon["stopped_at"] == last["updated_at"]


def _beat(spool: Path, **fields: Any) -> None:
    """A heartbeat as another spoold would have written it, just now."""
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    beat = {
        "pid": 4242,
        "hostname": "elsewhere.example",
        "instance": "default",
        "version": "0",
        "status": "idle",
        "reason": None,
        "started_at": now,
        "updated_at": now,
        "last_progress_at": now,
        "current_job": None,
        "gpu": None,
        "limits": {},
        "seq": 7,
        "problems": [],
        **fields,
    }
    (spool / "heartbeats").mkdir(parents=True, exist_ok=True)
    tmp = spool / "heartbeats" / ".beat-by-test.tmp"  # replaced whole, as spoold does
    tmp.write_text(json.dumps(beat))
    os.replace(tmp, spool / "heartbeats" / "default.json")


def test_a_stopping_daemon_is_still_alive_for_spool_status(tmp_path: Path) -> None:
    """`stopping` is a live daemon finishing its chunk (it still commits): not down."""
    cfg = make_config(tmp_path)
    _beat(tmp_path / "spool", status="stopping", reason="SIGTERM")
    shown = spool_status(cfg)
    assert shown.returncode == 1, shown.stdout  # alive, but no longer taking work
    assert "stopping" in shown.stdout


def test_a_stopped_heartbeat_does_not_block_the_next_daemon(tmp_path: Path) -> None:
    """A heartbeat of the same instance that keeps changing blocks a start (its daemon
    runs, on another host; wall clocks are not compared); one that says `stopped` does
    not: that daemon exited cleanly. One that nobody rewrites is stale after
    heartbeat.stale_after_s on the starting daemon's clock, and then does not either."""
    cfg = make_config(tmp_path, heartbeat={"interval_s": 0.2, "stale_after_s": 2})
    spool = tmp_path / "spool"
    alive = threading.Event()
    alive.set()

    def beating() -> None:
        seq = 7
        while alive.is_set():
            seq += 1
            _beat(spool, status="stopping", seq=seq, updated_at="2001-01-01T00:00:00Z")
            time.sleep(0.1)

    writer = threading.Thread(target=beating)
    writer.start()
    try:
        refused = run_spoold("run", "--config", str(cfg), "--drain", timeout=60)
    finally:
        alive.clear()
        writer.join()
    assert refused.returncode == 2 and "elsewhere.example" in refused.stderr, refused.stderr
    _beat(spool, status="stopped", reason="SIGTERM")
    started = time.monotonic()
    ran = run_spoold("run", "--config", str(cfg), "--drain", timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert time.monotonic() - started < 2, "a stopped heartbeat made the start wait"
    beat = read_beat(spool)
    assert beat is not None and beat["status"] == "stopped" and beat["reason"] == "drained"
    _beat(spool, status="processing")  # a daemon that died on another host, mid-beat
    started = time.monotonic()
    ran = run_spoold("run", "--config", str(cfg), "--drain", timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert time.monotonic() - started >= 2, "judged dead before stale_after_s"


# -- Heartbeat ----------------------------------------------------------------------------


def test_heartbeat_counts_every_write_and_lists_no_problems(tmp_path: Path) -> None:
    path = tmp_path / "default.json"
    beat = Heartbeat(path, 0.02, {})
    seen = []
    beat.on_beat = lambda snapshot: seen.append(snapshot["seq"])
    beat.start()
    wait_for(lambda: len(seen) >= 5, what="five beats")
    beat.stop()
    last = json.loads(path.read_text())
    assert seen[0] == 1 and seen == list(range(1, len(seen) + 1))
    assert last["seq"] == seen[-1] and last["status"] == "stopped" and last["problems"] == []


def test_heartbeat_stop_does_not_wait_forever_for_a_stuck_write(tmp_path: Path) -> None:
    """A beat stuck in its write (a hung NFS server) must not hold the stop forever:
    stop() gives up on the last beat with an OSError, as for a write that failed."""
    beat = Heartbeat(tmp_path / "default.json", 0.01, {})
    stuck, release = threading.Event(), threading.Event()
    raised: list[BaseException] = []

    def stop() -> None:
        try:
            beat.stop(timeout_s=0.5)
        except BaseException as e:
            raised.append(e)

    def sample() -> dict[str, Any]:
        if threading.current_thread().name == "heartbeat":
            stuck.set()
            release.wait(30)
        return {}

    beat.start()
    beat.sampler = sample
    wait_for(stuck.is_set, what="the beat to get stuck")
    stopper = threading.Thread(target=stop)
    t0 = time.monotonic()
    stopper.start()
    stopper.join(10)
    took = time.monotonic() - t0
    release.set()
    stopper.join()
    assert took < 10, "Heartbeat.stop waited for the stuck write"
    assert len(raised) == 1 and isinstance(raised[0], OSError), raised


# -- spoold.signals ----------------------------------------------------------------------


def test_signal_watcher_calls_back_from_its_own_thread_and_restores(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    got: list[tuple[signal.Signals, str]] = []
    watcher = SignalWatcher(lambda s: got.append((s, threading.current_thread().name)))
    watcher.start()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: the handler is ours
        wait_for(lambda: len(got) == 2, timeout=10, what="two callbacks")
    finally:
        watcher.close()
    assert got == [(signal.SIGTERM, "signals"), (signal.SIGINT, "signals")]
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    assert signal.set_wakeup_fd(-1) == -1  # ours is gone (pytest sets none)
    watcher.close()  # twice is fine


def test_a_forked_child_signals_do_not_reach_the_parent() -> None:
    """A child forked without exec (multiprocessing's fork; vLLM's engine core may be
    one) inherits the wakeup fd: its own SIGTERM — the one that ends it at a model
    switch — must not arrive in the parent's pipe as a stop of the daemon."""
    got: list[signal.Signals] = []
    watcher = SignalWatcher(got.append)
    watcher.start()
    try:
        pid = os.fork()
        if pid == 0:  # the child: a handler of its own, as vLLM's engine core has
            try:
                signal.signal(signal.SIGTERM, lambda *_: None)
                os.kill(os.getpid(), signal.SIGTERM)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.3)
        assert got == [], "the child's SIGTERM reached the parent's callback"
        os.kill(os.getpid(), signal.SIGTERM)  # the parent's own still does
        wait_for(lambda: got == [signal.SIGTERM], timeout=10, what="the parent's callback")
    finally:
        watcher.close()
