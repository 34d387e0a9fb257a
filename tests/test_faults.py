"""SPEC §3 "Every line accounted for, whatever happens": faults injected for real.

Config drift between runs, a ledger gap, a model that cannot load, requests that kill
the engine (the process, or only the engine), an input still being written after its
claim, results too big for memory, transient I/O errors (strace's syscall fault
injection), a stop that outlasts its timeout. Real `spoold` processes on real files;
design.md names the crash points (C12–C18) these cover.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests import rusage
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
    state,
    wait_for,
    write_jsonl,
)
from tests.test_crash import _assert_counts, _ids, _requests, _stage_job_dir
from tests.test_daemon import Daemon, start
from tests.test_daemon import daemons as daemons

STATUS = str(Path(sys.executable).parent / "spool-status")


def _committed(spool: Path, at_least: int) -> Path:
    """The job in processing/ once a checkpoint shows `at_least` results."""

    def seen() -> Path | None:
        for d in job_dirs(spool, "processing"):
            try:
                if state(d)["checkpoint"]["completed"] >= at_least:
                    return d
            except (OSError, ValueError, KeyError):
                continue
        return None

    found: Path = wait_for(seen, what=f"a checkpoint with {at_least} results")
    return found


def _stop_part_way(daemons: list[Daemon], cfg: Path, at_least: int) -> Path:
    """Run a live daemon until `at_least` results are committed, then SIGTERM it."""
    d = start(daemons, cfg)
    job = _committed(cfg.parent / "spool", at_least)
    assert d.terminate() == 0
    return job


# -- the ledger ------------------------------------------------------------------------


def test_config_drift_between_runs_never_drops_a_line(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """A job stopped part-way, resumed with a lower limits.max_line_bytes and an alias
    that now names another model: the lines judged differently become error lines with
    the reason; done/ shows every one of the 300 lines, total never rewritten."""
    fake = {"delay_per_request_s": 0.01, "batch_size": 10}
    first = {"chunk_size": 20}
    cfg = make_config(
        tmp_path, processing=first, engine={"fake": fake, "models": {"m2": "fake-model"}}
    )
    spool = tmp_path / "spool"
    records: list[dict[str, Any]] = [chat(f"r{i:03d}", f"q {i}") for i in range(276)]
    records += [chat(f"m{i}", "aliased", model="m2") for i in range(5)]
    records += [chat(f"long{i:02d}", "x" * 3000) for i in range(19)]
    write_jsonl(spool / "incoming" / "drift.jsonl", records)
    job = _stop_part_way(daemons, cfg, at_least=20)
    assert state(job)["checkpoint"]["completed"] < 276, "the job ran too far to test drift"

    make_config(
        tmp_path,
        processing={"chunk_size": 7},
        limits={"max_line_bytes": 2000},
        engine={"fake": {}, "models": {"m2": "another-model"}},
    )
    drain(cfg)
    done = only_job(spool, "done")
    st = _assert_counts(done)
    assert st["status"] == "completed"
    assert st["request_counts"] == {"total": 300, "completed": 276, "failed": 24}
    assert_exactly_once(done, _ids(records))
    errors = {e["custom_id"]: e["error"] for e in read_results(done, "errors.jsonl")}
    for i in range(19):
        e = errors[f"long{i:02d}"]
        assert e["code"] == "line_too_long" and "limits.max_line_bytes" in e["message"]
    for i in range(5):
        e = errors[f"m{i}"]
        assert e["code"] == "model_mismatch" and "another-model" in e["message"]


def test_a_gap_in_the_books_is_loud_never_completed(tmp_path: Path, daemons: list[Daemon]) -> None:
    """A checkpoint that claims a line as finished that no result file holds (a record
    corrupted, or a bug) does not make a completed job: it goes to failed/ saying how
    many lines are unaccounted for, its results kept (design §5b)."""
    fake = {"delay_per_request_s": 0.01, "batch_size": 10}
    cfg = make_config(tmp_path, processing={"chunk_size": 20}, engine={"fake": fake})
    spool = tmp_path / "spool"
    records = [chat(f"r{i:03d}") for i in range(200)]
    write_jsonl(spool / "incoming" / "gap.jsonl", records)
    job = _stop_part_way(daemons, cfg, at_least=20)
    raw = json.loads((job / "state.json").read_text())
    ck = raw["checkpoint"]
    assert ck["next_line"] < 150
    ck["done_lines"] = sorted({*ck["done_lines"], 180})  # says line 180 is done: it is not
    (job / "state.json").write_text(json.dumps(raw))

    make_config(tmp_path, processing={"chunk_size": 20}, engine={"fake": {}})
    drain(cfg)
    assert job_dirs(spool, "done") == []
    failed = only_job(spool, "failed")
    st = state(failed)
    assert st["status"] == "failed"
    assert "1 of 200 input lines are unaccounted for" in st["error"], st["error"]
    assert "180" in st["error"]
    assert st["request_counts"]["total"] == 200
    assert st["request_counts"]["completed"] == 199
    outputs = {r["custom_id"] for r in read_results(failed, "output.jsonl")}
    assert outputs == _ids(records) - {"r179"}, "the results are kept"


# -- a model that cannot load ----------------------------------------------------------


def _unloadable_config(tmp_path: Path, **processing: Any) -> Path:
    return make_config(
        tmp_path,
        engine={
            "models": {"missing": "no-such-model-MISSING"},
            "fake": {"load_fail_marker": "MISSING", "delay_per_request_s": 0.002},
        },
        processing={"model_retry_s": 0.3, "max_model_load_attempts": 3, **processing},
    )


def _drop_bad_then_good(spool: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    bad = [chat(f"b{i}", model="missing") for i in range(5)]
    good = [chat(f"g{i}") for i in range(50)]
    write_jsonl(spool / "incoming" / "a_bad.jsonl", bad)
    write_jsonl(spool / "incoming" / "b_good.jsonl", good)
    now = time.time_ns()
    os.utime(spool / "incoming" / "a_bad.jsonl", ns=(now - 2_000_000_000,) * 2)
    return bad, good


def test_an_unloadable_model_wedges_nothing_under_a_live_daemon(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """The first job's model cannot load: the daemon stays up, runs the good job behind
    it, says so in its heartbeat (spool-status degraded, naming the model), retries
    with backoff, then files the bad job in failed/ naming the model and the error."""
    cfg = _unloadable_config(tmp_path, model_retry_s=1.0)
    spool = tmp_path / "spool"
    _, good = _drop_bad_then_good(spool)
    d = start(daemons, cfg)

    def good_done() -> Path | None:
        jobs = [j for j in job_dirs(spool, "done") if state(j)["source_name"] == "b_good.jsonl"]
        return jobs[0] if jobs else None

    done = wait_for(good_done, what="the good job to complete")
    assert_exactly_once(done, _ids(good))

    def said() -> bool:
        beat = json.loads((spool / "heartbeats" / "default.json").read_text())
        return any("no-such-model-MISSING" in p for p in beat.get("problems") or [])

    wait_for(said, what="the heartbeat to name the model")  # while it is retried
    status = subprocess.run(
        [STATUS, "--config", str(cfg)], capture_output=True, text=True, timeout=30, env=_env()
    )
    if job_dirs(spool, "failed") == []:  # still retrying: degraded, naming the model
        assert status.returncode == 1, status.stdout
        assert "no-such-model-MISSING" in status.stdout

    failed = wait_for(lambda: job_dirs(spool, "failed"), what="the bad job to fail")[0]
    st = state(failed)
    assert st["source_name"] == "a_bad.jsonl" and st["status"] == "failed"
    assert "no-such-model-MISSING" in st["error"] and "3 attempts" in st["error"], st["error"]
    assert "load_fail_marker" in st["error"], "the last load error is named"
    assert d.proc.poll() is None, "the daemon must not exit for a model that cannot load"
    log = d.log.read_text()
    assert log.count('"cannot load model"') == 3, "three loads, with backoff between them"

    # A job for that model dropped later gets a round of loads of its own (the cause,
    # a network or a path, may have been fixed meanwhile); it fails the same way.
    write_jsonl(spool / "incoming" / "c_bad_again.jsonl", [chat("again", model="missing")])
    wait_for(lambda: len(job_dirs(spool, "failed")) == 2, what="the second bad job to fail")
    assert d.terminate() == 0
    assert d.log.read_text().count('"cannot load model"') == 6


def test_an_unloadable_model_under_drain_fails_its_jobs_and_exits_1(tmp_path: Path) -> None:
    cfg = _unloadable_config(tmp_path, model_retry_s=30)  # --drain does not wait it out
    spool = tmp_path / "spool"
    _, good = _drop_bad_then_good(spool)
    started = time.monotonic()
    proc = run_spoold("run", "--config", str(cfg), "--drain", timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - started < 25, "--drain waited for the backoff"
    assert_exactly_once(only_job(spool, "done"), _ids(good))
    st = state(only_job(spool, "failed"))
    assert "no-such-model-MISSING" in st["error"]
    assert st["request_counts"]["completed"] == 0


# -- requests that kill the engine -----------------------------------------------------


def _supervise(cfg: Path, spool: Path, limit: int = 40) -> int:
    """Run `spoold run` as systemd would (Restart=on-failure) until processing/ is
    empty; returns the number of restarts."""
    log = cfg.parent / "daemon.log"
    restarts = 0
    while True:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*SPOOLD, "run", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT,
                env=_env(),
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 120
            while proc.poll() is None and time.monotonic() < deadline:
                if job_dirs(spool, "done") and not job_dirs(spool, "processing"):
                    proc.send_signal(signal.SIGTERM)
                    assert proc.wait(30) == 0
                    return restarts
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert proc.returncode != 0
        restarts += 1
        assert restarts <= limit, f"more than {limit} restarts"


@pytest.mark.slow
def test_a_request_that_kills_the_process_costs_a_dozen_restarts_not_the_job(
    tmp_path: Path,
) -> None:
    """A crash-marker request inside a 2,000-request job, the daemon restarted like
    systemd restarts it: 1,999 results, one engine_crash line, about log2(2000) + 2
    restarts (design §5a: only the crashing half is split; two strikes alone)."""
    cfg = make_config(tmp_path, engine={"fake": {"crash_marker": "<<CRASH>>", "batch_size": 64}})
    spool = tmp_path / "spool"
    records = _requests("r", 2000)
    records[1234] = chat("r-1234", "this one <<CRASH>>es the GPU")
    write_jsonl(spool / "incoming" / "poison.jsonl", records)
    restarts = _supervise(cfg, spool)
    assert restarts <= 14, f"{restarts} restarts to isolate one request"
    done = only_job(spool, "done")
    st = _assert_counts(done)
    assert st["request_counts"] == {"total": 2000, "completed": 1999, "failed": 1}
    assert_exactly_once(done, _ids(records))
    (err,) = read_results(done, "errors.jsonl")
    assert err["custom_id"] == "r-1234" and err["error"]["code"] == "engine_crash"


def test_an_engine_that_dies_in_process_is_reloaded_and_its_culprit_isolated(
    tmp_path: Path,
) -> None:
    """The engine dies under the daemon (vLLM's engine core exiting; the fake engine's
    die_marker): one `--drain` reloads it, bisects the requests it held, dead-letters
    the culprit alone and completes the rest, exit 0 (design §5a, in-process)."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 100},
        engine={"fake": {"die_marker": "<<DIE>>", "batch_size": 16}},
    )
    spool = tmp_path / "spool"
    records = _requests("r", 500)
    records[321] = chat("r-321", "this one makes the engine <<DIE>>")
    write_jsonl(spool / "incoming" / "dies.jsonl", records)
    proc = drain(cfg)
    done = only_job(spool, "done")
    st = _assert_counts(done)
    assert st["request_counts"] == {"total": 500, "completed": 499, "failed": 1}
    assert_exactly_once(done, _ids(records))
    (err,) = read_results(done, "errors.jsonl")
    assert err["custom_id"] == "r-321" and err["error"]["code"] == "engine_crash"
    reloads = proc.stdout.count("reloading the engine after its death")
    assert 2 <= reloads <= 8, f"{reloads} reloads for a batch of 16 suspects"


# -- the input is frozen at the claim --------------------------------------------------


def _running_slowly(
    tmp_path: Path, daemons: list[Daemon], name: str, records: list[dict[str, Any]]
) -> tuple[Daemon, Path]:
    """A live daemon running `records` slowly; returns once 20 are committed."""
    fake = {"delay_per_request_s": 0.01, "batch_size": 10}
    cfg = make_config(
        tmp_path,
        watch={"settle_seconds": 0.4},
        processing={"chunk_size": 20},
        engine={"fake": fake},
    )
    write_jsonl(tmp_path / "spool" / "incoming" / name, records)
    d = start(daemons, cfg)
    return d, _committed(tmp_path / "spool", 20)


def test_an_upload_that_stalls_past_settle_is_restarted_once_it_settles(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """An scp that stalls longer than settle_seconds, then writes on: the job claimed
    early commits nothing from the changed file, waits for it to settle, and runs it
    again from the start: every line of the final file answered exactly once."""
    part1 = [chat(f"a{i:03d}") for i in range(100)]
    part2 = [chat(f"b{i:03d}") for i in range(60)]
    d, job = _running_slowly(tmp_path, daemons, "stalled.jsonl", part1)  # upload stalls
    spool = tmp_path / "spool"
    with open(job / "input.jsonl", "a", encoding="utf-8") as f:  # the scp writes on
        for r in part2:
            f.write(json.dumps(r) + "\n")
    done = wait_for(lambda: job_dirs(spool, "done"), timeout=60, what="the job to finish")[0]
    assert d.terminate() == 0
    st = _assert_counts(done)
    assert st["request_counts"] == {"total": 160, "completed": 160, "failed": 0}
    assert_exactly_once(done, _ids(part1 + part2))
    assert "the input changed after the claim" in d.log.read_text()


def test_an_input_rewritten_in_place_with_its_mtime_put_back_is_noticed(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Same size, mtime restored with os.utime, one answered line changed: the ctime
    recorded at validation tells (design §5c); the job restarts from the start, and
    done/ answers the file as it is now, every line exactly once."""
    records = [chat(f"a{i:03d}") for i in range(120)]
    d, job = _running_slowly(tmp_path, daemons, "rewritten.jsonl", records)  # line 1 done
    spool = tmp_path / "spool"
    path = job / "input.jsonl"
    before = path.stat()
    data = path.read_bytes()
    changed = data.replace(b'"a000"', b'"X000"', 1)
    assert len(changed) == len(data)
    with open(path, "r+b") as f:
        f.write(changed)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    done = wait_for(lambda: job_dirs(spool, "done"), timeout=60, what="the job to finish")[0]
    assert d.terminate() == 0
    final = [chat("X000"), *records[1:]]
    assert_exactly_once(done, _ids(final))
    assert "a000" not in {r["custom_id"] for r in read_results(done, "output.jsonl")}
    assert "the input changed after the claim" in d.log.read_text()


# -- memory bounded in bytes -----------------------------------------------------------


def _max_rss_kib(cfg: Path) -> int:
    usage = rusage.measure([*SPOOLD, "run", "--config", str(cfg), "--drain"], env=_env())
    assert usage.returncode == 0
    return usage.maxrss_kib


@pytest.mark.slow
def test_a_chunk_of_long_results_commits_by_bytes(tmp_path: Path) -> None:
    """1,500 requests with 128 choices each (~1.5 MB of results per 100 requests) in one
    5,000-request chunk (40 MB of output.jsonl): with processing.max_chunk_bytes 1 MiB
    the daemon's peak memory is what draining an empty spool takes, plus a few MiB;
    with the cap out of the way it buffers the whole chunk (the measurement can tell)."""
    records = [chat(f"r{i}", f"question {i}", n=128) for i in range(1500)]
    (tmp_path / "empty").mkdir()
    empty = make_config(tmp_path / "empty")
    rss = {"empty": _max_rss_kib(empty)}
    for label, cap in (("bounded", 1 << 20), ("unbounded", 1 << 30)):
        root = tmp_path / label
        root.mkdir()
        cfg = make_config(root, processing={"chunk_size": 5000, "max_chunk_bytes": cap})
        write_jsonl(root / "spool" / "incoming" / "long.jsonl", records)
        rss[label] = _max_rss_kib(cfg)
        job = only_job(root / "spool", "done")
        assert_exactly_once(job, _ids(records))
        total = (job / "output.jsonl").stat().st_size
    assert total > 30 << 20, "the results should be big enough to tell"
    # Measured here (KiB): empty ~36,000, bounded ~44,000, unbounded ~82,000.
    assert rss["unbounded"] - rss["empty"] > (total >> 10) // 2, ("no buffering seen", rss)
    assert rss["bounded"] - rss["empty"] < 16 << 10, rss


# -- transient I/O errors and stops ----------------------------------------------------

needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


@needs_strace
def test_transient_io_errors_wait_a_backoff_and_burn_no_attempt(tmp_path: Path) -> None:
    """EIO on reads of input.jsonl (strace injects it into the real read(2) calls, as a
    flaky NFS mount returns it): with processing.max_job_attempts 1, the job is neither
    quarantined nor retried in a tight loop; it completes once the errors pass."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 50, "max_job_attempts": 1, "io_retry_s": 0.3},
        engine={"fake": {}},
    )
    spool = tmp_path / "spool"
    records = _requests("r", 300)
    content = b"".join(json.dumps(r).encode() + b"\n" for r in records)
    job = spool / "processing" / "flaky-20261201T000000-abcdef"
    _stage_job_dir(job, "flaky.jsonl", content, job.name)
    proc = subprocess.run(
        ["strace", "-f", "-qq", "-o", "/dev/null", "-P", str(job / "input.jsonl"),
         "-e", "trace=read", "-e", "inject=read:error=EIO:when=2..4",
         *SPOOLD, "run", "--config", str(cfg), "--drain"],
        capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:]
    done = only_job(spool, "done")
    st = _assert_counts(done)
    assert st["request_counts"]["completed"] == 300
    assert_exactly_once(done, _ids(records))
    events = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    io_errors = [e for e in events if e.get("event") == "job run hit an I/O error"]
    assert io_errors, "the injected EIO never reached the daemon"
    assert all(e["retry_in_s"] >= 0 for e in io_errors)
    starts = [e for e in events if e.get("event") == "job started"]
    assert len(starts) == len(io_errors) + 1
    assert all(e["attempt"] == 1 for e in starts), "an I/O error counted as a crash attempt"


def test_a_stop_that_outlasts_stop_timeout_is_not_a_crash(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """SIGTERM during an engine batch longer than processing.stop_timeout_s: exit 0, and
    the job's attempt is given back (status queued, attempts 0, no crash evidence)."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 1000, "stop_timeout_s": 1, "max_job_attempts": 1},
        engine={"fake": {"delay_per_request_s": 0.05, "batch_size": 100}},
    )
    spool = tmp_path / "spool"
    records = [chat(f"r{i}") for i in range(300)]
    write_jsonl(spool / "incoming" / "slow.jsonl", records)
    d = start(daemons, cfg)

    def running() -> Path | None:
        jobs = job_dirs(spool, "processing")
        return jobs[0] if jobs and state(jobs[0])["status"] == "running" else None

    job = wait_for(running, what="the job to run")
    time.sleep(0.5)
    t0 = time.monotonic()
    assert d.terminate() == 0
    assert time.monotonic() - t0 < 1 + 5
    st = state(job)
    assert st["status"] == "queued" and st["attempts"] == 0, st
    assert st["fed_through"] == 0 and not st["isolation"]["trying"]
    make_config(tmp_path, processing={"max_job_attempts": 1}, engine={"fake": {}})
    drain(cfg)  # with max_job_attempts 1, a counted attempt would have quarantined it
    assert_exactly_once(only_job(spool, "done"), _ids(records))
