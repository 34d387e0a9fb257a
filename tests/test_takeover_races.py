"""Races of the take-over and the instance lease that a review broke (docs/design.md
§2), each forced in one process by pausing one party at the exact step; all of them
failed before the fixes: files never secured after an interrupted take-over, a taker
that buried another's fresh record and left the job ownerless, two holders of one
instance, a drain that called itself drained while its heartbeat could not be
written, a crashed taker that let the next one skip the copy."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from spoold import fsio
from spoold import lease as lease_mod
from spoold import spool as spool_mod
from spoold.fsio import AppendLog
from spoold.job import OUTPUT, load_state
from spoold.lease import InstanceTaken, Lease, Observer
from spoold.spool import Spool
from tests.helpers import SPOOLD, _env, chat, make_config, write_jsonl
from tests.test_lease import Clock, _job

COMMITTED = b'{"committed": 1}\n'


def test_acquired_afresh_after_an_interrupted_take_over_the_results_are_secured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Design §2 C10 ('no owner.json, a grave: the job is nobody's, acquired afresh') and
    any take-over whose create fails (ENOSPC) or that steps back: the old owner R was
    FENCED (step 3) but its files never SECURED (step 5). The next acquirer creates
    owner.json with O_EXCL (step 1), which never secures, so R's descriptors still point
    at the job's live output.jsonl. R wakes and its buffered appends overwrite what the
    new owner committed."""
    clock = Clock()
    old = Spool(tmp_path, "a")
    old.ensure_layout()
    job = _job(old, out=COMMITTED)
    assert old.acquire(job)
    stale = AppendLog(job / OUTPUT, len(COMMITTED), old.results_check())
    stale.append(b'{"stale-owner-line": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}\n')
    # ... old owner stalls here (SIGSTOP, hung NFS) with its append buffered.

    taker = Spool(tmp_path, "b", stale_after_s=60, clock=clock)
    assert not taker.acquire(job)
    clock.now += 61
    real_create = fsio.create_exclusive

    def full_disk(path: Path, data: bytes) -> bool:
        if path.name == "owner.json" and not path.exists():
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_create(path, data)

    monkeypatch.setattr(fsio, "create_exclusive", full_disk)
    with pytest.raises(OSError):
        taker.acquire(job)  # step 3 fenced a, step 4's create failed: no owner.json now
    monkeypatch.setattr(fsio, "create_exclusive", real_create)
    assert not (job / "owner.json").exists()

    # Room again: the job is "nobody's" and is acquired afresh (step 1) — no secure.
    assert taker.acquire(job)
    with AppendLog(job / OUTPUT, len(COMMITTED), taker.results_check()) as out:
        out.append(b'{"new": 1}\n')
        out.sync()
        state = load_state(job)
        state.checkpoint.output_bytes = out.size
        taker.save(job, state)
    committed = COMMITTED + b'{"new": 1}\n'
    assert (job / OUTPUT).read_bytes() == committed

    # The fenced old owner wakes and syncs what it had buffered.
    stale.sync()
    stale.close()
    assert (job / OUTPUT).read_bytes()[: len(committed)] == committed, (
        "a fenced owner's late append overwrote the new owner's committed bytes"
    )


def test_two_takers_of_one_dead_owner_leave_one_owner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Design §2 steps 2-4 with two takers T1, T2 of one dead owner R (e.g. all the
    daemons of a host restarting together after R's host died): T2 reads R, T1 takes the
    record over completely, then T2's grave rename buries T1's fresh record; T2 finds
    the grave is not R and 'steps back' by DELETING its own record. Now owner.json is
    missing although T1 believes it owns the job and was never fenced; T2's next pass
    creates owner.json afresh (step 1) without fencing T1 or securing the files. T1's
    lease is fine, so its state.json writes still land after T2 owns the job."""
    clock1, clock2 = Clock(), Clock()
    dead = Spool(tmp_path, "r")
    dead.ensure_layout()
    job = _job(dead, out=COMMITTED)
    assert dead.acquire(job)
    dead.lease.release()  # R exited / was fenced: its lease dir is gone -> DEAD at once

    t1 = Spool(tmp_path, "t1", stale_after_s=60, clock=clock1)
    t2 = Spool(tmp_path, "t2", stale_after_s=60, clock=clock2)
    t1.lease.ensure_dir()
    t2.lease.ensure_dir()

    real_fence = spool_mod.fence
    done = []

    def fence_then_peer_takes(heartbeats: Path, holder: lease_mod.Holder) -> None:
        real_fence(heartbeats, holder)
        if not done:  # T2 has read R and judged it dead; now T1 runs its whole take-over
            done.append(1)
            assert t1.acquire(job)

    monkeypatch.setattr(spool_mod, "fence", fence_then_peer_takes)
    assert not t2.acquire(job)  # T2 lost the race (buried T1's record, stepped back)
    monkeypatch.setattr(spool_mod, "fence", real_fence)
    assert done
    owners = (
        {json.loads((job / "owner.json").read_text())["token"]}
        if (job / "owner.json").exists()
        else set()
    )
    # T1 believes it owns the job (it returned True from acquire and will run it) ...
    assert t1._owned.get(job.name) is not None
    assert owners == {t1.lease.token}, f"owner.json after the race: {owners or 'MISSING'}"


def test_a_taker_whose_record_was_buried_is_fenced_before_another_acquires(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Continuation of the race above: T2's next pass acquires via O_EXCL. Both T1 and T2
    returned True from acquire; T1 is not fenced, so T1's commit (state.json via its
    lease) lands over T2's. 'The fence is the guarantee' does not hold."""
    clock1, clock2 = Clock(), Clock()
    dead = Spool(tmp_path, "r")
    dead.ensure_layout()
    job = _job(dead, out=COMMITTED)
    assert dead.acquire(job)
    dead.lease.release()
    t1 = Spool(tmp_path, "t1", stale_after_s=60, clock=clock1)
    t2 = Spool(tmp_path, "t2", stale_after_s=60, clock=clock2)
    t1.lease.ensure_dir()
    t2.lease.ensure_dir()
    real_fence = spool_mod.fence
    done = []

    def fence_then_peer_takes(heartbeats: Path, holder: lease_mod.Holder) -> None:
        real_fence(heartbeats, holder)
        if not done:
            done.append(1)
            assert t1.acquire(job)

    monkeypatch.setattr(spool_mod, "fence", fence_then_peer_takes)
    t2.acquire(job)
    monkeypatch.setattr(spool_mod, "fence", real_fence)
    if not (job / "owner.json").exists():
        assert t2.acquire(job)  # afresh: no fence of T1, no secure
        t1.lease.check()  # T1 is NOT fenced ...
        t1.save(job, load_state(job))  # ... and its state.json write lands
        pytest.fail("T1 and T2 both acquired the job; T1 is unfenced and still commits")


def test_two_starters_of_one_instance_never_both_hold_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance lease (design §2, steps 1-3) with a dead previous holder R and two
    starters S1, S2: S2 reads R and judges it dead; S1 takes the heartbeat over; S2's
    grave rename buries S1's record, S2's create succeeds, the grave is not R so S2
    removes its own record and loops; the heartbeat is now MISSING, so S2's next look
    creates it with O_EXCL and wins. S1 also holds the instance, unfenced."""
    beats = tmp_path / "heartbeats"
    beats.mkdir()
    r = Lease(beats, "gpu0", 60)
    r.ensure_dir()
    r_obs = Observer(beats, 60)
    assert r.claim_instance(
        r_obs,
        lambda: json.dumps({"instance": "gpu0", "token": r.token, "pid": 1, "seq": 1}).encode(),
        lambda: False,
    )
    r.release()  # R died: its lease dir gone (dead at once), its record left behind

    s1, s2 = Lease(beats, "gpu0", 60), Lease(beats, "gpu0", 60)

    def rec(lease: Lease) -> bytes:
        return json.dumps(
            {"instance": "gpu0", "token": lease.token, "pid": 1, "seq": 1, "status": "starting"}
        ).encode()

    real_fence = lease_mod.fence
    done = []

    def fence_then_peer_takes(heartbeats: Path, holder: lease_mod.Holder) -> None:
        real_fence(heartbeats, holder)
        if not done:
            done.append(1)
            assert s1.claim_instance(Observer(beats, 60), lambda: rec(s1), lambda: False)

    monkeypatch.setattr(lease_mod, "fence", fence_then_peer_takes)
    try:
        won2 = s2.claim_instance(Observer(beats, 60), lambda: rec(s2), lambda: False)
    except InstanceTaken:
        won2 = False
    monkeypatch.setattr(lease_mod, "fence", real_fence)
    assert done and s1.holding
    assert not (won2 and s2.holding), "two live incarnations both hold instance gpu0"


def test_a_drain_whose_heartbeat_cannot_be_written_exits_1_with_work_left(tmp_path: Path) -> None:
    """A heartbeat that cannot be written (EIO/ESTALE on its rename; EISDIR here) makes
    the lease not fresh: nothing is committed or acquired, exactly as when a live peer
    holds the job. --drain must not call that drained: it waits stale_after_s for a
    beat to land, then exits 1 with the job left in processing/, and says why."""
    cfg = make_config(
        tmp_path,
        watch={"settle_seconds": 0.1, "rescan_interval_s": 1},
        heartbeat={"interval_s": 0.2, "stale_after_s": 2.0},
        processing={"chunk_size": 10, "stop_timeout_s": 10},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.02, "batch_size": 5}},
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "j.jsonl", [chat(f"r{i}") for i in range(400)])
    with open(tmp_path / "d.log", "wb") as log:
        proc = subprocess.Popen(
            [*SPOOLD, "run", "--config", str(cfg), "--drain"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
        beat = spool / "heartbeats" / "default.json"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            jobs = list((spool / "processing").glob("j-*/state.json"))
            if jobs and json.loads(jobs[0].read_text())["checkpoint"]["completed"] > 0:
                break
            time.sleep(0.05)
        # The heartbeat's rename now fails (EISDIR); everything else works.
        beat.unlink()
        beat.mkdir()
        (beat / "x").write_text("x")
        rc = proc.wait(60)
    left = [p.name for p in (spool / "processing").iterdir() if not p.name.startswith(".")]
    done = [p.name for p in (spool / "done").iterdir()]
    shutil.rmtree(beat)
    text = (tmp_path / "d.log").read_text()
    assert rc == 1 and left, f"--drain exited {rc}, {left} left (done: {done}):\n{text[-1500:]}"
    assert "cannot write the heartbeat" in text


def test_a_taker_that_crashed_before_securing_does_not_let_the_next_skip_the_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Design §2 C19 says the next taker secures the files, 'the owner it judges is the
    crashed taker, not provably dead from another host'. But from the crashed taker's own
    host (two daemons per host is the common layout) it IS provably dead, and step 5 is
    skipped: the files still are the ones the ORIGINAL owner (stalled, on another host or
    this one) holds open; its late append overwrites what the new owner committed."""
    clock = Clock()
    r = Spool(tmp_path, "a")
    r.ensure_layout()
    job = _job(r, out=COMMITTED)
    assert r.acquire(job)
    stale = AppendLog(job / OUTPUT, len(COMMITTED), r.results_check())
    stale.append(b'{"stale-owner-line": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}\n')

    t = Spool(tmp_path, "b", stale_after_s=60, clock=clock)
    dead_pid = 2**22 + 7
    real_identity = t.lease.identity
    monkeypatch.setattr(t.lease, "identity", lambda: {**real_identity(), "pid": dead_pid})

    class Crash(BaseException):
        pass

    def crash(job_dir: Path, took_from: object = None) -> None:
        raise Crash  # T is SIGKILLed between its step 4 and step 5 (C19)

    monkeypatch.setattr(t, "_secure", crash)
    assert not t.acquire(job)
    clock.now += 61
    with pytest.raises(Crash):
        t.acquire(job)
    t.lease.release()  # T's process is gone (its pid is dead, its lease dir goes)

    n = Spool(tmp_path, "c", stale_after_s=60)
    assert n.acquire(job)  # T provably dead: no copy made
    with AppendLog(job / OUTPUT, len(COMMITTED), n.results_check()) as out:
        out.append(b'{"new": 1}\n')
        out.sync()
        state = load_state(job)
        state.checkpoint.output_bytes = out.size
        n.save(job, state)
    committed = COMMITTED + b'{"new": 1}\n'
    stale.sync()  # the original owner R wakes
    stale.close()
    assert (job / OUTPUT).read_bytes()[: len(committed)] == committed, (
        "the original owner's late append overwrote the new owner's committed bytes"
    )
