"""The live daemon (`spoold run` without --drain), as a real subprocess on a temp spool."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    job_dirs,
    make_config,
    read_results,
    run_spoold,
    state,
    wait_for,
    write_jsonl,
)


class Daemon:
    """A `spoold run` subprocess, stopped (and reaped) by the fixture."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.log = config.parent / "daemon.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [*SPOOLD, "run", "--config", str(config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**_env(), **(env or {})},
            )
        self.spool = config.parent / "spool"

    def wait_started(self) -> None:
        path = self.spool / "heartbeats" / "default.json"

        def started() -> bool:
            try:
                return bool(json.loads(path.read_text()).get("pid") == self.proc.pid)
            except (OSError, ValueError):
                return False

        wait_for(started, what="the daemon's first heartbeat")

    def terminate(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def start(daemons: list[Daemon], config: Path, **env: str) -> Daemon:
    d = Daemon(config, env)
    daemons.append(d)
    d.wait_started()
    return d


def done_jobs(spool: Path) -> list[Path]:
    return job_dirs(spool, "done")


def test_file_written_in_place_is_claimed_only_once_settled(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """scp writes under the final name: half a file must never be claimed."""
    cfg = make_config(tmp_path, watch={"settle_seconds": 1.5})
    start(daemons, cfg)
    spool = tmp_path / "spool"
    data = b"".join(json.dumps(chat(f"r{i}")).encode() + b"\n" for i in range(200))
    target = spool / "incoming" / "scp.jsonl"
    with open(target, "wb") as f:
        f.write(data[: len(data) // 2 + 7])  # cut mid-line
        f.flush()
        time.sleep(1.0)  # a stall shorter than settle_seconds
        assert target.exists(), "claimed while still being written"
        f.write(data[len(data) // 2 + 7 :])
    job = wait_for(lambda: done_jobs(spool), what="the job to finish")[0]
    st = state(job)
    assert st["request_counts"] == {"total": 200, "completed": 200, "failed": 0}
    assert_exactly_once(job, [f"r{i}" for i in range(200)])


def test_rsync_and_submit_arrivals_are_picked_up(tmp_path: Path, daemons: list[Daemon]) -> None:
    """rsync's `.name.XXXXXX` → `name` rename and `spoldd submit` both count as arrival."""
    cfg = make_config(tmp_path, watch={"settle_seconds": 0.2, "rescan_interval_s": 60})
    start(daemons, cfg)
    spool = tmp_path / "spool"
    tmp = spool / "incoming" / ".rsynced.jsonl.Xa81bQ"
    write_jsonl(tmp, [chat("a"), chat("b")])
    time.sleep(0.5)
    assert tmp.exists(), "an rsync temp file was touched"
    os.rename(tmp, spool / "incoming" / "rsynced.jsonl")
    src = write_jsonl(tmp_path / "submitted.jsonl", [chat("c")])
    run_spoold("submit", "--config", str(cfg), str(src), check=True)
    jobs = wait_for(lambda: len(done_jobs(spool)) == 2 and done_jobs(spool), what="two jobs")
    assert sorted(state(j)["source_name"] for j in jobs) == ["rsynced.jsonl", "submitted.jsonl"]


def test_queue_depth_one_admits_one_at_a_time_in_order(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """With max_queue_depth 1, files wait in incoming/ and run oldest first."""
    cfg = make_config(
        tmp_path,
        limits={"max_queue_depth": 1},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.002, "batch_size": 10}},
    )
    spool = tmp_path / "spool"
    names = [f"job{i}.jsonl" for i in range(4)]
    for i, name in enumerate(names):
        path = write_jsonl(spool / "incoming" / name, [chat(f"{i}-{k}") for k in range(150)])
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
    d = start(daemons, cfg)
    most = 0
    deadline = time.monotonic() + 60
    while len(done_jobs(spool)) < 4 and time.monotonic() < deadline:
        most = max(most, len(job_dirs(spool, "processing")))
        assert d.proc.poll() is None
        time.sleep(0.01)
    assert most == 1
    finished = sorted(done_jobs(spool), key=lambda j: state(j)["finished_at"])
    assert [state(j)["source_name"] for j in finished] == names


def test_a_file_dropped_behind_a_running_job_is_queued_and_cancellable_at_once(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """SPEC: processing/ holds queued jobs; a file waits in incoming/ only for a limit."""
    cfg = make_config(
        tmp_path, engine={"backend": "fake", "fake": {"delay_per_request_s": 0.01, "batch_size": 5}}
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "long.jsonl", [chat(f"l{i}") for i in range(3000)])
    start(daemons, cfg)
    wait_for(
        lambda: any(state(j)["status"] == "running" for j in job_dirs(spool, "processing")),
        what="the long job to run",
    )
    write_jsonl(spool / "incoming" / "behind.jsonl", [chat("b1"), chat("b2")])

    def queued() -> Path | None:
        for j in job_dirs(spool, "processing"):
            if state(j)["source_name"] == "behind.jsonl":
                return j
        return None

    job = wait_for(queued, timeout=10, what="the second file to be claimed")
    assert state(job)["status"] == "queued"
    assert not (spool / "incoming" / "behind.jsonl").exists()
    assert any(state(j)["status"] == "running" for j in job_dirs(spool, "processing"))
    run_spoold("cancel", "--config", str(cfg), job.name, check=True)
    cancelled = wait_for(
        lambda: [j for j in job_dirs(spool, "failed") if j.name == job.name],
        timeout=10,  # not when the 30 s job ahead of it ends
        what="the queued job to be cancelled",
    )[0]
    assert state(cancelled)["status"] == "cancelled"
    assert state(cancelled)["request_counts"]["completed"] == 0


def test_sigterm_mid_job_exits_0_and_the_job_resumes(tmp_path: Path, daemons: list[Daemon]) -> None:
    """SIGTERM: finish the chunk, last heartbeat `stopped`, exit 0; the next start resumes (C8)."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 50},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.005, "batch_size": 10}},
    )
    spool = tmp_path / "spool"
    ids = [f"r{i}" for i in range(1500)]
    write_jsonl(spool / "incoming" / "long.jsonl", [chat(i) for i in ids])
    d = start(daemons, cfg)

    def committed() -> bool:
        jobs = job_dirs(spool, "processing")
        return bool(jobs) and state(jobs[0])["request_counts"]["completed"] >= 100

    wait_for(committed, what="a first checkpoint")
    assert d.terminate() == 0
    beat = json.loads((spool / "heartbeats" / "default.json").read_text())
    assert beat["status"] == "stopped" and beat["reason"] == "SIGTERM"
    (job,) = job_dirs(spool, "processing")
    st = state(job)
    assert st["status"] == "queued" and 100 <= st["request_counts"]["completed"] < 1500
    # The commit at stop covered everything written: no uncommitted tail.
    assert (job / "output.jsonl").stat().st_size == st["checkpoint"]["output_bytes"]
    start(daemons, cfg)
    final = wait_for(lambda: done_jobs(spool), what="the resumed job")[0]
    assert_exactly_once(final, ids)
    assert len(read_results(final, "output.jsonl")) == 1500


def test_stop_timeout_abandons_a_slow_chunk(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A chunk that outlives processing.stop_timeout_s is abandoned: exit 0, redone later."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 1000, "stop_timeout_s": 1},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.05, "batch_size": 200}},
    )
    spool = tmp_path / "spool"
    ids = [f"r{i}" for i in range(400)]
    write_jsonl(spool / "incoming" / "slow.jsonl", [chat(i) for i in ids])
    d = start(daemons, cfg)
    beat_path = spool / "heartbeats" / "default.json"

    def busy() -> dict[str, Any] | None:
        beat = json.loads(beat_path.read_text())
        return beat if beat["status"] == "processing" and beat["current_job"] else None

    first = wait_for(busy, what="the job to be inside its first 10 s engine batch")
    time.sleep(1.2)
    second = json.loads(beat_path.read_text())
    # The heartbeat keeps ticking while the engine is busy; progress does not move.
    assert second["updated_at"] > first["updated_at"]
    assert second["status"] == "processing"
    assert second["last_progress_at"] == first["last_progress_at"]
    t0 = time.monotonic()
    assert d.terminate(timeout=20) == 0
    assert time.monotonic() - t0 < 8
    cfg2 = make_config(
        tmp_path, engine={"backend": "fake"}, processing={"chunk_size": 1000}
    )  # fast engine for the resume
    proc = run_spoold("run", "--config", str(cfg2), "--drain", check=True)
    assert proc.returncode == 0
    (job,) = done_jobs(spool)
    assert_exactly_once(job, ids)


def test_spool_status_exit_codes(tmp_path: Path, daemons: list[Daemon]) -> None:
    """3 no daemon ever, 0 healthy, 2 when the heartbeat goes stale (daemon SIGKILLed)."""
    cfg = make_config(tmp_path, heartbeat={"interval_s": 0.3, "stale_after_s": 1.5})
    # The installed console script, as an operator runs it.
    status = [str(Path(sys.executable).parent / "spool-status"), "--config", str(cfg)]

    def run_status(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*status, *extra], capture_output=True, text=True, env=_env(), timeout=30
        )

    proc = run_status()
    assert proc.returncode == 3, proc.stdout
    d = start(daemons, cfg)
    write_jsonl(tmp_path / "spool" / "incoming" / "x.jsonl", [chat("a")])
    wait_for(lambda: done_jobs(tmp_path / "spool"), what="the job")
    proc = run_status()
    assert proc.returncode == 0, proc.stdout
    assert "1 done" in proc.stdout
    report = json.loads(run_status("--json").stdout)
    assert report["health"] == "healthy" and report["queue"]["done"] == 1
    job_id = done_jobs(tmp_path / "spool")[0].name
    one = run_status(job_id)
    assert one.returncode == 0 and "completed" in one.stdout
    d.kill()
    time.sleep(2.0)
    proc = run_status()
    assert proc.returncode == 2, proc.stdout
    assert "STALE" in proc.stdout


def test_spool_status_does_not_import_heavy_modules(tmp_path: Path) -> None:
    code = (
        "import sys, spoold.status as s; s.main(['--spool', sys.argv[1], '--json']); "
        "bad = [m for m in ('vllm', 'torch', 'pynvml', 'structlog') if m in sys.modules]; "
        "print('HEAVY', bad)"
    )
    proc = subprocess.run(
        [SPOOLD[0], "-c", code, str(tmp_path)], capture_output=True, text=True, env=_env()
    )
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def _received(sock: socket.socket) -> list[str]:
    """Every datagram waiting on `sock` (which has a short timeout), in order."""
    messages: list[str] = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            return messages


def test_systemd_notify_protocol(tmp_path: Path, daemons: list[Daemon]) -> None:
    """READY=1 once recovered and watching, STATUS=, WATCHDOG=1, STOPPING=1, in order."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    try:
        cfg = make_config(
            tmp_path, engine={"backend": "fake", "fake": {"delay_per_request_s": 0.001}}
        )
        d = start(daemons, cfg, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="2000000")
        write_jsonl(tmp_path / "spool" / "incoming" / "n.jsonl", [chat(str(i)) for i in range(300)])
        wait_for(lambda: done_jobs(tmp_path / "spool"), what="the job")
        assert d.terminate() == 0
        messages = _received(sock)
    finally:
        sock.close()
    fields = [line.split("=", 1)[0] for m in messages for line in m.splitlines()]
    assert fields[0] == "READY", messages[:3]
    assert "STATUS" in fields and "WATCHDOG" in fields
    assert fields.index("READY") < fields.index("WATCHDOG")
    assert "STOPPING" in fields and fields.index("STOPPING") > max(
        i for i, f in enumerate(fields) if f == "WATCHDOG"
    )
    assert any("processing" in m for m in messages), messages


def test_a_second_daemon_with_the_same_instance_refuses_to_start(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The instance name owns jobs and the heartbeat file: two live daemons under one
    name would take each other's work. The second says so and exits 2 (a config
    problem: give it its own instance); the first goes on."""
    cfg = make_config(tmp_path)
    first = start(daemons, cfg)
    proc = run_spoold("run", "--config", str(cfg), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "instance 'default'" in proc.stderr and f"pid {first.proc.pid}" in proc.stderr
    assert first.proc.poll() is None
    # Under its own instance name it runs beside the first.
    second = run_spoold("run", "--config", str(cfg), "--instance", "gpu1", "--drain", timeout=60)
    assert second.returncode == 0, second.stderr


def test_two_daemons_share_a_spool_and_one_takes_over_when_the_other_dies(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """SPEC §3, several daemons: every job is run by one daemon at a time, both take
    work, and when one is SIGKILLed the other takes over its job once its heartbeat
    is stale; every request ends up exactly once."""
    spool = tmp_path / "spool"
    common: dict[str, Any] = {
        "spool_dir": str(spool),
        "heartbeat": {"interval_s": 0.2, "stale_after_s": 1.5},
        "processing": {"chunk_size": 50},
        "engine": {"backend": "fake", "fake": {"delay_per_request_s": 0.004, "batch_size": 10}},
    }
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    cfgs = {name: make_config(tmp_path / name, instance=name, **common) for name in ("a", "b")}
    (spool / "incoming").mkdir(parents=True, exist_ok=True)
    files = {f"f{i}": [chat(f"f{i}-{k}") for k in range(300)] for i in range(6)}
    for name, recs in files.items():
        write_jsonl(spool / "incoming" / f"{name}.jsonl", recs)
    a, b = (Daemon(cfgs[n]) for n in ("a", "b"))
    daemons += [a, b]

    def running_by(instance: str) -> Path | None:
        for j in job_dirs(spool, "processing"):
            st = state(j)
            if st["status"] == "running" and st.get("instance") == instance:
                return j
        return None

    victim = wait_for(lambda: running_by("b"), what="b to run a job")
    a_job = wait_for(lambda: running_by("a"), what="a to run a job")
    assert victim != a_job
    b.kill()  # mid-job: its job must be taken over by a
    jobs = wait_for(
        lambda: len(job_dirs(spool, "done")) == len(files) and job_dirs(spool, "done"),
        timeout=90,
        what="every job done",
    )
    assert a.proc.poll() is None
    for job in jobs:
        st = state(job)
        name = st["source_name"].removesuffix(".jsonl")
        assert st["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
        assert_exactly_once(job, [r["custom_id"] for r in files[name]])
    taken_over = state(spool / "done" / victim.name)
    assert taken_over["instance"] == "a" and taken_over["attempts"] == 0


def test_the_watchdog_is_pinged_while_a_slow_model_loads(tmp_path: Path) -> None:
    """A model load takes minutes on a big model, longer than WatchdogSec: the
    heartbeat thread pings the watchdog meanwhile, or systemd would kill every load."""
    from spoold.config import parse_config
    from spoold.daemon import Daemon as InProcess
    from spoold.engines.fake import FakeEngine
    from spoold.notify import Notifier

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    cfg = parse_config(
        {
            "spool_dir": str(tmp_path / "spool"),
            "watch": {"settle_seconds": 0},
            "heartbeat": {"interval_s": 0.1, "stale_after_s": 5},
        }
    )

    def slow_load(model: str, runner: str) -> FakeEngine:
        time.sleep(3.0)
        return FakeEngine(model, cfg.engine.fake, runner)

    d = InProcess(cfg, slow_load)
    d.notifier = Notifier(str(sock_path))
    d.spool.ensure_layout()
    write_jsonl(d.spool.incoming / "a.jsonl", [chat("a")])
    try:
        assert d.run(drain=True) == 0
        messages = _received(sock)
    finally:
        sock.close()
    start = next(i for i, m in enumerate(messages) if "STATUS=loading model" in m)
    end = next(i for i, m in enumerate(messages) if i > start and "STATUS=processing" in m)
    pings = [m for m in messages[start:end] if m == "WATCHDOG=1"]
    assert len(pings) >= 2, messages[start : end + 1]


def test_spool_status_shows_progress_between_commits(tmp_path: Path, daemons: list[Daemon]) -> None:
    """state.json moves at commits (every chunk_size requests); spool-status takes the
    running daemon's fresher count from its heartbeat, so a job inside its first chunk
    does not look stuck at 0."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 5000},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.005, "batch_size": 10}},
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "slow.jsonl", [chat(f"s{i}") for i in range(2000)])
    start(daemons, cfg)

    def beat_done() -> int:
        beat = json.loads((spool / "heartbeats" / "default.json").read_text())
        current = beat.get("current_job") or {}
        return int(current.get("completed") or 0)

    wait_for(lambda: beat_done() >= 100, what="the heartbeat to count progress")
    (job,) = job_dirs(spool, "processing")
    assert state(job)["request_counts"]["completed"] == 0  # no commit yet
    exe = str(Path(sys.executable).parent / "spool-status")
    out = subprocess.run(
        [exe, "--config", str(cfg), "--json"], capture_output=True, text=True, timeout=30
    )
    (view,) = json.loads(out.stdout)["jobs"]
    assert view["done"] >= 100 and view["requests_per_s"] and view["eta_s"] is not None
