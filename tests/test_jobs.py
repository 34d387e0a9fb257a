"""`spoold jobs` (SPEC §5) on spools made by running real jobs through `spoold run`: every
job in every state, newest first, as a table and as JSON lines."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    SPOOLD,
    _env,
    chat,
    drain,
    job_dirs,
    make_config,
    run_spoold,
    start_spoold,
    state,
    wait_for,
    write_jsonl,
)

JSON_KEYS = ["id", "state", "source_name", "request_counts", "model", "created_at"]
STATES = ["waiting", "queued", "running", "completed", "failed", "cancelled"]
INVALID = '{"custom_id": "bad", "method": "GET", "url": "/v1/chat/completions", "body": {}}'


def jobs(*args: str) -> subprocess.CompletedProcess[str]:
    return run_spoold("jobs", *args, timeout=60)


def jobs_json(spool: Path, *args: str) -> list[dict[str, Any]]:
    proc = jobs("--spool", str(spool), "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _job_named(spool: Path, where: str, source: str) -> Path:
    (job,) = [j for j in job_dirs(spool, where) if state(j)["source_name"] == source]
    return job


@pytest.fixture(scope="module")
def spool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A spool after real runs: a clean job, one done with 2 of 10 requests failed, one
    that failed whole, one cancelled; then files left waiting (one uploaded a day ago)
    and uploads in progress."""
    tmp = tmp_path_factory.mktemp("jobs")
    cfg = make_config(tmp)
    spool = tmp / "spool"
    incoming = spool / "incoming"
    write_jsonl(incoming / "ok.jsonl", [chat(f"o{i}") for i in range(3)])
    write_jsonl(incoming / "mixed.jsonl", [chat(f"m{i}") for i in range(8)] + [INVALID] * 2)
    write_jsonl(incoming / "bad.jsonl", [INVALID, "{not json"])
    # Claimed in mtime order, so created_at runs ok < mixed < bad.
    for age, name in ((30, "ok.jsonl"), (20, "mixed.jsonl"), (10, "bad.jsonl")):
        os.utime(incoming / name, (time.time() - age,) * 2)
    drain(cfg)
    # A queued job, claimed (as a daemon with a full queue would) and cancelled.
    from spoold.spool import Spool, classify

    write_jsonl(incoming / "stop.jsonl", [chat("s1"), chat("s2")])
    claimed = Spool(spool)
    entry = classify(incoming / "stop.jsonl")
    assert entry is not None
    job_id = claimed.claim(entry, 2, entry.size)
    assert job_id
    run_spoold("cancel", "--config", str(cfg), job_id, check=True)
    drain(cfg)
    time.sleep(0.05)  # the waiting files are younger than every job
    write_jsonl(incoming / "later.jsonl", [chat("l1")])
    write_jsonl(incoming / "old-upload.jsonl", [chat("u1")])
    day_ago = time.time() - 86400 - 120
    os.utime(incoming / "old-upload.jsonl", (day_ago, day_ago))
    for name in (".hidden.jsonl", "big.jsonl.part", "x.jsonl.tmp", "notes.txt"):
        (incoming / name).write_text("{}\n")  # uploads in progress, not jobs
    return spool


def _expected(spool: Path) -> list[tuple[str, str]]:
    """(id, state) of every job, newest first, from the files themselves."""
    cancelled = job_dirs(spool, "failed")
    return [
        ("later.jsonl", "waiting"),
        (next(j.name for j in cancelled if state(j)["status"] == "cancelled"), "cancelled"),
        (_job_named(spool, "failed", "bad.jsonl").name, "failed"),
        (_job_named(spool, "done", "mixed.jsonl").name, "completed"),
        (_job_named(spool, "done", "ok.jsonl").name, "completed"),
        ("old-upload.jsonl", "waiting"),
    ]


def test_json_lists_every_job_newest_first_with_the_spec_keys(spool: Path) -> None:
    listed = jobs_json(spool)
    assert [(j["id"], j["state"]) for j in listed] == _expected(spool)
    for j in listed:
        assert list(j) == JSON_KEYS, j
    by_source = {j["source_name"]: j for j in listed}
    mixed = by_source["mixed.jsonl"]
    assert mixed["request_counts"] == {"total": 10, "completed": 8, "failed": 2}
    assert mixed["model"] == "fake-model"
    assert by_source["ok.jsonl"]["request_counts"] == {"total": 3, "completed": 3, "failed": 0}
    for where in ("done", "failed"):  # every job's line is its state.json's
        for job in job_dirs(spool, where):
            record = state(job)
            shown = next(j for j in listed if j["id"] == job.name)
            for key in ("source_name", "request_counts", "model", "created_at"):
                assert shown[key] == record[key], key
    # A waiting file: its name, its mtime as created_at, nothing counted yet.
    old = by_source["old-upload.jsonl"]
    mtime = (spool / "incoming" / "old-upload.jsonl").stat().st_mtime
    assert old["id"] == "old-upload.jsonl" and old["model"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", old["created_at"])
    shown_at = datetime.fromisoformat(old["created_at"].replace("Z", "+00:00")).timestamp()
    assert abs(shown_at - mtime) < 0.001


@pytest.mark.parametrize("wanted", STATES)
def test_state_keeps_only_the_jobs_in_that_state_in_order(spool: Path, wanted: str) -> None:
    listed = jobs_json(spool, "--state", wanted)
    assert [(j["id"], j["state"]) for j in listed] == [
        (i, s) for i, s in _expected(spool) if s == wanted
    ]
    table = jobs("--spool", str(spool), "--state", wanted)
    assert table.returncode == 0
    if not listed:
        assert table.stdout == f"no {wanted} jobs in {spool}\n"


def test_a_state_that_is_not_one_is_refused_naming_the_choices(spool: Path) -> None:
    proc = jobs("--spool", str(spool), "--state", "done")
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--state" in proc.stderr and "'done'" in proc.stderr
    assert all(s in proc.stderr for s in STATES)


def test_the_table_has_a_header_and_aligned_columns(spool: Path) -> None:
    proc = jobs("--spool", str(spool))
    assert proc.returncode == 0 and proc.stderr == ""
    header, *rows = proc.stdout.splitlines()
    assert header.split() == [
        "ID", "STATE", "COMPLETED", "FAILED", "TOTAL", "MODEL", "SOURCE", "AGE",
    ]  # fmt: skip
    expected = _expected(spool)
    assert len(rows) == len(expected)

    def cell(row: str, name: str, right: bool = False) -> str:
        """The cell under `name`: from its start (left-aligned) or to its end (right)."""
        at = header.index(name)
        if right:
            return row[: at + len(name)].split()[-1]
        assert at == 0 or row[at - 1] == " ", (row, name)
        return row[at:].split()[0]

    by_source = {j["source_name"]: j for j in jobs_json(spool)}
    for row, (job_id, job_state) in zip(rows, expected, strict=True):
        assert cell(row, "ID") == job_id and cell(row, "STATE") == job_state
        source = cell(row, "SOURCE")
        counts = by_source[source]["request_counts"]
        for name in ("COMPLETED", "FAILED", "TOTAL"):
            shown = cell(row, name, right=True)
            assert shown == ("-" if job_state == "waiting" else str(counts[name.lower()])), row
        assert cell(row, "MODEL") == (by_source[source]["model"] or "-")
    assert re.search(r" \d?\ds$", rows[0]) and rows[-1].endswith(" 1d00h"), rows
    mixed = next(r for r in rows if "mixed.jsonl" in r)
    assert re.search(r"completed\s+8\s+2\s+10\s+fake-model\s+mixed\.jsonl", mixed)


def test_an_unreadable_state_json_is_listed_and_reported(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "a.jsonl", [chat("a")])
    write_jsonl(spool / "incoming" / "b.jsonl", [chat("b")])
    drain(cfg)
    broken = _job_named(spool, "done", "a.jsonl")
    typed = _job_named(spool, "done", "b.jsonl")
    (broken / "state.json").write_text('{"id": "torn')
    record = state(typed)
    (typed / "state.json").write_text(json.dumps({**record, "request_counts": "ten"}))
    stuck = spool / "processing" / "stuck-20261127T000000-abcdef"
    stuck.mkdir(parents=True)  # no state.json at all
    write_jsonl(spool / "incoming" / "c.jsonl", [chat("c")])
    listed = jobs_json(spool)
    assert {j["id"]: j["state"] for j in listed} == {
        "c.jsonl": "waiting",
        broken.name: "completed",  # done/ says so
        typed.name: "completed",
        stuck.name: "queued",
    }
    assert all(list(j) == JSON_KEYS for j in listed)
    proc = jobs("--spool", str(spool))
    assert proc.returncode == 0
    assert proc.stdout.count("(state.json unreadable)") == 3
    for job, why in (
        (broken, "state.json is not JSON"),
        (typed, "request_counts"),
        (stuck, "state.json is missing"),
    ):
        (line,) = [ln for ln in proc.stderr.splitlines() if str(job) in ln]
        assert why in line and "repair its state.json" in line
    assert len(jobs_json(spool, "--state", "queued")) == 1


def test_queued_and_running_jobs_of_a_live_daemon(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path, engine={"backend": "fake", "fake": {"delay_per_request_s": 0.01, "batch_size": 5}}
    )
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "long.jsonl", [chat(f"l{i}") for i in range(3000)])
    with _daemon(cfg):
        wait_for(lambda: jobs_json(spool, "--state", "running"), what="the long job to run")
        write_jsonl(spool / "incoming" / "behind.jsonl", [chat("b1"), chat("b2")])
        wait_for(lambda: jobs_json(spool, "--state", "queued"), what="the second to be claimed")
        listed = jobs_json(spool)
    assert [(j["source_name"], j["state"]) for j in listed] == [
        ("behind.jsonl", "queued"),
        ("long.jsonl", "running"),
    ]
    assert listed[1]["request_counts"]["total"] == 3000
    assert listed[0]["id"] == _job_named(spool, "processing", "behind.jsonl").name


class _daemon:
    """`spoold run` in the background; SIGTERM (then SIGKILL) when the block ends."""

    def __init__(self, cfg: Path) -> None:
        self.cfg = cfg

    def __enter__(self) -> subprocess.Popen[bytes]:
        self.proc = start_spoold("run", "--config", str(self.cfg))
        return self.proc

    def __exit__(self, *_: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        finally:
            self.proc.kill()
            self.proc.wait()


def test_config_and_spool_alone_or_together(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "here.jsonl", [chat("a")])
    other = tmp_path / "other"
    (other / "incoming").mkdir(parents=True)
    write_jsonl(other / "incoming" / "there.jsonl", [chat("a")])

    def ids(*args: str) -> list[str]:
        proc = jobs("--json", *args)
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line)["id"] for line in proc.stdout.splitlines()]

    assert ids("--config", str(cfg)) == ["here.jsonl"]
    assert ids("--config", str(cfg), "--spool", str(other)) == ["there.jsonl"]
    assert ids("--spool", str(other)) == ["there.jsonl"]  # no config anywhere: defaults
    missing = tmp_path / "nope.yaml"
    proc = jobs("--config", str(missing), "--spool", str(other))
    assert proc.returncode == 2 and str(missing) in proc.stderr and proc.stdout == ""
    proc = jobs("--spool", str(tmp_path / "no-spool"))
    assert proc.returncode == 2 and str(tmp_path / "no-spool") in proc.stderr


def test_an_empty_spool_says_so(tmp_path: Path) -> None:
    (tmp_path / "incoming").mkdir()
    proc = jobs("--spool", str(tmp_path))
    assert proc.returncode == 0 and proc.stdout == f"no jobs in {tmp_path}\n"
    assert jobs("--spool", str(tmp_path), "--json").stdout == ""


def test_jobs_does_not_import_heavy_modules(spool: Path) -> None:
    code = (
        "import sys; from spoold.cli import main; main(['jobs', '--spool', sys.argv[1]]); "
        "print('HEAVY', [m for m in ('vllm', 'torch', 'pynvml', 'structlog') if m in sys.modules])"
    )
    proc = subprocess.run(
        [SPOOLD[0], "-c", code, str(spool)], capture_output=True, text=True, env=_env()
    )
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_a_name_that_is_not_printable_stays_on_one_row(tmp_path: Path) -> None:
    (tmp_path / "incoming").mkdir()
    write_jsonl(tmp_path / "incoming" / "two\nlines.jsonl", [chat("a")])
    os.close(os.open(tmp_path / "incoming" / b"caf\xe9.jsonl".decode(errors="surrogateescape"),
                     os.O_CREAT | os.O_WRONLY))  # fmt: skip
    proc = jobs("--spool", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    _, *rows = proc.stdout.splitlines()
    assert len(rows) == 2 and any("two\\nlines.jsonl" in r for r in rows), proc.stdout
    assert any("caf\\udce9.jsonl" in r for r in rows), proc.stdout
    listed = jobs_json(tmp_path)
    assert {j["id"] for j in listed} == {"two\nlines.jsonl", "caf\udce9.jsonl"}
