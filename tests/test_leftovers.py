"""Nothing accumulates (SPEC §3): whatever restarts, take-overs and full disks a job went
through, its directory holds only the documented files, and the spool no temp files.

Real processes, real SIGKILLs, a real full filesystem (a small tmpfs filled up).
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from spoold.fsio import Fenced
from spoold.job import new_job_id
from spoold.spool import Spool
from spoold.unique import IN_MEMORY, UniqueIds
from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    beating,
    chat,
    drain,
    job_dirs,
    make_config,
    only_job,
    state,
    write_jsonl,
)
from tests.test_crash import _requests, _sigkill, _spawn, _stage_job_dir, _wait_for_heartbeat_of
from tests.test_fsio import fill, mounted_tmpfs

# SPEC §2: what a job directory holds (CANCEL only when cancelled).
DOCUMENTED = {"input.jsonl", "state.json", "output.jsonl", "errors.jsonl", "owner.json"}


def _leftovers(spool: Path) -> list[Path]:
    """Temp files (atomic-write temps, `.ids-*.tmp` buckets) and owner graves anywhere.
    os.walk, not rglob: a live daemon renames job directories while we look."""
    return sorted(
        Path(top, name)
        for top, _, names in os.walk(spool)
        for name in names
        if name.endswith((".tmp", ".stale"))
    )


def _assert_only_documented(job: Path) -> None:
    names = {p.name for p in job.iterdir()}
    assert names <= DOCUMENTED | {"CANCEL"}, f"{job.name} holds {sorted(names - DOCUMENTED)}"


# -- owner graves (design §2, §7) ------------------------------------------------------


@pytest.mark.slow
def test_many_restarts_leave_only_the_documented_files(tmp_path: Path) -> None:
    """SIGKILL `spoold run --drain` 16 times while one job runs (every restart takes
    its own job over: owner.json is buried and replaced), then drain: done/<job> holds
    the documented files and nothing else (no owner.json.*.stale grave per restart, no
    temp), processing/ is empty. Wherever a kill lands in the take-over (C10, C11) the
    next start cleans it."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 50, "max_job_attempts": 1000},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.003, "batch_size": 16}},
    )
    spool = tmp_path / "spool"
    recs = _requests("r", 3000)
    write_jsonl(spool / "incoming" / "restarts.jsonl", recs)
    log = tmp_path / "spoold.log"
    kills = acquired = 0
    for i in range(40):
        proc = _spawn(cfg, log)
        _wait_for_heartbeat_of(spool, proc)
        time.sleep(0.05 + (i % 7) * 0.07)  # recovery, acquire, validation, mid-chunk
        kills += _sigkill(proc) == -signal.SIGKILL
        acquired += _owner_pid(spool) == proc.pid
        if job_dirs(spool, "done") or kills >= 16:
            break
    print(f"{kills} kills, {acquired} after the job was acquired")
    assert kills >= 15, f"only {kills} kills landed before the job finished"
    drain(cfg, timeout=120)
    job = only_job(spool, "done")
    assert sorted(p.name for p in job.iterdir()) == sorted(DOCUMENTED)
    assert list((spool / "processing").iterdir()) == []
    assert _leftovers(spool) == []
    assert state(job)["status"] == "completed"
    assert_exactly_once(job, {r["custom_id"] for r in recs})
    assert acquired >= 10, f"only {acquired} of {kills} runs got as far as taking the job over"


def _owner_pid(spool: Path) -> object:
    for job in job_dirs(spool, "processing"):
        try:
            return json.loads((job / "owner.json").read_text()).get("pid")
        except (OSError, ValueError):
            return None
    return None


def _grave(job: Path, instance: str, record: dict[str, object], tag: str = "a1b2c3") -> Path:
    grave = job / f"owner.json.{instance}.{tag}.stale"
    grave.write_text(json.dumps(record))
    return grave


def test_recovery_removes_graves_of_an_interrupted_take_over_c10_c11(tmp_path: Path) -> None:
    """C10: killed after burying owner.json, before creating its own (no owner.json, a
    grave). C11: killed after creating its own, before removing the grave. Both are
    cleaned at the next start, also a grave of ours in a job a live peer took over
    meanwhile; the live peer's job and its own grave (it may be between its rename and
    its read) are left alone."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    dead = {"instance": "default", "hostname": "h", "pid": 1}
    recs = {name: _requests(name, 20) for name in ("c10", "c11", "peer")}
    jobs = {}
    for name, rr in recs.items():
        src = write_jsonl(tmp_path / f"{name}.jsonl", rr)
        job_id = new_job_id(f"{name}.jsonl")
        jobs[name] = spool / "processing" / job_id
        _stage_job_dir(jobs[name], f"{name}.jsonl", src.read_bytes(), job_id)
    _grave(jobs["c10"], "default", dead)
    (jobs["c11"] / "owner.json").write_text(json.dumps(dead))
    _grave(jobs["c11"], "default", {**dead, "pid": 2})
    # A live peer (fresh heartbeat) owns the third job and is in the middle of a take-over.
    Spool(spool, "peer").ensure_layout()
    peer_owner = {"instance": "peer", "hostname": "h", "pid": 3}
    (jobs["peer"] / "owner.json").write_text(json.dumps(peer_owner))
    peer_grave = _grave(jobs["peer"], "peer", dead)
    ours = _grave(jobs["peer"], "default", dead, tag="0f0f0f")  # our life before the peer's
    beat = {"instance": "peer", "pid": 3, "hostname": "h", "status": "processing"}
    with beating(spool / "heartbeats" / "peer.json", beat):  # alive: it keeps beating
        drain(cfg)
    done = {state(d)["source_name"]: d for d in job_dirs(spool, "done")}
    assert sorted(done) == ["c10.jsonl", "c11.jsonl"]
    for name in ("c10", "c11"):
        assert sorted(p.name for p in done[f"{name}.jsonl"].iterdir()) == sorted(DOCUMENTED)
        assert_exactly_once(done[f"{name}.jsonl"], {r["custom_id"] for r in recs[name]})
    assert peer_grave.exists() and json.loads(peer_grave.read_text()) == dead
    assert not ours.exists()
    assert json.loads((jobs["peer"] / "owner.json").read_text()) == peer_owner


def test_take_overs_leave_no_grave(tmp_path: Path) -> None:
    """Design §2 step 5: every take-over (of our own job, of a stale peer's, one lost to
    a daemon that created owner.json first) removes the grave it made."""
    # stale_after_s 0: each judges the others stale at first sight.
    a, b = Spool(tmp_path, "a", stale_after_s=0), Spool(tmp_path, "b", stale_after_s=0)
    a.ensure_layout()
    job = a.processing / "j-20260101T000000-abcdef"
    job.mkdir()
    (job / "owner.json").write_text(json.dumps({"instance": "p", "hostname": "h", "pid": 1}))
    for _ in range(5):  # each takes it from the other: whoever is taken over is fenced
        assert a.acquire(job) and a.still_owner(job)
        assert b.acquire(job) and b.still_owner(job)
        assert a.lease.fenced or not a.lease.dir.exists()
        a, b = Spool(tmp_path, "a", stale_after_s=0), Spool(tmp_path, "b", stale_after_s=0)
    assert sorted(p.name for p in job.iterdir()) == ["owner.json"]


def _take_over_for(root: str, instance: str, seconds: float) -> None:
    """One daemon's acquire, over and over, against peers doing the same (each is
    taken over by the others, which fence it: it goes on as a new incarnation)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        spool = Spool(Path(root), instance, stale_after_s=0)  # all stale at first sight
        job = spool.processing / "j-20260101T000000-abcdef"
        while time.monotonic() < end and not spool.lease.fenced:
            spool.acquire(job)
            with contextlib.suppress(Fenced):
                spool.lease.check()


def test_concurrent_take_overs_leave_no_grave(tmp_path: Path) -> None:
    """Four processes take one job over from each other as fast as they can for a
    second: renames lost, owner.json created first by another, records buried that
    were not the one judged (the steps back). Every grave made is removed."""
    spool = Spool(tmp_path, "x")
    spool.ensure_layout()
    job = spool.processing / "j-20260101T000000-abcdef"
    job.mkdir()
    procs = [
        multiprocessing.Process(target=_take_over_for, args=(str(tmp_path), f"d{i}", 1.0))
        for i in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert {p.name for p in job.iterdir()} <= {"owner.json"}


# -- a full disk -----------------------------------------------------------------------


@pytest.mark.slow
def test_a_full_disk_leaves_no_temp_files_and_the_job_completes_once(tmp_path: Path) -> None:
    """The spool is a small tmpfs; while a live daemon (heartbeat every 0.05 s) runs a
    job, the disk is filled up and kept full for 6 s (past one throttled wait, so the
    daemon also retries the job, its take-over of owner.json included, on the full
    disk), then freed. No temp file or grave outlives its write, in heartbeats/,
    processing/<job>/ or anywhere, during or after; the job then completes exactly
    once."""
    spool = tmp_path / "spool"
    with mounted_tmpfs(spool, size="16m"):
        cfg = make_config(
            tmp_path,
            heartbeat={"interval_s": 0.05, "stale_after_s": 5},
            processing={"chunk_size": 40},
            engine={"backend": "fake", "fake": {"delay_per_request_s": 0.002, "batch_size": 8}},
        )
        recs = [chat(f"full-{i}", f"question {i}", max_tokens=8 + i % 30) for i in range(1500)]
        write_jsonl(spool / "incoming" / "full.jsonl", recs)
        log = tmp_path / "spoold.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*SPOOLD, "run", "--config", str(cfg)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(),
            )
        filler = spool / "filler"
        try:
            _wait_for_progress(spool, proc, completed=200)
            seen: list[set[Path]] = []
            full_until = time.monotonic() + 6  # past one throttled wait (5 s): a retry too
            while time.monotonic() < full_until:  # full: the daemon's writes keep failing
                fill(filler)
                seen.append(set(_leftovers(spool)))
                time.sleep(0.1)
            # A temp seen in two looks 0.5 s apart outlived its write: it was left.
            left = set().union(*(seen[i] & seen[i + 5] for i in range(len(seen) - 5)))
            assert not left, f"{len(left)} temp files left while full: {sorted(left)[:4]}"
            filler.unlink()
            done = _wait_for_done(spool, proc, timeout=60)
            assert proc.poll() is None, "the daemon exited on a full disk"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=30)
        assert rc == 0, log.read_text()[-3000:]
        assert "disk full" in log.read_text(), "the disk never looked full to the daemon"
        assert state(done)["status"] == "completed"
        assert_exactly_once(done, {r["custom_id"] for r in recs})
        assert sorted(p.name for p in done.iterdir()) == sorted(DOCUMENTED)
        assert list((spool / "processing").iterdir()) == []
        assert _leftovers(spool) == []


def _wait_for_progress(spool: Path, proc: subprocess.Popen[bytes], completed: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"spoold exited {proc.returncode}"
        for d in job_dirs(spool, "processing"):
            try:
                if state(d)["request_counts"]["completed"] >= completed:
                    return
            except (OSError, ValueError):
                continue
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint with {completed} results within 30 s")


def _wait_for_done(spool: Path, proc: subprocess.Popen[bytes], timeout: float) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"spoold exited {proc.returncode}"
        if job_dirs(spool, "done"):
            return only_job(spool, "done")
        time.sleep(0.05)
    raise AssertionError(f"the job did not complete within {timeout} s of freeing the disk")


def test_id_buckets_are_removed_when_the_disk_fills_during_validation(tmp_path: Path) -> None:
    """A job of more than IN_MEMORY ids spills them to `.ids-*.tmp` buckets in its job
    directory; a full disk fails the bucket writes (and the flush at close): every bucket
    is still removed."""
    with mounted_tmpfs(tmp_path / "job", size="512k") as job:
        fill(job / "filler")
        with pytest.raises(OSError), UniqueIds(IN_MEMORY * 4, job) as ids:
            for line in range(1, 200_000):
                ids.add(line, f"custom-id-{line}", True)
        assert [p.name for p in job.iterdir()] == ["filler"]
        os.unlink(job / "filler")
        with UniqueIds(IN_MEMORY * 4, job) as ids:  # and with room, after the pass
            for line in range(1, 1000):
                ids.add(line, f"custom-id-{line % 500}", True)
            assert len(list(ids.duplicates())) == 499
        assert list(job.iterdir()) == []
