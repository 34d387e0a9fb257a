"""A second review's breaks of the multi-daemon protocol (docs/design.md §2), each
forced in one process by pausing a party at the exact step (a thread, or a
monkeypatched primitive); all failed before the fixes: a buried record not written
yet, a put-back by a taker fenced meanwhile, a drain fenced while it retries an
unloadable model's job. The fixes: graves live in the taker's lease directory (a
fenced taker can neither bury nor put back), a taker checks at the end that the record
is still its own, and every acquisition fences every earlier writer before it secures."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

import pytest

from spoold import fsio
from spoold import spool as spool_mod
from spoold.fsio import AppendLog, Fenced
from spoold.job import OUTPUT, load_state
from spoold.spool import Spool
from tests.test_lease import _job

COMMITTED = b'{"committed": 1}\n'


def _committed_lost(job: Path, line: bytes) -> list[str]:
    """What state.json says is committed must be in output.jsonl."""
    committed = load_state(job).checkpoint.output_bytes
    expected = (COMMITTED + line)[:committed]
    have = (job / OUTPUT).read_bytes()
    if have[:committed] != expected or len(have) < committed:
        return [f"state.json commits {committed} bytes, output.jsonl holds {have!r}"]
    return []


def test_a_buried_record_not_written_yet_fences_nobody(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """take_record, 'someone created a record meanwhile': the buried record T of a live
    taker B is fenced through `displaced(buried)`, which parses the grave's bytes. But
    fsio.create_exclusive creates the file (O_EXCL) before it writes and fsyncs it: a
    taker A whose rename buries T in that window reads an EMPTY grave, cannot tell
    whose it was, and fences nobody. B then fills its (now unlinked) record, reads its
    own grave == R and returns True; C created owner.json afresh (step 1) meanwhile and
    also holds the job. Two unfenced owners: B's step 5 renames a copy over the
    output.jsonl that C has open, and C's committed line is lost."""
    dead = Spool(tmp_path, "o")
    dead.ensure_layout()
    job = _job(dead, out=COMMITTED)
    assert dead.acquire(job)
    dead.lease.release()  # O exited: its lease dir gone, dead at once to everyone

    a, b, c = (Spool(tmp_path, n) for n in ("a", "b", "c"))
    for s in (a, b, c):
        s.lease.ensure_dir()

    real_create = fsio.create_exclusive
    real_fence = spool_mod.fence
    b_thread: threading.Thread | None = None  # B's take-over runs in its own thread
    b_created_empty, b_go = threading.Event(), threading.Event()
    a_intercepted: list[int] = []
    b_result: list[bool] = []

    def create(path: Path, data: bytes) -> bool:
        if (
            threading.current_thread() is b_thread
            and path.name == "owner.json"
            and not path.exists()  # B's step 4 create (its step 1 found R there)
        ):
            # B's O_EXCL create is done, its write + fsync not yet (a slow NFS COMMIT).
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            b_created_empty.set()
            assert b_go.wait(10)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            return True
        if (
            path.name == "owner.json"
            and not a_intercepted
            and threading.current_thread() is (threading.main_thread())
            and b_created_empty.is_set()
        ):
            # A has renamed B's empty record away; before A's create, C acquires afresh.
            a_intercepted.append(1)
            assert c.acquire(job)
        return real_create(path, data)

    def fence(heartbeats: Path, holder: object) -> None:
        nonlocal b_thread
        real_fence(heartbeats, holder)  # type: ignore[arg-type]
        if threading.current_thread() is threading.main_thread() and not b_created_empty.is_set():
            # A read R and judged it dead; now B starts its own take-over of R.
            t = threading.Thread(target=lambda: b_result.append(b.acquire(job)))
            b_thread = t
            t.start()
            assert b_created_empty.wait(10)

    monkeypatch.setattr(fsio, "create_exclusive", create)
    monkeypatch.setattr(spool_mod, "fence", fence)
    assert not a.acquire(job)  # A buried B's empty record; C had created: A steps back
    assert a_intercepted

    # C runs the job: its output.jsonl is open, a line is appended and synced.
    out = AppendLog(job / OUTPUT, len(COMMITTED), c.results_check())
    out.append(b'{"c": 1}\n')
    out.sync()

    b_go.set()  # B's write lands in its unlinked record; it reads its grave == R
    assert b_thread is not None
    b_thread.join(10)
    monkeypatch.setattr(fsio, "create_exclusive", real_create)
    monkeypatch.setattr(spool_mod, "fence", real_fence)

    state = load_state(job)
    state.checkpoint.output_bytes = out.size
    with contextlib.suppress(Fenced):
        c.save(job, state)  # C's commit: lands (C is not fenced)
    out.close()
    b_fenced = not b.lease.dir.is_dir()
    c_fenced = not c.lease.dir.is_dir()
    owners = json.loads((job / "owner.json").read_text())["token"]
    broken = []
    if b_result == [True] and not b_fenced and not c_fenced:
        who = "C" if owners == c.lease.token else owners
        broken.append(f"B and C both acquired the job, neither fenced (owner.json: {who})")
    broken += _committed_lost(job, b'{"c": 1}\n')
    assert not broken, "; ".join(broken)


def test_a_put_back_by_a_taker_fenced_meanwhile_still_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """take_record's put-back (`os.replace(grave, path)`, 'the other taker's record,
    back over ours') is not written through the lease directory, so it lands whenever
    its taker wakes, fenced or not. A reads R (dead); B takes the job over and runs it;
    A buries B's record T, creates its own and stalls before putting T back. E judges
    A stale, fences it, takes the record over and secures (copies the files B holds
    open). A wakes: its put-back replaces E's record with T. B believes it owns (T is
    back) and was never fenced; E believed it owned. B's next commit points past the end
    of the output.jsonl E put in place: B's committed line is lost."""
    from spoold import lease as lease_mod
    from tests.test_lease import Clock

    dead = Spool(tmp_path, "o")
    dead.ensure_layout()
    job = _job(dead, out=COMMITTED)
    assert dead.acquire(job)
    dead.lease.release()

    clock_e = Clock()
    a, b = Spool(tmp_path, "a"), Spool(tmp_path, "b")
    e = Spool(tmp_path, "e", stale_after_s=60, clock=clock_e)
    for s in (a, b, e):
        s.lease.ensure_dir()
    real_fence, real_replace = spool_mod.fence, os.replace
    b_out: list[AppendLog] = []
    e_took: list[bool] = []
    b_took: list[bool] = []
    b_started: list[int] = []
    e_started: list[int] = []

    def fence(heartbeats: Path, holder: lease_mod.Holder) -> None:
        real_fence(heartbeats, holder)
        if holder.instance == "o" and not b_started:
            b_started.append(1)
            # A read R and judged it dead; B takes the job over whole and starts running.
            b_took.append(b.acquire(job))
            b_out.append(AppendLog(job / OUTPUT, len(COMMITTED), b.results_check()))

    def replace(src: object, dst: object) -> None:
        if Path(str(src)).parent == a.lease.dir and not e_started:
            e_started.append(1)
            # A stalls here (> stale_after_s); E judges it stale and takes the job over.
            # A wakes while E secures (after E's copy, before E's step 6): the put-back.
            real_secure = e._secure

            def secure_then_a_wakes(job_dir: Path, took_from: object) -> bool:
                copied = real_secure(job_dir, took_from)  # type: ignore[arg-type]
                with contextlib.suppress(FileNotFoundError):  # A's grave went with its fence
                    real_replace(src, dst)  # type: ignore[arg-type]
                return copied

            monkeypatch.setattr(e, "_secure", secure_then_a_wakes)
            assert not e.acquire(job)
            clock_e.now += 61
            e_took.append(e.acquire(job))
            return
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(spool_mod, "fence", fence)
    monkeypatch.setattr(lease_mod.os, "replace", replace)
    assert not a.acquire(job)
    monkeypatch.setattr(lease_mod.os, "replace", real_replace)
    monkeypatch.setattr(spool_mod, "fence", real_fence)
    assert b_took == [True] and e_took == [True]  # B took R over, then E took it from A
    assert not a.lease.dir.is_dir()  # A is fenced

    # A's put-back failed (its grave went with its fence): E owns the job, and B, an
    # earlier writer, was fenced by E before E secured. B goes on all the same.
    out = b_out[0]
    assert e.still_owner(job) and not b.still_owner(job)
    out.append(b'{"b": 1}\n')
    out.sync()
    state = load_state(job)
    state.checkpoint.output_bytes = out.size
    with contextlib.suppress(Fenced):
        b.save(job, state)  # lands unless B was fenced
    out.close()
    broken = []
    if b.lease.dir.is_dir() and e.lease.dir.is_dir():
        broken.append(
            "B and E both acquired the job and neither is fenced; A's put-back "
            "(A fenced) replaced E's owner.json"
        )
    broken += _committed_lost(job, b'{"b": 1}\n')
    assert not broken, "; ".join(broken)


def test_a_drain_fenced_while_retrying_an_unloadable_model_reincarnates(
    tmp_path: Path,
) -> None:
    """Daemon.run's --drain branch `self.run_next_job(ignore_backoff=True)` (daemon.py,
    the line after `if ran: continue`) is outside the `try` that turns Fenced into a new
    incarnation (and OSError/DiskFull into a wait). A drain whose lease dir is renamed
    away (a taker's displaced fence, design §2 step 4) while the only job left is of a
    model in its load backoff: the retry acquires (ours already: no write), the runner's
    fence check raises Fenced, and nothing catches it: the daemon dies with a traceback
    instead of going on as a new incarnation."""
    from spoold import lease as lease_mod
    from spoold.config import load_config
    from spoold.daemon import Daemon
    from tests.helpers import chat, make_config, write_jsonl

    cfg_path = make_config(
        tmp_path,
        watch={"settle_seconds": 0},
        heartbeat={"interval_s": 30, "stale_after_s": 100},
        processing={"model_retry_s": 1},
    )
    cfg = load_config(cfg_path)
    write_jsonl(cfg.spool_dir / "incoming" / "j.jsonl", [chat("r0")])
    loads: list[int] = []
    daemon: Daemon | None = None

    def factory(model: str, runner: str) -> object:
        loads.append(1)
        assert daemon is not None
        raise RuntimeError("model load failed")

    daemon = Daemon(cfg, factory)  # type: ignore[arg-type]
    real_next = daemon.run_next_job

    def run_next_job(ignore_backoff: bool = False) -> bool:
        if ignore_backoff and daemon.spool.lease.dir.is_dir():
            # A peer's displaced fence lands now (after the give-back of the failed load).
            lease_mod.fence(daemon.spool.heartbeats, daemon.spool.lease.holder())
        return real_next(ignore_backoff)

    daemon.run_next_job = run_next_job  # type: ignore[method-assign]
    try:
        code = daemon.run(drain=True)
    except Fenced as e:
        pytest.fail(f"--drain crashed on an uncaught Fenced: {e}")
    assert code in (0, 1)
