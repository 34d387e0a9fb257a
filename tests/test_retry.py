"""`spoold retry` on a cancelled or wholly failed job: back in the queue under the same
id, resuming from its checkpoint (SPEC §5, design §6a); an interrupted retry (R1) is
finished by running it again."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    drain,
    job_dirs,
    make_config,
    only_job,
    read_results,
    run_spoold,
    start_spoold,
    state,
    wait_for,
    write_jsonl,
)


def _cancelled_mid_job(tmp_path: Path, n: int) -> tuple[Path, Path, bytes]:
    """A job cancelled after a few commits: (config, its dir in failed/, output bytes)."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 20},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.005, "batch_size": 10}},
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "long.jsonl", [chat(f"r{i}") for i in range(n)])
    daemon = start_spoold("run", "--config", str(cfg), "--drain")
    try:
        job = wait_for(
            lambda: next(
                (
                    j
                    for j in job_dirs(spool, "processing")
                    if state(j)["request_counts"]["completed"] >= 60
                ),
                None,
            ),
            what="60 committed requests",
        )
        run_spoold("cancel", "--config", str(cfg), job.name, check=True)
        assert daemon.wait(30) == 0
    finally:
        daemon.kill()
        daemon.wait()
    failed = only_job(spool, "failed")
    assert state(failed)["status"] == "cancelled"
    return cfg, failed, (failed / "output.jsonl").read_bytes()


def test_a_cancelled_job_resumes_under_its_id_from_its_checkpoint(tmp_path: Path) -> None:
    n = 600
    cfg, failed, committed = _cancelled_mid_job(tmp_path, n)
    spool = tmp_path / "spool"
    done_at_cancel = state(failed)["request_counts"]["completed"]
    assert 60 <= done_at_cancel < n

    proc = run_spoold("retry", "--config", str(cfg), failed.name, check=True)
    assert f"job {failed.name} is queued again" in proc.stdout
    assert f"({done_at_cancel} of {n} requests done)" in proc.stdout
    queued = spool / "processing" / failed.name
    st = state(queued)
    assert st["status"] == "queued" and st["error"] is None and st["finished_at"] is None
    assert st["retries"] == 1
    assert not (queued / "CANCEL").exists() and not (queued / "owner.json").exists()
    assert list((spool / "incoming").iterdir()) == []  # no new job: the same one
    assert not failed.exists()

    drain(cfg)
    done = only_job(spool, "done")
    assert done.name == failed.name
    st = state(done)
    assert st["status"] == "completed"
    assert st["request_counts"] == {"total": n, "completed": n, "failed": 0}
    out = (done / "output.jsonl").read_bytes()
    assert out.startswith(committed)  # nothing committed was redone, nor rewritten
    assert_exactly_once(done, [f"r{i}" for i in range(n)])
    assert sorted(p.name for p in done.iterdir()) == [
        "errors.jsonl",
        "input.jsonl",
        "output.jsonl",
        "owner.json",
        "state.json",
    ]
    owner = json.loads((done / "owner.json").read_text())
    assert owner["generation"] > 1  # the next owner generation, not a fresh job


def test_a_job_whose_model_could_not_load_runs_once_the_config_is_fixed(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "spool"
    broken = make_config(
        tmp_path,
        engine={"backend": "fake", "model": "BROKEN-model", "fake": {"load_fail_marker": "BROKEN"}},
        processing={"max_model_load_attempts": 1, "model_retry_s": 0.1},
    )
    write_jsonl(spool / "incoming" / "j.jsonl", [chat(f"r{i}") for i in range(30)])
    proc = run_spoold("run", "--config", str(broken), "--drain")
    assert proc.returncode == 1
    failed = only_job(spool, "failed")
    assert state(failed)["status"] == "failed" and "BROKEN-model" in state(failed)["error"]

    fixed = make_config(tmp_path, engine={"backend": "fake", "model": "good-model"})
    run_spoold("retry", "--spool", str(spool), failed.name, check=True)  # --spool alone
    drain(fixed)
    done = only_job(spool, "done")
    assert done.name == failed.name and state(done)["status"] == "completed"
    assert_exactly_once(done, [f"r{i}" for i in range(30)])


def test_a_job_rejected_at_admission_is_not_requeued(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, limits={"max_requests_per_job": 2})
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "big.jsonl", [chat(f"r{i}") for i in range(5)])
    drain(cfg)
    failed = only_job(spool, "failed")
    proc = run_spoold("retry", "--config", str(cfg), failed.name)
    assert proc.returncode == 1
    assert "rejected before it was queued" in proc.stderr
    assert "max_requests_per_job" in proc.stderr and "submit it again" in proc.stderr
    assert only_job(spool, "failed") == failed and job_dirs(spool, "processing") == []


def test_two_retries_of_one_job_requeue_it_once(tmp_path: Path) -> None:
    cfg, failed, _ = _cancelled_mid_job(tmp_path, 300)
    procs = [
        subprocess.Popen(
            [*SPOOLD, "retry", "--config", str(cfg), failed.name],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(2)
    ]
    results = [(p.wait(30), *p.communicate()) for p in procs]
    assert sum(code == 0 for code, _, _ in results) >= 1
    for code, _out, err in results:
        assert code == 0 or "moved meanwhile" in err or "still in processing/" in err
    spool = tmp_path / "spool"
    assert job_dirs(spool, "failed") == [] and list((spool / "failed").iterdir()) == []
    assert state(spool / "processing" / failed.name)["retries"] == 1


needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


@needs_strace
@pytest.mark.parametrize("killed_at_rename", [2, 3])
def test_an_interrupted_retry_is_completed_by_running_it_again_r1(
    tmp_path: Path, killed_at_rename: int
) -> None:
    """R1: `spoold retry` SIGKILLed (by strace, at its real rename(2) calls) after it
    took the job aside: before the new state.json landed (the 2nd rename) or before the
    move into processing/ (the 3rd). The job is in no job directory, so nothing runs it;
    `spoold retry` again finishes the steps, and the job then completes exactly once."""
    cfg, failed, committed = _cancelled_mid_job(tmp_path, 300)
    spool = tmp_path / "spool"
    killed = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null",
         "-e", f"inject=rename:signal=KILL:when={killed_at_rename}",
         *SPOOLD, "retry", "--config", str(cfg), failed.name],
        capture_output=True, text=True, timeout=60,
        env={**_env(), "PYTHONDONTWRITEBYTECODE": "1"},  # no .pyc renames to count
    )  # fmt: skip
    assert killed.returncode != 0
    staging = spool / "failed" / f".retry-{failed.name}"
    assert staging.is_dir() and not failed.exists()
    assert job_dirs(spool, "processing") == []

    proc = run_spoold("retry", "--config", str(cfg), failed.name, check=True)
    assert "interrupted" in proc.stdout and "queued again" in proc.stdout
    assert not staging.exists()
    assert state(spool / "processing" / failed.name)["retries"] == 1
    time.sleep(0.05)
    drain(cfg)
    done = only_job(spool, "done")
    assert (done / "output.jsonl").read_bytes().startswith(committed)
    assert_exactly_once(done, [f"r{i}" for i in range(300)])
    assert len(read_results(done, "output.jsonl")) == 300
