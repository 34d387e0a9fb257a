"""The lease protocol step by step (docs/design.md §2), on real files in one process:
liveness on the observer's clock, the instance lease, fencing, securing the results of
a contested take-over, and staging recovery that renames before it looks.

Several daemons in real processes, stalled and killed, are tests/test_fencing.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from spoold import fsio
from spoold.fsio import AppendLog, Fenced
from spoold.job import COMPLETED, OUTPUT, Checkpoint, JobState, load_state, save_state
from spoold.lease import InstanceTaken, Lease, Observer
from spoold.spool import Spool, classify
from tests.helpers import chat, write_jsonl


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _job(spool: Spool, name: str = "j-20261201T000000-abcdef", out: bytes = b"") -> Path:
    job = spool.processing / name
    job.mkdir(parents=True)
    state = JobState(id=name, source_name="j.jsonl", status="running", attempts=1)
    state.checkpoint = Checkpoint(validated=True, output_bytes=len(out))
    save_state(job, state)
    (job / OUTPUT).write_bytes(out)
    return job


def test_a_heartbeat_that_changes_is_alive_whatever_its_wall_clock_says(tmp_path: Path) -> None:
    """Hosts minutes apart: updated_at is never compared. Unchanged for stale_after_s on
    the observer's own clock is stale; a change seen after a pause of the observer is
    alive (it re-reads at every judgement)."""
    clock = Clock()
    beats = tmp_path / "heartbeats"
    beats.mkdir()
    peer = Lease(beats, "peer", 60)
    peer.ensure_dir()
    observer = Observer(beats, 60, clock)
    path = beats / "peer.json"
    record = {"instance": "peer", "token": peer.token, "pid": 1, "seq": 1}
    for updated_at in ("1999-01-01T00:00:00Z", "2099-01-01T00:00:00Z"):
        path.write_text(json.dumps({**record, "updated_at": updated_at}))
        holder = peer.holder()
        assert not observer.gone(holder)
        clock.now += 30
        assert not observer.gone(holder)
        record["seq"] += 1  # a beat while the observer was paused for 500 s
        path.write_text(json.dumps({**record, "updated_at": updated_at}))
        clock.now += 500
        assert not observer.gone(holder)
        clock.now += 59
        assert not observer.gone(holder)
        clock.now += 2
        assert observer.gone(holder)  # 61 s unchanged on our clock
    peer.release()
    assert observer.gone(peer.holder())  # its lease dir is gone: dead at once


def test_one_of_two_starters_gets_the_instance_the_other_is_refused(tmp_path: Path) -> None:
    """The instance lease: the first creates the record; the second, seeing it change
    (its holder beats), is refused naming the holder. A record that says `stopped` frees
    the name at once."""
    beats = tmp_path / "heartbeats"
    beats.mkdir()
    first, second = Lease(beats, "gpu0", 60), Lease(beats, "gpu0", 60)
    observer = Observer(beats, 60)
    record = {"instance": "gpu0", "pid": 4242, "hostname": "far", "status": "starting"}

    def beat(lease: Lease, seq: int, **extra: object) -> bytes:
        return json.dumps({**record, "token": lease.token, "seq": seq, **extra}).encode()

    assert first.claim_instance(observer, lambda: beat(first, 1), lambda: False)
    seq = [1]

    def stopping() -> bool:  # the holder beats while the second one watches
        seq[0] += 1
        first.beat(beat(first, seq[0]))
        return False

    with pytest.raises(InstanceTaken, match="pid 4242 on far"):
        second.claim_instance(observer, lambda: beat(second, 1), stopping)
    first.beat(beat(first, seq[0] + 1, status="stopped"))
    third = Lease(beats, "gpu0", 60)
    assert third.claim_instance(Observer(beats, 60), lambda: beat(third, 1), lambda: False)
    assert json.loads((beats / "gpu0.json").read_text())["token"] == third.token


def test_a_take_over_fences_the_old_owner_and_secures_the_results(tmp_path: Path) -> None:
    """Design §2 steps 3 and 5, C21: the old owner, stalled with output.jsonl open and an
    uncommitted tail written, wakes after the take-over: its appends land in a file
    nobody reads, its state.json write fails, and the job's files hold exactly what was
    committed, then what the new owner commits."""
    clock = Clock()
    old = Spool(tmp_path, "a")
    old.ensure_layout()
    job = _job(old, out=b'{"committed": 1}\n')
    assert old.acquire(job)
    stale = AppendLog(job / OUTPUT, len(b'{"committed": 1}\n'), old.results_check())
    stale.append(b'{"uncommitted": 1}\n')
    stale.sync()  # synced, never checkpointed (C7): then it stalls
    new = Spool(tmp_path, "b", stale_after_s=60, clock=clock)
    assert not new.acquire(job)  # first sight of a's (missing) heartbeat: not yet
    clock.now += 61
    assert new.acquire(job)
    owner = json.loads((job / "owner.json").read_text())
    assert owner["token"] == new.lease.token and owner["generation"] == 2
    assert (job / OUTPUT).read_bytes() == b'{"committed": 1}\n'  # the tail is not the job's
    assert load_state(job).attempts == 0  # a stall is not a crash: the attempt given back
    # The old owner wakes and runs on.
    stale.append(b'{"late": 1}\n')
    stale.sync()
    stale.close()
    with pytest.raises(Fenced):
        old.save(job, load_state(job))
    with pytest.raises(Fenced):
        AppendLog(job / OUTPUT, 0, old.results_check())  # checked before the cut
    assert (job / OUTPUT).read_bytes() == b'{"committed": 1}\n'
    with AppendLog(job / OUTPUT, len(b'{"committed": 1}\n'), new.results_check()) as out:
        out.append(b'{"new": 1}\n')
        out.sync()
    assert (job / OUTPUT).read_bytes() == b'{"committed": 1}\n{"new": 1}\n'
    assert sorted(p.name for p in job.iterdir()) == ["output.jsonl", "owner.json", "state.json"]


def test_an_owner_provably_dead_on_this_host_is_taken_over_at_once_without_a_copy(
    tmp_path: Path,
) -> None:
    """Same host_id, its pid gone: no wait and no copy (the kill-and-restart path)."""
    spool = Spool(tmp_path, "b")
    spool.ensure_layout()
    job = _job(spool, out=b"x\n")
    inode = os.stat(job / OUTPUT).st_ino
    dead = spool.lease.identity() | {"instance": "a", "pid": 2**22 + 7, "token": "0" * 12}
    (job / "owner.json").write_text(json.dumps(dead))
    assert spool.acquire(job)
    assert os.stat(job / OUTPUT).st_ino == inode


def test_an_owner_stalled_after_its_terminal_record_finishes_through_the_taker_c22(
    tmp_path: Path,
) -> None:
    """Design §2 W3: the terminal state.json landed before the fence; the taker (its
    recovery, C9) moves the job; the old owner's own move then fails, nothing changes."""
    old = Spool(tmp_path, "a")
    old.ensure_layout()
    job = _job(old)
    assert old.acquire(job)
    state = load_state(job)
    state.status = COMPLETED
    old.save(job, state)  # ... and it stalls before the move
    new = Spool(tmp_path, "b", stale_after_s=0)
    new.recover()
    done = tmp_path / "done" / job.name
    assert done.is_dir() and load_state(done).status == COMPLETED
    before = {p.name: p.read_bytes() for p in done.iterdir()}
    with pytest.raises(FileNotFoundError):
        fsio.move(job, done.parent / "again")
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before


def test_staging_recovery_renames_first_so_a_late_claim_cannot_put_a_file_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Design §1: a claimer stalled between its state.json and its rename is judged dead
    and its staging dir recovered; when it wakes its rename finds no target dir, and
    the submitted file stays in incoming/ for the next claim. Never deleted."""
    claimer = Spool(tmp_path, "a")
    claimer.ensure_layout()
    data = write_jsonl(claimer.incoming / "x.jsonl", [chat("a")]).read_bytes()
    entry = classify(claimer.incoming / "x.jsonl")
    assert entry is not None
    real_move = fsio.move

    def stalled(src: Path, dst: Path) -> None:
        if src == entry.path:  # step 3: meanwhile a's lease is fenced, its claim recovered
            claimer.lease.release()
            Spool(tmp_path, "b").take_over()
            assert not any(p.name.startswith(".claim-") for p in claimer.processing.iterdir())
        real_move(src, dst)

    monkeypatch.setattr(fsio, "move", stalled)
    assert claimer.claim(entry, 1, len(data)) is None
    monkeypatch.setattr(fsio, "move", real_move)
    assert (claimer.incoming / "x.jsonl").read_bytes() == data
    assert list(claimer.processing.iterdir()) == []
    later = Spool(tmp_path, "b")
    entry = classify(later.incoming / "x.jsonl")
    assert entry is not None and later.claim(entry, 1, len(data))


def test_a_claim_whose_rename_lies_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A retransmitted NFS RENAME answers ENOENT after it happened: the claim looks where
    the file is, finds it in its staging dir, and finishes (design §1)."""
    spool = Spool(tmp_path)
    spool.ensure_layout()
    data = write_jsonl(spool.incoming / "x.jsonl", [chat("a")]).read_bytes()
    entry = classify(spool.incoming / "x.jsonl")
    assert entry is not None
    real = os.rename

    def lying(src: str | Path, dst: str | Path) -> None:
        real(src, dst)
        raise FileNotFoundError(2, "No such file or directory (a retransmitted RENAME)")

    monkeypatch.setattr(os, "rename", lying)
    job_id = spool.claim(entry, 1, len(data))
    monkeypatch.setattr(os, "rename", real)
    assert job_id is not None
    assert (spool.processing / job_id / "input.jsonl").read_bytes() == data
