"""Embeddings jobs beside generation jobs (SPEC §6 Endpoints), with the fake engine.

A job runs one kind of work, decided by its first valid request; lines of the other
kind are `endpoint_mismatch` error lines; the daemon loads the job's model with the
runner that kind needs (tests/test_embeddings.py does the same with real vLLM).
"""

from __future__ import annotations

import base64
import json
import struct
from pathlib import Path
from typing import Any

import pytest

from spoold.validate import LineError, Request, parse_line
from tests.helpers import (
    assert_exactly_once,
    chat,
    completion,
    drain,
    job_dirs,
    log_events,
    make_config,
    only_job,
    read_results,
    run_spoold,
    state,
    write_jsonl,
)


def embed(custom_id: str, given: Any = "Hello!", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "any", "input": given, **body},
    }


def _parse(record: dict[str, Any]) -> Request | LineError | None:
    return parse_line(json.dumps(record).encode(), 7)


@pytest.mark.parametrize(
    "given",
    ["a sentence", "", ["one", "two"], [1, 2, 3], [[1, 2], [3]]],
    ids=["string", "empty-string", "strings", "token-ids", "lists-of-token-ids"],
)
def test_every_input_shape_openai_takes_is_valid(given: Any) -> None:
    parsed = _parse(embed("e", given, encoding_format="base64", dimensions=16, user="u"))
    assert isinstance(parsed, Request) and parsed.is_embedding


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"input": []}, "body.input"),
        ({"input": [[]]}, "body.input"),
        ({"input": [1, "a"]}, "body.input"),
        ({"input": [-1]}, "body.input"),
        ({"input": {"text": "a"}}, "body.input"),
        ({}, "body.input is missing"),
        ({"input": "a", "encoding_format": "hex"}, "body.encoding_format"),
        ({"input": "a", "encoding_format": None}, "body.encoding_format"),
        ({"input": ["a"] * 2049}, "body.input has 2049 inputs: at most 2048"),
        ({"input": "a", "dimensions": 0}, "body.dimensions"),
        ({"input": "a", "temperature": 0}, "body.temperature is not supported for /v1/embeddings"),
        ({"input": "a", "messages": []}, "body.messages is not supported for /v1/embeddings"),
    ],
)
def test_a_bad_embeddings_body_is_an_error_naming_the_field(
    body: dict[str, Any], named: str
) -> None:
    record = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": body}
    parsed = _parse(record)
    assert isinstance(parsed, LineError), parsed
    assert parsed.code == "invalid_request" and named in parsed.message, parsed.message
    assert parsed.message.startswith("line 7: ")


def _floats(value: Any) -> list[float]:
    if isinstance(value, str):
        raw = base64.b64decode(value)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return list(value)


def test_an_embeddings_job_answers_each_input_and_refuses_the_other_kind(
    tmp_path: Path,
) -> None:
    """Every input of a line gets its vector, in order, as floats or base64 (the same
    values); a chat and a completions line in the embeddings job are endpoint_mismatch
    error lines naming the job's kind; the books balance."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    records = [
        embed("one", "the quick brown fox"),
        embed("many", ["a", "b", "the quick brown fox"]),
        embed("tokens", [5, 6, 7]),
        embed("b64", "the quick brown fox", encoding_format="base64"),
        chat("a-chat", "hi"),
        embed("short", "x", dimensions=4),
        completion("a-completion", "once"),
        embed("huge", "x", dimensions=10**9),  # refused by the engine, as a real one does
    ]
    write_jsonl(spool / "incoming" / "emb.jsonl", records)
    drain(cfg)
    job = only_job(spool, "done")
    assert_exactly_once(job, [r["custom_id"] for r in records])
    st = state(job)
    assert st["status"] == "completed"
    assert st["request_counts"] == {"total": 8, "completed": 5, "failed": 3}
    out = {r["custom_id"]: r["response"]["body"] for r in read_results(job, "output.jsonl")}
    for body in out.values():
        assert body["object"] == "list" and body["id"].startswith("embd-")
        assert [d["index"] for d in body["data"]] == list(range(len(body["data"])))
        assert {d["object"] for d in body["data"]} == {"embedding"}
        usage = body["usage"]
        assert usage["prompt_tokens"] == usage["total_tokens"] > 0
        assert usage["completion_tokens"] == 0
    assert len(out["many"]["data"]) == 3
    fox = out["one"]["data"][0]["embedding"]
    assert out["many"]["data"][2]["embedding"] == fox  # same input, same vector
    assert out["many"]["data"][0]["embedding"] != fox
    assert _floats(out["b64"]["data"][0]["embedding"]) == pytest.approx(fox, abs=0)
    assert len(out["short"]["data"][0]["embedding"]) == 4
    errors = {r["custom_id"]: r["error"] for r in read_results(job, "errors.jsonl")}
    assert set(errors) == {"a-chat", "a-completion", "huge"}
    assert errors.pop("huge")["code"] == "invalid_request"
    for cid, line in (("a-chat", 5), ("a-completion", 7)):
        assert errors[cid]["code"] == "endpoint_mismatch"
        assert errors[cid]["message"].startswith(f"line {line}: ")
        assert "embeddings job" in errors[cid]["message"]


def test_a_generation_job_refuses_embeddings_lines(tmp_path: Path) -> None:
    """The first valid request decides: a chat job's embeddings lines are
    endpoint_mismatch errors, even when the file starts with an invalid line."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    records: list[Any] = ["not json", chat("c1"), embed("e1"), completion("c2")]
    write_jsonl(spool / "incoming" / "gen.jsonl", records)
    drain(cfg)
    job = only_job(spool, "done")
    errors = {r["custom_id"]: r["error"]["code"] for r in read_results(job, "errors.jsonl")}
    assert errors == {None: "invalid_json", "e1": "endpoint_mismatch"}
    assert {r["custom_id"] for r in read_results(job, "output.jsonl")} == {"c1", "c2"}
    assert state(job)["runner"] == "generate"


def test_the_first_valid_request_decides_however_far_down_it_is(tmp_path: Path) -> None:
    """3,000 invalid lines, then embeddings lines and a chat line: an embeddings job;
    the heartbeat names the engine's runner while it is loaded."""
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    records: list[Any] = [f"broken {i}" for i in range(3000)]
    records += [embed("e1", "one"), chat("c1"), embed("e2", [[1, 2]])]
    write_jsonl(spool / "incoming" / "late.jsonl", records)
    drain(cfg)
    job = only_job(spool, "done")
    st = state(job)
    assert (st["runner"], st["request_counts"]["completed"]) == ("pooling", 2), st
    errors = read_results(job, "errors.jsonl")
    assert [e["custom_id"] for e in errors if e["error"]["code"] == "endpoint_mismatch"] == ["c1"]
    beat = json.loads((spool / "heartbeats" / "default.json").read_text())
    assert beat["engine"]["runner"] == "pooling", beat["engine"]


def test_one_daemon_runs_generation_and_embeddings_jobs_on_one_model(tmp_path: Path) -> None:
    """The same model name is needed as a generator by one job and with the pooling
    runner by the next: the daemon loads it again with the other runner (logged as a
    switch), and each job gets its kind of answer."""
    cfg = make_config(tmp_path, processing={"prefer_loaded_model": False})
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "a-gen.jsonl", [chat(f"g{i}") for i in range(5)])
    write_jsonl(spool / "incoming" / "b-emb.jsonl", [embed(f"e{i}", f"s {i}") for i in range(5)])
    write_jsonl(spool / "incoming" / "c-gen.jsonl", [completion(f"c{i}") for i in range(5)])
    proc = drain(cfg)
    done = {state(j)["source_name"]: j for j in job_dirs(spool, "done")}
    assert set(done) == {"a-gen.jsonl", "b-emb.jsonl", "c-gen.jsonl"}
    for name, obj in (
        ("a-gen.jsonl", "chat.completion"),
        ("b-emb.jsonl", "list"),
        ("c-gen.jsonl", "text_completion"),
    ):
        bodies = [r["response"]["body"] for r in read_results(done[name], "output.jsonl")]
        assert len(bodies) == 5 and {b["object"] for b in bodies} == {obj}, name
    said = log_events(proc.stdout + proc.stderr)
    loads = [e for e in said if e.get("event") == "model loaded"]
    assert [e["runner"] for e in loads] == ["generate", "pooling", "generate"], loads


def test_validate_reports_the_other_kind_of_lines(tmp_path: Path) -> None:
    """`spoold validate` applies the rule the daemon applies: exit 1, naming the line."""
    f = write_jsonl(tmp_path / "emb.jsonl", [embed("e1"), chat("c1"), embed("e2", [[1], [2]])])
    proc = run_spoold("validate", str(f))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "line 2: url /v1/chat/completions does not run in this job" in proc.stdout, proc.stdout
    ok = write_jsonl(tmp_path / "ok.jsonl", [embed("e1"), embed("e2", [[1], [2]])])
    assert run_spoold("validate", str(ok)).returncode == 0
