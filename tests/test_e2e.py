"""End-to-end: the real `spoold run --drain` on a spool in a temp dir, with the fake engine.

Each test drops files into incoming/ the way a user would, drains the spool with the real
daemon as a subprocess, and checks what the user finds afterwards in done/, failed/ and
incoming/ (SPEC §2 "The spool", §4 "Formats").
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Any

from tests.helpers import (
    assert_exactly_once,
    chat,
    completion,
    drain,
    job_dirs,
    make_config,
    only_job,
    read_results,
    state,
    write_jsonl,
)

STATE_KEYS = {
    "id",
    "source_name",
    "status",
    "model",
    "created_at",
    "started_at",
    "finished_at",
    "request_counts",
    "error",
}
ISO_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|\+00:00)$")


# -- helpers local to this file ---------------------------------------------------------


def spool_of(cfg: Path) -> Path:
    return cfg.parent / "spool"


def incoming(cfg: Path) -> Path:
    return spool_of(cfg) / "incoming"


def job_by_source(spool: Path, where: str, source_name: str) -> Path:
    """The one job directory under `where` that was made from the dropped `source_name`."""
    found = [d for d in job_dirs(spool, where) if state(d).get("source_name") == source_name]
    assert len(found) == 1, (
        f"expected one job from {source_name!r} in {where}/, found {[d.name for d in found]}; "
        f"done/={[d.name for d in job_dirs(spool, 'done')]} "
        f"failed/={[d.name for d in job_dirs(spool, 'failed')]}"
    )
    return found[0]


def assert_state_record(st: dict[str, Any], source_name: str, status: str) -> None:
    """state.json has the keys SPEC §4 pins, with consistent values for a finished job."""
    missing = STATE_KEYS - st.keys()
    assert not missing, f"state.json lacks {sorted(missing)}: {st}"
    assert st["source_name"] == source_name
    assert st["status"] == status
    stem = source_name[: -len(".jsonl")] if source_name.endswith(".jsonl") else source_name
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    assert st["id"].startswith(stem.split(".")[0]), f"job id {st['id']} not from {source_name}"
    assert ISO_UTC.match(st["created_at"]), st["created_at"]
    assert st["finished_at"] and ISO_UTC.match(st["finished_at"]), st["finished_at"]
    if st["started_at"] is not None:
        assert ISO_UTC.match(st["started_at"]), st["started_at"]
    counts = st["request_counts"]
    assert set(counts) >= {"total", "completed", "failed"}, counts
    # SPEC §4: a completed job has completed + failed = total (the input's non-blank
    # lines, never rewritten to match); a cancelled or failed job may have fewer.
    done = counts["completed"] + counts["failed"]
    if status == "completed":
        assert counts["total"] == done, f"completed job has request_counts {counts}"
    else:
        assert done <= counts["total"], f"finished job ({status}) counts more than total: {counts}"


def assert_completed_job(job_dir: Path, source_name: str, completed: int, failed: int) -> None:
    st = state(job_dir)
    assert_state_record(st, source_name, "completed")
    assert st["error"] is None
    assert st["started_at"] is not None
    assert st["model"], "a completed job names the model that ran it"
    counts = st["request_counts"]
    assert (counts["total"], counts["completed"], counts["failed"]) == (
        completed + failed,
        completed,
        failed,
    ), counts
    assert len(read_results(job_dir, "output.jsonl")) == completed
    assert len(read_results(job_dir, "errors.jsonl")) == failed
    assert job_dir.name == st["id"]


def assert_failed_entry(spool: Path, source_name: str, *reason_words: str) -> dict[str, Any]:
    """`source_name` ended in failed/ with status failed and a reason naming `reason_words`."""
    job_dir = job_by_source(spool, "failed", source_name)
    st = state(job_dir)
    assert st["status"] == "failed", st
    assert isinstance(st["error"], str) and st["error"], f"no reason in state.json: {st}"
    for word in reason_words:
        assert word.lower() in st["error"].lower(), f"{word!r} not in reason {st['error']!r}"
    left = spool / "incoming" / source_name
    assert not left.exists() and not left.is_symlink(), f"{source_name} still in incoming/"
    assert_state_record(st, source_name, "failed")
    return st


def assert_output_line(rec: dict[str, Any], custom_id: str, sent: dict[str, Any]) -> None:
    """One output.jsonl line in the exact OpenAI Batch output format (SPEC §4)."""
    assert set(rec) == {"id", "custom_id", "response", "error"}, rec.keys()
    assert isinstance(rec["id"], str) and rec["id"]
    assert rec["custom_id"] == custom_id
    assert rec["error"] is None
    resp = rec["response"]
    assert set(resp) == {"status_code", "request_id", "body"}, resp.keys()
    assert resp["status_code"] == 200
    assert isinstance(resp["request_id"], str) and resp["request_id"]
    body = resp["body"]
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}, body.keys()
    assert isinstance(body["id"], str) and body["id"]
    assert isinstance(body["created"], int) and not isinstance(body["created"], bool)
    assert body["created"] > 1_600_000_000
    assert body["model"] == sent["body"]["model"]
    is_chat = sent["url"] == "/v1/chat/completions"
    assert body["object"] == ("chat.completion" if is_chat else "text_completion")
    choices = body["choices"]
    assert isinstance(choices, list) and choices
    for i, ch in enumerate(choices):
        assert ch["index"] == i
        assert ch["finish_reason"] in ("stop", "length")
        if is_chat:
            assert ch["message"]["role"] == "assistant"
            assert isinstance(ch["message"]["content"], str)
            assert "text" not in ch
        else:
            assert isinstance(ch["text"], str)
            assert "message" not in ch
    usage = body["usage"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert isinstance(usage[key], int) and usage[key] >= 0, usage
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def assert_error_line(rec: dict[str, Any]) -> None:
    """One errors.jsonl line: same keys as output, `error` {code, message}."""
    assert set(rec) == {"id", "custom_id", "response", "error"}, rec.keys()
    assert rec["custom_id"] is None or isinstance(rec["custom_id"], str)
    err = rec["error"]
    assert isinstance(err, dict), rec
    assert isinstance(err["code"], str) and err["code"]
    assert isinstance(err["message"], str) and err["message"]
    resp = rec["response"]
    assert resp is None or resp["status_code"] >= 400, resp


def mentions_line(message: str, line: int) -> bool:
    return re.search(rf"\bline {line}\b", message) is not None


def errors_for_line(errors: list[dict[str, Any]], line: int) -> list[dict[str, Any]]:
    return [e for e in errors if mentions_line(e["error"]["message"], line)]


def healthy(cfg: Path, name: str = "healthy.jsonl", n: int = 3) -> list[str]:
    """Drop a small valid job next to a hostile one; returns its custom_ids."""
    ids = [f"ok-{i}" for i in range(n)]
    write_jsonl(incoming(cfg) / name, [chat(cid, f"question {cid}") for cid in ids])
    return ids


def assert_healthy_completed(cfg: Path, ids: list[str], name: str = "healthy.jsonl") -> None:
    job = job_by_source(spool_of(cfg), "done", name)
    assert_completed_job(job, name, completed=len(ids), failed=0)
    assert_exactly_once(job, ids)


# -- 1. several files at once ------------------------------------------------------------


def test_mixed_drop_of_many_files_each_lands_where_a_user_expects(tmp_path: Path) -> None:
    """A user drops chat, completions, a half-broken file, an empty file, a .txt and three
    uploads in progress; after one drain the good jobs are in done/ with OpenAI-format
    results, each broken line is explained in errors.jsonl by line number, the empty file
    and the .txt are in failed/ with a reason, and the uploads are untouched in incoming/."""
    cfg = make_config(tmp_path)
    spool, inc = spool_of(cfg), incoming(cfg)

    chat_reqs = [chat(f"c-{i}", f"Tell me about {i}", model="my-chat-model") for i in range(4)]
    write_jsonl(inc / "chats.jsonl", chat_reqs)
    comp_reqs = [completion(f"p-{i}", f"Once upon a time {i}", model="my-lm") for i in range(3)]
    write_jsonl(inc / "prompts.jsonl", comp_reqs)

    good_chat = chat("m-ok-1", "fine")
    good_comp = completion("m-ok-2", "also fine")
    no_id = chat("x")
    del no_id["custom_id"]
    mixed_lines: list[dict[str, Any] | str] = [
        good_chat,  # 1 valid
        '{"custom_id": "broken", not json',  # 2 bad JSON: custom_id unreadable
        no_id,  # 3 custom_id missing
        {**chat("x"), "custom_id": 42},  # 4 custom_id not a string
        {**chat("x"), "custom_id": ""},  # 5 custom_id empty
        {**chat("m-get"), "method": "GET"},  # 6
        {**chat("m-url"), "url": "/v1/moderations"},  # 7
        {**chat("m-nomsg"), "body": {"model": "any"}},  # 8 body without messages
        {**chat("m-shape"), "body": {"model": "any", "messages": "hello"}},  # 9
        {**completion("m-prompt"), "body": {"model": "any", "prompt": 42}},  # 10
        chat("m-ok-1", "again"),  # 11 duplicate custom_id
        "",  # 12 blank line: skipped
        good_comp,  # 13 valid
    ]
    write_jsonl(inc / "mixed.jsonl", mixed_lines)
    expected_errors: dict[int, str | None] = {
        2: None,
        3: None,
        4: None,
        5: None,
        6: "m-get",
        7: "m-url",
        8: "m-nomsg",
        9: "m-shape",
        10: "m-prompt",
        11: "m-ok-1",
    }

    (inc / "empty.jsonl").write_bytes(b"")
    (inc / "notes.txt").write_text("remember to buy milk\n")

    uploads = {
        "big.jsonl.part": b'{"custom_id": "u1", "method": "POST"',
        ".upload.jsonl": json.dumps(chat("u2")).encode() + b"\n",
        "x.jsonl.tmp": json.dumps(chat("u3")).encode() + b"\n",
    }
    for name, data in uploads.items():
        (inc / name).write_bytes(data)

    drain(cfg)

    # Chat and completions jobs: done, every request answered in OpenAI batch format.
    for name, reqs in (("chats.jsonl", chat_reqs), ("prompts.jsonl", comp_reqs)):
        job = job_by_source(spool, "done", name)
        assert job.name.startswith(name[: -len(".jsonl")] + "-")
        assert_completed_job(job, name, completed=len(reqs), failed=0)
        assert_exactly_once(job, [r["custom_id"] for r in reqs])
        sent = {r["custom_id"]: r for r in reqs}
        for rec in read_results(job, "output.jsonl"):
            assert_output_line(rec, rec["custom_id"], sent[rec["custom_id"]])
        assert (job / "input.jsonl").is_file()

    # The mixed job: done, valid lines answered, one error line per invalid line.
    job = job_by_source(spool, "done", "mixed.jsonl")
    assert job.name.startswith("mixed-")
    assert_completed_job(job, "mixed.jsonl", completed=2, failed=len(expected_errors))
    outputs = read_results(job, "output.jsonl")
    assert sorted(r["custom_id"] for r in outputs) == ["m-ok-1", "m-ok-2"]
    by_id = {r["custom_id"]: r for r in outputs}
    assert_output_line(by_id["m-ok-1"], "m-ok-1", good_chat)
    assert_output_line(by_id["m-ok-2"], "m-ok-2", good_comp)
    assert by_id["m-ok-1"]["response"]["body"]["object"] == "chat.completion"
    errors = read_results(job, "errors.jsonl")
    assert len(errors) == len(expected_errors), errors
    for rec in errors:
        assert_error_line(rec)
    for line, custom_id in expected_errors.items():
        hits = [e for e in errors_for_line(errors, line) if e["custom_id"] == custom_id]
        assert len(hits) == 1, f"line {line}: expected one error with custom_id {custom_id!r}"
    assert not errors_for_line(errors, 12), "a blank line is skipped, not an error"
    assert not errors_for_line(errors, 13)

    # The empty file: failed whole, with a reason.
    st = assert_failed_entry(spool, "empty.jsonl")
    assert st["error"] is not None
    assert job_by_source(spool, "failed", "empty.jsonl").name.startswith("empty-")

    # notes.txt: not a job, moved to failed/ with the reason, the file kept.
    assert_failed_entry(spool, "notes.txt", "jsonl")
    notes_job = job_by_source(spool, "failed", "notes.txt")
    assert notes_job.name.startswith("notes")
    kept = [p for p in notes_job.iterdir() if p.name != "state.json"]
    assert any(p.read_bytes() == b"remember to buy milk\n" for p in kept if p.is_file())

    # Uploads in progress: still in incoming/, byte for byte.
    for name, data in uploads.items():
        assert (inc / name).read_bytes() == data, f"{name} was touched"
    assert sorted(p.name for p in inc.iterdir()) == sorted(uploads)
    assert job_dirs(spool, "processing") == []
    assert len(job_dirs(spool, "done")) == 3
    assert len(job_dirs(spool, "failed")) == 2


# -- 2. / 3. encodings -------------------------------------------------------------------


def test_crlf_line_endings_and_utf8_bom_are_accepted(tmp_path: Path) -> None:
    """A file saved on Windows (BOM + CRLF, non-ASCII text) runs like any other: every
    request completes."""
    cfg = make_config(tmp_path)
    reqs = [chat(f"w-{i}", f"Grüße, naïve café {i} ✓") for i in range(5)]
    lines = [json.dumps(r, ensure_ascii=False) for r in reqs]
    data = "\ufeff".encode() + "\r\n".join(lines).encode("utf-8") + b"\r\n"
    (incoming(cfg) / "windows.jsonl").write_bytes(data)

    drain(cfg)

    job = only_job(spool_of(cfg), "done")
    assert_completed_job(job, "windows.jsonl", completed=5, failed=0)
    assert_exactly_once(job, [r["custom_id"] for r in reqs])
    assert job_dirs(spool_of(cfg), "failed") == []


def test_file_that_is_not_utf8_fails_whole(tmp_path: Path) -> None:
    """A file with latin-1 bytes inside a JSON string is not run at all: it lands in
    failed/ and the reason tells the user it is not UTF-8."""
    cfg = make_config(tmp_path)
    good = json.dumps(chat("l-1", "hello")).encode()
    bad = json.dumps(chat("l-2", "cafe")).encode().replace(b"cafe", b"caf\xe9")
    (incoming(cfg) / "latin.jsonl").write_bytes(good + b"\n" + bad + b"\n")

    drain(cfg)

    assert_failed_entry(spool_of(cfg), "latin.jsonl", "UTF-8")
    job = job_by_source(spool_of(cfg), "failed", "latin.jsonl")
    assert read_results(job, "output.jsonl") == []
    assert job_dirs(spool_of(cfg), "done") == []


# Every character str.splitlines() splits a string on (JSON escapes those below 0x20
# already), then the other C1 controls and DEL, then characters that stay raw UTF-8.
SPLITS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
ESCAPED = SPLITS + "\x7f\x80\x9f"
KEPT = "é—“”\u00a0"


def test_result_files_split_into_records_at_newline_alone(tmp_path: Path) -> None:
    """SPEC §4: whatever a request carries back into a result line (its custom_id, its
    body.model, both echoed), output.jsonl and errors.jsonl read with str.splitlines()
    give exactly one JSON record per request, and every character round-trips."""
    cfg = make_config(tmp_path, engine={"backend": "fake", "fake": {"fail_marker": "POISON"}})
    odd = ESCAPED + KEPT
    answered = [chat(f"ok{c}{i}", f"q {i}", model=f"m{c}") for i, c in enumerate(odd)]
    answered.append(chat(f"all{odd}", "q", model=odd))
    refused = [chat(f"bad{c}{i}", temperature="hot") for i, c in enumerate(odd)]
    poisoned = chat(f"poison{odd}", "POISON here")  # the engine's error line (status 500)
    repeated = chat(answered[0]["custom_id"])  # its message quotes the custom_id
    write_jsonl(incoming(cfg) / "odd.jsonl", [*answered, *refused, poisoned, repeated])

    drain(cfg)

    job = only_job(spool_of(cfg), "done")
    failed = [*refused, poisoned, repeated]
    for name, sent in (("output.jsonl", answered), ("errors.jsonl", failed)):
        text = (job / name).read_text(encoding="utf-8")
        records = [json.loads(x) for x in text.splitlines()]
        assert len(records) == len(sent), f"{name}: {len(records)} records for {len(sent)}"
        assert sorted(r["custom_id"] for r in records) == sorted(r["custom_id"] for r in sent)
        assert text.count("\n") == len(sent), f"{name}: a line break inside a record"
        assert not [c for c in ESCAPED[1:] if c in text], f"{name} holds them raw"
        assert all(c in text for c in KEPT), f"{name}: UTF-8 text is kept as it is"
    out = {r["custom_id"]: r for r in read_results(job, "output.jsonl")}
    for r in answered:
        assert out[r["custom_id"]]["response"]["body"]["model"] == r["body"]["model"]
    errors = {r["custom_id"]: r for r in read_results(job, "errors.jsonl")}
    assert errors[poisoned["custom_id"]]["response"]["status_code"] == 500
    assert_completed_job(job, "odd.jsonl", completed=len(answered), failed=len(failed))


def test_a_file_without_request_lines_fails_saying_so(tmp_path: Path) -> None:
    """An empty or blank-only file fails whole; its reason says what is true, not "see
    errors.jsonl" (which is empty)."""
    cfg = make_config(tmp_path)
    (incoming(cfg) / "empty.jsonl").write_bytes(b"")
    (incoming(cfg) / "blank.jsonl").write_bytes(b"\n  \r\n\t\n")

    drain(cfg)

    spool = spool_of(cfg)
    for name, what in (("empty.jsonl", "it is empty"), ("blank.jsonl", "its 3 lines are blank")):
        st = assert_failed_entry(spool, name)
        assert st["error"] == (
            f"{name} has no request lines: {what}; put one JSON request on each line and "
            "submit it again"
        )
        assert read_results(job_by_source(spool, "failed", name), "errors.jsonl") == []


# -- 4. hostile inputs -------------------------------------------------------------------


def test_hostile_symlink_is_never_followed(tmp_path: Path) -> None:
    """A symlink in incoming/ to a file outside the spool is filed under failed/ as a link;
    the file it points to is never read, moved or changed, and the daemon goes on."""
    cfg = make_config(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "secret.jsonl"
    secret = json.dumps(chat("secret", "private data")).encode() + b"\n"
    target.write_bytes(secret)
    os.symlink(target, incoming(cfg) / "evil.jsonl")
    ids = healthy(cfg)

    drain(cfg, timeout=30)

    assert target.read_bytes() == secret, "the link's target was changed"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.jsonl"]
    st = assert_failed_entry(spool_of(cfg), "evil.jsonl", "link")
    job = job_by_source(spool_of(cfg), "failed", "evil.jsonl")
    assert not (job / "output.jsonl").exists() or read_results(job, "output.jsonl") == []
    links = [p for p in job.iterdir() if p.is_symlink()]
    assert links and os.readlink(links[0]) == str(target), "the link itself is kept, as is"
    assert st["request_counts"]["completed"] == 0
    assert_healthy_completed(cfg, ids)


def test_hostile_fifo_is_never_opened(tmp_path: Path) -> None:
    """A FIFO named pipe.jsonl does not hang the daemon: the drain finishes, the FIFO is
    in failed/ with a reason, and the healthy job completes."""
    cfg = make_config(tmp_path)
    os.mkfifo(incoming(cfg) / "pipe.jsonl")
    ids = healthy(cfg)

    drain(cfg, timeout=30)

    assert_failed_entry(spool_of(cfg), "pipe.jsonl")
    assert_healthy_completed(cfg, ids)


def test_hostile_directory_named_jsonl(tmp_path: Path) -> None:
    """A directory called dir.jsonl in incoming/ is moved to failed/ with a reason; the
    healthy job completes."""
    cfg = make_config(tmp_path)
    d = incoming(cfg) / "dir.jsonl"
    d.mkdir()
    write_jsonl(d / "inner.jsonl", [chat("inner")])
    ids = healthy(cfg)

    drain(cfg, timeout=30)

    assert_failed_entry(spool_of(cfg), "dir.jsonl", "directory")
    assert_healthy_completed(cfg, ids)
    for where in ("done", "failed"):
        for job in job_dirs(spool_of(cfg), where):
            ids_seen = [r["custom_id"] for r in read_results(job, "output.jsonl")]
            assert "inner" not in ids_seen, "the directory's contents were run"


def test_hostile_binary_file_fails_whole(tmp_path: Path) -> None:
    """Random bytes (NULs, invalid UTF-8) named bin.jsonl fail whole into failed/; the
    healthy job completes."""
    cfg = make_config(tmp_path)
    rng = random.Random(1234)
    data = b"\xff\xfe\x00\x80" + rng.randbytes(64 * 1024) + b"\x00\xc3\x28\n\x00"
    (incoming(cfg) / "bin.jsonl").write_bytes(data)
    ids = healthy(cfg)

    drain(cfg, timeout=30)

    assert_failed_entry(spool_of(cfg), "bin.jsonl", "UTF-8")
    job = job_by_source(spool_of(cfg), "failed", "bin.jsonl")
    assert read_results(job, "output.jsonl") == []
    assert_healthy_completed(cfg, ids)


def test_hostile_multi_megabyte_line_without_newline(tmp_path: Path) -> None:
    """A 5 MB line of garbage with no trailing newline does not stop the daemon: the file
    fails (it has no valid line) and any error line names line 1; the healthy job
    completes."""
    cfg = make_config(tmp_path)
    (incoming(cfg) / "huge.jsonl").write_bytes(b"x" * (5 * 1024 * 1024))
    ids = healthy(cfg)

    drain(cfg, timeout=60)

    spool = spool_of(cfg)
    assert_failed_entry(spool, "huge.jsonl")
    job = job_by_source(spool, "failed", "huge.jsonl")
    errors = read_results(job, "errors.jsonl")
    for rec in errors:
        assert_error_line(rec)
        assert mentions_line(rec["error"]["message"], 1)
        assert len(json.dumps(rec)) < 64 * 1024, "the error line must not echo the 5 MB line"
    assert read_results(job, "output.jsonl") == []
    assert_healthy_completed(cfg, ids)


def test_hostile_line_over_max_line_bytes_is_one_error(tmp_path: Path) -> None:
    """With limits.max_line_bytes = 1 MiB, a 3 MB request among valid ones becomes one
    error line (line_too_long, naming its line) and the other requests complete."""
    cfg = make_config(tmp_path, limits={"max_line_bytes": 1048576})
    big = chat("big", "a" * (3 * 1024 * 1024))
    reqs = [chat("v-1"), chat("v-2"), big, chat("v-3")]
    write_jsonl(incoming(cfg) / "long.jsonl", reqs)
    ids = healthy(cfg)

    drain(cfg, timeout=60)

    job = job_by_source(spool_of(cfg), "done", "long.jsonl")
    assert_completed_job(job, "long.jsonl", completed=3, failed=1)
    assert sorted(r["custom_id"] for r in read_results(job, "output.jsonl")) == [
        "v-1",
        "v-2",
        "v-3",
    ]
    (err,) = read_results(job, "errors.jsonl")
    assert_error_line(err)
    assert err["error"]["code"] == "line_too_long"
    assert mentions_line(err["error"]["message"], 3)
    assert len(json.dumps(err)) < 64 * 1024, "the error line must not echo the 3 MB line"
    assert_healthy_completed(cfg, ids)


def test_hostile_wrong_json_types_are_one_error_each(tmp_path: Path) -> None:
    """Lines of the wrong JSON type or with body fields that cannot be honoured each
    become one errors.jsonl line naming the line (and the field); valid lines complete."""
    cfg = make_config(tmp_path)
    # line number -> (raw line, custom_id in the error, word the message must name)
    bad: dict[int, tuple[dict[str, Any] | str, str | None, str | None]] = {
        2: ("[1, 2, 3]", None, None),
        3: ("42", None, None),
        4: ('"just a string"', None, None),
        5: ("null", None, None),
        6: ({**chat("x"), "custom_id": 123}, None, "custom_id"),
        7: ({**chat("t-body"), "body": [{"role": "user", "content": "hi"}]}, "t-body", "body"),
        8: (chat("t-max", max_tokens="ten"), "t-max", "max_tokens"),
        9: (chat("t-temp", temperature=5), "t-temp", "temperature"),
        10: (chat("t-n", n=0), "t-n", "n"),
        11: (chat("t-stream", stream=True), "t-stream", "stream"),
        12: (chat("t-tools", tools=[{"type": "function"}]), "t-tools", "tools"),
    }
    lines: list[dict[str, Any] | str] = [chat("v-1")]
    lines += [bad[n][0] for n in sorted(bad)]
    lines.append(completion("v-2", max_tokens=8, temperature=0.5, n=1, stream=False))
    write_jsonl(incoming(cfg) / "types.jsonl", lines)
    ids = healthy(cfg)

    drain(cfg, timeout=30)

    job = job_by_source(spool_of(cfg), "done", "types.jsonl")
    assert_completed_job(job, "types.jsonl", completed=2, failed=len(bad))
    assert sorted(r["custom_id"] for r in read_results(job, "output.jsonl")) == ["v-1", "v-2"]
    errors = read_results(job, "errors.jsonl")
    assert len(errors) == len(bad)
    for rec in errors:
        assert_error_line(rec)
    for line, (_, custom_id, word) in bad.items():
        hits = errors_for_line(errors, line)
        assert len(hits) == 1, f"line {line}: expected one error, got {hits}"
        (hit,) = hits
        assert hit["custom_id"] == custom_id, hit
        if word is not None:
            assert re.search(rf"\b{word}\b", hit["error"]["message"]), (word, hit)
    assert_healthy_completed(cfg, ids)


# -- 5. admission limits -----------------------------------------------------------------


def test_admission_max_requests_per_job(tmp_path: Path) -> None:
    """With limits.max_requests_per_job = 5, a 6-request file is rejected to failed/ with
    the limit named in the reason, and a 5-request file runs to completion."""
    cfg = make_config(tmp_path, limits={"max_requests_per_job": 5})
    write_jsonl(incoming(cfg) / "six.jsonl", [chat(f"s-{i}") for i in range(6)])
    write_jsonl(incoming(cfg) / "five.jsonl", [chat(f"f-{i}") for i in range(5)])

    drain(cfg, timeout=30)

    spool = spool_of(cfg)
    assert_failed_entry(spool, "six.jsonl", "max_requests_per_job")
    rejected = job_by_source(spool, "failed", "six.jsonl")
    assert read_results(rejected, "output.jsonl") == []
    assert len((rejected / "input.jsonl").read_bytes().splitlines()) == 6, "input kept"
    job = job_by_source(spool, "done", "five.jsonl")
    assert_completed_job(job, "five.jsonl", completed=5, failed=0)
    assert_exactly_once(job, [f"f-{i}" for i in range(5)])


def test_admission_max_file_bytes(tmp_path: Path) -> None:
    """With limits.max_file_bytes = 1000, a larger file is rejected to failed/ naming the
    limit, and a small file completes."""
    cfg = make_config(tmp_path, limits={"max_file_bytes": 1000})
    write_jsonl(incoming(cfg) / "large.jsonl", [chat(f"l-{i}", "x" * 100) for i in range(10)])
    assert (incoming(cfg) / "large.jsonl").stat().st_size > 1000
    write_jsonl(incoming(cfg) / "small.jsonl", [chat("s-1")])
    assert (incoming(cfg) / "small.jsonl").stat().st_size < 1000

    drain(cfg, timeout=30)

    spool = spool_of(cfg)
    assert_failed_entry(spool, "large.jsonl", "max_file_bytes")
    assert read_results(job_by_source(spool, "failed", "large.jsonl"), "output.jsonl") == []
    job = job_by_source(spool, "done", "small.jsonl")
    assert_completed_job(job, "small.jsonl", completed=1, failed=0)


# -- 6. poison request -------------------------------------------------------------------


def test_poison_request_is_isolated_and_the_rest_complete(tmp_path: Path) -> None:
    """One request that makes the engine fail its whole batch is isolated: the job lands
    in done/ with 999 answers and exactly one errors.jsonl line for the poison request."""
    cfg = make_config(
        tmp_path,
        processing={"chunk_size": 100},
        engine={"backend": "fake", "fake": {"fail_marker": "POISON"}},
    )
    ids = [f"r-{i:04d}" for i in range(1000)]
    poison_id = ids[537]
    reqs = [chat(cid, "POISON pill" if cid == poison_id else f"q {cid}") for cid in ids]
    write_jsonl(incoming(cfg) / "poison.jsonl", reqs)

    drain(cfg, timeout=60)

    spool = spool_of(cfg)
    job = only_job(spool, "done")
    assert_completed_job(job, "poison.jsonl", completed=999, failed=1)
    assert_exactly_once(job, ids)
    outputs = read_results(job, "output.jsonl")
    assert len(outputs) == 999
    assert poison_id not in {r["custom_id"] for r in outputs}
    (err,) = read_results(job, "errors.jsonl")
    assert_error_line(err)
    assert err["custom_id"] == poison_id
    assert mentions_line(err["error"]["message"], 538)
    assert job_dirs(spool, "failed") == []


# -- 7. sampling fields ------------------------------------------------------------------


def test_n_and_max_tokens_shape_the_answers(tmp_path: Path) -> None:
    """n=3 gives three choices per answer; a tiny max_tokens cuts answers short with
    finish_reason "length" and completion_tokens within the limit."""
    cfg = make_config(tmp_path)
    three = [chat(f"n-{i}", f"pick {i}", n=3) for i in range(3)]
    short = [chat(f"m-{i}", f"a long story {i}", max_tokens=2) for i in range(10)]
    short_comp = [completion(f"k-{i}", f"Once {i}", max_tokens=1) for i in range(5)]
    write_jsonl(incoming(cfg) / "sampling.jsonl", [*three, *short, *short_comp])

    drain(cfg, timeout=30)

    job = only_job(spool_of(cfg), "done")
    sent = {r["custom_id"]: r for r in [*three, *short, *short_comp]}
    assert_completed_job(job, "sampling.jsonl", completed=len(sent), failed=0)
    out = {r["custom_id"]: r for r in read_results(job, "output.jsonl")}
    assert set(out) == set(sent)
    for cid, rec in out.items():
        assert_output_line(rec, cid, sent[cid])
    for r in three:
        choices = out[r["custom_id"]]["response"]["body"]["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2]
    reasons = []
    for r in [*short, *short_comp]:
        body = out[r["custom_id"]]["response"]["body"]
        assert len(body["choices"]) == 1
        assert body["usage"]["completion_tokens"] <= r["body"]["max_tokens"]
        reasons.append(body["choices"][0]["finish_reason"])
    assert "length" in reasons, reasons
