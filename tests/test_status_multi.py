"""spool-status over several daemons sharing one spool (SPEC §3, §5): every daemon is
listed, and a job's progress comes from whichever daemon runs it. Heartbeats, job
records and owner.json are written by hand; the real `spool-status` reads them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from spoold import status
from spoold.job import JobState, RequestCounts
from tests.helpers import _env

STALE_AFTER_S = 60.0  # the default: --spool with no config


def _ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def _beat(spool: Path, instance: str, **fields: Any) -> dict[str, Any]:
    """heartbeats/<instance>.json as a daemon writes it, 2 s old; `fields` override."""
    beat = {
        "pid": 100,
        "hostname": "host-a",
        "instance": instance,
        "version": "0.1.0",
        "status": "idle",
        "reason": None,
        "started_at": _ago(3600),
        "updated_at": _ago(2),
        "last_progress_at": _ago(2),
        "current_job": None,
        "gpu": None,
        "limits": {},
        "seq": 10,
        "problems": [],
        "token": "newer-version-key",  # unknown keys are ignored
        "host_id": "abc123",
        **fields,
    }
    (spool / "heartbeats").mkdir(parents=True, exist_ok=True)
    (spool / "heartbeats" / f"{instance}.json").write_text(json.dumps(beat))
    return beat


def _job(
    spool: Path,
    job_id: str,
    status: str = "running",
    total: int = 400,
    completed: int = 0,
    owner: dict[str, Any] | None = None,
) -> Path:
    """processing/<job_id>/ with a state.json (started 100 s ago) and maybe owner.json."""
    job_dir = spool / "processing" / job_id
    job_dir.mkdir(parents=True)
    record = JobState(
        id=job_id,
        source_name=f"{job_id.split('-')[0]}.jsonl",
        status=status,
        model="m",
        started_at=_ago(100) if status == "running" else None,
        request_counts=RequestCounts(total=total, completed=completed),
    )
    (job_dir / "state.json").write_text(json.dumps(record.to_dict()))
    (job_dir / "input.jsonl").write_text("{}\n" * total)
    if owner is not None:
        (job_dir / "owner.json").write_text(json.dumps(owner))
    return job_dir


def _current(job_id: str, completed: int, total: int, rate: float, failed: int = 0) -> Any:
    return {
        "id": job_id,
        "completed": completed,
        "failed": failed,
        "total": total,
        "tokens_per_s": rate,
    }


def _spool(tmp_path: Path) -> Path:
    spool = tmp_path / "spool"
    for name in ("incoming", "processing", "done", "failed", "heartbeats"):
        (spool / name).mkdir(parents=True, exist_ok=True)
    return spool


def spool_status(spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The real command, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "spoold.status", "--spool", str(spool), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )


def _line(text: str, start: str) -> str:
    found = [ln for ln in text.splitlines() if ln.startswith(start)]
    assert len(found) == 1, text
    return found[0]


def test_three_daemons_each_listed_and_the_job_progress_from_its_runner(tmp_path: Path) -> None:
    """gpu0 runs a job (state.json still at 0: no commit yet), gpu1 idles, gpu2 stopped:
    every daemon is listed with its fields, the job's count is gpu0's, exit 1."""
    spool = _spool(tmp_path)
    _job(spool, "big-1", completed=0)
    # A job gpu2 held when it stopped: no live daemon runs it.
    _job(spool, "held-2", owner={"instance": "gpu2", "hostname": "host-c", "pid": 300})
    _job(spool, "next-3", status="queued", total=50)
    _beat(spool, "gpu2", pid=300, hostname="host-c", status="stopped", reason="SIGTERM", seq=4)
    _beat(
        spool,
        "gpu0",
        pid=101,
        status="processing",
        seq=812,
        current_job=_current("big-1", 150, 400, 812.5, failed=2),
    )
    _beat(
        spool,
        "gpu1",
        pid=202,
        hostname="host-b",
        seq=33,
        problems=["incoming/bad.jsonl cannot be moved: Permission denied"],
    )
    shown = spool_status(spool)
    assert shown.returncode == 1, shown.stdout + shown.stderr
    out = shown.stdout
    assert out.startswith(f"spoold at {spool}: DEGRADED")
    daemons = [ln for ln in out.splitlines() if ln.startswith("  daemon ")]
    assert [ln.split()[1] for ln in daemons] == ["gpu0", "gpu1", "gpu2"]  # by instance
    gpu0 = _line(out, "  daemon gpu0 pid 101 on host-a: processing, heartbeat ")
    assert re.search(r"heartbeat \ds ago \(seq 812\)", gpu0), gpu0
    assert "job big-1 152/400 at 812.5 tok/s" in gpu0
    gpu1 = _line(out, "  daemon gpu1 pid 202 on host-b: idle, heartbeat ")
    assert re.search(r"heartbeat \ds ago \(seq 33\)", gpu1), gpu1
    assert "job " not in gpu1 and "1 problem (below)" in gpu1
    assert "problem: gpu1: incoming/bad.jsonl cannot be moved: Permission denied" in out
    gpu2 = _line(out, "  daemon gpu2 pid 300 on host-c: stopped at ")
    assert re.search(r"heartbeat \ds ago \(seq 4\): SIGTERM$", gpu2), gpu2
    big = _line(out, "  big-1 running")
    assert " 152/400 " in big and "812.5 tok/s" in big and big.endswith("on gpu0@host-a")
    held = _line(out, "  held-2 running")
    assert " 0/400 " in held and "ETA ?" in held
    assert held.endswith("waiting for a daemon; held by gpu2@host-c pid 300 (stopped)")
    assert _line(out, "  next-3 queued").endswith("waiting for a daemon")
    # The queue's totals: as before, from state.json's states and the live counts.
    assert "queue: 0 waiting, 1 queued, 2 running, 0 done, 0 failed; 698 requests left" in out

    report = json.loads(spool_status(spool, "--json").stdout)
    assert report["exit_code"] == 1 and report["health"] == "degraded"
    by_instance = {d["instance"]: d for d in report["daemons"]}
    assert list(by_instance) == ["gpu0", "gpu1", "gpu2"]
    for d in report["daemons"]:
        for key in ("hostname", "pid", "status", "reason", "age_s", "seq", "current_job"):
            assert key in d, (key, d)
        assert d["token"] == "newer-version-key"  # kept, not judged
    assert by_instance["gpu0"]["current_job"]["tokens_per_s"] == 812.5
    assert by_instance["gpu0"]["alive"] and by_instance["gpu1"]["alive"]
    assert not by_instance["gpu2"]["alive"] and by_instance["gpu2"]["reason"] == "SIGTERM"
    assert by_instance["gpu1"]["problems"] and by_instance["gpu0"]["label"] == "gpu0@host-a"
    jobs = {j["id"]: j for j in report["jobs"]}
    big_view = jobs["big-1"]
    assert big_view["done"] == 152 and big_view["completed"] == 150 and big_view["failed"] == 2
    assert big_view["request_counts"]["completed"] == 0  # state.json's, kept as it is
    assert big_view["progress_from"] == "heartbeat" and big_view["daemon"] == "gpu0"
    assert big_view["runner"]["hostname"] == "host-a" and big_view["runner"]["pid"] == 101
    assert big_view["tokens_per_s"] == 812.5 and big_view["requests_per_s"] > 0
    assert big_view["eta_s"] is not None and not big_view["waiting_for_daemon"]
    held_view = jobs["held-2"]
    assert held_view["waiting_for_daemon"] and held_view["runner"] is None
    assert held_view["owner"] == {
        "instance": "gpu2",
        "hostname": "host-c",
        "pid": 300,
        "daemon": "stopped",
    }
    assert held_view["requests_per_s"] is None and held_view["eta_s"] is None
    assert jobs["next-3"]["waiting_for_daemon"] and jobs["next-3"]["owner"] is None

    # Once gpu1's problem is gone, every live daemon is fine: the stopped one alone
    # degrades (it is down beside live ones); without it, healthy; with only it, down.
    _beat(spool, "gpu1", pid=202, hostname="host-b", seq=34)
    assert status.build_report(spool, STALE_AFTER_S).exit_code == status.DEGRADED
    (spool / "heartbeats" / "gpu2.json").unlink()
    assert status.build_report(spool, STALE_AFTER_S).exit_code == status.HEALTHY
    for name in ("gpu0", "gpu1"):
        (spool / "heartbeats" / f"{name}.json").unlink()
    _beat(spool, "gpu2", status="stopped", reason="SIGTERM")
    assert spool_status(spool).returncode == 2


def test_two_daemons_each_running_a_job_show_their_own(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    _job(spool, "a-1", total=100, completed=10)
    _job(spool, "b-2", total=900, completed=0)
    _beat(
        spool,
        "gpu0",
        status="processing",
        current_job=_current("a-1", 60, 100, 100.0),
        gpu=[{"index": 0, "memory_percent": 71, "temperature_c": 60, "healthy": True}],
    )
    _beat(
        spool,
        "gpu1",
        pid=200,
        hostname="host-b",
        status="processing",
        current_job=_current("b-2", 300, 900, 2500.0),
    )
    report = status.build_report(spool, STALE_AFTER_S)
    assert report.exit_code == status.HEALTHY
    jobs = {j["id"]: j for j in report.jobs}
    assert (jobs["a-1"]["daemon"], jobs["a-1"]["done"], jobs["a-1"]["tokens_per_s"]) == (
        "gpu0",
        60,
        100.0,
    )
    assert (jobs["b-2"]["daemon"], jobs["b-2"]["done"], jobs["b-2"]["tokens_per_s"]) == (
        "gpu1",
        300,
        2500.0,
    )
    assert jobs["b-2"]["runner"]["label"] == "gpu1@host-b"
    # ETA from each runner's own progress: 300 of 900 in 100 s, 600 left at 3 req/s.
    assert 2.9 <= jobs["b-2"]["requests_per_s"] <= 3.0 and 195 <= jobs["b-2"]["eta_s"] <= 210
    assert report.queue["requests_left"] == 40 + 600
    out = status.render(report)
    assert _line(out, "  a-1 running").endswith("on gpu0@host-a")
    assert _line(out, "  b-2 running").endswith("on gpu1@host-b")
    assert "job a-1 60/100 at 100.0 tok/s" in _line(out, "  daemon gpu0 ")
    assert "job b-2 300/900 at 2500.0 tok/s" in _line(out, "  daemon gpu1 ")


def test_one_job_run_by_another_instance_shows_its_live_progress(tmp_path: Path) -> None:
    """`spool-status JOB_ID` for a job gpu3 runs: gpu3's count, and gpu3 named."""
    spool = _spool(tmp_path)
    job_dir = _job(spool, "rev-9", total=500, completed=100, owner={"instance": "gpu3"})
    (job_dir / "output.jsonl").write_text("")
    _beat(spool, "default", hostname="host-a")
    _beat(
        spool,
        "gpu3",
        pid=4242,
        hostname="host-d",
        status="processing",
        current_job=_current("rev-9", 230, 500, 990.0, failed=5),
    )
    one = spool_status(spool, "rev-9", "--json")
    assert one.returncode == 0, one.stdout + one.stderr
    shown = json.loads(one.stdout)
    assert shown["where"] == "processing"
    assert shown["state"]["request_counts"]["completed"] == 100  # the record as it is
    progress = shown["progress"]
    assert progress["done"] == 235 and progress["completed"] == 230 and progress["failed"] == 5
    assert progress["progress_from"] == "heartbeat" and progress["tokens_per_s"] == 990.0
    assert progress["runner"] == {
        "instance": "gpu3",
        "hostname": "host-d",
        "pid": 4242,
        "status": "processing",
        "label": "gpu3@host-d",
    }
    text = spool_status(spool, "rev-9").stdout
    assert "progress: 235/500 (230 completed, 5 failed, from gpu3's heartbeat)" in text
    assert text.rstrip().endswith(f"results: {job_dir / 'output.jsonl'}")
    assert "on gpu3@host-d" in text


def test_a_stale_runner_counts_for_nothing_and_its_job_waits(tmp_path: Path) -> None:
    """A stale heartbeat's current_job is not progress: state.json's counts, no rate,
    and the job waits for a daemon (its owner named, STALE) to take it over."""
    spool = _spool(tmp_path)
    owner = {"instance": "gpu1", "hostname": "host-b", "pid": 77}
    _job(spool, "late-1", total=100, completed=20, owner=owner)
    _beat(spool, "gpu0")
    _beat(
        spool,
        "gpu1",
        pid=77,
        hostname="host-b",
        status="processing",
        updated_at=_ago(600),
        current_job=_current("late-1", 90, 100, 50.0),
    )
    report = status.build_report(spool, STALE_AFTER_S)
    assert report.exit_code == status.DEGRADED
    (view,) = report.jobs
    assert view["done"] == 20 and view["progress_from"] == "state.json"
    assert view["runner"] is None and view["tokens_per_s"] is None and view["eta_s"] is None
    assert view["owner"]["daemon"] == "STALE"
    out = status.render(report)
    assert "  daemon gpu1 pid 77 on host-b: STALE (last processing), heartbeat 10m00s ago" in out
    assert _line(out, "  late-1 running").endswith(
        "waiting for a daemon; held by gpu1@host-b pid 77 (STALE)"
    )


def test_an_unreadable_heartbeat_is_a_problem_not_a_silence(tmp_path: Path) -> None:
    spool = _spool(tmp_path)
    _beat(spool, "gpu0")
    (spool / "heartbeats" / "gpu1.json").write_text("[not, a beat")
    report = status.build_report(spool, STALE_AFTER_S)
    assert report.exit_code == status.DEGRADED
    assert any("heartbeats/gpu1.json cannot be read" in p for p in report.problems)


def test_a_ray_daemon_lists_its_replicas_with_where_they_run_and_what_they_did(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    replicas = [
        {"id": 0, "node": "10.0.0.5", "alive": False, "completed": 1200},
        {"id": 1, "node": "10.0.0.6", "alive": True, "completed": 3400},
        {"id": 2, "node": "10.0.0.7", "alive": True, "completed": 15},
    ]
    engine = {"backend": "ray", "model": "m", "address": "head:6379", "replicas": replicas}
    _beat(spool, "gpu-pool", status="processing", engine=engine)
    _beat(spool, "plain", engine={"backend": "vllm", "model": "m"})
    proc = subprocess.run(
        [sys.executable, "-m", "spoold.status", "--spool", str(spool)],
        capture_output=True, text=True, env=_env(), timeout=30,
    )  # fmt: skip
    out = proc.stdout
    assert "ray (head:6379): 2 of 3 replicas alive" in out
    assert "replica 0 on 10.0.0.5: dead, 1200 completed" in out
    assert "replica 1 on 10.0.0.6: alive, 3400 completed" in out
    assert out.count("ray (") == 1  # the vllm daemon has no replicas to list
    as_json = json.loads(
        subprocess.run(
            [sys.executable, "-m", "spoold.status", "--spool", str(spool), "--json"],
            capture_output=True, text=True, env=_env(), timeout=30,
        ).stdout
    )  # fmt: skip
    beats = {d["instance"]: d for d in as_json["daemons"]}
    assert beats["gpu-pool"]["engine"]["replicas"] == replicas
