"""`spool-status` on spools made by real runs (SPEC §5): where it looks (`--config` and
`--spool`, alone or together) and what `spool-status JOB_ID` says of one job."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.helpers import _env, chat, drain, job_dirs, make_config, run_spoold, state, write_jsonl

STATUS = str(Path(sys.executable).parent / "spool-status")
INVALID = '{"custom_id": "bad", "method": "GET", "url": "/v1/chat/completions", "body": {}}'


def spool_status(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [STATUS, *args], capture_output=True, text=True, timeout=30, env={**_env(), **env}
    )


def _beat_aged(spool: Path, seconds: float) -> None:
    """A daemon's heartbeat, `seconds` old (idle, nothing wrong)."""
    at = (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")
    beat = {"pid": 1, "hostname": "h", "instance": "default", "status": "idle"}
    beat.update(started_at=at, updated_at=at, seq=3, problems=[], current_job=None)
    (spool / "heartbeats").mkdir(exist_ok=True)
    (spool / "heartbeats" / "default.json").write_text(json.dumps(beat))


def test_config_and_spool_together_take_the_spool_from_one_and_the_rest_from_the_other(
    tmp_path: Path,
) -> None:
    """The config's heartbeat.stale_after_s (5 s) with --spool's directory: a beat 20 s
    old is stale (down, 2); with --spool alone the defaults apply (60 s: healthy)."""
    (tmp_path / "a").mkdir()
    cfg = make_config(tmp_path / "a", heartbeat={"interval_s": 1, "stale_after_s": 5})
    spool = tmp_path / "b" / "spool"
    (spool / "incoming").mkdir(parents=True)
    _beat_aged(spool, 20)
    both = spool_status("--config", str(cfg), "--spool", str(spool))
    assert both.returncode == 2, both.stdout + both.stderr
    assert both.stdout.startswith(f"spoold at {spool}: DOWN") and "STALE" in both.stdout
    alone = spool_status("--spool", str(spool))
    assert alone.returncode == 0, alone.stdout + alone.stderr
    assert alone.stdout.startswith(f"spoold at {spool}: HEALTHY")
    # The same with the order swapped and through $SPOOLD_CONFIG.
    assert spool_status("--spool", str(spool), "--config", str(cfg)).returncode == 2
    assert spool_status("--spool", str(spool), SPOOLD_CONFIG=str(cfg)).returncode == 2


def test_a_named_config_that_is_missing_is_an_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "incoming").mkdir()
    missing = tmp_path / "nope.yaml"
    proc = spool_status("--config", str(missing), "--spool", str(tmp_path))
    assert proc.returncode == 3 and proc.stdout == ""
    assert str(missing) in proc.stderr and "not found" in proc.stderr


def _run_jobs(tmp_path: Path) -> tuple[Path, Path]:
    """A spool after one drain: a clean job and one with 2 of its 10 requests failed."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "clean.jsonl", [chat("c1"), chat("c2")])
    write_jsonl(
        spool / "incoming" / "mixed.jsonl", [chat(f"m{i}") for i in range(8)] + [INVALID] * 2
    )
    drain(cfg)
    return cfg, spool


def _done(spool: Path, source: str) -> Path:
    (job,) = [j for j in job_dirs(spool, "done") if state(j)["source_name"] == source]
    return job


def test_one_job_done_with_failed_requests_says_so_and_where_its_results_are(
    tmp_path: Path,
) -> None:
    cfg, spool = _run_jobs(tmp_path)
    mixed, clean = _done(spool, "mixed.jsonl"), _done(spool, "clean.jsonl")
    shown = spool_status("--config", str(cfg), mixed.name)
    lines = shown.stdout.splitlines()
    assert lines[0] == (f"job {mixed.name} (done/): done, 2 failed (8 of 10 requests completed)"), (
        shown.stdout
    )
    assert "model: fake-model" in shown.stdout and "None" not in shown.stdout
    record = state(mixed)
    for key in ("created_at", "started_at", "finished_at"):
        assert record[key] in shown.stdout
    (results,) = [ln for ln in lines if ln.startswith("  results: ")]
    assert results == f"  results: {mixed / 'output.jsonl'}, {mixed / 'errors.jsonl'}"
    assert len((mixed / "errors.jsonl").read_text().splitlines()) == 2
    as_json = json.loads(spool_status("--config", str(cfg), "--json", mixed.name).stdout)
    assert as_json["results"] == {
        "output": str(mixed / "output.jsonl"),
        "errors": str(mixed / "errors.jsonl"),
    }
    clean_shown = spool_status("--config", str(cfg), clean.name).stdout
    assert clean_shown.splitlines()[0] == f"job {clean.name} (done/): completed"


def test_a_queued_job_shows_no_model_or_times_it_does_not_have(tmp_path: Path) -> None:
    """Claimed (as a daemon with a full queue would) but not started: no model, no start
    or finish, no result files yet; no `None` anywhere."""
    from spoold.spool import Spool, classify

    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "q.jsonl", [chat("a")])
    entry = classify(spool / "incoming" / "q.jsonl")
    assert entry is not None
    job_id = Spool(spool).claim(entry, 1, entry.size)
    assert job_id
    shown = spool_status("--config", str(cfg), job_id)
    out = shown.stdout
    assert out.splitlines()[0] == f"job {job_id} (processing/): queued", out
    assert "None" not in out and "model:" not in out
    assert "started" not in out and "finished" not in out
    assert f"created {state(spool / 'processing' / job_id)['created_at']}" in out
    assert "  results: none yet" in out.splitlines()
    as_json = json.loads(spool_status("--config", str(cfg), "--json", job_id).stdout)
    assert as_json["results"] == {"output": None, "errors": None}


def test_a_waiting_file_is_found_by_the_name_spoold_jobs_gives_it(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    waiting = write_jsonl(tmp_path / "spool" / "incoming" / "w.jsonl", [chat("a")])
    listed = run_spoold("jobs", "--config", str(cfg), "--json", check=True).stdout
    (job_id,) = [json.loads(line)["id"] for line in listed.splitlines()]
    shown = spool_status("--config", str(cfg), job_id)
    assert shown.stdout == f"{waiting}: waiting, not claimed yet (it gets a job id when it is)\n"
    assert shown.returncode == 3  # no daemon ever ran here
    nothing = spool_status("--config", str(cfg), "w.jsonl.part")
    assert nothing.returncode == 1 and "no job 'w.jsonl.part'" in nothing.stderr
