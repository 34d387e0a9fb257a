"""GPU protection and free-disk protection (SPEC §7), with scripted readers and real files."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoold.config import GpuConfig, parse_config
from spoold.daemon import Daemon
from spoold.engines.fake import FakeEngine
from spoold.gpu import GpuGuard, GpuReading, NvmlReader, open_nvml, visible_devices
from tests.helpers import (
    assert_exactly_once,
    chat,
    job_dirs,
    make_config,
    run_spoold,
    state,
    write_jsonl,
)


class ScriptedGpu:
    """A GPU whose readings follow a script: (memory %, °C) per read, the last one repeats."""

    def __init__(self, script: list[tuple[float, float]]) -> None:
        self.script = list(script)
        self.reads = 0
        self.lock = threading.Lock()

    def read(self) -> list[GpuReading]:
        with self.lock:
            mem, temp = self.script[min(self.reads, len(self.script) - 1)]
            self.reads += 1
        return [GpuReading(index=0, memory_percent=mem, temperature_c=temp)]

    def close(self) -> None:
        pass


def test_guard_hysteresis_hot_throttled_cooled_resumed() -> None:
    cfg = GpuConfig(max_memory_percent=95, max_temperature_c=85, resume_temperature_c=80)
    gpu = ScriptedGpu([(50, 70), (50, 86), (50, 84), (50, 81), (50, 80), (50, 84)])
    guard = GpuGuard(cfg, gpu)
    assert guard.check()  # 70°C: fine
    assert not guard.check()  # 86°C: too hot
    assert guard.reason and "86" in guard.reason and "gpu.max_temperature_c" in guard.reason
    assert not guard.check()  # 84°C: under the max but not cooled to resume: no flapping
    assert "gpu.resume_temperature_c" in (guard.reason or "")
    assert not guard.check()  # 81°C
    assert guard.check()  # 80°C: resumed
    assert guard.check()  # 84°C again: under the max, still fine


def test_guard_memory_limit_and_no_nvml() -> None:
    guard = GpuGuard(GpuConfig(), ScriptedGpu([(96.5, 40)]))
    assert not guard.check()
    assert "memory 96.5%" in (guard.reason or "")
    sample = guard.sample()
    assert sample and sample[0]["healthy"] is False and sample[0]["memory_percent"] == 96.5
    nothing = GpuGuard(GpuConfig(), None)
    assert nothing.check() and nothing.sample() is None


def _beats(path: Path, stop: threading.Event) -> Iterator[dict[str, object]]:
    while not stop.is_set():
        try:
            beat = json.loads(path.read_text())
        except (OSError, ValueError):
            beat = None  # not written yet, or caught mid-replace by a non-atomic reader
        if beat is not None:
            yield beat
        time.sleep(0.02)


def test_daemon_throttles_while_hot_and_resumes_when_cooled(tmp_path: Path) -> None:
    """hot → throttled (heartbeat says why) → cooled → resumed; the job completes."""
    gpu = ScriptedGpu([(40, 60)] * 3 + [(40, 90)] * 40 + [(40, 70)])
    cfg = parse_config(
        {
            "spool_dir": str(tmp_path / "spool"),
            "watch": {"settle_seconds": 0},
            "heartbeat": {"interval_s": 0.05, "stale_after_s": 5},
            "processing": {"chunk_size": 50},
        }
    )
    d = Daemon(cfg, lambda m, r: FakeEngine(m, cfg.engine.fake, r), gpu_reader=gpu)
    d.poll_s = 0.02
    ids = [f"r{i}" for i in range(300)]
    d.spool.ensure_layout()
    write_jsonl(d.spool.incoming / "hot.jsonl", [chat(i) for i in ids])
    seen: list[dict[str, object]] = []
    stop = threading.Event()

    def watch() -> None:
        for beat in _beats(cfg.heartbeat_path, stop):
            seen.append(beat)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert d.run(drain=True) == 0
    finally:
        stop.set()
        watcher.join()
    (job,) = job_dirs(cfg.spool_dir, "done")
    assert_exactly_once(job, ids)
    throttled = [b for b in seen if b.get("status") == "throttled"]
    assert throttled, "the heartbeat never said throttled"
    assert "90" in str(throttled[0]["reason"]) and "gpu.max_temperature_c" in str(
        throttled[0]["reason"]
    )
    gpus = [b["gpu"] for b in seen if b.get("gpu")]
    assert gpus and isinstance(gpus[0], list) and "temperature_c" in gpus[0][0]
    # Cooled: resumed (the job completed above), nothing throttled at the end.
    assert not d.guard.throttled
    final = json.loads(cfg.heartbeat_path.read_text())
    assert final["status"] == "stopped" and final["reason"] == "drained"  # not the heat


def test_low_disk_holds_admission_until_space_returns(tmp_path: Path) -> None:
    free = {"bytes": 10 << 20}
    cfg = parse_config(
        {
            "spool_dir": str(tmp_path / "spool"),
            "watch": {"settle_seconds": 0},
            "limits": {"min_free_disk_mb": 100},
        }
    )
    d = Daemon(
        cfg, lambda m, r: FakeEngine(m, cfg.engine.fake, r), disk_free=lambda p: free["bytes"]
    )
    d.spool.ensure_layout()
    write_jsonl(d.spool.incoming / "wait.jsonl", [chat("a")])
    report = d.admit()
    assert report.waiting == ["wait.jsonl"] and not report.claimed
    assert (d.spool.incoming / "wait.jsonl").exists()
    free["bytes"] = 500 << 20
    assert d.admit().claimed


needs_mount = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root to mount a tmpfs"
)


@needs_mount
def test_enospc_mid_job_never_corrupts_it(tmp_path: Path) -> None:
    """A real full filesystem during appends: the drain stops, nothing is lost or doubled,
    and once there is room the job resumes from its checkpoint (C6/C7)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        cfg = make_config(mnt, processing={"chunk_size": 40})
        ids = [f"r{i}" for i in range(1000)]
        write_jsonl(mnt / "spool" / "incoming" / "big.jsonl", [chat(i) for i in ids])
        # Input ~170 KB, output ~500 KB: the 512 KB filesystem fills up mid-job.
        first = run_spoold("run", "--config", str(cfg), "--drain")
        assert first.returncode == 1, first.stdout[-2000:]
        assert "disk" in first.stdout
        (job,) = job_dirs(mnt / "spool", "processing")
        st = state(job)
        # state.json may not be writable on a full disk: what it holds is the last
        # checkpoint, and the result files hold at least that much.
        assert st["status"] in ("queued", "running")
        ck = st["checkpoint"]
        assert (job / "output.jsonl").stat().st_size >= ck["output_bytes"]
        assert ck["completed"] < 1000, "the disk filled up before the job could finish"
        subprocess.run(["mount", "-o", "remount,size=4m", str(mnt)], check=True)
        run_spoold("run", "--config", str(cfg), "--drain", check=True)
        (done,) = job_dirs(mnt / "spool", "done")
        assert_exactly_once(done, ids)
        assert state(done)["request_counts"] == {"total": 1000, "completed": 1000, "failed": 0}
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@needs_mount
def test_a_file_that_cannot_be_claimed_is_reported_and_the_daemon_goes_on(
    tmp_path: Path,
) -> None:
    """incoming/ on its own filesystem: rename into processing/ fails with EXDEV. The
    file stays in incoming/ untouched, the problem is said once (log, heartbeat), and
    the daemon neither dies nor copies."""
    cfg = parse_config({"spool_dir": str(tmp_path / "spool"), "watch": {"settle_seconds": 0}})
    d = Daemon(cfg, lambda m, r: FakeEngine(m, cfg.engine.fake, r))
    d.spool.ensure_layout()
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d.spool.incoming)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        src = write_jsonl(d.spool.incoming / "elsewhere.jsonl", [chat("a"), chat("b")])
        data = src.read_bytes()
        assert d.run(drain=True) == 0
        assert src.read_bytes() == data
        assert job_dirs(cfg.spool_dir, "processing") == []
        assert [p.name for p in d.spool.processing.iterdir()] == []  # no staging left
        beat = json.loads(cfg.heartbeat_path.read_text())
        (problem,) = beat["problems"]
        assert "incoming/elsewhere.jsonl" in problem and "one filesystem" in problem
    finally:
        subprocess.run(["umount", "-l", str(d.spool.incoming)])


def test_real_nvml_reader_where_a_gpu_exists() -> None:
    reader = open_nvml()
    if reader is None:
        pytest.skip("no NVML / no GPU on this machine")
    try:
        readings = reader.read()
    finally:
        reader.close()
    assert readings
    for r in readings:
        assert 0 <= r.memory_percent <= 100
        assert 0 < r.temperature_c < 120


def test_an_input_read_error_mid_run_is_not_taken_for_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO while reading input.jsonl (a flaky NFS mount) ends the attempt; it must not
    be bisected like an engine failure, which used to finish the job without the
    lines never handed out. The next attempt resumes and every request runs once."""
    from spoold import execution

    cfg = parse_config(
        {
            "spool_dir": str(tmp_path / "spool"),
            "watch": {"settle_seconds": 0},
            "processing": {"chunk_size": 50},
            "engine": {"backend": "fake", "fake": {"batch_size": 16}},
        }
    )
    real = execution.read_request
    failed = []

    def flaky(raw: bytes, line: int) -> object:
        if line == 120 and not failed:
            failed.append(line)
            raise OSError(errno.EIO, "Input/output error")
        return real(raw, line)

    monkeypatch.setattr(execution, "read_request", flaky)
    d = Daemon(cfg, lambda m, r: FakeEngine(m, cfg.engine.fake, r))
    d.spool.ensure_layout()
    ids = [f"r{i}" for i in range(300)]
    write_jsonl(d.spool.incoming / "flaky.jsonl", [chat(i) for i in ids])
    assert d.run(drain=True) == 0
    assert failed == [120]
    (job,) = job_dirs(cfg.spool_dir, "done")
    assert_exactly_once(job, ids)
    st = json.loads((job / "state.json").read_text())
    assert st["request_counts"] == {"total": 300, "completed": 300, "failed": 0}


def test_only_the_gpus_cuda_visible_devices_leaves_are_watched() -> None:
    """spoold@.service gives each daemon one GPU (CUDA_VISIBLE_DEVICES=%i); NVML ignores
    the variable, so spoold applies it the way CUDA does."""
    uuids = ["GPU-aaaa1111-0", "GPU-bbbb2222-1", "GPU-cccc3333-2", "GPU-cccc4444-3"]
    assert visible_devices(None, uuids) == [0, 1, 2, 3]
    assert visible_devices("2", uuids) == [2]
    assert visible_devices("3,1", uuids) == [3, 1]
    assert visible_devices("GPU-bbbb", uuids) == [1]  # a unique UUID prefix
    assert visible_devices("1,GPU-cccc,0", uuids) == [1]  # ambiguous: the list stops there
    assert visible_devices("0,7,1", uuids) == [0]  # no GPU 7: it stops there too
    assert visible_devices("", uuids) == []
    assert visible_devices("-1", uuids) == []


def test_an_engine_that_loses_a_request_fails_the_job_instead_of_looping(
    tmp_path: Path,
) -> None:
    """Every request in must come out; an engine that silently drops one must not get
    the job marked completed short, nor retried forever: it fails, saying why, with
    what was committed kept."""
    from collections.abc import Iterator as It

    from spoold.engines.base import Outcome
    from spoold.validate import Request

    class Lossy(FakeEngine):
        def run(self, requests: It[Request]) -> It[Outcome]:
            for outcome in super().run(requests):
                if outcome.request.custom_id != "r7":
                    yield outcome

    cfg = parse_config({"spool_dir": str(tmp_path / "spool"), "watch": {"settle_seconds": 0}})
    d = Daemon(cfg, lambda model, runner: Lossy(model, cfg.engine.fake, runner))
    d.spool.ensure_layout()
    write_jsonl(d.spool.incoming / "lossy.jsonl", [chat(f"r{i}") for i in range(20)])
    assert d.run(drain=True) == 0
    (job,) = job_dirs(cfg.spool_dir, "failed")
    st = json.loads((job / "state.json").read_text())
    assert st["status"] == "failed" and "unanswered" in st["error"], st["error"]
    assert st["request_counts"] == {"total": 20, "completed": 19, "failed": 0}


def test_a_passing_claim_error_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry that could not be moved once (a full disk, a flaky mount) is tried
    again a while later, not blocked until the daemon restarts."""
    from spoold import admission as admission_module

    now = [1000.0]
    cfg = parse_config({"spool_dir": str(tmp_path / "spool"), "watch": {"settle_seconds": 0}})
    d = Daemon(cfg, lambda m, r: FakeEngine(m, cfg.engine.fake, r), clock=lambda: now[0])
    d.spool.ensure_layout()
    write_jsonl(d.spool.incoming / "later.jsonl", [chat("a")])
    real = d.spool.claim
    failures = [OSError(errno.ENOSPC, "No space left on device")]

    def claim_once_full(*args: object) -> str | None:
        if failures:
            raise failures.pop()
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(d.spool, "claim", claim_once_full)
    assert d.admit().claimed == []
    assert (d.spool.incoming / "later.jsonl").exists()
    assert d.admit().claimed == []  # still within the retry delay
    now[0] += admission_module.UNMOVABLE_RETRY_S + 1
    assert len(d.admit().claimed) == 1
    assert not (d.spool.incoming / "later.jsonl").exists()


@pytest.mark.parametrize(
    ("spec", "watched"),
    [(None, [0, 1]), ("1", [1]), ("GPU-b", [1]), ("MIG-3f2a", [0, 1]), ("", [])],
)
def test_the_nvml_reader_reads_the_visible_gpus_under_their_nvml_index(
    monkeypatch: pytest.MonkeyPatch, spec: str | None, watched: list[int]
) -> None:
    """NvmlReader over a stand-in pynvml (two GPUs): CUDA_VISIBLE_DEVICES picks which
    are read, readings keep nvidia-smi's index, and a MIG spec NVML cannot map falls
    back to every GPU rather than none."""
    import types

    fake = types.SimpleNamespace(
        NVML_TEMPERATURE_GPU=0,
        NVMLError=RuntimeError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetUUID=lambda h: f"GPU-{'ab'[h]}000",
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(used=10 * (h + 1), total=100),
        nvmlDeviceGetTemperature=lambda h, _: 50 + h,
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=1),
        nvmlDeviceGetPowerUsage=lambda h: 100_000,
        nvmlDeviceGetName=lambda h: b"Fake GPU",
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    if spec is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", spec)
    readings = NvmlReader().read()
    assert [r.index for r in readings] == watched
    assert [r.memory_percent for r in readings] == [10.0 * (i + 1) for i in watched]
