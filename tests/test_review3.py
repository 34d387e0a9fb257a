"""Review of "filing a job passes through the mover's lease directory" (design §2 W3,
C22, C23): real `spoold` processes, real faults (tests/faultshim.c: fsyncs that hang,
a SIGKILL at a chosen rename). Each test names what it breaks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faultshim import shim_env
from tests.helpers import (
    SPOOLD,
    _env,
    chat,
    job_dirs,
    make_config,
    only_job,
    run_spoold,
    state,
    wait_for,
    write_jsonl,
)
from tests.test_fencing import Daemon, config, start


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts is SIGKILLed and reaped at the end (as test_fencing)."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def _killed_while_filing(tmp: Path, faultshim: Path, into: str, n: int = 5) -> Path:
    """A real leftover: `spoold run --drain` on its own spool under `tmp`, SIGKILLed by
    the fault shim as it calls rename(2) with `into` in the new path (a filing step).
    Returns that spool."""
    cfg = make_config(tmp)
    spool = tmp / "spool"
    write_jsonl(spool / "incoming" / "left.jsonl", [chat(f"left-{i}") for i in range(n)])
    killed = subprocess.run(
        [*SPOOLD, "run", "--config", str(cfg), "--drain"],
        capture_output=True, text=True, timeout=120,
        env={**_env(), "LD_PRELOAD": str(faultshim), "FAULTSHIM_KILL_RENAME": into},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    return spool


# -- 1. a job parked by a daemon that died is invisible until a daemon starts --------


def test_a_job_parked_by_a_killed_daemon_is_still_a_job_to_jobs_status_and_cancel(
    tmp_path: Path, faultshim: Path
) -> None:
    """Injects: SIGKILL as the daemon renames a finished job from its lease directory
    into done/ (C23), and no daemon runs after (the host's only one crashed, systemd
    has not restarted it yet, or it is a cron --drain). Before the change the job
    stayed in processing/ with its terminal record: `spoold jobs` listed it and
    `spool-status JOB_ID` showed it. Now it sits in heartbeats/.<inst>.<tok>.lease/<id>
    and every command says it does not exist — the user is told their finished job,
    with all its results, is unknown."""
    spool = _killed_while_filing(tmp_path, faultshim, "/done/")
    parked = [p for p in (spool / "heartbeats").glob(".*.lease/*") if p.is_dir()]
    assert len(parked) == 1 and job_dirs(spool, "processing") == [], parked
    job_id = parked[0].name
    cfg = str(tmp_path / "spoold.yaml")

    listed = run_spoold("jobs", "--config", cfg, "--json")
    ids = [json.loads(line).get("id") for line in listed.stdout.splitlines() if line.strip()]
    status = subprocess.run(
        [sys.executable, "-m", "spoold.status", "--config", cfg, job_id],
        capture_output=True, text=True, timeout=60, env=_env(),
    )  # fmt: skip
    cancel = run_spoold("cancel", "--config", cfg, job_id)
    assert job_id in ids, f"`spoold jobs` does not list the parked job:\n{listed.stdout}"
    assert status.returncode == 0 and job_id in status.stdout, (
        f"spool-status {job_id} exited {status.returncode}:\n{status.stdout}{status.stderr}"
    )
    assert "no such job" not in (cancel.stdout + cancel.stderr).lower(), cancel.stderr


# -- 2. Fenced out of take_over: a stalled daemon crashes instead of going on --------


def _stalled_in_repair(a: Daemon, left: Path, spool: Path, stall: Path) -> Path:
    """Hand `a` a C9 leftover (`left`, moved into its processing/) with an interrupted
    write's temp in it, fsyncs hanging: a's take_over (every stale_after_s / 2) judges
    the dead owner, unlinks the temp, then hangs in the fsync of the job directory,
    between judging the job its own and filing it. The job's path in the spool."""
    stray = left / ".state.json.0badc0de.tmp"
    stray.write_bytes(b"{")
    stall.touch()
    job = spool / "processing" / left.name
    left.rename(job)
    stray = job / stray.name
    wait_for(lambda: not stray.exists(), 10, what=f"a to start repairing:\n{a.tail()}")
    return job


def test_a_daemon_fenced_while_it_files_a_dead_peers_finished_job_goes_on(
    tmp_path: Path, daemons: list[Daemon], faultshim: Path
) -> None:
    """Injects: every fsync of daemon `a` hangs (FAULTSHIM_STALL_FILE) while its
    take_over (C9) is repairing a finished job whose owner was SIGKILLed before filing
    it; `b` judges `a` stale and fences it. When the stall ends, `a`'s `_file` finds
    its lease directory gone and raises Fenced, which nothing between take_over and
    run() catches (`_take_over_dead_peers` catches OSError only; `_loop` catches Fenced
    only around run_next_job): `a` exits 1 with a traceback, where a fenced daemon
    goes on as a new incarnation (test_fencing's stalled-commit test). Before the
    change C9 was one plain rename, which never raised Fenced."""
    side = tmp_path / "side"
    side.mkdir()
    # Killed just before the first move (processing/<id> -> <lease>/<id>): a terminal
    # job in processing/ whose owner is dead (C9).
    left_spool = _killed_while_filing(side, faultshim, ".lease/")
    left = only_job(left_spool, "processing")
    assert state(left)["status"] == "completed"

    cfg = config(tmp_path)
    spool = tmp_path / "spool"
    stall, faults = tmp_path / "stall", tmp_path / "faults.log"
    a = start(daemons, cfg, "a", **shim_env(faultshim, _env(), stall_file=stall, log=faults))
    _stalled_in_repair(a, left, spool, stall)
    stalled_beat = a.beat()

    b = start(daemons, cfg, "b")
    wait_for(
        lambda: not list((spool / "heartbeats").glob(".a.*.lease")),
        20,
        what=f"b to fence a:\n{b.tail()}",
    )
    done = wait_for(lambda: (spool / "done" / left.name).is_dir(), 20, what="b to file it")
    assert done
    stall.unlink()  # a's fsync returns: it goes on with its take_over

    wait_for(
        lambda: a.proc.poll() is not None or a.beating_since(stalled_beat),
        20,
        what="a to wake",
    )
    time.sleep(2)
    err = a.err.read_text(errors="replace")
    assert a.proc.poll() is None, f"a exited {a.proc.returncode} once woken:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert state(spool / "done" / left.name)["status"] == "completed"
    assert a.stop() == 0
    assert b.stop() == 0


# -- 3. a parked job that cannot be put back is removed with its lease directory -----


def test_a_parked_job_that_cannot_be_put_back_is_not_removed_with_the_lease_dir(
    tmp_path: Path, faultshim: Path
) -> None:
    """Injects: SIGKILL with a job parked in the daemon's lease directory (C23), then
    a start on a disk with no room for a new entry in processing/ (the shim fails the
    rename into processing/<id> with ENOSPC, as ext4 does when the directory must grow
    a block; EIO from an NFS server is the same). `rescue_parked` logs "cannot put a
    parked job back" and goes on; `remove_fenced` then runs `remove_tree` over the
    fenced lease directory, the job in it: input, results, record, all deleted.
    Design §2 W3 says "a job is never removed"."""
    spool = _killed_while_filing(tmp_path, faultshim, "/done/", n=8)
    parked = [p for p in (spool / "heartbeats").glob(".*.lease/*") if p.is_dir()]
    assert len(parked) == 1, parked
    job_id = parked[0].name
    output = (parked[0] / "output.jsonl").read_bytes()

    full = subprocess.run(
        [*SPOOLD, "run", "--config", str(tmp_path / "spoold.yaml"), "--drain"],
        capture_output=True, text=True, timeout=120,
        env={
            **_env(), "LD_PRELOAD": str(faultshim),
            "FAULTSHIM_FAIL_RENAME": f"/processing/{job_id}", "FAULTSHIM_FAIL_ERRNO": "28",
        },
    )  # fmt: skip
    assert "cannot put a parked job back" in full.stdout + full.stderr, full.stderr[-2000:]
    found = [
        p
        for p in spool.rglob("*")
        if p.is_dir() and p.name.startswith(job_id) and (p / "input.jsonl").exists()
    ]
    assert found, (
        f"job {job_id} (output {len(output)} bytes) is nowhere in the spool after the "
        f"start that could not put it back:\n{full.stdout[-2000:]}{full.stderr[-2000:]}"
    )


# -- 4. a filing that fails between its two moves leaves the job parked for good ----


def test_a_job_whose_filing_meets_a_full_disk_is_filed_once_there_is_room(
    tmp_path: Path, daemons: list[Daemon], faultshim: Path
) -> None:
    """Injects: the rename of a finished job into done/ fails once with ENOSPC (a full
    disk; the shim's FAULTSHIM_FAIL_RENAME, once), then there is room again. Before
    the change the job stayed in processing/ with its terminal record and the next
    take_over (C9, ours) filed it. Now the failed rename is the second move: the job
    is parked in the live daemon's own lease directory; the runner turns the error
    into DiskFull, the daemon waits and goes on, and nothing ever looks in its lease
    directory again until it exits (`release`): the job is neither filed nor listed
    by `spoold jobs`, for as long as the daemon runs (days, under systemd)."""
    cfg = config(tmp_path)
    spool = tmp_path / "spool"
    env = {
        "LD_PRELOAD": str(faultshim),
        "FAULTSHIM_FAIL_RENAME": "/done/", "FAULTSHIM_FAIL_ERRNO": "28",
        "FAULTSHIM_FAIL_TIMES": "1",
    }  # fmt: skip
    a = start(daemons, cfg, "a", **env, FAULTSHIM_LOG=str(tmp_path / "faults.log"))
    write_jsonl(spool / "incoming" / "full.jsonl", [chat(f"full-{i}") for i in range(20)])
    failed = wait_for(
        lambda: [e for e in a.events("disk full; the job will resume from its checkpoint")],
        30,
        what=f"the filing to fail:\n{a.tail()}",
    )
    assert "/done/" in failed[0]["error"], failed
    job_id = failed[0]["job_id"]
    # take_over runs every stale_after_s / 2 (1 s here); the disk has room again.
    filed = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and filed is None:
        filed = job_id if (spool / "done" / job_id).is_dir() else None
        time.sleep(0.2)
    listed = run_spoold("jobs", "--config", str(cfg), "--json")
    still_parked = [p.name for p in (spool / "heartbeats").glob(".a.*.lease/*") if p.is_dir()]
    assert a.proc.poll() is None, a.tail()
    assert filed == job_id, (
        f"{job_id} not filed 15 s after the disk had room; parked in a's lease dir: "
        f"{still_parked}; `spoold jobs`: {listed.stdout!r}\n{a.tail()}"
    )
    assert a.stop() == 0


# -- 5. C9's fence hits whoever owns the job *now*, not the owner that was judged ----


def test_a_repairer_that_stalled_does_not_fence_the_live_daemon_running_the_retried_job(
    tmp_path: Path, daemons: list[Daemon], faultshim: Path
) -> None:
    """Injects: a daemon SIGKILLed between a cancelled job's terminal record and its
    filing (C9 leftover, owner dead); daemon `a` starts to repair it and hangs in an
    fsync (FAULTSHIM_STALL_FILE, 3 s, shorter than stale_after_s: `a` is never stale).
    Meanwhile `b` files the job, the user runs `spoold retry`, and `b` runs it again.
    `_repair_job` judged the owner from one read of owner.json (`_ours_to_repair`:
    the dead one) but fences the holder of a second read after the stall: `b`, alive
    and beating all along, is fenced in the middle of the job it legitimately runs,
    and `a` moves that running job into its own lease directory and back."""
    side = tmp_path / "side"
    side.mkdir()
    side_cfg = make_config(
        side,
        processing={"chunk_size": 5},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.05, "batch_size": 5}},
    )
    left_spool = side / "spool"
    write_jsonl(left_spool / "incoming" / "again.jsonl", [chat(f"again-{i}") for i in range(80)])
    killer = subprocess.Popen(
        [*SPOOLD, "run", "--config", str(side_cfg)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**_env(), "LD_PRELOAD": str(faultshim), "FAULTSHIM_KILL_RENAME": ".lease/"},
    )  # fmt: skip
    try:
        left = wait_for(
            lambda: [
                j for j in job_dirs(left_spool, "processing") if state(j)["checkpoint"]["completed"]
            ],
            30,
            what="the side job to commit",
        )[0]
        assert run_spoold("cancel", "--config", str(side_cfg), left.name).returncode == 0
        assert killer.wait(30) == -signal.SIGKILL
    finally:
        if killer.poll() is None:
            killer.kill()
            killer.wait()
    assert state(left)["status"] == "cancelled"

    cfg = make_config(
        tmp_path,
        watch={"settle_seconds": 0.1, "rescan_interval_s": 1},
        heartbeat={"interval_s": 0.2, "stale_after_s": 8},
        processing={"chunk_size": 5, "stop_timeout_s": 10},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.05, "batch_size": 5}},
    )
    spool = tmp_path / "spool"
    stall = tmp_path / "stall"
    a = start(daemons, cfg, "a", **shim_env(faultshim, _env(), stall_file=stall))
    job = _stalled_in_repair(a, left, spool, stall)
    stalled_at = time.monotonic()

    b = start(daemons, cfg, "b")
    wait_for(lambda: (spool / "failed" / left.name).is_dir(), 10, what="b to file the job")
    retried = run_spoold("retry", "--config", str(cfg), left.name)
    assert retried.returncode == 0, retried.stderr
    wait_for(
        lambda: (
            json.loads((job / "owner.json").read_text()).get("instance") == "b"
            if (job / "owner.json").exists()
            else False
        ),
        10,
        what="b to run the retried job",
    )
    assert time.monotonic() - stalled_at < 6, "too slow: a would be stale by now"
    stall.unlink()  # a wakes, in the middle of its repair

    done = wait_for(lambda: (spool / "done" / left.name).is_dir(), 60, what="the job to finish")
    assert done
    time.sleep(1)
    assert not b.events("fenced"), (
        f"b, alive and beating, was fenced by a's stale judgement:\n{b.tail()}"
    )
    assert a.stop() == 0
    assert b.stop() == 0
