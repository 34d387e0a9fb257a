"""Crash and kill tests: the real `spoold` in subprocesses, real SIGKILLs, real crash states.

Two kinds of test (SPEC §3 "Processing, durability and resume", docs/design.md):

- kill tests start `spoold run --drain`, SIGKILL it (or let the fake engine's crash
  marker `os._exit` it) at some point, and check that the next runs finish the job
  exactly once, without rewriting a committed byte;
- recovery tests build on disk exactly what a crash between two protocol steps leaves
  (docs/design.md names these crash points C1–C9; each test's docstring says which it
  covers), run a drain, and check the end state.

Nothing is mocked: the daemon runs as a process on a spool in a temp dir.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spoold.job import JobState, new_job_id, utcnow
from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    beating,
    chat,
    completion,
    drain,
    job_dirs,
    make_config,
    only_job,
    read_results,
    run_spoold,
    state,
    write_jsonl,
)

LINE_RE = re.compile(r"\bline (\d+)\b")


# -- helpers -------------------------------------------------------------------------


def _spawn(config: Path, log: Path) -> subprocess.Popen[bytes]:
    """Start `spoold run --drain` in the background, its output appended to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [*SPOOLD, "run", "--config", str(config), "--drain"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )


def _sigkill(proc: subprocess.Popen[bytes]) -> int:
    """SIGKILL the daemon (if it is still running) and reap it; returns its exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    return proc.wait(timeout=30)


def _wait_for_heartbeat_of(spool: Path, proc: subprocess.Popen[bytes]) -> None:
    """Until `proc` has written its heartbeat (it has recovered and is working)."""
    path = spool / "heartbeats" / "default.json"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if json.loads(path.read_text()).get("pid") == proc.pid:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.01)


def _requests(prefix: str, n: int) -> list[dict[str, Any]]:
    """`n` valid requests, chat and completions mixed."""
    return [
        completion(f"{prefix}-{i}", f"prompt {i}")
        if i % 3 == 0
        else chat(f"{prefix}-{i}", f"question {i}", max_tokens=4 + i % 40)
        for i in range(n)
    ]


def _ids(records: list[dict[str, Any]]) -> set[str]:
    return {r["custom_id"] for r in records}


def _kill_after_commit(
    config: Path, spool: Path, log: Path, min_completed: int, then_s: float = 0.0
) -> tuple[Path, dict[str, Any]]:
    """Run a drain, SIGKILL it once a checkpoint shows `min_completed` results (then
    `then_s` more seconds, to land mid-chunk); returns the job dir and its state."""
    proc = _spawn(config, log)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"spoold exited {proc.returncode} before the kill"
            seen = 0
            for d in job_dirs(spool, "processing"):
                try:
                    seen = max(seen, state(d)["request_counts"]["completed"])
                except (OSError, ValueError):
                    continue  # moved or being replaced right now
            if seen >= min_completed:
                break
            time.sleep(0.003)
        else:
            raise AssertionError(f"no checkpoint with {min_completed} results within 20 s")
        time.sleep(then_s)
    finally:
        rc = _sigkill(proc)
    assert rc == -signal.SIGKILL, f"spoold was not killed mid-job (exit status {rc})"
    job = only_job(spool, "processing")
    return job, state(job)


def _error_lines(job: Path) -> dict[int, str | None]:
    """errors.jsonl as {line number named in the message: custom_id}; each line once."""
    errors = read_results(job, "errors.jsonl")
    numbers: list[int] = []
    by_line: dict[int, str | None] = {}
    for e in errors:
        match = LINE_RE.search(e["error"]["message"])
        assert match, f"error message does not name the line: {e['error']['message']!r}"
        numbers.append(int(match.group(1)))
        by_line[int(match.group(1))] = e["custom_id"]
    twice = {n: c for n, c in Counter(numbers).items() if c > 1}
    assert not twice, f"input lines with more than one errors.jsonl line: {twice}"
    return by_line


def _assert_counts(job: Path) -> dict[str, Any]:
    """state.json's request_counts agree with the result files (SPEC §4)."""
    st = state(job)
    counts = st["request_counts"]
    assert counts["completed"] == len(read_results(job, "output.jsonl"))
    assert counts["failed"] == len(read_results(job, "errors.jsonl"))
    assert counts["total"] == counts["completed"] + counts["failed"]
    return st


def _stage_job_dir(
    d: Path, source_name: str, content: bytes, job_id: str, **fields: Any
) -> dict[str, Any]:
    """What claim steps 1–3 write: state.json (queued, counted) and input.jsonl."""
    d.mkdir(parents=True)
    st = JobState(id=job_id, source_name=source_name, file_bytes=len(content)).to_dict()
    st["request_counts"]["total"] = sum(1 for line in content.splitlines() if line.strip())
    st.update(fields)
    (d / "state.json").write_text(json.dumps(st, indent=2, sort_keys=True) + "\n")
    (d / "input.jsonl").write_bytes(content)
    return st


def _no_leftovers(spool: Path) -> None:
    """No staging dirs, no jobs left in processing/, no stray temp files anywhere."""
    assert list((spool / "processing").iterdir()) == []
    stray = [p for p in spool.rglob(".*") if p.name.endswith(".tmp")]
    assert stray == [], f"stray temp files: {stray}"
    left = [p for p in (spool / "failed").iterdir() if p.name.startswith(".")]
    assert left == [], f"reject staging dirs left: {left}"


# -- 1. many SIGKILLs ----------------------------------------------------------------


def _input_places(spool: Path, name: str) -> list[Path]:
    """Every place the dropped file `name` may be: incoming/, a claim dir, a job dir."""
    places = [spool / "incoming" / name]
    for where in ("processing", "done", "failed"):
        base = spool / where
        if base.is_dir():
            places += [d / "input.jsonl" for d in base.iterdir() if d.is_dir()]
    return [p for p in places if p.exists()]


@pytest.mark.slow
def test_sigkill_many_times_exactly_once(tmp_path: Path) -> None:
    """SIGKILL `spoold run --drain` ~30 times at random moments (start-up, claim,
    validation, mid-chunk, between sync and checkpoint), then drain: every valid
    custom_id exactly once, every invalid line exactly one errors line, both files
    parse, counts agree, committed bytes never rewritten.

    Covers, wherever the kills land: C1–C4 (claim), C5 (validation), C6/C7 (torn or
    synced-but-uncommitted tails are truncated and redone), C8 (resume from checkpoint),
    C9 (killed between the terminal state and the move). After each kill the dropped
    file is in exactly one place and the job keeps one id.
    """
    chunk, batch = 97, 16
    # The brief's 0.3 ms/request finishes all 4,000 requests within ~4 kills on a fast
    # machine; 2.5 ms/request (40 ms per engine batch) keeps the job alive for ~30 kills.
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": chunk, "max_job_attempts": 1000},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.0025, "batch_size": batch}},
    )
    spool = tmp_path / "spool"
    valid = _requests("req", 4000)
    bad_lines: dict[int, str] = {
        10: "this is not json {",
        700: json.dumps([1, 2, 3]),
        1500: json.dumps({**chat("bad-method"), "method": "GET"}),
        2200: json.dumps({**chat("bad-url"), "url": "/v1/moderations"}),
        3100: json.dumps({**chat("bad-body"), "body": {"model": "m", "messages": []}}),
    }
    bad_ids: dict[str, str | None] = {
        bad_lines[10]: None,
        bad_lines[700]: None,
        bad_lines[1500]: "bad-method",
        bad_lines[2200]: "bad-url",
        bad_lines[3100]: "bad-body",
    }
    dup_id = "req-17"
    lines: list[dict[str, Any] | str] = []
    expected_errors: dict[int, str | None] = {}  # input line number → custom_id
    for i, rec in enumerate(valid):
        if i in bad_lines:
            lines.append(bad_lines[i])
            expected_errors[len(lines)] = bad_ids[bad_lines[i]]
        if i == 1800:
            lines.append("")  # blank: skipped, but counted in line numbers
        if i == 3500:
            lines.append(chat(dup_id, "the same id again"))
            expected_errors[len(lines)] = dup_id
        lines.append(rec)
    write_jsonl(spool / "incoming" / "big.jsonl", lines)

    rng = random.Random(20261127)
    log = tmp_path / "spoold.log"
    kills = mid_processing = tails = staged = 0
    job_id: str | None = None
    committed = b""  # output.jsonl up to the last checkpoint seen
    started = time.monotonic()
    for _ in range(30):
        proc = _spawn(cfg, log)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.05, 0.6))  # start-up, recovery, claim, validation
        else:
            # Measured from the daemon's first heartbeat, so a slow start (a loaded CI
            # machine) does not turn every kill into a start-up kill.
            _wait_for_heartbeat_of(spool, proc)
            time.sleep(rng.uniform(0.0, 0.9))
        if _sigkill(proc) == -signal.SIGKILL:
            kills += 1

        places = _input_places(spool, "big.jsonl")
        assert len(places) == 1, f"the dropped file is in {len(places)} places: {places}"
        if (spool / "processing").is_dir():
            staged += any(p.name.startswith(".claim-") for p in (spool / "processing").iterdir())
        jobs = job_dirs(spool, "processing") + job_dirs(spool, "done") + job_dirs(spool, "failed")
        assert len(jobs) <= 1, f"one file became several jobs: {jobs}"
        if jobs:
            assert job_id in (None, jobs[0].name), f"the job changed id: {job_id} → {jobs[0]}"
            job_id = jobs[0].name
        if job_dirs(spool, "done"):
            break
        if not job_dirs(spool, "processing"):
            continue
        job = only_job(spool, "processing")
        ck = state(job)["checkpoint"]
        out = job / "output.jsonl"
        data = out.read_bytes() if out.exists() else b""
        assert len(data) >= ck["output_bytes"], "output.jsonl is shorter than its checkpoint"
        assert data[: ck["output_bytes"]].startswith(committed), "a committed line was rewritten"
        committed = data[: ck["output_bytes"]]
        mid_processing += data.count(b"\n") > 0
        tails += len(data) > ck["output_bytes"]  # C6/C7: bytes past the checkpoint
    loop_s = time.monotonic() - started

    drain(cfg, timeout=120)
    job = only_job(spool, "done")
    assert job.name == job_id or job_id is None
    assert job_dirs(spool, "failed") == []
    assert list((spool / "incoming").iterdir()) == []
    _no_leftovers(spool)
    st = _assert_counts(job)
    assert st["status"] == "completed"
    assert st["request_counts"] == {
        "total": len(valid) + len(expected_errors),
        "completed": len(valid),
        "failed": len(expected_errors),
    }
    assert_exactly_once(job, _ids(valid) - {dup_id})
    outputs = read_results(job, "output.jsonl")
    assert len(outputs) == len(valid)
    assert [r["custom_id"] for r in outputs].count(dup_id) == 1
    assert _error_lines(job) == expected_errors
    assert (job / "output.jsonl").read_bytes().startswith(committed)

    summary = (
        f"{kills} kills in {loop_s:.1f} s: {mid_processing} mid-processing, "
        f"{tails} left bytes past the checkpoint, {staged} left a claim dir"
    )
    print(summary)
    assert kills >= 5, summary
    assert mid_processing >= 3, f"too few kills landed mid-processing: {summary}"


# -- 2. a job that crashes the daemon --------------------------------------------------


def _drain_until_clean(
    cfg: Path, incoming: Path, bad: list[dict[str, Any]], good: list[dict[str, Any]]
) -> Iterator[subprocess.CompletedProcess[str]]:
    """Drop `bad` then `good` (claimed, so run, in that order); drain again and again,
    as a service manager restarts a daemon that died (at most 10 times)."""
    write_jsonl(incoming / "a_bad.jsonl", bad)
    write_jsonl(incoming / "b_good.jsonl", good)
    now = time.time_ns()
    os.utime(incoming / "a_bad.jsonl", ns=(now - 2_000_000_000, now - 2_000_000_000))
    os.utime(incoming / "b_good.jsonl", ns=(now - 1_000_000_000, now - 1_000_000_000))
    for _ in range(10):
        yield run_spoold("run", "--config", str(cfg), "--drain", timeout=60)


def test_a_request_that_kills_the_process_is_isolated_and_dead_lettered(tmp_path: Path) -> None:
    """A request that kills the process (the fake engine's crash_marker: os._exit, as a
    CUDA fault) is isolated across restarts (design §5a): the suspects are bisected,
    the culprit is dead-lettered alone as engine_crash on its second crash alone, the
    rest of its job completes, and the healthy job behind it runs afterwards.

    Covers C15 (crash in normal mode, requests in flight), C16 (crash while a group
    runs alone), C17/C18 (the next group after a commit or a dead-letter)."""
    cfg = make_config(
        tmp_path,
        engine={"backend": "fake", "fake": {"crash_marker": "CRASH"}},
        processing={"max_job_attempts": 3},
    )
    spool = tmp_path / "spool"
    bad = [chat("bad-0"), chat("bad-1", "please CRASH now"), completion("bad-2")]
    good = _requests("good", 30)
    codes: list[int] = []
    for proc in _drain_until_clean(cfg, spool / "incoming", bad, good):
        codes.append(proc.returncode)
        if proc.returncode == 0:
            break
        # The bad job, claimed first, runs first: the good one has not started.
        assert job_dirs(spool, "done") == [], f"a job finished during a crashing run: {codes}"
        queued = [state(d) for d in job_dirs(spool, "processing")]
        good_state = next(s for s in queued if s["source_name"] == "b_good.jsonl")
        assert good_state["status"] == "queued"
    # All three in flight → halves [1], [2] → [1], [1] → strike → second strike.
    assert codes == [70, 70, 70, 70, 0], codes

    jobs = {state(d)["source_name"]: d for d in job_dirs(spool, "done")}
    assert set(jobs) == {"a_bad.jsonl", "b_good.jsonl"}, jobs
    st = _assert_counts(jobs["a_bad.jsonl"])
    assert st["status"] == "completed"
    assert st["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert_exactly_once(jobs["a_bad.jsonl"], _ids(bad))
    (err,) = read_results(jobs["a_bad.jsonl"], "errors.jsonl")
    assert err["custom_id"] == "bad-1"
    assert err["error"]["code"] == "engine_crash"
    assert err["response"]["status_code"] == 500
    assert "line 2" in err["error"]["message"]
    assert st["isolation"]["suspects"] == [] and st["fed_through"] == 0

    st = _assert_counts(jobs["b_good.jsonl"])
    assert st["request_counts"]["completed"] == len(good)
    assert_exactly_once(jobs["b_good.jsonl"], _ids(good))
    assert job_dirs(spool, "failed") == []
    _no_leftovers(spool)


def test_a_model_load_that_kills_the_process_quarantines_its_job(tmp_path: Path) -> None:
    """A crash that no isolation can narrow (the model load itself kills the process, as
    the OOM killer does: C12) is counted before the load, so the job is quarantined after
    `processing.max_job_attempts` crashes instead of crash-looping the daemon; the
    healthy job behind it is blocked until then and completes afterwards (design §3)."""
    limit = 3
    cfg = make_config(
        tmp_path,
        engine={
            "backend": "fake",
            "models": {"huge": "huge-CRASH"},
            "fake": {"crash_marker": "CRASH"},
        },
        processing={"max_job_attempts": limit},
    )
    spool = tmp_path / "spool"
    bad = [chat("big-0", model="huge"), chat("big-1", model="huge")]
    good = _requests("good", 30)
    codes: list[int] = []
    for proc in _drain_until_clean(cfg, spool / "incoming", bad, good):
        codes.append(proc.returncode)
        if proc.returncode == 0:
            break
        assert job_dirs(spool, "done") == [], f"a job finished during a crashing run: {codes}"
    assert codes == [71] * limit + [0], codes

    failed = only_job(spool, "failed")
    st = state(failed)
    assert st["source_name"] == "a_bad.jsonl"
    assert st["status"] == "failed"
    assert st["attempts"] == limit
    assert st["error"] and "crash" in st["error"].lower() and str(limit) in st["error"]
    assert (failed / "input.jsonl").exists(), "the quarantined job keeps its input"

    done = only_job(spool, "done")
    st = _assert_counts(done)
    assert st["source_name"] == "b_good.jsonl"
    assert st["request_counts"]["completed"] == len(good)
    assert_exactly_once(done, _ids(good))
    _no_leftovers(spool)


# -- 3. recovery of constructed crash states ------------------------------------------


def test_recover_claim_dir_without_input_c1_c2(tmp_path: Path) -> None:
    """C1 (empty claim dir), C1 during step 2 (only a stray `.state.json.*.tmp`) and C2
    (claim dir with state.json only), each while its file is still in incoming/: the
    claim dir is removed and the file runs as a job normally, exactly once."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    processing = spool / "processing"
    records = {name: _requests(name, 25) for name in ("one", "two", "three")}
    for name, recs in records.items():
        write_jsonl(spool / "incoming" / f"{name}.jsonl", recs)

    c1 = processing / f".claim-default+{new_job_id('one.jsonl')}"
    c1.mkdir(parents=True)
    c1_tmp = processing / f".claim-default+{new_job_id('two.jsonl')}"
    c1_tmp.mkdir()
    (c1_tmp / ".state.json.abcd1234.tmp").write_text('{"id": "two-')  # torn temp
    c2_id = new_job_id("three.jsonl")
    c2 = processing / f".claim-default+{c2_id}"
    content = (spool / "incoming" / "three.jsonl").read_bytes()
    _stage_job_dir(c2, "three.jsonl", content, c2_id)
    (c2 / "input.jsonl").unlink()  # step 3 never happened: the file is still in incoming/

    drain(cfg)
    assert list((spool / "incoming").iterdir()) == []
    _no_leftovers(spool)
    done = job_dirs(spool, "done")
    assert sorted(state(d)["source_name"] for d in done) == [
        "one.jsonl",
        "three.jsonl",
        "two.jsonl",
    ]
    for d in done:
        st = _assert_counts(d)
        name = st["source_name"].removesuffix(".jsonl")
        assert st["status"] == "completed"
        assert d.name.startswith(f"{name}-")
        assert_exactly_once(d, _ids(records[name]))
        assert st["request_counts"]["completed"] == len(records[name])


def test_recover_claim_dir_with_input_c3(tmp_path: Path) -> None:
    """C3: claim dir with state.json and input.jsonl, the file gone from incoming/:
    recovery finishes the claim and the job completes under the id it was given."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    recs = _requests("r", 40)
    src = write_jsonl(tmp_path / "c3.jsonl", recs)
    job_id = new_job_id("c3.jsonl")
    _stage_job_dir(
        spool / "processing" / f".claim-default+{job_id}", "c3.jsonl", src.read_bytes(), job_id
    )

    drain(cfg)
    _no_leftovers(spool)
    job = only_job(spool, "done")
    assert job.name == job_id
    st = _assert_counts(job)
    assert st["id"] == job_id
    assert st["source_name"] == "c3.jsonl"
    assert st["status"] == "completed"
    assert st["request_counts"]["completed"] == len(recs)
    assert_exactly_once(job, _ids(recs))
    assert (job / "input.jsonl").read_bytes() == src.read_bytes()


def test_recover_stray_temps_and_queued_job_c4(tmp_path: Path) -> None:
    """C4 (a claimed, queued job: nothing to recover, it just runs) with stray
    `.state.json.*.tmp` files from interrupted atomic writes in its job dir and a stray
    heartbeat temp: recovery deletes them all; the job completes."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    recs = _requests("q", 30)
    src = write_jsonl(tmp_path / "queued.jsonl", recs)
    job_id = new_job_id("queued.jsonl")
    job = spool / "processing" / job_id
    _stage_job_dir(job, "queued.jsonl", src.read_bytes(), job_id)
    (job / ".state.json.abcd.tmp").write_text('{"status": "runn')
    (job / ".state.json.0f1e2d3c.tmp").write_bytes(b"")
    (spool / "heartbeats").mkdir()
    (spool / "heartbeats" / ".default.json.beef.tmp").write_text("{")

    drain(cfg)
    _no_leftovers(spool)
    done = only_job(spool, "done")
    assert done.name == job_id
    assert sorted(p.name for p in done.iterdir() if p.name.startswith(".")) == []
    st = _assert_counts(done)
    assert st["status"] == "completed"
    assert_exactly_once(done, _ids(recs))


def test_recover_interrupted_validation_c5(tmp_path: Path) -> None:
    """C5: killed during validation (state `running`, not validated, a partial
    errors.jsonl with a torn last line): validation restarts from scratch, so every
    invalid line has exactly one errors line and every valid request runs once."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    recs = _requests("v", 30)
    lines: list[dict[str, Any] | str] = [*recs[:10], "{not json", *recs[10:], "[]"]
    src = write_jsonl(tmp_path / "val.jsonl", lines)
    job_id = new_job_id("val.jsonl")
    job = spool / "processing" / job_id
    _stage_job_dir(
        job,
        "val.jsonl",
        src.read_bytes(),
        job_id,
        status="running",
        attempts=1,
        started_at=utcnow(),
    )
    partial = {
        "id": "x",
        "custom_id": None,
        "response": None,
        "error": {"code": "invalid_json", "message": "line 11: not valid JSON"},
    }
    (job / "errors.jsonl").write_text(json.dumps(partial) + "\n" + '{"id": "x", "cust')

    drain(cfg)
    _no_leftovers(spool)
    done = only_job(spool, "done")
    st = _assert_counts(done)
    assert st["status"] == "completed"
    assert_exactly_once(done, _ids(recs))
    assert _error_lines(done) == {11: None, 32: None}
    assert st["request_counts"] == {"total": 32, "completed": 30, "failed": 2}


def test_resume_truncates_torn_and_uncommitted_tails_c6_c7(tmp_path: Path) -> None:
    """C6/C7: a job SIGKILLed after some commits, whose output.jsonl and errors.jsonl
    then carry bytes past the checkpoint — complete lines for requests not yet committed
    (synced, but the checkpoint never written: C7) and a torn half line or garbage
    (C6) — plus a stray state temp file: on resume both files are
    cut back to the checkpoint and the rest redone, so results are exactly once and
    parse, and the committed bytes are untouched."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 10},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.004, "batch_size": 5}},
    )
    spool = tmp_path / "spool"
    recs = _requests("t", 400)
    lines: list[dict[str, Any] | str] = [*recs[:5], "not json", *recs[5:], "{}"]
    write_jsonl(spool / "incoming" / "torn.jsonl", lines)

    job, st = _kill_after_commit(cfg, spool, tmp_path / "spoold.log", min_completed=20)
    ck = st["checkpoint"]
    out_path, err_path = job / "output.jsonl", job / "errors.jsonl"
    out_committed = out_path.read_bytes()[: ck["output_bytes"]]
    err_committed = err_path.read_bytes()[: ck["errors_bytes"]]
    committed_lines = out_committed.splitlines()
    assert len(committed_lines) == st["request_counts"]["completed"] >= 20
    done_ids = {json.loads(line)["custom_id"] for line in committed_lines}
    pending = [r["custom_id"] for r in recs if r["custom_id"] not in done_ids][:2]

    with open(out_path, "ab") as f:
        for custom_id in pending:  # the next chunk: synced, but the checkpoint not written
            uncommitted = json.loads(committed_lines[-1])
            uncommitted["custom_id"] = custom_id
            f.write(json.dumps(uncommitted).encode() + b"\n")
        f.write(committed_lines[0][: len(committed_lines[0]) // 2])  # torn append
    err_line = json.dumps(
        {
            "id": "x",
            "custom_id": pending[0],
            "response": None,
            "error": {"code": "engine_error", "message": "line 9: uncommitted"},
        }
    )
    with open(err_path, "ab") as f:
        f.write(err_line.encode() + b"\n" + b'\x00\x00garbage{"custom_')
    (job / ".state.json.abcd.tmp").write_text('{"checkpoint": {"output_')

    drain(cfg)
    _no_leftovers(spool)
    done = only_job(spool, "done")
    assert done.name == job.name
    final = _assert_counts(done)
    assert final["status"] == "completed"
    assert_exactly_once(done, _ids(recs))
    assert final["request_counts"] == {"total": 402, "completed": 400, "failed": 2}
    assert _error_lines(done) == {6: None, 402: None}
    assert (done / "output.jsonl").read_bytes().startswith(out_committed)
    assert (done / "errors.jsonl").read_bytes().startswith(err_committed)


def test_recover_terminal_job_left_in_processing_c9(tmp_path: Path) -> None:
    """C9: the terminal state.json was written but the move to done/ or failed/ did not
    happen: recovery finishes the move (completed → done/, failed → failed/) without
    running the job again."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    recs = _requests("c", 20)
    write_jsonl(spool / "incoming" / "ok.jsonl", recs)
    write_jsonl(spool / "incoming" / "broken.jsonl", ["not json", "[]", json.dumps({"a": 1})])
    drain(cfg)
    ok, broken = only_job(spool, "done"), only_job(spool, "failed")
    assert state(ok)["status"] == "completed"
    assert state(broken)["status"] == "failed"
    before = {
        d.name: {p.name: p.read_bytes() for p in d.iterdir() if p.name != "state.json"}
        for d in (ok, broken)
    }
    # What a crash between finish step 1 and step 2 leaves: the terminal job in processing/.
    for d in (ok, broken):
        os.rename(d, spool / "processing" / d.name)

    drain(cfg)
    _no_leftovers(spool)
    assert [d.name for d in job_dirs(spool, "done")] == [ok.name]
    assert [d.name for d in job_dirs(spool, "failed")] == [broken.name]
    for d in (ok, broken):
        after = {p.name: p.read_bytes() for p in d.iterdir() if p.name != "state.json"}
        assert after == before[d.name], f"{d.name} was changed, not just moved"
    st = _assert_counts(ok)
    assert st["status"] == "completed"
    assert_exactly_once(ok, _ids(recs))
    assert state(broken)["status"] == "failed"
    assert state(broken)["error"]


# -- 4. resume redoes at most one chunk ------------------------------------------------


def _check_checkpoint(
    job: Path, st: dict[str, Any], recs: list[dict[str, Any]], window: int
) -> bytes:
    """The checkpoint names exactly the committed requests; returns the committed bytes."""
    ck = st["checkpoint"]
    committed = (job / "output.jsonl").read_bytes()[: ck["output_bytes"]]
    ids = [json.loads(line)["custom_id"] for line in committed.splitlines()]
    assert len(ids) == len(set(ids)) == st["request_counts"]["completed"]
    data = (job / "input.jsonl").read_bytes()
    offset, next_line = ck["input_offset"], ck["next_line"]
    assert data[:offset].count(b"\n") == next_line - 1, "input_offset is not line next_line"
    assert offset == 0 or data[offset - 1 : offset] == b"\n"
    # Finished lines at or above next_line: the engine's window, or after a crash the
    # suspects run alone (design §5a: at most a chunk and a half plus the window).
    assert all(line >= next_line for line in ck["done_lines"])
    assert len(ck["done_lines"]) <= window, "done_lines exceed the engine's window"
    covered = set(range(1, next_line)) | set(ck["done_lines"])
    assert set(ids) == {recs[i - 1]["custom_id"] for i in covered}
    return committed


def test_resume_keeps_committed_bytes_and_redoes_at_most_one_chunk(tmp_path: Path) -> None:
    """C6–C8 and resume: runs that die at a known request (the fake engine's
    crash_marker, os._exit) leave a checkpoint at most one chunk behind the work they
    had finished, and the next run resumes from it; a SIGKILL mid-chunk after some
    commits leaves a checkpoint that names exactly the committed requests (input offset
    of `next_line`, `done_lines` within the engine's window). The final output.jsonl
    begins with the bytes of every checkpoint: a committed line is never rewritten."""
    chunk, batch, n = 25, 5, 600
    markers = {"CRASH_A": 2 * chunk - batch + 1, "CRASH_B": 3 * chunk - batch + 1}  # lines
    fake = {"delay_per_request_s": 0.003, "batch_size": batch}
    cfg = make_config(tmp_path, processing={"chunk_size": chunk}, engine={"fake": fake})
    spool = tmp_path / "spool"
    recs = _requests("p", n)
    for marker, line in markers.items():
        recs[line - 1] = chat(recs[line - 1]["custom_id"], f"this one will {marker}")
    write_jsonl(spool / "incoming" / "resume.jsonl", recs)
    prefixes: list[bytes] = []

    # Runs 1 and 2 die in the engine batch holding their marker's line.
    for marker, line in markers.items():
        armed = {**fake, "crash_marker": marker}
        make_config(tmp_path, processing={"chunk_size": chunk}, engine={"fake": armed})
        job = next(iter(job_dirs(spool, "processing")), None)
        resume_at = state(job)["checkpoint"]["next_line"] if job else 1
        proc = run_spoold("run", "--config", str(cfg), "--drain", timeout=60)
        assert proc.returncode != 0, f"{marker} did not stop the run"
        job = only_job(spool, "processing")
        st = state(job)
        # The fake engine answers in order, in batches of `batch` from the resume point.
        finished = resume_at - 1 + (line - resume_at) // batch * batch
        lost = finished - st["request_counts"]["completed"]
        assert 0 <= lost <= chunk, (
            f"{marker}: died with {finished} requests finished and "
            f"{st['request_counts']['completed']} committed; at most one chunk may be lost"
        )
        prefixes.append(_check_checkpoint(job, st, recs, batch + chunk + chunk // 2))

    # Run 3: SIGKILL mid-chunk once at least two more chunks are committed.
    make_config(tmp_path, processing={"chunk_size": chunk}, engine={"fake": fake})
    before = state(only_job(spool, "processing"))["request_counts"]["completed"]
    job, st = _kill_after_commit(
        cfg, spool, tmp_path / "spoold.log", min_completed=before + 2 * chunk, then_s=0.04
    )
    assert st["request_counts"]["completed"] >= before + 2 * chunk
    prefixes.append(_check_checkpoint(job, st, recs, batch + chunk + chunk // 2))

    # Run 4 finishes the job.
    drain(cfg)
    done = only_job(spool, "done")
    final = _assert_counts(done)
    assert final["status"] == "completed"
    assert final["request_counts"]["completed"] == n
    assert_exactly_once(done, _ids(recs))
    out = (done / "output.jsonl").read_bytes()
    for run, prefix in enumerate(prefixes, 1):
        assert prefix, f"run {run} committed nothing"
        assert out.startswith(prefix), f"lines committed by run {run} were rewritten"


# -- 4. several daemons: a live peer's files are left alone, a dead peer's repaired ---


def _peer_heartbeat(spool: Path, instance: str, age_s: float) -> None:
    """A peer's heartbeat file, last written `age_s` seconds ago."""
    beats = spool / "heartbeats"
    beats.mkdir(parents=True, exist_ok=True)
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - age_s))
    beat = {"instance": instance, "pid": 1, "hostname": "peer", "status": "processing"}
    (beats / f"{instance}.json").write_text(json.dumps({**beat, "updated_at": when}))


def test_start_up_recovery_leaves_a_live_peers_temp_files_alone(tmp_path: Path) -> None:
    """A daemon starting beside a live one must not delete the temp files of the peer's
    atomic writes (its state.json, its heartbeat) or its duplicate-id buckets: the
    peer's rename would fail under it."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    (spool / "heartbeats").mkdir(parents=True)
    job_id = new_job_id("theirs.jsonl")
    job = spool / "processing" / job_id
    content = write_jsonl(tmp_path / "theirs.jsonl", _requests("t", 5)).read_bytes()
    _stage_job_dir(job, "theirs.jsonl", content, job_id, status="running")
    (job / "owner.json").write_text(json.dumps({"instance": "gpu1", "pid": 1}))
    theirs = [job / ".state.json.abcd.tmp", job / ".ids-1-0.tmp"]
    theirs.append(spool / "heartbeats" / ".gpu1.json.beef.tmp")
    for p in theirs:
        p.write_text("{")
    ours = spool / "heartbeats" / ".default.json.0bad.tmp"
    ours.write_text("{")

    peer = {"instance": "gpu1", "pid": 1, "hostname": "peer", "status": "processing"}
    with beating(spool / "heartbeats" / "gpu1.json", peer):  # alive: it keeps beating
        drain(cfg)
    assert all(p.exists() for p in theirs), [p for p in theirs if not p.exists()]
    assert not ours.exists()
    assert state(job)["status"] == "running"  # still the peer's: not run, not moved


def test_a_running_daemon_finishes_a_dead_peers_claim_without_a_restart(
    tmp_path: Path,
) -> None:
    """C3 left by a peer that died after our start: the peer's heartbeat goes stale,
    and the running daemon finishes the claim and runs the job (SPEC §3: the others
    take over its unfinished work), as well as a job the peer finished but never
    moved (C9)."""
    cfg = make_config(tmp_path, heartbeat={"interval_s": 0.2, "stale_after_s": 1})
    spool = tmp_path / "spool"
    log = tmp_path / "daemon.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*SPOOLD, "run", "--config", str(cfg)], stdout=out, stderr=subprocess.STDOUT, env=_env()
        )
    try:
        _wait_for_heartbeat_of(spool, proc)
        _peer_heartbeat(spool, "gpu1", age_s=30)  # it died a while ago
        recs = _requests("p", 20)
        src = write_jsonl(tmp_path / "peer.jsonl", recs)
        job_id = new_job_id("peer.jsonl")
        _stage_job_dir(
            spool / "processing" / f".claim-gpu1+{job_id}", "peer.jsonl", src.read_bytes(), job_id
        )
        c9_id = new_job_id("finished.jsonl")
        c9 = spool / "processing" / c9_id
        _stage_job_dir(c9, "finished.jsonl", src.read_bytes(), c9_id, status="completed")
        (c9 / "owner.json").write_text(json.dumps({"instance": "gpu1", "pid": 1}))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(job_dirs(spool, "done")) < 2:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.1)
        assert sorted(d.name for d in job_dirs(spool, "done")) == sorted([job_id, c9_id])
        assert_exactly_once(spool / "done" / job_id, _ids(recs))
        assert list((spool / "processing").iterdir()) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_cancelling_a_paused_job_cuts_its_uncommitted_tail(tmp_path: Path) -> None:
    """A job paused mid-run (a stop, a full disk, a crash) may hold results past its
    checkpoint, ending in a torn line (C6). Cancelled before it resumes, it goes to
    failed/ with the committed results only, and counts that match them."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    recs = _requests("p", 10)
    src = write_jsonl(tmp_path / "paused.jsonl", recs)
    job_id = new_job_id("paused.jsonl")
    job = spool / "processing" / job_id
    committed = b"".join(
        json.dumps({"id": f"batch_req_{i}", "custom_id": f"p-{i}"}).encode() + b"\n"
        for i in range(3)
    )
    lines = src.read_bytes().splitlines(keepends=True)
    _stage_job_dir(
        job,
        "paused.jsonl",
        src.read_bytes(),
        job_id,
        status="queued",
        checkpoint={
            "validated": True,
            "next_line": 4,
            "input_offset": sum(len(line) for line in lines[:3]),
            "done_lines": [],
            "output_bytes": len(committed),
            "errors_bytes": 0,
            "completed": 3,
            "failed": 0,
        },
        request_counts={"total": 10, "completed": 5, "failed": 0},  # uncommitted counts
    )
    (job / "output.jsonl").write_bytes(
        committed + b'{"id": "batch_req_3", "custom_id": "p-3"}\n{"id"'
    )
    (job / "errors.jsonl").write_bytes(b"")
    (job / "CANCEL").write_bytes(b"")

    drain(cfg)
    done = only_job(spool, "failed")
    st = state(done)
    assert st["status"] == "cancelled"
    assert (done / "output.jsonl").read_bytes() == committed
    assert st["request_counts"] == {"total": 10, "completed": 3, "failed": 0}


def test_cancelling_a_job_left_running_by_a_crash_files_it_as_cancelled(
    tmp_path: Path,
) -> None:
    """A job the daemon crashed on (status running, attempts used up) that the user
    cancels meanwhile is filed as cancelled at the next start: no model is loaded and
    nothing re-validated for it, and it is not reported as having failed."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    src = write_jsonl(tmp_path / "crashed.jsonl", _requests("c", 10))
    job_id = new_job_id("crashed.jsonl")
    job = spool / "processing" / job_id
    _stage_job_dir(job, "crashed.jsonl", src.read_bytes(), job_id, status="running", attempts=3)
    (job / "owner.json").write_text(json.dumps({"instance": "default", "pid": 999_999}))
    (job / "CANCEL").write_bytes(b"")

    drain(cfg)
    done = only_job(spool, "failed")
    st = state(done)
    assert st["status"] == "cancelled", st
    assert st["request_counts"] == {"total": 10, "completed": 0, "failed": 0}


def test_a_job_parked_by_a_daemon_killed_mid_filing_is_filed_by_the_next_start_c23(
    tmp_path: Path, faultshim: Path
) -> None:
    """C23: a job is filed through its owner's lease directory (design §2 W3); the
    daemon is SIGKILLed (by the fault shim, as it calls rename(2) into done/) with the
    job parked there. The next start fences its old lease directory, puts the job back
    in processing/ and files it (C9): nothing lost, nothing run again, nothing left."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    recs = _requests("p", 30)
    write_jsonl(spool / "incoming" / "parked.jsonl", recs)
    killed = subprocess.run(
        [*SPOOLD, "run", "--config", str(cfg), "--drain"],
        capture_output=True, text=True, timeout=120,
        env={**_env(), "LD_PRELOAD": str(faultshim), "FAULTSHIM_KILL_RENAME": "/done/"},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    parked = [p for p in (spool / "heartbeats").glob(".*.lease/*") if p.is_dir()]
    assert [p.name for p in parked] and job_dirs(spool, "processing") == []
    output = (parked[0] / "output.jsonl").read_bytes()

    drain(cfg)
    done = only_job(spool, "done")
    assert done.name == parked[0].name
    assert (done / "output.jsonl").read_bytes() == output  # filed, not run again
    assert_exactly_once(done, _ids(recs))
    _no_leftovers(spool)
    assert not [p for p in (spool / "heartbeats").iterdir() if p.name.startswith(".")]
