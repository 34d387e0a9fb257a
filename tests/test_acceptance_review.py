"""Acceptance tests written from SPEC §4, §5 and §8 and the README alone, by an outside
reviewer (issue 12): real processes through the CLI, fake-engine configs, real files."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    SPOOLD,
    _env,
    chat,
    completion,
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

STATUS = [sys.executable, "-m", "spoold.status"]
REPO = Path(__file__).resolve().parent.parent


def spool_status(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STATUS, *args], capture_output=True, text=True, timeout=60, env=_env(), cwd=cwd
    )


def spoold_in(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`spoold ARGS` run from `cwd` (relative spool paths resolve there)."""
    return subprocess.run(
        [*SPOOLD, *args], capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd
    )


@contextlib.contextmanager
def daemon(cfg: Path, *extra: str, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`spoold run --config CFG EXTRA…` in the background; SIGTERM at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*SPOOLD, "run", "--config", str(cfg), *extra],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def heartbeat(spool: Path, instance: str = "default") -> dict[str, Any]:
    path = spool / "heartbeats" / f"{instance}.json"
    try:
        return dict(json.loads(path.read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def slow_config(tmp: Path, **overrides: Any) -> Path:
    """Jobs that take a few seconds: 20 ms a request, commits every 10."""
    return make_config(
        tmp,
        processing={"chunk_size": 10},
        engine={"backend": "fake", "fake": {"delay_per_request_s": 0.02, "batch_size": 5}},
        **overrides,
    )


def running_job(spool: Path, at_least: int = 10) -> Path:
    def find() -> Path | None:
        for d in job_dirs(spool, "processing"):
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                st = state(d)
                if st["status"] == "running" and st["request_counts"]["completed"] >= at_least:
                    return d
        return None

    found: Path = wait_for(find, timeout=60, what="a running job with committed results")
    return found


# --- §4 Formats -------------------------------------------------------------------------

ODD = "\u2028\u2029\u0085\x01\x1f\x7f\x9f"


def test_result_files_split_into_records_at_newline_alone(tmp_path: Path) -> None:
    """§4: every result file splits into records at \\n alone, for every reader: U+2028,
    U+2029, U+0085 (and, README, DEL and the other C1 controls) are written escaped."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    ok_ids = [f"ok{i}{ODD}" for i in range(3)]
    records: list[dict[str, Any] | str] = [chat(cid, model=f"m{ODD}") for cid in ok_ids]
    records.append(completion(f"cmp{ODD}", prompt=f"p{ODD}"))
    bad_id = f"bad{ODD}"
    records.append({**chat(bad_id), "method": f"GET{ODD}"})  # invalid: an errors.jsonl line
    write_jsonl(spool / "incoming" / "odd.jsonl", records)
    drain(cfg)
    job = only_job(spool, "done")
    for name, want in (("output.jsonl", 4), ("errors.jsonl", 1)):
        data = (job / name).read_bytes()
        text = data.decode("utf-8")
        for ch in ODD:
            assert ch not in text, f"{name} holds a raw {ch!r}"
        assert len(text.splitlines()) == text.count("\n") == want, name
        assert all(json.loads(line) for line in text.splitlines())
    outs = read_results(job, "output.jsonl")
    assert sorted(r["custom_id"] for r in outs) == sorted([*ok_ids, f"cmp{ODD}"])
    chat_out = next(r for r in outs if r["custom_id"] == ok_ids[0])
    assert chat_out["response"]["body"]["model"] == f"m{ODD}"  # kept as sent
    (err,) = read_results(job, "errors.jsonl")
    assert err["custom_id"] == bad_id and err["error"]["code"] and err["error"]["message"]


def test_clean_exit_writes_heartbeat_stopped_sigterm_and_drain(tmp_path: Path) -> None:
    """§4: a daemon that exits cleanly writes its heartbeat a last time with status
    `stopped`; §3: SIGTERM → exit 0. §5: spool-status then says down (exit 2)."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    with daemon(cfg, log=tmp_path / "d.log") as proc:
        wait_for(lambda: heartbeat(spool).get("status") == "idle", what="idle heartbeat")
        assert spool_status("--config", str(cfg)).returncode == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    hb = heartbeat(spool)
    assert hb["status"] == "stopped"
    for key in ("pid", "hostname", "instance", "version", "started_at", "updated_at", "seq"):
        assert key in hb, key
    assert hb["problems"] == []
    st = spool_status("--config", str(cfg))
    assert st.returncode == 2, st.stdout + st.stderr
    assert "stopped" in st.stdout
    js = spool_status("--config", str(cfg), "--json")
    assert js.returncode == 2
    json.loads(js.stdout)

    write_jsonl(spool / "incoming" / "a.jsonl", [chat("a")])
    drain(cfg)
    assert heartbeat(spool)["status"] == "stopped"
    assert spool_status("--config", str(cfg)).returncode == 2


# --- §5 spoold submit ---------------------------------------------------------------------


def test_submit_several_files_prints_each_name(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    a = write_jsonl(tmp_path / "a.jsonl", [chat("1")])
    b = write_jsonl(tmp_path / "b.jsonl", [chat("2")])
    proc = run_spoold("submit", str(a), str(b), "--config", str(cfg), check=True)
    assert proc.stdout.split() == ["a.jsonl", "b.jsonl"]
    incoming = tmp_path / "spool" / "incoming"
    assert sorted(os.listdir(incoming)) == ["a.jsonl", "b.jsonl"]  # no temp left behind
    assert (incoming / "b.jsonl").read_bytes() == b.read_bytes()
    again = run_spoold("submit", "--config", str(cfg), str(a), check=True)
    assert again.stdout.strip() == "a-1.jsonl"  # README: never replaces a file
    assert (incoming / "a.jsonl").read_bytes() == a.read_bytes()


# --- §5 --spool / --config alone or together ---------------------------------------------


def test_every_command_takes_spool_alone_with_defaults(tmp_path: Path) -> None:
    """§5: with --spool and no config file anywhere, the defaults apply."""
    assert not Path("/etc/spoold/spoold.yaml").exists()
    spool = tmp_path / "s"
    src = write_jsonl(tmp_path / "x.jsonl", [chat("a"), chat("b", temperature="hot")])
    proc = run_spoold("submit", "--spool", str(spool), str(src))
    assert proc.returncode == 0, proc.stderr
    assert (spool / "incoming" / "x.jsonl").exists()
    listed = run_spoold("jobs", "--spool", str(spool), "--json", check=True)
    assert [json.loads(line)["state"] for line in listed.stdout.splitlines()] == ["waiting"]
    st = spool_status("--spool", str(spool))
    assert st.returncode == 3, st.stdout + st.stderr  # no daemon ever seen
    # Default watch.settle_seconds is 5: the drain waits for the file to settle.
    run_spoold("run", "--spool", str(spool), "--drain", timeout=120, check=True)
    job = only_job(spool, "done")
    assert state(job)["model"] == "fake-model"  # the default engine
    retry = run_spoold("retry", "--spool", str(spool), job.name)
    # the invalid line is not retried: nothing to do, said plainly (not a config error)
    assert retry.returncode in (0, 1), retry.stderr
    assert "config" not in retry.stderr.lower(), retry.stderr
    cancel = run_spoold("cancel", "--spool", str(spool), job.name)
    assert cancel.returncode == 1 and "config" not in cancel.stderr.lower(), cancel.stderr
    assert spool_status("--spool", str(spool)).returncode == 2  # drained: stopped
    shown = spool_status("--spool", str(spool), job.name)
    assert shown.returncode == 2 and "results:" in shown.stdout  # exit: the daemon's health


def test_spool_overrides_config_for_every_command(tmp_path: Path) -> None:
    """§5: --spool DIR overrides spool_dir, also together with --config."""
    cfg = make_config(tmp_path)  # spool_dir: tmp/spool
    other = tmp_path / "other"
    src = write_jsonl(tmp_path / "x.jsonl", [chat("a")])
    both = ("--config", str(cfg), "--spool", str(other))
    assert run_spoold("submit", *both, str(src), check=True).stdout.strip() == "x.jsonl"
    assert (other / "incoming" / "x.jsonl").exists()
    assert not (tmp_path / "spool" / "incoming" / "x.jsonl").exists()
    run_spoold("run", *both, "--drain", check=True)
    job = only_job(other, "done")
    assert job_dirs(tmp_path / "spool", "done") == []
    (line,) = run_spoold("jobs", *both, "--json", check=True).stdout.splitlines()
    assert json.loads(line)["id"] == job.name
    st = spool_status(*both, job.name)
    assert st.returncode == 2, st.stdout + st.stderr  # found; the daemon has stopped
    assert str(job / "output.jsonl") in st.stdout or "other/done" in st.stdout
    assert spool_status(*both).returncode == 2
    assert spool_status("--config", str(cfg)).returncode == 3  # its own spool: no daemon
    cancel = run_spoold("cancel", *both, job.name)
    assert cancel.returncode == 1 and job.name in cancel.stderr


def test_spoold_config_env_is_used_without_config_flag(tmp_path: Path) -> None:
    """§5: config file: --config PATH, else $SPOOLD_CONFIG, else /etc/spoold/spoold.yaml."""
    cfg = make_config(tmp_path)
    src = write_jsonl(tmp_path / "x.jsonl", [chat("a")])
    env = {**_env(), "SPOOLD_CONFIG": str(cfg)}
    proc = subprocess.run(
        [*SPOOLD, "submit", str(src)], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "spool" / "incoming" / "x.jsonl").exists()
    st = subprocess.run([*STATUS], capture_output=True, text=True, env=env, timeout=60)
    assert st.returncode == 3 and "spool" in st.stdout + st.stderr


def test_no_config_and_no_spool_says_what_to_pass(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "x.jsonl", [chat("a")])
    for args in (["submit", str(src)], ["jobs"], ["cancel", "j"], ["retry", "j"], ["run"]):
        proc = spoold_in(tmp_path, *args, timeout=30)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "--config" in proc.stderr and "--spool" in proc.stderr, (args, proc.stderr)
    st = spool_status(cwd=tmp_path)
    assert st.returncode == 3 and "--spool" in st.stdout + st.stderr


@pytest.mark.parametrize("command", ["run", "submit", "jobs", "cancel", "retry", "status"])
def test_wrong_config_key_is_named_and_spool_untouched(tmp_path: Path, command: str) -> None:
    """§5: a wrong key or value is a clear error naming it, at start (README: exit 2
    before touching the spool; spool-status exit 3)."""
    spool = tmp_path / "spool"
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"spool_dir": str(spool), "processing": {"chunk_sise": 5}}))
    src = write_jsonl(tmp_path / "x.jsonl", [chat("a")])
    args = {
        "run": ["run", "--drain"],
        "submit": ["submit", str(src)],
        "jobs": ["jobs"],
        "cancel": ["cancel", "j"],
        "retry": ["retry", "j"],
    }
    if command == "status":
        proc = spool_status("--config", str(cfg))
        assert proc.returncode == 3
    else:
        proc = run_spoold(*args[command], "--config", str(cfg), timeout=30)
        assert proc.returncode == 2
    assert "processing.chunk_sise" in proc.stdout + proc.stderr
    assert str(cfg) in proc.stdout + proc.stderr or "bad.yaml" in proc.stdout + proc.stderr
    assert not spool.exists()


# --- §5 spoold run --drain ---------------------------------------------------------------


def test_drain_leaves_uploads_in_progress_and_files_not_jobs(tmp_path: Path) -> None:
    """§2/§5: in-progress names are left alone; other files go to failed/; exit 0."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    incoming = spool / "incoming"
    uploads = [".x.jsonl", "a.jsonl.tmp", "b.jsonl.part", "c.jsonl.partial", "d.jsonl.filepart"]
    for name in uploads:
        write_jsonl(incoming / name, [chat("u")])
    write_jsonl(incoming / "job.jsonl", [chat("1"), chat("2")])
    (incoming / "notes.txt").write_text("hello\n")
    drain(cfg)
    assert sorted(os.listdir(incoming)) == sorted(uploads)
    done = only_job(spool, "done")
    assert done.name.startswith("job")
    st = state(done)
    assert st["status"] == "completed" and st["source_name"] == "job.jsonl"
    assert st["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    failed = only_job(spool, "failed")
    assert state(failed)["status"] == "failed" and state(failed)["error"]


# --- §5 cancel and retry -----------------------------------------------------------------


def test_cancel_running_then_retry_resumes_under_same_id(tmp_path: Path) -> None:
    """§3/§5: cancel → failed/ `cancelled`, partial results kept; retry of a cancelled job
    puts it back under the same id, resuming from its checkpoint (nothing committed is
    redone)."""
    cfg = slow_config(tmp_path)
    spool = tmp_path / "spool"
    ids = [f"r{i}" for i in range(400)]
    write_jsonl(spool / "incoming" / "long.jsonl", [chat(i) for i in ids])
    with daemon(cfg, log=tmp_path / "d.log"):
        job = running_job(spool)
        proc = run_spoold("cancel", "--config", str(cfg), job.name)
        assert proc.returncode == 0, proc.stderr
        failed = wait_for(
            lambda: (spool / "failed" / job.name).is_dir() and spool / "failed" / job.name,
            timeout=60,
            what="the cancelled job in failed/",
        )
    st = state(failed)
    assert st["status"] == "cancelled"
    kept = (failed / "output.jsonl").read_bytes()
    n_kept = len(kept.splitlines())
    assert 10 <= n_kept < 400 and st["request_counts"]["completed"] == n_kept
    assert "cancelled" in spool_status("--config", str(cfg), job.name).stdout

    proc = run_spoold("retry", "--config", str(cfg), job.name)
    assert proc.returncode == 0, proc.stderr
    assert (spool / "processing" / job.name).is_dir()
    listed = run_spoold("jobs", "--config", str(cfg), "--json", check=True).stdout
    assert [json.loads(line)["state"] for line in listed.splitlines()] == ["queued"]
    drain(cfg)
    done = spool / "done" / job.name
    assert done.is_dir(), os.listdir(spool / "done")
    out = read_results(done, "output.jsonl")
    assert sorted(r["custom_id"] for r in out) == sorted(ids)  # exactly once
    assert (done / "output.jsonl").read_bytes().startswith(kept)  # committed not redone
    assert state(done)["status"] == "completed"


def test_cancel_queued_job_without_daemon(tmp_path: Path) -> None:
    """§5: cancel a queued job (here: one a SIGTERM left in processing/)."""
    cfg = slow_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "q.jsonl", [chat(f"r{i}") for i in range(400)])
    with daemon(cfg, log=tmp_path / "d.log") as proc:
        job = running_job(spool)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert state(job)["status"] == "queued"  # README: stays in processing/ as queued
    (line,) = run_spoold("jobs", "--config", str(cfg), "--json", check=True).stdout.splitlines()
    assert json.loads(line)["state"] == "queued"
    c = run_spoold("cancel", "--config", str(cfg), job.name)
    assert c.returncode == 0, c.stderr
    drain(cfg)
    failed = spool / "failed" / job.name
    assert state(failed)["status"] == "cancelled"
    assert len(read_results(failed, "output.jsonl")) == state(failed)["request_counts"]["completed"]


def test_retry_done_job_resubmits_only_engine_failures(tmp_path: Path) -> None:
    """§5: for a finished job, a new job in incoming/ from its errors.jsonl requests that
    can be retried (README: incoming/<job_id>.retry.jsonl; invalid lines are not)."""
    cfg = make_config(
        tmp_path,
        engine={"backend": "fake", "fake": {"fail_marker": "POISON"}},
    )
    spool = tmp_path / "spool"
    write_jsonl(
        spool / "incoming" / "mix.jsonl",
        [chat("a"), chat("p", "POISON here"), chat("b"), {**chat("bad"), "method": "GET"}],
    )
    drain(cfg)
    job = only_job(spool, "done")
    errs = {r["custom_id"]: r for r in read_results(job, "errors.jsonl")}
    assert set(errs) == {"p", "bad"}
    assert state(job)["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    proc = run_spoold("retry", "--config", str(cfg), job.name)
    assert proc.returncode == 0, proc.stderr
    retry_file = spool / "incoming" / f"{job.name}.retry.jsonl"
    assert retry_file.exists(), os.listdir(spool / "incoming")
    lines = [json.loads(line) for line in retry_file.read_text().splitlines()]
    assert [r["custom_id"] for r in lines] == ["p"]
    assert lines[0]["body"]["messages"][0]["content"] == "POISON here"
    assert retry_file.name in proc.stdout


def test_retry_and_cancel_refuse_what_they_cannot_do(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    for cmd in ("retry", "cancel"):
        proc = run_spoold(cmd, "--config", str(cfg), "no-such-job")
        assert proc.returncode == 1, (cmd, proc.stderr)
        assert "no-such-job" in proc.stderr
    write_jsonl(spool / "incoming" / "a.jsonl", [chat("a")])
    drain(cfg)
    job = only_job(spool, "done")
    proc = run_spoold("cancel", "--config", str(cfg), job.name)
    assert proc.returncode == 1 and job.name in proc.stderr
    assert state(job)["status"] == "completed"


# --- §5 spoold jobs ----------------------------------------------------------------------

JOBS_KEYS = {"id", "state", "source_name", "request_counts", "model", "created_at"}


def test_jobs_lists_every_state_newest_first(tmp_path: Path) -> None:
    cfg = slow_config(tmp_path, limits={"max_queue_depth": 2, "max_requests_per_job": 500})
    spool = tmp_path / "spool"
    incoming = spool / "incoming"
    write_jsonl(incoming / "one.jsonl", [chat("a"), chat("b")])
    drain(cfg)  # completed
    time.sleep(1.1)
    write_jsonl(incoming / "big.jsonl", [chat(f"r{i}") for i in range(501)])
    drain(cfg)  # failed: over max_requests_per_job
    time.sleep(1.1)
    write_jsonl(incoming / "cx.jsonl", [chat(f"r{i}") for i in range(300)])
    with daemon(cfg, log=tmp_path / "d0.log"):
        cx = running_job(spool)
        run_spoold("cancel", "--config", str(cfg), cx.name, check=True)
        wait_for(lambda: (spool / "failed" / cx.name).is_dir(), timeout=60, what="cancelled")
    time.sleep(1.1)
    with daemon(cfg, log=tmp_path / "d1.log"):
        write_jsonl(incoming / "run.jsonl", [chat(f"r{i}") for i in range(400)])
        running = running_job(spool)
        time.sleep(1.1)
        write_jsonl(incoming / "next.jsonl", [chat("a")])
        wait_for(lambda: not (incoming / "next.jsonl").exists(), what="next.jsonl claimed")
        time.sleep(1.1)
        write_jsonl(incoming / "later.jsonl", [chat("a")])  # queue full: waits
        time.sleep(1.5)
        assert (incoming / "later.jsonl").exists()
        proc = run_spoold("jobs", "--config", str(cfg), "--json")
        table = run_spoold("jobs", "--config", str(cfg))
        only_failed = run_spoold("jobs", "--config", str(cfg), "--json", "--state", "failed")
        only_wait = run_spoold("jobs", "--config", str(cfg), "--json", "--state", "waiting")
        st = spool_status("--config", str(cfg))
        st_wait = spool_status("--config", str(cfg), "later.jsonl")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    for row in rows:
        assert set(row) >= JOBS_KEYS, row
    got = [(r["state"], r["source_name"]) for r in rows]
    assert got == [
        ("waiting", "later.jsonl"),
        ("queued", "next.jsonl"),
        ("running", "run.jsonl"),
        ("cancelled", "cx.jsonl"),
        ("failed", "big.jsonl"),
        ("completed", "one.jsonl"),
    ]
    assert rows[0]["id"] == "later.jsonl"
    assert rows[0]["request_counts"] == {"total": 0, "completed": 0, "failed": 0} or set(
        rows[0]["request_counts"]
    ) >= {"completed", "failed", "total"}
    assert rows[2]["id"] == running.name
    assert rows[-1]["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert rows[-1]["model"] == "fake-model"
    assert [json.loads(line)["source_name"] for line in only_failed.stdout.splitlines()] == [
        "big.jsonl"
    ]
    assert [json.loads(line)["id"] for line in only_wait.stdout.splitlines()] == ["later.jsonl"]
    header = table.stdout.splitlines()[0].upper()
    for column in ("ID", "STATE", "MODEL", "SOURCE", "AGE"):
        assert column in header, header
    assert "1 waiting" in st.stdout and "1 queued" in st.stdout and "1 running" in st.stdout
    assert st_wait.returncode == 0 and "incoming" in st_wait.stdout, st_wait.stdout


def test_jobs_extra_keys_beyond_spec(tmp_path: Path) -> None:
    """§5 names the --json keys; report any extra (a strict reading: 'with keys …')."""
    cfg = make_config(tmp_path)
    write_jsonl(tmp_path / "spool" / "incoming" / "a.jsonl", [chat("a")])
    drain(cfg)
    (line,) = run_spoold("jobs", "--config", str(cfg), "--json", check=True).stdout.splitlines()
    assert set(json.loads(line)) == JOBS_KEYS


def test_jobs_rejects_unknown_state(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    proc = run_spoold("jobs", "--config", str(cfg), "--state", "done")
    assert proc.returncode == 2 and "completed" in proc.stderr


# --- §5 spoold validate ------------------------------------------------------------------


def test_validate_reports_problems_and_submits_nothing(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", [chat("a"), completion("b")])
    proc = run_spoold("validate", str(good))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [chat("a"), "", {**chat("b"), "url": "/v1/nope"}, chat("a"), "not json"],
    )
    proc = run_spoold("validate", "--config", str(cfg), str(bad))
    assert proc.returncode == 1
    out = proc.stdout
    assert "line 3" in out and "url" in out
    assert "line 4" in out and "custom_id" in out
    assert "line 5" in out
    assert "line 1:" not in out and "line 2:" not in out
    assert os.listdir(tmp_path / "spool" / "incoming") == []
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert run_spoold("validate", str(empty)).returncode == 1
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(
        json.dumps(chat("a", "caf\xe9")).encode("latin-1").replace(b"\\u00e9", b"\xe9")
    )
    proc = run_spoold("validate", str(latin))
    assert proc.returncode == 1 and "UTF-8" in proc.stdout + proc.stderr


# --- §5 spool-status -----------------------------------------------------------------------


def test_spool_status_exit_codes_healthy_degraded_down_never(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    assert spool_status("--config", str(cfg)).returncode == 3
    assert spool_status("--config", str(cfg), "--json").returncode == 3
    run_spoold("run", "--config", str(cfg), "--instance", "b", "--drain", check=True)
    assert spool_status("--config", str(cfg)).returncode == 2  # only a stopped daemon
    (spool / "heartbeats" / "b.json").unlink()
    with daemon(cfg, log=tmp_path / "d.log") as proc:
        wait_for(lambda: heartbeat(spool).get("status") == "idle", what="idle")
        ok = spool_status("--config", str(cfg))
        assert ok.returncode == 0, ok.stdout
        js = spool_status("--config", str(cfg), "--json")
        assert js.returncode == 0 and json.loads(js.stdout)
        run_spoold("run", "--config", str(cfg), "--instance", "b", "--drain", check=True)
        deg = spool_status("--config", str(cfg))
        assert deg.returncode == 1, deg.stdout  # README: a stopped daemon beside a live one
        (spool / "heartbeats" / "b.json").unlink()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert heartbeat(spool)["status"] != "stopped"
    time.sleep(5.5)  # heartbeat.stale_after_s is 5
    down = spool_status("--config", str(cfg))
    assert down.returncode == 2, down.stdout


def test_spool_status_job_shows_result_paths(tmp_path: Path) -> None:
    """§5: spool-status JOB_ID shows the paths of the job's result files."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "r.jsonl", [chat("a"), {**chat("b"), "method": "GET"}])
    drain(cfg)
    job = only_job(spool, "done")
    proc = spool_status("--config", str(cfg), job.name)
    assert proc.returncode == 2, proc.stdout + proc.stderr  # found; daemon stopped
    assert str(job / "output.jsonl") in proc.stdout
    assert str(job / "errors.jsonl") in proc.stdout
    assert "1 failed" in proc.stdout.splitlines()[0]  # README: done with failed requests
    js = spool_status("--config", str(cfg), "--json", job.name)
    data = json.loads(js.stdout)
    found = json.dumps(data)
    assert str(job / "output.jsonl") in found and str(job / "errors.jsonl") in found
    missing = spool_status("--config", str(cfg), "nope-123")
    assert missing.returncode == 1 and "nope-123" in missing.stdout + missing.stderr


def test_spool_status_relative_spool_paths_resolve(tmp_path: Path) -> None:
    """The README's demo: `--spool spool` from the clone; the result paths printed must
    open from where the command was run."""
    cfg = make_config(tmp_path)
    write_jsonl(tmp_path / "spool" / "incoming" / "r.jsonl", [chat("a")])
    drain(cfg)
    job = only_job(tmp_path / "spool", "done")
    proc = spool_status("--spool", "spool", job.name, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = next(x for x in proc.stdout.splitlines() if "results:" in x)
    first = line.split("results:")[1].split(",")[0].strip()
    assert (tmp_path / first).is_file(), first


def test_spool_status_never_imports_vllm_torch_nvml(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['spool-status', '--config', {str(cfg)!r}]\n"
        "try:\n    runpy.run_module('spoold.status', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('vllm', 'torch', 'pynvml')]\n"
        "print('IMPORTED', bad)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr
    t0 = time.monotonic()
    spool_status("--config", str(cfg))
    assert time.monotonic() - t0 < 5


# --- §8 systemd ---------------------------------------------------------------------------


@pytest.mark.skipif(
    not (shutil.which("systemd-sysusers") and shutil.which("systemd-tmpfiles")),
    reason="needs systemd-sysusers and systemd-tmpfiles",
)
def test_sysusers_and_tmpfiles_apply_under_root(tmp_path: Path) -> None:
    """§8: both apply with systemd-sysusers / systemd-tmpfiles --create, also under
    --root=DIR; the uploaders' group can drop into incoming/ and read results."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    su = subprocess.run(
        ["systemd-sysusers", f"--root={root}", str(REPO / "systemd" / "spoold.sysusers")],
        capture_output=True,
        text=True,
    )
    assert su.returncode == 0, su.stderr
    passwd = (root / "etc" / "passwd").read_text()
    group = (root / "etc" / "group").read_text()
    assert any(line.startswith("spoold:") for line in passwd.splitlines())
    users_line = next(x for x in group.splitlines() if x.startswith("spoold-users:"))
    assert "spoold" in users_line.split(":")[3].split(",")
    tf = subprocess.run(
        [
            "systemd-tmpfiles",
            "--create",
            f"--root={root}",
            str(REPO / "systemd" / "spoold.tmpfiles"),
        ],
        capture_output=True,
        text=True,
    )
    assert tf.returncode == 0, tf.stderr
    uid = int(next(x for x in passwd.splitlines() if x.startswith("spoold:")).split(":")[2])
    gid = int(users_line.split(":")[2])
    base = root / "var" / "spool" / "spoold"
    for sub in ("", "incoming", "processing", "done", "failed", "heartbeats"):
        st = (base / sub).stat()
        assert (st.st_uid, st.st_gid) == (uid, gid), sub
        assert st.st_mode & stat.S_IRGRP and st.st_mode & stat.S_IXGRP, sub
    inc = (base / "incoming").stat().st_mode
    assert inc & stat.S_IWGRP and inc & stat.S_ISGID


def test_job_files_are_group_readable_under_umask_022(tmp_path: Path) -> None:
    """§8: the uploaders' group reads results: the files the daemon writes must be
    group-readable (under systemd's default UMask=0022, or the unit's own)."""
    unit = (REPO / "systemd" / "spoold.service").read_text()
    umask = next(
        (int(x.split("=")[1], 8) for x in unit.splitlines() if x.startswith("UMask=")), 0o022
    )
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "r.jsonl", [chat("a"), {**chat("b"), "method": "GET"}])
    old = os.umask(umask)
    try:
        drain(cfg)
    finally:
        os.umask(old)
    job = only_job(spool, "done")
    for f in job.iterdir():
        assert f.stat().st_mode & stat.S_IRGRP, f"{f.name}: {oct(f.stat().st_mode)}"
    hb = spool / "heartbeats" / "default.json"
    assert hb.stat().st_mode & stat.S_IRGRP, oct(hb.stat().st_mode)


# --- help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "submit", "cancel", "retry", "jobs"])
def test_help_names_config_and_spool(command: str) -> None:
    proc = run_spoold(command, "--help", check=True)
    assert "--config" in proc.stdout and "--spool" in proc.stdout


def test_spool_status_help_gives_exit_codes() -> None:
    proc = spool_status("--help")
    assert proc.returncode == 0
    for code in ("0", "1", "2", "3"):
        assert code in proc.stdout
    assert "degraded" in proc.stdout.lower() and "down" in proc.stdout.lower()


# --- round 2: formats, records, edges -------------------------------------------------


def test_result_and_state_records_have_spec_keys(tmp_path: Path) -> None:
    """§4: output/errors line keys; state.json's keys, ISO 8601 UTC times, counts; the
    job id begins with the file's sanitised stem."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(
        spool / "incoming" / "my batch é!.jsonl",
        [chat("a"), completion("b"), "", {**chat("c"), "method": "GET"}],
    )
    drain(cfg)
    job = only_job(spool, "done")
    assert job.name.startswith("my"), job.name
    assert "/" not in job.name and " " not in job.name, job.name
    st = state(job)
    for key in ("id", "source_name", "status", "model", "created_at", "started_at"):
        assert key in st, key
    assert st["id"] == job.name and st["source_name"] == "my batch é!.jsonl"
    assert st["status"] == "completed" and st["error"] is None
    assert st["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    for key in ("created_at", "started_at", "finished_at"):
        assert st[key].endswith(("Z", "+00:00")), st[key]
    by_id = {r["custom_id"]: r for r in read_results(job, "output.jsonl")}
    assert by_id["a"]["response"]["status_code"] == 200 and by_id["a"]["error"] is None
    assert by_id["a"]["id"].startswith("batch_req_")
    body = by_id["a"]["response"]["body"]
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert set(body["usage"]) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    tb = by_id["b"]["response"]["body"]
    assert tb["object"] == "text_completion" and isinstance(tb["choices"][0]["text"], str)
    (err,) = read_results(job, "errors.jsonl")
    assert set(err) >= {"id", "custom_id", "response", "error"}
    assert err["custom_id"] == "c" and set(err["error"]) >= {"code", "message"}
    assert "line 4" in err["error"]["message"]


def test_heartbeat_while_processing_names_current_job(tmp_path: Path) -> None:
    """§4: heartbeat keys; current_job {id, completed, total, tokens_per_s}; gpu null
    without NVML; seq grows by one at every write."""
    cfg = slow_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "hb.jsonl", [chat(f"r{i}") for i in range(300)])
    with daemon(cfg, log=tmp_path / "d.log"):
        job = running_job(spool)
        hb = wait_for(lambda: (h := heartbeat(spool)).get("current_job") and h, what="current_job")
        seq1 = hb["seq"]
        hb2 = wait_for(lambda: (h := heartbeat(spool)).get("seq", 0) > seq1 and h, what="seq")
    assert hb["status"] == "processing"
    assert set(hb["current_job"]) >= {"id", "completed", "total", "tokens_per_s"}
    assert hb["current_job"]["id"] == job.name and hb["current_job"]["total"] == 300
    assert "gpu" in hb and "limits" in hb and hb["problems"] == []
    assert hb2["seq"] >= seq1 + 1


def test_spoold_jobs_and_status_name_an_unreadable_state_json(tmp_path: Path) -> None:
    """README: `spoold jobs` lists a job whose state.json cannot be read as its directory
    says, names it on stderr, exits 0."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "a.jsonl", [chat("a")])
    drain(cfg)
    job = only_job(spool, "done")
    (job / "state.json").write_text("{torn")
    proc = run_spoold("jobs", "--config", str(cfg), "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = [json.loads(line) for line in proc.stdout.splitlines()]
    assert row["id"] == job.name and row["state"] == "completed"
    assert job.name in proc.stderr
    # spool-status counts done/ by its directories and reads no finished job's record
    # (10,000 of them in 0.1 s): a torn one there is `spoold jobs`'s to name, not its.


def test_status_degraded_for_unreadable_processing_job(tmp_path: Path) -> None:
    """§3: a job whose records cannot be read is reported (heartbeat problems,
    spool-status degraded) and left where it is while the daemon goes on."""
    cfg = slow_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "t.jsonl", [chat(f"r{i}") for i in range(300)])
    with daemon(cfg, log=tmp_path / "d0.log") as proc:
        job = running_job(spool)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    (job / "state.json").write_text("{torn")
    write_jsonl(spool / "incoming" / "next.jsonl", [chat("a")])
    with daemon(cfg, log=tmp_path / "d1.log"):
        wait_for(lambda: job_dirs(spool, "done"), what="the other job done")
        wait_for(lambda: heartbeat(spool).get("problems"), what="a problem reported")
        st = spool_status("--config", str(cfg))
        listed = run_spoold("jobs", "--config", str(cfg), "--json")
    assert st.returncode == 1, st.stdout
    assert job.name in st.stdout
    assert job.is_dir()
    assert listed.returncode == 0 and job.name in listed.stderr


def test_second_daemon_same_instance_exits_2_naming_holder(tmp_path: Path) -> None:
    """§3 / §5 exit codes: one live daemon per instance; the second exits 2 naming the
    instance and the holder (pid, host)."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    with daemon(cfg, log=tmp_path / "d.log") as first:
        wait_for(lambda: heartbeat(spool).get("status") == "idle", what="idle")
        second = run_spoold("run", "--config", str(cfg), "--drain", timeout=60)
        assert first.poll() is None
    assert second.returncode == 2
    msg = second.stdout + second.stderr
    assert "default" in msg and str(first.pid) in msg, msg


def test_missing_named_config_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    proc = run_spoold("jobs", "--config", str(missing))
    assert proc.returncode == 2 and "nope.yaml" in proc.stderr
    st = spool_status("--config", str(missing))
    assert st.returncode == 3 and "nope.yaml" in st.stdout + st.stderr
    # with --spool too: a named config that is missing is still an error (README)
    st = spool_status("--config", str(missing), "--spool", str(tmp_path / "s"))
    assert st.returncode == 3, st.stdout + st.stderr


def test_retry_model_load_failure_requeues_under_same_id(tmp_path: Path) -> None:
    """§3: after max_model_load_attempts that model's jobs go to failed/ naming the model;
    --drain exits 1. §5: retry of a job that failed whole → same id, resumes."""
    common: dict[str, Any] = {"models": {"bad": "broken-model"}}
    cfg = make_config(
        tmp_path,
        engine={"backend": "fake", **common, "fake": {"load_fail_marker": "broken"}},
        processing={"max_model_load_attempts": 1, "model_retry_s": 0.1},
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "m.jsonl", [chat("a", model="bad"), chat("b", model="bad")])
    write_jsonl(spool / "incoming" / "ok.jsonl", [chat("c")])
    proc = run_spoold("run", "--config", str(cfg), "--drain", timeout=120)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    job = only_job(spool, "failed")
    st = state(job)
    assert st["status"] == "failed" and "broken-model" in st["error"], st["error"]
    assert only_job(spool, "done").name.startswith("ok")
    fixed = make_config(tmp_path, engine={"backend": "fake", **common})
    r = run_spoold("retry", "--config", str(fixed), job.name)
    assert r.returncode == 0, r.stderr
    drain(fixed)
    done = spool / "done" / job.name
    assert state(done)["status"] == "completed", state(done)
    assert sorted(x["custom_id"] for x in read_results(done, "output.jsonl")) == ["a", "b"]


def test_retry_refuses_a_rejected_job(tmp_path: Path) -> None:
    """README: a job rejected before it was queued (a limit) is not retried."""
    cfg = make_config(tmp_path, limits={"max_requests_per_job": 1})
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "two.jsonl", [chat("a"), chat("b")])
    drain(cfg)
    job = only_job(spool, "failed")
    assert "max_requests_per_job" in state(job)["error"]
    proc = run_spoold("retry", "--config", str(cfg), job.name)
    assert proc.returncode == 1 and job.name in proc.stderr
    assert os.listdir(spool / "incoming") == []


def test_spool_status_queued_job_shows_no_none(tmp_path: Path) -> None:
    cfg = slow_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "q.jsonl", [chat(f"r{i}") for i in range(300)])
    with daemon(cfg, log=tmp_path / "d.log"):
        running_job(spool)
        write_jsonl(spool / "incoming" / "q2.jsonl", [chat("x")])
        q2 = wait_for(
            lambda: next(
                (d for d in job_dirs(spool, "processing") if d.name.startswith("q2")), None
            ),
            what="q2 claimed",
        )
        proc = spool_status("--config", str(cfg), q2.name)
        js = spool_status("--config", str(cfg), "--json", q2.name)
    assert "None" not in proc.stdout and "null" not in proc.stdout, proc.stdout
    assert "queued" in proc.stdout
    res = json.loads(js.stdout)
    assert "results" in json.dumps(res)


def test_validate_accepts_embeddings_requests(tmp_path: Path) -> None:
    """§2 Validation: `url` one of /v1/chat/completions, /v1/completions, /v1/embeddings;
    `body` with `input` for embeddings. §5: validate checks as admission would."""
    f = write_jsonl(
        tmp_path / "emb.jsonl",
        [
            {
                "custom_id": "e1",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "any", "input": "hello"},
            }
        ],
    )
    proc = run_spoold("validate", str(f))
    assert proc.returncode == 0, proc.stdout


def test_validate_help_does_not_offer_spool() -> None:
    """validate takes no --spool: its help must not tell a newcomer what --spool does."""
    proc = run_spoold("validate", "--help", check=True)
    assert "--spool" not in proc.stdout, proc.stdout


def test_submit_of_a_dot_file_gives_a_name_the_daemon_claims(tmp_path: Path) -> None:
    """§5 submit copies files into incoming/ to become jobs; §2 leaves names beginning with
    `.` alone for ever. A submitted `.hidden.jsonl` must become a job (or be refused),
    not sit in incoming/ as an 'upload in progress' after `submit` said it was done."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    src = write_jsonl(tmp_path / ".hidden.jsonl", [chat("a")])
    proc = run_spoold("submit", "--config", str(cfg), str(src))
    if proc.returncode == 0:
        drain(cfg)
        assert job_dirs(spool, "done"), (proc.stdout, os.listdir(spool / "incoming"))
    else:
        assert proc.returncode == 1 and ".hidden.jsonl" in proc.stderr


def test_spool_status_names_a_spool_directory_it_cannot_list(tmp_path: Path) -> None:
    """§5 spool-status is the monitoring plugin: a spool directory it cannot list (here
    done/ is a plain file; EACCES for a user outside spoold-users is the same path) must
    give a message naming it and one of its exit codes, not a traceback."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    (spool / "done").write_text("")
    proc = spool_status("--config", str(cfg))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "done" in proc.stdout + proc.stderr
    jobs = run_spoold("jobs", "--config", str(cfg))
    assert jobs.returncode == 1 and "done" in jobs.stderr and "Traceback" not in jobs.stderr


def test_spool_status_unreadable_heartbeat_is_not_never_seen(tmp_path: Path) -> None:
    """§5 exit 3 is 'no daemon ever seen'; README: a heartbeat file that cannot be read is
    degraded (1). A torn heartbeat proves a daemon was seen."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    drain(cfg)  # a daemon has run here
    (spool / "heartbeats" / "default.json").write_text("{torn")
    proc = spool_status("--config", str(cfg))
    assert proc.returncode in (1, 2), proc.stdout
    assert "never" not in proc.stdout, proc.stdout
