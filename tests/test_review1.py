"""Review of issue 12's retry, side admission and heartbeat changes: the breaks found.

Each test runs the real `spoold` (and `spoold retry`) as processes on a temp spool, with
faults injected by strace (a rename(2) held back) and the LD_PRELOAD fault shim (fsyncs
that hang, as on a hung NFS mount). Every test here fails on main as of 595b854; the
docstring says what a user sees and what the design promises instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    job_dirs,
    make_config,
    only_job,
    run_spoold,
    state,
    wait_for,
    write_jsonl,
)
from tests.test_fencing import Daemon

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

STALE_S = 2.0


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Every process a test starts is SIGCONTed, SIGKILLed and reaped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            for pid in (*_traced_pids(p), p.pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        p.wait(10)


def _traced_pids(strace: subprocess.Popen[bytes]) -> list[int]:
    """The pids strace started (its children)."""
    try:
        text = Path(f"/proc/{strace.pid}/task/{strace.pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _stop_traced(strace: subprocess.Popen[bytes]) -> None:
    """SIGTERM the daemon under strace (by its pid, not strace's), then reap strace."""
    for pid in _traced_pids(strace):
        os.kill(pid, signal.SIGTERM)
    try:
        strace.wait(30)
    except subprocess.TimeoutExpired:
        for pid in _traced_pids(strace):
            os.kill(pid, signal.SIGKILL)
        strace.kill()
        strace.wait(10)


def _queued_job(spool: Path, n: int) -> str:
    """A job claimed into processing/ (by a short-lived Spool of the test's own, whose
    lease is released at once): its id."""
    from spoold.spool import Spool, classify

    src = write_jsonl(spool / "incoming" / "j.jsonl", [chat(f"r{i}") for i in range(n)])
    setup = Spool(spool, "setup")
    setup.ensure_layout()
    entry = classify(src)
    assert entry is not None
    job_id = setup.claim(entry, n, src.stat().st_size)
    setup.lease.release()
    assert job_id is not None
    return job_id


@needs_strace
def test_a_stalled_owners_late_finish_move_carries_off_a_retried_job(
    tmp_path: Path, faultshim: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    """Design §2 C22 + §6a. Owner `a` files a cancelled job: its terminal state.json
    lands, then it stalls before the move (its rename held back by strace; its
    heartbeat's fsyncs hang, so it goes stale). Peer `b` judges it stale, fences it and
    finishes the move (C9) into failed/. The user runs `spoold retry`: the job is back in
    processing/ under the same id. Then `a` wakes: its move is a plain rename(2) of
    processing/<id> → failed/<id>, not fenced by its lease directory (W3 relies on the
    source never existing again: "the old owner's move fails"). Since retry brought the
    source back, the rename succeeds and carries the *queued* job into failed/.

    Expected: the retried job stays queued and a drain completes it exactly once.
    Observed on main: failed/<id> with status `queued`; no daemon ever runs it, and
    `spoold retry` refuses it ("no failed requests that can be retried")."""
    cfg = make_config(
        tmp_path,
        watch={"settle_seconds": 0.1, "rescan_interval_s": 1},
        heartbeat={"interval_s": 0.2, "stale_after_s": STALE_S},
        processing={"chunk_size": 10, "stop_timeout_s": 5},
    )
    spool = tmp_path / "spool"
    n = 30
    job_id = _queued_job(spool, n)
    job = spool / "processing" / job_id
    (job / "CANCEL").write_bytes(b"")  # filed as cancelled by whoever acquires it first
    stall = tmp_path / "stall"
    held_s = 25
    with open(tmp_path / "a.log", "ab") as out:
        a = subprocess.Popen(
            ["strace", "-f", "-qq", "-o", "/dev/null",
             "-E", f"LD_PRELOAD={faultshim}", "-E", f"FAULTSHIM_STALL_FILE={stall}",
             "-P", str(job), "-e", "trace=rename",
             "-e", f"inject=rename:delay_enter={held_s}s",
             *SPOOLD, "run", "--config", str(cfg), "--instance", "a"],
            stdout=out, stderr=subprocess.STDOUT, env=_env(),
        )  # fmt: skip
    procs.append(a)
    # a's terminal record landed; its move to failed/ is held back from here on.
    wait_for(lambda: state(job)["status"] == "cancelled", 30, "a's terminal state.json")
    held_until = time.monotonic() + held_s
    stall.write_bytes(b"")  # a's heartbeat stops changing: stale after STALE_S
    b = Daemon(cfg, "b")
    procs.append(b.proc)
    failed = spool / "failed" / job_id
    wait_for(failed.is_dir, 20, "b's take-over to finish the move (C9)")
    assert b.stop() == 0

    proc = run_spoold("retry", "--config", str(cfg), job_id, check=True)
    assert "queued again" in proc.stdout
    assert state(job)["status"] == "queued" and not failed.exists()

    # a's held-back rename runs now (it is past its terminal record: nothing fences it).
    time.sleep(max(0.0, held_until - time.monotonic()) + 3)  # its rename has run by now
    stall.unlink()
    _stop_traced(a)

    assert job.is_dir(), (
        f"the retried job left processing/: failed/{job_id} holds it with status "
        f"{state(failed)['status']!r} (a's late finish move took it)"
    )
    run_spoold("run", "--config", str(cfg), "--instance", "b", "--drain", check=True)
    done = only_job(spool, "done")
    assert_exactly_once(done, [f"r{i}" for i in range(n)])


def test_a_retried_job_whose_model_could_not_load_runs_on_the_fixed_model(
    tmp_path: Path,
) -> None:
    """SPEC §5: retry "resumes a ... wholly failed job (model could not load)". The run
    that failed to load recorded `state.model` before the load (runner.run saves it,
    and the give-back keeps it), `_fail_unloadable` files it with that model, and
    `requeue` keeps it; the daemon then picks the job's model from `state.model` first
    (`Daemon._model_of`), never from the fixed config. So a job filed because
    engine.model named a model that cannot load fails again, for ever, after the
    operator fixed engine.model and ran `spoold retry` as the error told them.

    (tests/test_retry.py's own test passes only because its fixed config can load any
    name, the broken one included: it never checks which model ran.)"""
    spool = tmp_path / "spool"
    # The engine refuses any model whose name holds BROKEN (a name that does not exist).
    fake = {"load_fail_marker": "BROKEN"}
    broken = make_config(
        tmp_path,
        engine={"backend": "fake", "model": "BROKEN-model", "fake": fake},
        processing={"max_model_load_attempts": 1, "model_retry_s": 0.1},
    )
    write_jsonl(spool / "incoming" / "j.jsonl", [chat(f"r{i}") for i in range(10)])
    assert run_spoold("run", "--config", str(broken), "--drain").returncode == 1
    failed = only_job(spool, "failed")
    assert "BROKEN-model" in state(failed)["error"]

    fixed = make_config(
        tmp_path,
        engine={"backend": "fake", "model": "good-model", "fake": fake},
        processing={"max_model_load_attempts": 1, "model_retry_s": 0.1},
    )
    run_spoold("retry", "--config", str(fixed), failed.name, check=True)
    proc = run_spoold("run", "--config", str(fixed), "--drain")
    assert proc.returncode == 0, (
        f"the retried job failed again on {state(only_job(spool, 'failed'))['model']!r}, "
        f"not the fixed engine.model 'good-model': {state(only_job(spool, 'failed'))['error']}"
    )
    done = only_job(spool, "done")
    assert state(done)["model"] == "good-model"


def test_a_job_in_an_interrupted_retry_is_still_a_job_to_the_commands(tmp_path: Path) -> None:
    """R1 (design §6a): a `spoold retry` killed after step 1 leaves the job in
    failed/.retry-<id>. `spoold retry` knows to look there, but the commands a user
    reaches for first do not: `spoold jobs` lists no such job and `spool-status <id>`
    says there is none, so the job looks lost, and nothing tells the user that running
    `spoold retry` again is the repair.

    Expected: both show the job (e.g. "retry interrupted: run `spoold retry <id>` again").
    Observed on main: `spoold jobs` omits it; `spool-status <id>` exits non-zero, "no job"."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    job_id = _queued_job(spool, 5)
    (spool / "processing" / job_id / "CANCEL").write_bytes(b"")
    run_spoold("run", "--config", str(cfg), "--drain", check=True)
    failed = only_job(spool, "failed")
    assert state(failed)["status"] == "cancelled"
    # What R1 leaves (step 1 of §6a done, the process killed): the tests of test_retry.py
    # make this with strace; the rename alone is the same state.
    os.rename(failed, spool / "failed" / f".retry-{job_id}")
    assert job_dirs(spool, "processing") == [] and job_dirs(spool, "failed") == []

    listing = run_spoold("jobs", "--config", str(cfg))
    status = subprocess.run(
        [sys.executable, "-m", "spoold.status", "--config", str(cfg), job_id],
        capture_output=True, text=True, env=_env(), timeout=60,
    )  # fmt: skip
    assert job_id in listing.stdout, f"spoold jobs does not list it:\n{listing.stdout}"
    # Its exit code is the spool's health (2 here: the drain's daemon has stopped).
    assert f"run `spoold retry {job_id}` again" in status.stdout, (
        f"spool-status {job_id} exits {status.returncode}: {status.stdout}{status.stderr}"
    )
