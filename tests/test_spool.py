import errno
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from spoold import fsio
from spoold.fsio import Fenced
from spoold.heartbeat import Heartbeat
from spoold.job import JobState, load_state, save_state
from spoold.spool import Kind, SettleTracker, Spool, classify, count_requests
from tests.helpers import chat, write_jsonl


def test_classify(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "a.jsonl", [chat("a")])
    (tmp_path / "b.txt").write_text("x")
    (tmp_path / "c.jsonl.part").write_text("x")
    (tmp_path / ".c.jsonl.Ab12Cd").write_text("x")
    (tmp_path / "d.jsonl.filepart").write_text("x")
    os.symlink("/etc/hostname", tmp_path / "e.jsonl")
    os.mkfifo(tmp_path / "f.jsonl")
    (tmp_path / "g.jsonl").mkdir()
    kinds = {p.name: classify(p) for p in tmp_path.iterdir()}
    assert {k: e.kind for k, e in kinds.items() if e} == {
        "a.jsonl": Kind.JOB,
        "b.txt": Kind.NOT_A_JOB,
        "c.jsonl.part": Kind.UPLOADING,
        ".c.jsonl.Ab12Cd": Kind.UPLOADING,
        "d.jsonl.filepart": Kind.UPLOADING,
        "e.jsonl": Kind.NOT_A_JOB,
        "f.jsonl": Kind.NOT_A_JOB,
        "g.jsonl": Kind.NOT_A_JOB,
    }
    assert "link" in (kinds["e.jsonl"].reason or "")  # type: ignore[union-attr]
    assert "FIFO" in (kinds["f.jsonl"].reason or "")  # type: ignore[union-attr]
    assert classify(tmp_path / "gone.jsonl") is None


def test_settle_waits_for_unchanged_size_and_mtime(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text("x")
    tracker = SettleTracker(settle_s=5)
    e = classify(p)
    assert e is not None
    assert not tracker.settled(e, now=100)
    assert not tracker.settled(e, now=104)
    with open(p, "a") as f:
        f.write("more")
    e2 = classify(p)
    assert e2 is not None
    assert not tracker.settled(e2, now=104.5)  # changed: the clock starts again
    assert "a.jsonl" in tracker.changed
    assert not tracker.settled(e2, now=109)
    assert tracker.settled(e2, now=109.6)


def test_settle_zero_claims_at_once(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_text("x")
    e = classify(p)
    assert e is not None and SettleTracker(0).settled(e, now=1)


def test_count_requests_counts_non_blank_lines(tmp_path: Path) -> None:
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"a":1}\n\n  \r\n{"b":2}\r\n{"c":3}')
    assert count_requests(p, 1000) == (3, p.stat().st_size)
    assert count_requests(p, 10)[0] == -1


def _claim(root: str, name: str, q: "multiprocessing.Queue[str | None]") -> None:
    spool = Spool(Path(root), f"i{os.getpid()}")
    e = classify(spool.incoming / name)
    q.put(spool.claim(e, 1, 1) if e else None)


def test_only_one_of_several_daemons_claims_a_file(tmp_path: Path) -> None:
    """Claim by rename (design §1): racing processes, one winner, nothing left behind."""
    spool = Spool(tmp_path)
    spool.ensure_layout()
    for round_ in range(5):
        write_jsonl(spool.incoming / f"r{round_}.jsonl", [chat("a")])
        q: multiprocessing.Queue[str | None] = multiprocessing.Queue()
        procs = [
            multiprocessing.Process(target=_claim, args=(str(tmp_path), f"r{round_}.jsonl", q))
            for _ in range(4)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(10)
        results = [q.get(timeout=5) for _ in procs]
        winners = [r for r in results if r]
        assert len(winners) == 1, results
    jobs = sorted(p.name for p in spool.processing.iterdir())
    assert len(jobs) == 5 and not any(j.startswith(".") for j in jobs)
    assert all(load_state(spool.processing / j).status == "queued" for j in jobs)


def test_ownership_and_takeover_of_stale_peer(tmp_path: Path) -> None:
    """Design §2: a live peer keeps its job however old its wall clock says its beats
    are; one whose heartbeat stops changing for stale_after_s on the observer's own
    clock loses it, fenced first (its state.json writes fail from then on)."""
    now = [1000.0]
    a = Spool(tmp_path, "gpu0")
    b = Spool(tmp_path, "gpu1", stale_after_s=60, clock=lambda: now[0])
    a.ensure_layout()
    job = tmp_path / "processing" / "j1"
    job.mkdir()
    beat = {"instance": "gpu0", "token": a.lease.token, "pid": os.getpid(), "seq": 1}
    beat["updated_at"] = "2000-01-01T00:00:00Z"  # a clock 26 years behind: never compared
    path = a.heartbeats / "gpu0.json"
    path.write_text(json.dumps(beat))
    assert a.acquire(job)
    assert a.still_owner(job)
    for _ in range(5):  # alive: its seq grows, minutes apart on b's clock
        assert not b.acquire(job)
        now[0] += 59
        beat["seq"] += 1
        path.write_text(json.dumps(beat))
    assert not b.acquire(job)  # seen now; unchanged for 0 s
    now[0] += 61
    assert b.acquire(job)
    assert b.still_owner(job) and not a.still_owner(job)
    assert not a.lease.dir.exists()  # fenced
    with pytest.raises(Fenced):
        a.save(job, load_state(job) if (job / "state.json").exists() else JobState("j1", "x"))
    owner = json.loads((job / "owner.json").read_text())
    assert owner["generation"] == 2 and owner["token"] == b.lease.token


def test_recover_finishes_terminal_jobs_and_claims(tmp_path: Path) -> None:
    """C3 and C9 built on disk, then recovery."""
    spool = Spool(tmp_path)
    spool.ensure_layout()
    write_jsonl(spool.incoming / "x.jsonl", [chat("a")])
    e = classify(spool.incoming / "x.jsonl")
    assert e is not None
    job_id = spool.claim(e, 1, 1)
    assert job_id
    # C9: terminal state written, directory not yet moved.
    st = load_state(spool.processing / job_id)
    st.status = "completed"
    save_state(spool.processing / job_id, st)
    # C3: a claim dir holding the input, not yet renamed into place.
    staging = spool.processing / ".claim-default.0123456789ab+y-20260101T000000-abcdef"
    staging.mkdir()
    save_state(staging, JobState(id="y-20260101T000000-abcdef", source_name="y.jsonl"))
    write_jsonl(staging / "input.jsonl", [chat("b")])
    # C1: an empty claim dir.
    (spool.processing / ".claim-default.0123456789ab+z-20260101T000000-abcdef").mkdir()
    # From a spoold before incarnations (no token in the name): ours, a past life.
    (spool.processing / ".claim-default+w-20260101T000000-abcdef").mkdir()
    spool.recover()
    assert (spool.done / job_id).is_dir()
    assert (spool.processing / "y-20260101T000000-abcdef" / "input.jsonl").exists()
    assert sorted(p.name for p in spool.processing.iterdir()) == ["y-20260101T000000-abcdef"]


def test_heartbeat_thread_keeps_writing(tmp_path: Path) -> None:
    beat = Heartbeat(tmp_path / "default.json", 0.05, {"max_queue_depth": 5})
    beat.start()
    first = json.loads((tmp_path / "default.json").read_text())["updated_at"]
    time.sleep(0.3)
    beat.set(status="processing")
    time.sleep(0.2)
    data = json.loads((tmp_path / "default.json").read_text())
    beat.stop()
    assert data["updated_at"] > first and data["status"] == "processing"
    assert json.loads((tmp_path / "default.json").read_text())["status"] == "stopped"
    for key in ("pid", "hostname", "instance", "version", "started_at", "current_job", "gpu"):
        assert key in data


def test_a_claim_whose_fsync_fails_after_the_rename_keeps_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step 3 renamed the file into the staging dir, then the directory fsync failed
    (EIO on a network mount): the file must never be removed with the staging dir;
    the claim looks where the file is and goes on (design §1)."""
    spool = Spool(tmp_path)
    spool.ensure_layout()
    data = write_jsonl(spool.incoming / "x.jsonl", [chat("a")]).read_bytes()
    entry = classify(spool.incoming / "x.jsonl")
    assert entry is not None
    real = fsio.fsync_dir

    def flaky(path: Path) -> None:
        if any(p.name == "input.jsonl" for p in path.iterdir()):
            raise OSError(errno.EIO, "Input/output error")
        real(path)

    monkeypatch.setattr(fsio, "fsync_dir", flaky)
    job_id = spool.claim(entry, 1, len(data))
    monkeypatch.setattr(fsio, "fsync_dir", real)
    assert job_id is not None
    (job,) = list(spool.processing.iterdir())
    assert job.name == job_id
    assert (job / "input.jsonl").read_bytes() == data and load_state(job).status == "queued"


def test_acquire_of_a_job_that_moved_on_is_false(tmp_path: Path) -> None:
    """A peer finished or cancelled it between our listing and our acquire."""
    spool = Spool(tmp_path)
    spool.ensure_layout()
    assert not spool.acquire(spool.processing / "gone-20260101T000000-abcdef")


def test_two_daemons_taking_over_one_stale_job_at_once_do_not_both_own_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a and b both judge the owner p stale; a takes the job over between b's look and
    b's rename. b must notice it buried a's fresh record and step back: at most one
    daemon may believe it owns a job."""
    a, b = Spool(tmp_path, "a"), Spool(tmp_path, "b")
    a.ensure_layout()
    job = a.processing / "j-20260101T000000-abcdef"
    job.mkdir()
    # p's lease dir is gone: dead to everyone (design §2).
    dead = {"instance": "p", "hostname": "h", "pid": 1, "token": "0123456789ab"}
    (job / "owner.json").write_text(json.dumps(dead))
    real_move = fsio.move
    raced = []

    def move(src: Path, dst: Path) -> None:
        if not raced and dst.parent == b.lease.dir and dst.name.startswith("owner.json."):
            raced.append(True)
            assert a.acquire(job)  # a, in between b's look and rename
        real_move(src, dst)

    monkeypatch.setattr(fsio, "move", move)
    b_owns = b.acquire(job)
    a_owns = a.still_owner(job)
    assert raced and not (a_owns and b_owns)
    assert not b_owns
    monkeypatch.setattr(fsio, "move", real_move)
    assert a.acquire(job) or b.acquire(job)


def test_an_entry_named_like_a_job_file_is_still_rejected(tmp_path: Path) -> None:
    """A stray `state.json` dropped into incoming/ must not collide with the reject
    staging dir's own state.json (it used to stay in incoming/ forever)."""
    spool = Spool(tmp_path)
    spool.ensure_layout()
    (spool.incoming / "state.json").write_text("{}")
    entry = classify(spool.incoming / "state.json")
    assert entry is not None and entry.kind is Kind.NOT_A_JOB
    job_id = spool.reject(entry, "not a job")
    assert job_id and not (spool.incoming / "state.json").exists()
    assert (spool.failed / job_id / "rejected-state.json").read_text() == "{}"
    assert load_state(spool.failed / job_id).status == "failed"
