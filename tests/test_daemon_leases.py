"""The daemon-level flows around fencing (docs/design.md §2, §3, §7) that a third
review broke, each in one process (a Daemon object, monkeypatched primitives); the
docstrings say what went wrong before the fix: the stop timer dying on a fence, the
lapsed branch's give-back outside the run's I/O handling, --drain's lease check,
the stop timer's exit leaving its lease dir, slow heartbeat writes said nowhere."""

from __future__ import annotations

import errno
import threading
import time
from pathlib import Path

import pytest

from spoold import daemon as daemon_mod
from spoold import lease as lease_mod
from spoold.config import load_config
from spoold.daemon import Daemon
from spoold.engines import make_engine
from spoold.job import JobState, load_state
from tests.helpers import chat, make_config, write_jsonl
from tests.test_lease import _job


class _Exited(BaseException):
    pass


def _daemon(tmp_path: Path, **overrides: object) -> Daemon:
    cfg = load_config(make_config(tmp_path, **overrides))  # type: ignore[arg-type]
    return Daemon(cfg, lambda model, runner: make_engine(cfg.engine, model, runner))


def _claimed(tmp_path: Path, **overrides: object) -> Daemon:
    d = _daemon(tmp_path, **overrides)
    d.spool.ensure_layout()
    d.spool.lease.ensure_dir()
    assert d._claim_instance()
    return d


@pytest.mark.parametrize("where", ["fenced while running a job", "waiting to reincarnate"])
def test_the_stop_timer_exits_even_when_the_lease_is_fenced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """SIGTERM while the chunk is stuck (a hung engine or mount: exactly when a peer
    judges us stale and fences us): after stop_timeout_s `_abandon` gives the attempt
    back and writes the last beat. The beat raises Fenced (our lease dir is gone, or a
    new incarnation does not hold the instance yet), `_abandon` suppresses only
    OSError: the timer thread dies, os._exit(0) is never called, and the commit lock it
    took is never released: the stop is lost, and the main thread's next commit blocks
    forever (a second SIGTERM changes nothing: request_stop runs once)."""
    d = _claimed(tmp_path)
    job = _job(d.spool)
    assert d.spool.acquire(job)
    exits: list[int] = []

    def fake_exit(code: int) -> None:
        exits.append(code)
        raise _Exited

    monkeypatch.setattr(daemon_mod.os, "_exit", fake_exit)
    d._current_dir = job
    if where == "fenced while running a job":
        lease_mod.fence(d.spool.heartbeats, d.spool.lease.holder())  # a peer's fence
    else:  # _reincarnate: the new lease is lent to the heartbeat, not claimed yet
        d.spool.lease = lease_mod.Lease(d.spool.heartbeats, "default", 5.0)
        d.spool.lease.ensure_dir()
        d._lend_lease()
    errors: list[BaseException] = []

    def timer() -> None:
        try:
            d._abandon()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=timer)
    t.start()
    t.join(10)
    held = d.hooks.commit_lock.locked()
    assert exits == [0], f"the stop timer did not exit: {errors!r}; commit lock held: {held}"


def test_a_lapsed_give_back_that_hits_a_full_disk_waits_for_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runner.run's `lapsed` branch (the heartbeat has not landed for stale_after_s/2:
    a full disk or a flaky mount in heartbeats/) gives the attempt back OUTSIDE the
    try whose `except OSError` gives back and raises DiskFull / IOFailure. The
    give-back goes through the same lease dir as the failing heartbeat, so it fails
    too: ENOSPC escapes as a plain exception, the daemon logs "job run failed" (a bug,
    with traceback), the attempt stays counted (design §3: a full disk gives it back),
    and the loop does not wait for room (no DiskFull). max_job_attempts such
    episodes quarantine a healthy job as "crashed the daemon"."""
    d = _claimed(tmp_path, processing={"chunk_size": 2})
    write_jsonl(d.spool.incoming / "j.jsonl", [chat(f"r{i}") for i in range(6)])
    d.admit()
    time.sleep(0.2)  # settle_seconds 0.1
    d.admit()
    (job,) = list(d.spool.job_dirs())
    d.heartbeat.start()
    try:
        _lapse_into_a_full_disk(d, job, monkeypatch)
    finally:
        d.heartbeat._stop.set()
        assert d.heartbeat._thread is not None
        d.heartbeat._thread.join(5)


def _lapse_into_a_full_disk(d: Daemon, job: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = d.spool.save
    real_fresh = lease_mod.Lease.fresh

    def fresh(self: lease_mod.Lease) -> bool:
        # The heartbeat stops landing once the run has counted its attempt and validated.
        on_disk = load_state(job)
        lapsed = on_disk.attempts > 0 and on_disk.checkpoint.validated
        return real_fresh(self) and not lapsed

    def save(job_dir: Path, state: JobState) -> None:
        if state.status == "queued" and load_state(job_dir).status == "running":
            raise OSError(errno.ENOSPC, "No space left on device")  # the give-back
        real_save(job_dir, state)

    monkeypatch.setattr(lease_mod.Lease, "fresh", fresh)
    monkeypatch.setattr(d.spool, "save", save)
    raised: list[BaseException] = []
    try:
        d.run_next_job()
    except BaseException as e:
        raised.append(e)
    attempts = load_state(job).attempts
    # The give-back cannot be written either (the disk is full): the attempt stays
    # counted (C13: safe, one attempt), but the loop waits for room: DiskFull.
    assert attempts == 1 and raised and isinstance(raised[0], daemon_mod.DiskFull), (
        f"after a lapse whose give-back hit ENOSPC: attempts {attempts} (counted), "
        f"raised {raised!r} (the loop waits for room only on DiskFull)"
    )


def test_drain_waits_stale_after_s_for_every_lapse_not_once_per_run(tmp_path: Path) -> None:
    """--drain gives up on a heartbeat that cannot be written only once none has landed
    for stale_after_s past the lease's freshness, counted from the last beat that
    landed: an earlier hiccup, long over, does not count against a later one."""
    d = _claimed(tmp_path, heartbeat={"interval_s": 0.2, "stale_after_s": 1.0})
    lease = d.spool.lease
    lease.ok_at = time.monotonic() - 0.6  # hiccup 1: a beat is late at an idle pass
    assert d._lease_holds()
    lease.ok_at = time.monotonic()  # beats land again; a job runs (no _lease_holds)
    time.sleep(1.2)  # longer than stale_after_s
    lease.ok_at = time.monotonic() - 0.6  # hiccup 2, just now: a beat is late
    assert d._lease_holds(), "the drain gave up at the first moment of its second hiccup"
    assert not d.lease_lost
    lease.ok_at = time.monotonic() - 1.6  # no beat for 1.5 × stale_after_s: give up
    assert not d._lease_holds() and d.lease_lost


def test_a_stop_timeout_exit_removes_its_lease_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_abandon` (the stop timer, exit 0) writes `stopped` and calls os._exit without
    Lease.release: heartbeats/.<instance>.<token>.lease/ (and what is in it) stays
    until a peer's take_over or the next start fences it (design §2: a daemon that
    exits cleanly removes its lease directory)."""
    d = _claimed(tmp_path)
    monkeypatch.setattr(daemon_mod.os, "_exit", lambda code: None)
    d._abandon()
    left = [p.name for p in d.spool.heartbeats.iterdir() if p.name.endswith(".lease")]
    assert not left, f"exited 0 after the stop timeout, left {left}"


def test_heartbeat_writes_slower_than_half_stale_after_s_are_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every heartbeat write takes longer than stale_after_s / 2 (a degraded NFS
    server; the design's margin is stale_after_s / 6 at the default cadence): the
    lease is never fresh when a write returns, so this daemon acquires nothing and
    commits nothing, forever. Its beats still land, so every peer judges it alive and
    none may take the jobs whose owner.json names it. Nothing says so: no log line, no
    heartbeat `problems` (spool-status: healthy), status `idle`."""
    from spoold import fsio
    from spoold.spool import Spool

    d = _daemon(
        tmp_path,
        heartbeat={"interval_s": 0.2, "stale_after_s": 1.0},
        watch={"settle_seconds": 0.1, "rescan_interval_s": 0.2},
    )
    d.spool.ensure_layout()
    d.spool.lease.ensure_dir()
    job = _job(d.spool)
    assert d.spool.acquire(job)  # owned by this daemon (queued after a give-back, say)
    real_write = fsio.atomic_write

    def slow(path: Path, data: object, via: Path | None = None) -> None:
        if path.name == "default.json":
            time.sleep(0.6)  # > stale_after_s / 2
        real_write(path, data, via)  # type: ignore[arg-type]

    monkeypatch.setattr(fsio, "atomic_write", slow)
    t = threading.Thread(target=d.run)
    t.start()
    try:
        peer = Spool(tmp_path / "spool", "peer", 1.0)
        peer.lease.ensure_dir()
        deadline = time.monotonic() + 4
        peer_took = False
        while time.monotonic() < deadline and not peer_took:
            peer_took = peer.acquire(job)
            time.sleep(0.1)
        problems = d.heartbeat._fields["problems"]
        status = d.heartbeat._fields["status"]
    finally:
        d.request_stop("test")
        t.join(10)
    assert peer_took or problems, (
        f"4 s (4 x stale_after_s): the owner ran nothing (status {status}), no peer "
        f"could take its job, problems {problems}"
    )
