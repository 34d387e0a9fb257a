"""Records from other versions, or broken ones, stop nothing (SPEC §3).

Unknown keys in state.json, owner.json or a heartbeat (a newer spoold's) are ignored
and kept; a job whose record cannot be read is reported and left where it is while
the daemon goes on with the others. The loader is tested as pure functions, the
rest with the real `spoold run` and `spool-status` on real files.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from spoold import job
from spoold.job import (
    Checkpoint,
    JobState,
    RecordError,
    Unreadable,
    parse_state,
    read_job,
    unknown_keys,
)
from spoold.spool import Spool, classify
from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    job_dirs,
    log_events,
    make_config,
    read_results,
    run_spoold,
    state,
    wait_for,
    write_jsonl,
)

UNREADABLE_EVENT = "job record cannot be read; job left in processing/"

# -- the loader, as pure functions ---------------------------------------------------


def _record(**changes: Any) -> dict[str, Any]:
    raw = JobState(id="j-1", source_name="j.jsonl").to_dict()
    raw.update(changes)
    return raw


def test_unknown_keys_are_kept_at_every_level_and_written_back() -> None:
    raw = _record(lease={"epoch": 7, "holders": ["a", "b"]}, priority=3)
    raw["checkpoint"].update(generation=4, result_files={"4": "output.4.jsonl"})
    raw["request_counts"]["cached"] = 2
    st = JobState.from_dict(raw)
    assert st.checkpoint.next_line == 1 and st.request_counts.total == 0
    assert unknown_keys(st)["priority"] == 3
    # Every commit replaces the checkpoint with a fresh object: its keys stay.
    st.checkpoint = Checkpoint(validated=True, next_line=9)
    out = st.to_dict()
    assert out["lease"] == {"epoch": 7, "holders": ["a", "b"]} and out["priority"] == 3
    assert out["checkpoint"]["generation"] == 4
    assert out["checkpoint"]["result_files"] == {"4": "output.4.jsonl"}
    assert out["checkpoint"]["next_line"] == 9 and out["checkpoint"]["validated"] is True
    assert out["request_counts"] == {"total": 0, "completed": 0, "failed": 0, "cached": 2}
    assert JobState.from_dict(out).to_dict() == out  # and again, unchanged


def test_a_record_without_unknown_keys_round_trips_exactly() -> None:
    st = JobState(id="j-2", source_name="j.jsonl", model="m", rejected_lines=[3, 5])
    st.checkpoint.done_lines = [7]
    assert JobState.from_dict(st.to_dict()) == st
    assert set(st.to_dict()) == {f for f in JobState.__dataclass_fields__}


@dataclass
class _Chunk:
    first: int
    last: int
    ratio: float = 0.0


@dataclass
class _Lease:
    epoch: int = 0
    mode: Literal["shared", "own"] = "own"


@dataclass
class _FutureState(JobState):
    """JobState as others will grow it: nested records in lists, mappings, optionals."""

    chunks: list[_Chunk] = field(default_factory=list)
    by_generation: dict[str, _Chunk] = field(default_factory=dict)
    lease: _Lease | None = None
    span: tuple[int, ...] = ()
    note: str | None = None


def test_the_loader_follows_new_fields_nested_records_lists_and_mappings() -> None:
    raw = _record(
        chunks=[{"first": 1, "last": 5, "ratio": 1, "crc": "ab"}, {"first": 6, "last": 9}],
        by_generation={"3": {"first": 1, "last": 2, "host": "h"}},
        lease={"epoch": 2, "mode": "shared", "fence": 11},
        span=[1, 2],
        later={"x": None},
    )
    st = _FutureState.from_dict(raw)
    assert st.chunks == [_Chunk(1, 5, 1.0), _Chunk(6, 9)]
    assert isinstance(st.chunks[0].ratio, float)
    assert st.by_generation == {"3": _Chunk(1, 2)} and st.lease == _Lease(2, "shared")
    assert st.span == (1, 2) and st.note is None
    st.chunks.append(_Chunk(10, 12))
    out = st.to_dict()
    assert out["chunks"][0]["crc"] == "ab" and "crc" not in out["chunks"][2]
    assert out["by_generation"]["3"]["host"] == "h"
    assert out["lease"] == {"epoch": 2, "mode": "shared", "fence": 11}
    assert out["later"] == {"x": None} and out["span"] == [1, 2]
    json.dumps(out)  # what save_state writes


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"attempts": "x"}, "attempts: expected an integer, got 'x'"),
        ({"attempts": True}, "attempts: expected an integer"),
        ({"attempts": 1.5}, "attempts"),
        ({"checkpoint": 5}, "checkpoint: expected an object, got 5"),
        ({"checkpoint": {"next_line": "1"}}, "checkpoint.next_line"),
        ({"checkpoint": {"done_lines": [1, "2"]}}, "checkpoint.done_lines[1]"),
        ({"request_counts": {"total": "3"}}, "request_counts.total"),
        ({"request_counts": None}, "request_counts: expected an object"),
        ({"rejected_lines": {}}, "rejected_lines: expected a list"),
        ({"model": 3}, "model: expected a string or null"),
        ({"id": None}, "id: expected a string"),
        ({"status": "paused"}, "status: 'paused' is not one of"),
    ],
)
def test_a_known_key_of_the_wrong_type_is_a_record_error_naming_it(
    changes: dict[str, Any], named: str
) -> None:
    data = json.dumps(_record(**changes)).encode()
    with pytest.raises(RecordError, match=r"^state\.json: ") as e:
        parse_state(data)
    assert named in str(e.value)
    with pytest.raises(RecordError):  # the same through a grown record
        _FutureState.from_dict(_record(**changes))


def test_nested_wrong_types_in_new_fields_are_named() -> None:
    for changes, named in [
        ({"chunks": [{"first": 1, "last": 2}, {"first": 1}]}, "chunks[1].last is missing"),
        ({"lease": {"mode": "theirs"}}, "lease.mode: expected one of 'shared', 'own'"),
        ({"by_generation": {"4": 7}}, "by_generation.4: expected an object"),
        ({"span": [1, "2"]}, "span[1]"),
    ]:
        with pytest.raises(RecordError) as e:
            _FutureState.from_dict(_record(**changes))
        assert named in str(e.value), e.value


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\xff\xfe garbage {",
        b"\xff\xfe\xfd",
        b'{"id": "j", "source_name": ',
        b"[1, 2]",
        b'"a string"',
        b"null",
        b"[" * 100_000,  # deeper than the JSON decoder goes: RecursionError before
        b"{" + b'"a":{' * 50_000,
    ],
)
def test_bytes_that_are_not_a_record_are_a_record_error(data: bytes) -> None:
    with pytest.raises(RecordError) as e:
        parse_state(data)
    assert isinstance(e.value, ValueError) and str(e.value).startswith("state.json")


def test_read_job_tells_unreadable_from_gone(tmp_path: Path) -> None:
    d = tmp_path / "j-1"
    d.mkdir()
    assert read_job(d) == Unreadable("state.json is missing")
    (d / "state.json").write_bytes(b"\x00garbage")
    found = read_job(d)
    assert isinstance(found, Unreadable) and "not JSON" in found.why
    (d / "state.json").write_text(json.dumps(_record(attempts="x")))
    assert read_job(d) == Unreadable("state.json: attempts: expected an integer, got 'x'")
    assert read_job(tmp_path / "moved-away") is None


def test_a_record_field_json_cannot_carry_back_is_refused() -> None:
    @dataclass
    class _Bad:
        where: Path

    with pytest.raises(TypeError, match="cannot hold"):
        job._check_loadable(_Bad, "_Bad", set())


def test_active_jobs_names_the_unreadable_ones_and_touches_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.ensure_layout()
    write_jsonl(tmp_path / "good.jsonl", [chat("a")])
    entry = classify(tmp_path / "good.jsonl")
    assert entry is not None
    good = spool.claim(entry, 1, entry.size)
    broken = _broken_jobs(spool.root)
    before = _snapshot(spool.processing)
    jobs = spool.active_jobs()
    assert [d.name for d, _ in jobs] == [good]
    assert set(spool.unreadable) == set(broken)
    for name, reason in broken.items():
        assert reason in spool.unreadable[name], (name, spool.unreadable[name])
    spool.recover()  # take_over reads them too: still nothing touched
    assert _snapshot(spool.processing) == before
    # Refreshed at every call: a repaired job runs, a removed one is forgotten.
    (spool.processing / "attempts-x" / "state.json").write_text(
        json.dumps(_record(id="attempts-x"))
    )
    (spool.processing / "garbage" / "state.json").unlink()
    (spool.processing / "garbage" / "input.jsonl").unlink()
    (spool.processing / "garbage").rmdir()
    names = [d.name for d, _ in spool.active_jobs()]
    assert "attempts-x" in names and "attempts-x" not in spool.unreadable
    assert "garbage" not in spool.unreadable and len(spool.unreadable) == len(broken) - 2


# -- broken and future records on a real spool, with the real daemon ------------------

# job id -> (state.json bytes, or None for none at all; what the report must say)
BROKEN: dict[str, tuple[bytes | None, str]] = {
    "garbage": (b"\x00\xff\xfe\x00 not json {{", "state.json is not JSON"),
    "not-an-object": (b'["queued"]\n', "expected an object"),
    "nested-too-deep": (b"[" * 100_000, "nested too deeply"),
    "attempts-x": (b"", "attempts: expected an integer, got 'x'"),
    "checkpoint-5": (b"", "checkpoint: expected an object, got 5"),
    "total-str": (b"", "request_counts.total: expected an integer"),
    "status-unknown": (b"", "status: 'paused' is not one of"),
    "no-state": (None, "state.json is missing"),
}
_WRONG_TYPES: dict[str, dict[str, Any]] = {
    "attempts-x": {"attempts": "x"},
    "checkpoint-5": {"checkpoint": 5},
    "total-str": {"request_counts": {"total": "1", "completed": 0, "failed": 0}},
    "status-unknown": {"status": "paused"},
}


def _broken_jobs(spool: Path) -> dict[str, str]:
    """Job directories in processing/ whose state.json cannot be read, each with a
    valid input (so running one by mistake would show): job id -> expected reason.
    They are older than any other job, so they come first in arrival order."""
    for name, (data, _) in BROKEN.items():
        d = spool / "processing" / name
        d.mkdir(parents=True)
        write_jsonl(d / "input.jsonl", [chat(f"{name}-1")])
        if name in _WRONG_TYPES:
            raw = _record(id=name, source_name=f"{name}.jsonl", created_at="2000-01-01T00:00:00Z")
            raw["request_counts"]["total"] = 1
            data = json.dumps({**raw, **_WRONG_TYPES[name]}).encode()
        if data is not None:
            (d / "state.json").write_bytes(data)
    return {name: reason for name, (_, reason) in BROKEN.items()}


def _snapshot(base: Path) -> dict[str, bytes]:
    """Every file under `base` (relative name -> bytes): to prove nothing was touched."""
    return {str(p.relative_to(base)): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def _broken_snapshot(spool: Path) -> dict[str, bytes]:
    return {k: v for k, v in _snapshot(spool / "processing").items() if k.split("/")[0] in BROKEN}


def _assert_reported_once_each(log_text: str) -> None:
    said = Counter(e.get("job_id") for e in log_events(log_text) if e["event"] == UNREADABLE_EVENT)
    assert said == Counter(dict.fromkeys(BROKEN, 1)), said
    assert "Traceback" not in log_text


def spool_status(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "spoold.status", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=30,
    )


def _assert_status_names_them(config: Path) -> int:
    """spool-status names every broken job with its reason, in text and --json; its
    exit code."""
    text = spool_status(config)
    for name, (_, reason) in BROKEN.items():
        line = next(ln for ln in text.stdout.splitlines() if f"job {name} in processing/" in ln)
        assert line.startswith("problem: ") and reason in line, line
    report = json.loads(spool_status(config, "--json").stdout)
    reported = {j["id"]: j["error"] for j in report["unreadable_jobs"]}
    assert reported.keys() == BROKEN.keys()
    assert all(BROKEN[name][1] in why for name, why in reported.items()), reported
    named = [name for p in report["problems"] for name in BROKEN if f"job {name} in " in p]
    assert sorted(named) == sorted(BROKEN)
    one = spool_status(config, "attempts-x")
    assert one.returncode >= 1 and "attempts: expected an integer" in one.stdout
    assert report["exit_code"] == text.returncode
    return text.returncode


def _claimed(spool: Path, name: str, ids: list[str]) -> Path:
    """A queued job in processing/, claimed the way the daemon claims one."""
    path = write_jsonl(spool.parent / name, [chat(i) for i in ids])
    entry = classify(path)
    assert entry is not None
    s = Spool(spool)
    s.ensure_layout()
    job_id = s.claim(entry, len(ids), entry.size)
    assert job_id is not None
    return spool / "processing" / job_id


def test_a_job_with_unknown_keys_everywhere_completes_once_and_keeps_them(tmp_path: Path) -> None:
    """(a) A newer spoold's record, queued: drained to done/, exactly once, keys kept."""
    cfg = make_config(tmp_path, processing={"chunk_size": 3})
    spool = tmp_path / "spool"
    ids = [f"r{i}" for i in range(10)]
    job_dir = _claimed(spool, "future.jsonl", ids)
    raw = state(job_dir)
    raw["lease"] = {"epoch": 7, "fence": [1, 2]}
    raw["priority"] = "high"
    raw["checkpoint"]["generation"] = 4
    raw["checkpoint"]["result_files"] = {"4": ["output.4.jsonl", "errors.4.jsonl"]}
    raw["request_counts"]["cached"] = 0
    (job_dir / "state.json").write_text(json.dumps(raw))
    proc = run_spoold("run", "--config", str(cfg), "--drain", check=True)
    assert "Traceback" not in proc.stdout + proc.stderr
    (done,) = job_dirs(spool, "done")
    assert done.name == job_dir.name and not job_dirs(spool, "processing")
    assert_exactly_once(done, ids)
    assert len(read_results(done, "output.jsonl")) == len(ids)
    final = state(done)
    assert final["status"] == "completed"
    assert final["request_counts"] == {"total": 10, "completed": 10, "failed": 0, "cached": 0}
    assert final["lease"] == {"epoch": 7, "fence": [1, 2]} and final["priority"] == "high"
    assert final["checkpoint"]["generation"] == 4
    assert final["checkpoint"]["result_files"] == {"4": ["output.4.jsonl", "errors.4.jsonl"]}
    # The checkpoint itself moved on (four commits of 3, 3, 3, 1): the keys rode along.
    assert final["checkpoint"]["validated"] is True and final["checkpoint"]["completed"] == 10


def test_drain_goes_on_beside_jobs_whose_records_cannot_be_read(tmp_path: Path) -> None:
    """(b, c) Garbage bytes, wrong types, no record at all: --drain does not die, runs
    the good jobs, leaves the broken ones as they are, says so once each."""
    cfg = make_config(tmp_path, processing={"chunk_size": 2})
    spool = tmp_path / "spool"
    _broken_jobs(spool)
    before = _broken_snapshot(spool)
    queued = _claimed(spool, "queued.jsonl", ["q1", "q2", "q3"])
    write_jsonl(spool / "incoming" / "dropped.jsonl", [chat("d1"), chat("d2")])
    proc = run_spoold("run", "--config", str(cfg), "--drain")
    log_text = proc.stdout + proc.stderr
    assert proc.returncode == 1, log_text  # unreadable jobs were left
    assert any(e["event"] == "spoold stopped" for e in log_events(log_text)), log_text
    _assert_reported_once_each(log_text)
    done = {state(d)["source_name"]: d for d in job_dirs(spool, "done")}
    assert set(done) == {"queued.jsonl", "dropped.jsonl"}
    assert done["queued.jsonl"].name == queued.name
    assert_exactly_once(done["queued.jsonl"], ["q1", "q2", "q3"])
    assert_exactly_once(done["dropped.jsonl"], ["d1", "d2"])
    assert {d.name for d in job_dirs(spool, "processing")} == set(BROKEN)
    assert _broken_snapshot(spool) == before  # the same bytes, no file added or removed
    assert not job_dirs(spool, "failed")
    assert _assert_status_names_them(cfg) >= 1  # the drained daemon is gone: down, at least


def test_drain_exits_1_when_unreadable_jobs_are_left(tmp_path: Path) -> None:
    """Not everything claimable was processed: --drain says so to cron (exit 1)."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    (spool / "processing" / "garbage").mkdir(parents=True)
    (spool / "processing" / "garbage" / "state.json").write_bytes(b"\x00garbage")
    write_jsonl(spool / "incoming" / "ok.jsonl", [chat("a")])
    proc = run_spoold("run", "--config", str(cfg), "--drain")
    assert len(job_dirs(spool, "done")) == 1
    assert proc.returncode == 1


def test_a_live_daemon_goes_on_beside_jobs_whose_records_cannot_be_read(tmp_path: Path) -> None:
    """(b, c) The same with `spoold run`: it keeps taking work, spool-status is degraded
    naming each broken job, SIGTERM stops it cleanly; the broken jobs are untouched."""
    cfg = make_config(
        tmp_path,
        watch={"settle_seconds": 0.1, "rescan_interval_s": 0.2},
        heartbeat={"interval_s": 0.3, "stale_after_s": 2},  # take_over every second
    )
    spool = tmp_path / "spool"
    _broken_jobs(spool)
    before = _broken_snapshot(spool)
    write_jsonl(spool / "incoming" / "first.jsonl", [chat("f1")])
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [*SPOOLD, "run", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT, env=_env()
        )
    try:
        wait_for(lambda: len(job_dirs(spool, "done")) == 1, what="the first good job")
        time.sleep(2.5)  # several rescans and take-over passes over the broken jobs
        write_jsonl(spool / "incoming" / "second.jsonl", [chat("s1"), chat("s2")])
        wait_for(lambda: len(job_dirs(spool, "done")) == 2, what="a job dropped later")
        assert proc.poll() is None, log_path.read_text()
        assert _assert_status_names_them(cfg) == 1  # degraded: alive, with problems
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    _assert_reported_once_each(log_path.read_text())
    assert {d.name for d in job_dirs(spool, "processing")} == set(BROKEN)
    assert _broken_snapshot(spool) == before
    for d in job_dirs(spool, "done"):
        assert state(d)["status"] == "completed"


def test_unknown_keys_in_owner_json_and_heartbeats_disturb_nothing(tmp_path: Path) -> None:
    """(d) A job left running by this instance's previous life, whose owner.json, and
    whose heartbeat, carry keys this version does not know; a peer's heartbeat too."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    ids = [f"o{i}" for i in range(5)]
    job_dir = _claimed(spool, "owned.jsonl", ids)
    raw = state(job_dir)
    raw.update(status="running", attempts=1, instance="default", fencing={"epoch": 3})
    (job_dir / "state.json").write_text(json.dumps(raw))
    old_owner = {
        "instance": "default",
        "hostname": socket.gethostname(),
        "pid": 2**22 + 12345,  # no such process
        "generation": 3,
        "lease": {"epoch": 3, "granted_at": "2030-01-01T00:00:00Z"},
    }
    (job_dir / "owner.json").write_text(json.dumps(old_owner))
    beat = {
        "pid": 2**22 + 12345,
        "hostname": socket.gethostname(),
        "instance": "default",
        "version": "9.9.9",
        "status": "processing",
        "updated_at": "2001-01-01T00:00:00Z",
        "seq": 41,
        "problems": [],
        "engines": [{"model": "m", "replicas": 2}],
        "lease_epoch": 3,
    }
    (spool / "heartbeats" / "default.json").write_text(json.dumps(beat))
    peer = {**beat, "instance": "gpu7", "pid": 1, "hostname": "elsewhere", "queue_shard": 7}
    (spool / "heartbeats" / "gpu7.json").write_text(json.dumps(peer))
    proc = run_spoold("run", "--config", str(cfg), "--drain", check=True)
    assert "Traceback" not in proc.stdout + proc.stderr
    (done,) = job_dirs(spool, "done")
    assert_exactly_once(done, ids)
    final = state(done)
    assert final["status"] == "completed" and final["fencing"] == {"epoch": 3}
    owner = json.loads((done / "owner.json").read_text())
    assert owner["instance"] == "default" and owner["pid"] != old_owner["pid"]
    # Where the old owner's record is kept (buried), it is kept whole.
    for grave in (p for p in done.iterdir() if p.name.startswith("owner.json.")):
        assert json.loads(grave.read_text()) == old_owner
    report = json.loads(spool_status(cfg, "--json").stdout)
    peers = {d["instance"]: d for d in report["daemons"]}
    assert peers["gpu7"]["queue_shard"] == 7 and peers["gpu7"]["stale"] is True
    assert report["unreadable_jobs"] == [] and report["queue"]["done"] == 1
    assert os.path.exists(spool / "heartbeats" / "gpu7.json")  # a peer's file is not ours
