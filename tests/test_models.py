"""engine.models aliases, one model per job, arrival order and model switching."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.helpers import chat, drain, job_dirs, make_config, read_results, state, write_jsonl


@pytest.mark.parametrize("prefer_loaded", [False, True])
def test_jobs_run_in_arrival_order_switching_models_as_needed(
    tmp_path: Path, prefer_loaded: bool
) -> None:
    """SPEC: jobs start in arrival order; a job for another model waits for the switch.
    processing.prefer_loaded_model trades that order for fewer switches."""
    cfg = make_config(
        tmp_path,
        engine={
            "backend": "fake",
            "model": "model-a",
            "models": {"gpt-a": "model-a", "gpt-b": "model-b"},
        },
        processing={"prefer_loaded_model": prefer_loaded},
    )
    incoming = tmp_path / "spool" / "incoming"
    for i, (name, alias) in enumerate([("a1", "gpt-a"), ("b1", "gpt-b"), ("a2", "gpt-a")]):
        path = write_jsonl(
            incoming / f"{name}.jsonl", [chat(f"{name}-{k}", model=alias) for k in range(3)]
        )
        os.utime(path, (1_700_000_000 + i, 1_700_000_000 + i))
    proc = drain(cfg)
    done = sorted(job_dirs(tmp_path / "spool", "done"), key=lambda j: state(j)["started_at"])
    names = [state(j)["source_name"] for j in done]
    switches = [
        json.loads(line) for line in proc.stdout.splitlines() if '"switching model"' in line
    ]
    if prefer_loaded:
        assert names == ["a1.jsonl", "a2.jsonl", "b1.jsonl"]
        assert [(s["old"], s["new"]) for s in switches] == [("model-a", "model-b")]
    else:
        assert names == ["a1.jsonl", "b1.jsonl", "a2.jsonl"]
        assert [(s["old"], s["new"]) for s in switches] == [
            ("model-a", "model-b"),
            ("model-b", "model-a"),
        ]
    by_name = {state(j)["source_name"]: j for j in done}
    assert state(by_name["b1.jsonl"])["model"] == "model-b"
    assert state(by_name["a2.jsonl"])["model"] == "model-a"
    # body.model is kept as the client sent it.
    out = read_results(by_name["b1.jsonl"], "output.jsonl")
    assert {r["response"]["body"]["model"] for r in out} == {"gpt-b"}


def test_unmapped_model_names_run_on_engine_model(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, engine={"backend": "fake", "model": "served"})
    write_jsonl(tmp_path / "spool" / "incoming" / "x.jsonl", [chat("a", model="gpt-4o")])
    drain(cfg)
    (job,) = job_dirs(tmp_path / "spool", "done")
    assert state(job)["model"] == "served"


def test_lines_for_another_model_are_error_lines(tmp_path: Path) -> None:
    cfg = make_config(
        tmp_path,
        engine={"backend": "fake", "model": "m1", "models": {"big": "m2"}},
    )
    write_jsonl(
        tmp_path / "spool" / "incoming" / "mixed.jsonl",
        [chat("a"), chat("b", model="big"), chat("c")],
    )
    drain(cfg)
    (job,) = job_dirs(tmp_path / "spool", "done")
    errors = read_results(job, "errors.jsonl")
    assert [e["custom_id"] for e in errors] == ["b"]
    assert errors[0]["error"]["code"] == "model_mismatch"
    assert "line 2" in errors[0]["error"]["message"]
    assert sorted(r["custom_id"] for r in read_results(job, "output.jsonl")) == ["a", "c"]
