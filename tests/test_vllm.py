"""Real-vLLM tests: `spoold run --drain` with `engine.backend: vllm` on a tiny Llama.

The model (tests/tinymodel.py: random weights, its own tokenizer and chat template) is
built offline and cached outside the repository. Everything runs on CPU with vLLM's
in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, docs in
/work/shared/notes/vllm-on-cpu.md). Nothing is mocked: spoold runs as a process on a
spool in a temp dir, and the fidelity reference is a real `vllm serve` on loopback.

To keep engine start-ups (~15 s each on 2 cores) few, one drain runs four jobs that
several tests read (`shared`): the mixed job, the bad-requests job, the fidelity job and
the uninterrupted reference for the kill test; the reference server starts while that
drain runs. The kill test adds two more spoold processes.

Skipped when vLLM is not installed, unless SPOOLD_REQUIRE_VLLM=1 (`make test`), which
turns a missing or broken vLLM into a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    completion,
    drain,
    job_dirs,
    kill_once_committed,
    log_events,
    make_config,
    only_job,
    read_results,
    run_spoold,
    state,
    write_jsonl,
)

REQUIRE_VLLM = os.environ.get("SPOOLD_REQUIRE_VLLM") == "1"

# A cheap check at collection (importing vLLM costs seconds, and every pytest run
# collects this module); the real `import vllm` is in the `vllm_env` fixture.
if importlib.util.find_spec("vllm") is None:
    if REQUIRE_VLLM:
        raise ImportError("SPOOLD_REQUIRE_VLLM=1 but vllm is not installed")
    pytest.skip("vllm is not installed (pip install 'spoold[vllm]')", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MAX_MODEL_LEN = 512
KV_CACHE_BYTES = 64 << 20
LINE_RE = re.compile(r"\bline (\d+)\b")
SERVER_START_S = 240

# Valid schemas for `response_format`. With random weights, constrained decoding of an
# object often loops on the whitespace the grammar allows until max_tokens; a top-level
# enum leaves no such room and closes in a few tokens.
SCHEMAS: dict[str, dict[str, Any]] = {
    "object": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}},
        "required": ["a"],
        "additionalProperties": False,
    },
    "enum": {"type": "string", "enum": ["yes", "no"]},
}


def _matches(schema: str, value: Any) -> bool:
    if schema == "object":
        return isinstance(value, dict) and set(value) == {"a"} and isinstance(value["a"], bool)
    return value in ("yes", "no")


WORDS = ["dragon", "castle", "knight", "sea", "fox", "numbers", "Paris", "morning"]


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def vllm_env() -> Iterator[None]:
    """vLLM imports (else skip, or fail under SPOOLD_REQUIRE_VLLM=1); every process this
    module starts (spoold, vllm serve) runs the engine in-process."""
    try:
        import vllm  # noqa: F401
    except Exception as e:
        if REQUIRE_VLLM:
            pytest.fail(f"SPOOLD_REQUIRE_VLLM=1 but `import vllm` failed: {e!r}")
        pytest.skip(f"`import vllm` failed: {e!r}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


@pytest.fixture(scope="session")
def tokenizer(tiny_model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def vllm_config(
    tmp: Path,
    model: Path,
    chunk_size: int = 5000,
    models: dict[str, str] | None = None,
    **processing: Any,
) -> Path:
    return make_config(
        tmp,
        engine={
            "backend": "vllm",
            "model": str(model),
            "models": models or {},
            "dtype": "float32",
            "max_model_len": MAX_MODEL_LEN,
            # Engine arguments go directly under engine (SPEC §6), or in extra_args.
            "enforce_eager": True,
            "seed": 0,
            "extra_args": {"kv_cache_memory_bytes": KV_CACHE_BYTES},
        },
        processing={"chunk_size": chunk_size, **processing},
    )


@dataclass
class Server:
    """`vllm serve` (the OpenAI API server) on loopback, the fidelity reference."""

    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "<no log>"

    def wait_healthy(self, timeout: float = SERVER_START_S) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"vllm serve exited {self.proc.returncode} before it was healthy:\n"
                    + self.log_tail()
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        pytest.fail(f"vllm serve not healthy within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, log: Path, max_model_len: int, *more: str) -> Server:
    """`vllm serve` for `model` on a free loopback port (its output in `log`), with the
    engine settings spoold's tests use; `more` are further arguments."""
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dtype",
                "float32",
                "--max-model-len",
                str(max_model_len),
                "--enforce-eager",
                "--seed",
                "0",
                "--kv-cache-memory-bytes",
                str(KV_CACHE_BYTES),
                *more,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    return Server(proc, port, log)


@pytest.fixture(scope="module")
def server(
    vllm_env: None, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Starts `vllm serve` (not waiting for it: it loads while the shared drain runs)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    srv = start_server(tiny_model, log, MAX_MODEL_LEN)
    try:
        yield srv
    finally:
        srv.stop()


# -- the requests --------------------------------------------------------------------


def _mixed_requests(n: int = 300) -> list[dict[str, Any]]:
    """Chat and completions; greedy and default temperature; max_tokens 1..64; some
    with `stop`, `n: 2`, logprobs, a system message, vLLM's logit_bias, stop_token_ids
    and include_stop_str_in_output."""
    reqs = []
    for i in range(n):
        body: dict[str, Any] = {"max_tokens": 1 + (i * 7) % 64}
        if i % 3:
            body["temperature"] = 0
        if i % 25 == 5:
            body["stop"] = [" "] if i % 2 == 0 else " "
        if i % 15 == 0:  # default temperature only: vLLM refuses n > 1 with greedy sampling
            body["n"] = 2
        if i % 30 == 11:  # vLLM's own sampling extras, as `vllm serve` takes them
            body.update(logit_bias={"7": 100}, stop_token_ids=[9])
        if i % 30 == 17:
            body.update(stop=" ", include_stop_str_in_output=True)
        word = WORDS[i % len(WORDS)]
        if i % 2 == 0:
            if i % 20 == 2:
                body.update(logprobs=True, top_logprobs=2)
            r = chat(f"mix-{i}", f"Tell me a story about a {word}, number {i}.", **body)
            if i % 8 == 4:
                r["body"]["messages"].insert(
                    0, {"role": "system", "content": "You are a brave knight."}
                )
        else:
            if i % 20 == 3:
                body["logprobs"] = 1
            r = completion(f"mix-{i}", f"Once upon a time a {word} said {i}", **body)
        reqs.append(r)
    return reqs


def _bad_requests() -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Good requests around two that vLLM refuses; returns (lines, {bad custom_id: line})."""
    reqs: list[dict[str, Any]] = [
        chat(f"ok-{i}", f"question {i}", max_tokens=8, temperature=0) for i in range(5)
    ]
    reqs.append(chat("too-long", "hello world " * 300, max_tokens=5))
    reqs += [completion(f"ok-c{i}", f"prompt {i}", max_tokens=8) for i in range(3)]
    reqs.append(
        chat(
            "bad-schema",
            "Give JSON",
            max_tokens=20,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "nonsense"}},
            },
        )
    )
    for schema in SCHEMAS:
        for j, prompt in enumerate(["Hello!", "Give JSON", "What is the capital of France?"]):
            reqs.append(
                chat(
                    f"schema-{schema}-{j}",
                    prompt,
                    max_tokens=200,
                    temperature=0,
                    response_format={
                        "type": "json_schema",
                        "json_schema": {"name": schema, "schema": SCHEMAS[schema]},
                    },
                )
            )
    reqs += [chat(f"ok-{i}", f"question {i}", max_tokens=4) for i in range(5, 8)]
    lines = {r["custom_id"]: n for n, r in enumerate(reqs, start=1)}
    return reqs, {k: lines[k] for k in ("too-long", "bad-schema")}


def _fidelity_requests(model: str) -> list[dict[str, Any]]:
    """~60 greedy requests; `model` is the served name, so the bodies work for both."""
    reqs = []
    budgets: list[int | None] = [1, 3, 8, 16, 33, 64, None, 120]
    for i in range(60):
        body: dict[str, Any] = {"model": model, "temperature": 0}
        budget = budgets[i % len(budgets)]
        if budget is not None:
            body["max_tokens"] = budget
        if i % 7 == 3:
            body["stop"] = [" b", "is", "\n"]
        word = WORDS[i % len(WORDS)]
        if i % 2 == 0:
            r = chat(f"fid-{i}", f"Write a haiku about the {word}. {i}", **body)
            if i % 6 == 0:
                r["body"]["messages"].insert(
                    0, {"role": "system", "content": "Answer in one sentence."}
                )
            if i % 10 == 4:
                r["body"].update(logprobs=True, top_logprobs=2)
        else:
            r = completion(f"fid-{i}", f"The quick brown {word} jumps {i}", **body)
            if i % 10 == 5:
                r["body"]["logprobs"] = 2
        reqs.append(r)
    return reqs


def _kill_requests(n: int = 2000) -> list[dict[str, Any]]:
    return [
        completion(f"k-{i}", f"One two three {i}", max_tokens=16 + i % 49, temperature=0)
        if i % 3 == 0
        else chat(
            f"k-{i}", f"Tell me about {WORDS[i % 8]} {i}", max_tokens=16 + i % 49, temperature=0
        )
        for i in range(n)
    ]


# -- the shared drain ----------------------------------------------------------------


@dataclass
class Shared:
    spool: Path
    jobs: dict[str, Path]  # source name stem → job dir in done/ (or failed/)
    inputs: dict[str, list[dict[str, Any]]]
    bad_lines: dict[str, int]


@pytest.fixture(scope="module")
def shared(server: Server, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Shared:
    tmp = tmp_path_factory.mktemp("shared")
    config = vllm_config(tmp, tiny_model)
    spool = tmp / "spool"
    bad, bad_lines = _bad_requests()
    inputs = {
        "mixed": _mixed_requests(),
        "bad": bad,
        "fidelity": _fidelity_requests(str(tiny_model)),
        "killref": _kill_requests(),
    }
    for name, reqs in inputs.items():
        write_jsonl(spool / "incoming" / f"{name}.jsonl", reqs)
    drain(config, timeout=540)
    jobs = {}
    for where in ("done", "failed", "processing"):
        for d in job_dirs(spool, where):
            jobs[state(d)["source_name"].removesuffix(".jsonl")] = d
    return Shared(spool, jobs, inputs, bad_lines)


# -- checks --------------------------------------------------------------------------


def _prompt_tokens(tokenizer: Any, req: dict[str, Any]) -> int:
    """What vLLM counts: the chat-templated prompt (its specials come from the template,
    none added on top), or the completion prompt encoded with the tokenizer's specials."""
    body = req["body"]
    if req["url"] == "/v1/chat/completions":
        ids = tokenizer.apply_chat_template(
            body["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return len(ids)
    return len(tokenizer.encode(body["prompt"], add_special_tokens=True))


def _check_well_formed(rec: dict[str, Any], req: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI batch output line for `req` (SPEC §4); returns its response body."""
    cid = req["custom_id"]
    assert set(rec) >= {"id", "custom_id", "response", "error"}, rec
    assert isinstance(rec["id"], str) and rec["id"].startswith("batch_req_"), rec["id"]
    assert rec["custom_id"] == cid
    assert rec["error"] is None, rec["error"]
    resp = rec["response"]
    assert resp["status_code"] == 200, resp
    assert isinstance(resp["request_id"], str) and resp["request_id"]
    body = resp["body"]
    is_chat = req["url"] == "/v1/chat/completions"
    assert isinstance(body["id"], str) and body["id"]
    assert body["object"] == ("chat.completion" if is_chat else "text_completion"), body
    assert isinstance(body["created"], int) and body["created"] > 1_600_000_000
    assert body["model"] == req["body"]["model"], (cid, body["model"])
    n = req["body"].get("n", 1)
    assert [c["index"] for c in body["choices"]] == list(range(n)), (cid, body["choices"])
    for c in body["choices"]:
        assert c["finish_reason"] in {"stop", "length"}, (cid, c)
        assert "logprobs" in c, (cid, c)
        if is_chat:
            assert c["message"]["role"] == "assistant", (cid, c)
            assert isinstance(c["message"]["content"], str), (cid, c)
        else:
            assert isinstance(c["text"], str), (cid, c)
    usage = body["usage"]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert isinstance(usage[key], int) and usage[key] >= 0, (cid, usage)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    return body


def _text(choice: dict[str, Any]) -> str:
    return choice["message"]["content"] if "message" in choice else choice["text"]


# -- 1. a mixed job, well-formed -----------------------------------------------------


def test_drain_real_engine_well_formed(shared: Shared, tokenizer: Any) -> None:
    """~300 chat and completion requests with every common sampling field through
    `spoold run --drain`: each result is a well-formed batch output line whose token
    counts, finish reasons, `n` and logprobs mean what they mean to `vllm serve`."""
    reqs = shared.inputs["mixed"]
    job = shared.jobs["mixed"]
    assert job.parent.name == "done", f"mixed job ended in {job.parent.name}/: {state(job)}"
    st = state(job)
    assert st["status"] == "completed", st
    assert_exactly_once(job, [r["custom_id"] for r in reqs])
    errors = read_results(job, "errors.jsonl")
    assert errors == [], f"valid requests dead-lettered: {errors[:3]}"
    out = {r["custom_id"]: r for r in read_results(job, "output.jsonl")}
    assert st["request_counts"] == {"total": len(reqs), "completed": len(reqs), "failed": 0}

    finishes: Counter[str] = Counter()
    stopped_on_stop_string = 0
    for req in reqs:
        cid, sent = req["custom_id"], req["body"]
        body = _check_well_formed(out[cid], req)
        usage, choices = body["usage"], body["choices"]
        n, max_tokens = sent.get("n", 1), sent["max_tokens"]
        is_chat = req["url"] == "/v1/chat/completions"

        assert usage["prompt_tokens"] == _prompt_tokens(tokenizer, req), (cid, usage)
        assert usage["completion_tokens"] <= n * max_tokens, (cid, usage, max_tokens)
        assert usage["completion_tokens"] >= n, (cid, usage)  # a stop token counts too
        for c in choices:
            finishes[c["finish_reason"]] += 1
        if n == 1 and choices[0]["finish_reason"] == "length":
            assert usage["completion_tokens"] == max_tokens, (cid, usage, max_tokens)
        if "stop" in sent:
            for c in choices:
                text = _text(c)
                if sent.get("include_stop_str_in_output") and c["finish_reason"] == "stop":
                    # vLLM's extra: the stop string is kept, at the very end.
                    assert text.endswith(" ") or " " not in text, (cid, text)
                    text = text.removesuffix(" ")
                assert " " not in text, (cid, text)
                if c["finish_reason"] == "stop" and usage["completion_tokens"] < max_tokens:
                    stopped_on_stop_string += 1

        for c in choices:
            lp = c["logprobs"]
            if is_chat and sent.get("logprobs"):
                assert lp is not None, (cid, c)
                content = lp["content"]
                assert len(content) == usage["completion_tokens"], (cid, len(content), usage)
                for t in content:
                    assert isinstance(t["token"], str) and t["logprob"] <= 0, (cid, t)
                    assert isinstance(t["bytes"], list), (cid, t)
                    assert len(t["top_logprobs"]) == 2, (cid, t)
                    if sent.get("temperature") == 0:  # greedy: the chosen token is the likeliest
                        best = max(x["logprob"] for x in t["top_logprobs"])
                        assert t["logprob"] == pytest.approx(best, abs=1e-5), (cid, t)
            elif not is_chat and sent.get("logprobs"):
                assert lp is not None, (cid, c)
                k = usage["completion_tokens"]
                assert len(lp["tokens"]) == len(lp["token_logprobs"]) == k, (cid, lp)
                assert len(lp["top_logprobs"]) == len(lp["text_offset"]) == k, (cid, lp)
                assert lp["text_offset"] == sorted(lp["text_offset"]), (cid, lp)
                for tok, logprob, top in zip(
                    lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
                ):
                    assert logprob <= 0 and 1 <= len(top) <= 2, (cid, tok, top)
                    assert tok in top, (cid, tok, top)
            else:
                assert lp is None, f"{cid}: logprobs not asked for but present: {lp}"

    assert finishes["stop"] > 0 and finishes["length"] > 0, finishes
    assert stopped_on_stop_string > 0, "no request stopped on its stop string"


# -- 2. identical to vllm serve ------------------------------------------------------


def _ask_server(client: Any, req: dict[str, Any]) -> dict[str, Any]:
    body = dict(req["body"])
    if req["url"] == "/v1/chat/completions":
        resp = client.chat.completions.create(**body)
    else:
        resp = client.completions.create(**body)
    return dict(resp.model_dump())


def _choice_view(choice: dict[str, Any]) -> dict[str, Any]:
    return {"text": _text(choice), "finish_reason": choice["finish_reason"]}


def _logprob_view(choice: dict[str, Any]) -> Any:
    lp = choice.get("logprobs")
    if lp is None:
        return None
    if "content" in lp:
        return [
            (t["token"], round(t["logprob"], 4), [x["token"] for x in t["top_logprobs"]])
            for t in lp["content"]
        ]
    return {
        "tokens": lp["tokens"],
        "token_logprobs": [round(x, 4) for x in lp["token_logprobs"]],
        "top_logprobs": [sorted(t) for t in lp["top_logprobs"]],
        "text_offset": lp["text_offset"],
    }


def test_fidelity_against_vllm_serve(shared: Shared, server: Server) -> None:
    """The same ~60 greedy requests give identical texts, finish reasons and usage (and
    logprobs where asked) through spoold and through `vllm serve` (SPEC §4: a body means
    what it means to vLLM's OpenAI server), including requests without `max_tokens`."""
    from openai import OpenAI

    reqs = shared.inputs["fidelity"]
    job = shared.jobs["fidelity"]
    assert job.parent.name == "done", f"fidelity job ended in {job.parent.name}/"
    assert_exactly_once(job, [r["custom_id"] for r in reqs])
    assert read_results(job, "errors.jsonl") == []
    ours = {r["custom_id"]: r["response"]["body"] for r in read_results(job, "output.jsonl")}

    try:
        server.wait_healthy()
        with (
            OpenAI(
                base_url=f"http://127.0.0.1:{server.port}/v1",
                api_key="x",
                max_retries=0,
                timeout=120,
            ) as client,
            ThreadPoolExecutor(max_workers=8) as pool,
        ):
            theirs = dict(
                zip(
                    [r["custom_id"] for r in reqs],
                    pool.map(lambda r: _ask_server(client, r), reqs),
                    strict=True,
                )
            )
    finally:
        server.stop()

    diffs = []
    for req in reqs:
        cid = req["custom_id"]
        a, b = ours[cid], theirs[cid]
        mine = {
            "choices": [_choice_view(c) for c in a["choices"]],
            "usage": {
                k: a["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            },
            "logprobs": [_logprob_view(c) for c in a["choices"]],
        }
        ref = {
            "choices": [_choice_view(c) for c in b["choices"]],
            "usage": {
                k: b["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")
            },
            "logprobs": [_logprob_view(c) for c in b["choices"]],
        }
        if mine != ref:
            diffs.append((cid, req["body"], {"spoold": mine, "vllm serve": ref}))
    assert not diffs, (
        f"{len(diffs)} of {len(reqs)} requests differ from vllm serve; first ones:\n"
        + "\n".join(json.dumps(d, ensure_ascii=False)[:1500] for d in diffs[:5])
    )
    finishes = Counter(c["finish_reason"] for b in ours.values() for c in b["choices"])
    assert finishes["stop"] > 0 and finishes["length"] > 0, finishes
    no_budget = [r["custom_id"] for r in reqs if "max_tokens" not in r["body"]]
    assert any(ours[c]["usage"]["completion_tokens"] > 120 for c in no_budget), (
        "no request without max_tokens ran past 120 tokens: is the default applied?"
    )


# -- 3. bad requests -----------------------------------------------------------------


def test_bad_requests_become_error_lines_only(shared: Shared) -> None:
    """A prompt longer than the model's context and an invalid JSON schema are 400
    lines in errors.jsonl naming their line; every other request answers, the job
    completes, and a valid json_schema response_format gives JSON matching it."""
    reqs = shared.inputs["bad"]
    job = shared.jobs["bad"]
    assert job.parent.name == "done", f"bad job ended in {job.parent.name}/: {state(job)}"
    st = state(job)
    assert st["status"] == "completed", st
    assert_exactly_once(job, [r["custom_id"] for r in reqs])

    errors = read_results(job, "errors.jsonl")
    by_id = {e["custom_id"]: e for e in errors}
    assert sorted(by_id) == sorted(shared.bad_lines), f"errors.jsonl: {errors}"
    for cid, line in shared.bad_lines.items():
        e = by_id[cid]
        assert e["response"] is not None and e["response"]["status_code"] == 400, e
        msg = e["error"]["message"]
        assert isinstance(e["error"]["code"], str) and e["error"]["code"], e
        match = LINE_RE.search(msg)
        assert match and int(match.group(1)) == line, f"{cid} (line {line}): {msg!r}"
    assert "512" in by_id["too-long"]["error"]["message"], by_id["too-long"]
    assert "nonsense" in by_id["bad-schema"]["error"]["message"], by_id["bad-schema"]

    out = {r["custom_id"]: r for r in read_results(job, "output.jsonl")}
    good = [r for r in reqs if r["custom_id"] not in shared.bad_lines]
    assert sorted(out) == sorted(r["custom_id"] for r in good)
    assert st["request_counts"] == {
        "total": len(reqs),
        "completed": len(good),
        "failed": len(shared.bad_lines),
    }
    for req in good:
        _check_well_formed(out[req["custom_id"]], req)

    parsed: Counter[str] = Counter()
    for req in good:
        if "response_format" not in req["body"]:
            continue
        cid, schema = req["custom_id"], req["body"]["response_format"]["json_schema"]["name"]
        choice = out[cid]["response"]["body"]["choices"][0]
        content = choice["message"]["content"]
        assert content.lstrip()[:1] == ("{" if schema == "object" else '"'), (cid, content)
        if choice["finish_reason"] == "stop":
            value = json.loads(content)
            assert _matches(schema, value), (cid, schema, value)
            parsed[schema] += 1
    assert parsed["enum"] > 0, f"no enum-schema answer finished: structured output? {parsed}"


# -- 4. SIGKILL mid-job, real engine --------------------------------------------------


def test_kill9_mid_job_real_engine_resumes_exactly_once(
    shared: Shared, tiny_model: Path, tmp_path: Path
) -> None:
    """SIGKILL a real-engine drain once a checkpoint is committed, then drain again: the
    job completes exactly once, committed bytes are never rewritten, and every answer
    is the one an uninterrupted run gives (greedy decoding is deterministic)."""
    reqs = _kill_requests()
    config = vllm_config(tmp_path, tiny_model, chunk_size=100)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "kill.jsonl", reqs)

    kill_once_committed(config, tmp_path / "spoold-1.log", 100)
    job = only_job(spool, "processing")
    st = state(job)
    assert st["status"] == "running", st
    assert 100 <= st["request_counts"]["completed"] < len(reqs), st["request_counts"]
    committed = (job / "output.jsonl").read_bytes()[: st["checkpoint"]["output_bytes"]]
    assert committed.count(b"\n") == st["request_counts"]["completed"], st

    drain(config, timeout=400)
    done = only_job(spool, "done")
    assert done.name == job.name
    final = state(done)
    assert final["status"] == "completed", final
    assert_exactly_once(done, [r["custom_id"] for r in reqs])
    outputs = read_results(done, "output.jsonl")
    assert read_results(done, "errors.jsonl") == []
    assert final["request_counts"] == {"total": len(reqs), "completed": len(reqs), "failed": 0}
    assert (done / "output.jsonl").read_bytes().startswith(committed), (
        "bytes committed before the kill were rewritten"
    )

    # Same answers as the uninterrupted run of the same file in the shared drain.
    ref = {
        r["custom_id"]: r["response"]["body"]
        for r in read_results(shared.jobs["killref"], "output.jsonl")
    }
    assert len(ref) == len(reqs)
    differ = []
    for r in outputs:
        mine, theirs = r["response"]["body"], ref[r["custom_id"]]
        a = ([_choice_view(c) for c in mine["choices"]], mine["usage"])
        b = ([_choice_view(c) for c in theirs["choices"]], theirs["usage"])
        if a != b:
            differ.append((r["custom_id"], a, b))
    assert not differ, f"{len(differ)} answers differ from an uninterrupted run: {differ[:3]}"


# -- 5. Engine arguments are checked at start, against vLLM's own list ----------------


def test_a_mistyped_engine_argument_is_a_config_error_at_start(
    tiny_model: Path, tmp_path: Path
) -> None:
    cfg = make_config(
        tmp_path, engine={"backend": "vllm", "model": str(tiny_model), "enforce_eagr": True}
    )
    write_jsonl(tmp_path / "spool" / "incoming" / "a.jsonl", [chat("a")])
    proc = run_spoold("run", "--config", str(cfg), "--drain", timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "engine.enforce_eagr" in proc.stderr and "'enforce_eager'" in proc.stderr
    assert (tmp_path / "spool" / "incoming" / "a.jsonl").exists()  # nothing was touched


# -- 6. A model that cannot load wedges nothing (SPEC §3) -----------------------------

MISSING_MODEL = "/nonexistent/model"


def _seconds(event: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _unloadable_beside_good(
    tmp: Path, tiny_model: Path, model_retry_s: float
) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """A job for a model that cannot load (a path that does not exist), dropped before
    a job for the tiny model; the config allows two loads."""
    config = vllm_config(
        tmp,
        tiny_model,
        models={"missing": MISSING_MODEL},
        model_retry_s=model_retry_s,
        max_model_load_attempts=2,
    )
    incoming = tmp / "spool" / "incoming"
    bad = [chat(f"bad-{i}", f"question {i}", model="missing", max_tokens=4) for i in range(3)]
    good = [chat(f"good-{i}", f"question {i}", max_tokens=4, temperature=0) for i in range(5)]
    write_jsonl(incoming / "a_bad.jsonl", bad)
    write_jsonl(incoming / "b_good.jsonl", good)
    older = time.time_ns() - 2_000_000_000
    os.utime(incoming / "a_bad.jsonl", ns=(older, older))
    return config, bad, good


def _offline_env() -> dict[str, str]:
    return {**_env(), "HF_HUB_OFFLINE": "1"}  # nothing tries the network for the path


def _check_unloadable_outcome(spool: Path, bad: list[Any], good: list[Any]) -> None:
    """The good job done exactly once, the bad one failed naming the model, 2 loads."""
    done = only_job(spool, "done")
    assert state(done)["source_name"] == "b_good.jsonl"
    assert state(done)["status"] == "completed", state(done)
    assert_exactly_once(done, [r["custom_id"] for r in good])
    assert read_results(done, "errors.jsonl") == []
    out = {r["custom_id"]: r for r in read_results(done, "output.jsonl")}
    for req in good:
        _check_well_formed(out[req["custom_id"]], req)
    failed = only_job(spool, "failed")
    st = state(failed)
    assert st["source_name"] == "a_bad.jsonl" and st["status"] == "failed", st
    assert MISSING_MODEL in st["error"] and "2 attempts" in st["error"], st["error"]
    assert "HFValidationError" in st["error"], "the last load error is named: " + st["error"]
    assert st["request_counts"]["completed"] == 0, st
    assert not job_dirs(spool, "processing") and not list((spool / "incoming").glob("*.jsonl"))


def test_an_unloadable_model_beside_a_good_one_under_drain(
    tiny_model: Path, tmp_path: Path
) -> None:
    """SPEC §3 "A model that cannot load wedges nothing", with the real engine: the first
    job's model path does not exist; one `--drain` runs the good job behind it, tries
    the bad model's second load without waiting out its 30 s backoff, files the bad job
    in failed/ naming the model and the error, and exits 1."""
    config, bad, good = _unloadable_beside_good(tmp_path, tiny_model, model_retry_s=30)
    spool = tmp_path / "spool"
    log = tmp_path / "spoold.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            [*SPOOLD, "run", "--config", str(config), "--drain"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_offline_env(),
            timeout=240,
        )
    text = log.read_text(errors="replace")
    assert proc.returncode == 1, f"exit {proc.returncode}:\n{text[-3000:]}"
    _check_unloadable_outcome(spool, bad, good)

    events = log_events(log.read_text(errors="replace"))
    loads = [e for e in events if e.get("event") == "cannot load model"]
    assert [e["model"] for e in loads] == [MISSING_MODEL] * 2, loads
    assert [e["attempt"] for e in loads] == [1, 2], loads
    assert _seconds(loads[1]) - _seconds(loads[0]) < 30, "--drain waited out the backoff"
    assert any(e.get("event") == "jobs failed because their model could not load" for e in events)
    # One process that never crashed: no job run failed, no exit for the engine.
    crashes = {"job run failed", "the engine died; exiting so the service manager restarts us"}
    assert not [e for e in events if e.get("event") in crashes], text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_an_unloadable_model_beside_a_good_one_under_a_live_daemon(
    tiny_model: Path, tmp_path: Path
) -> None:
    """The same under `spoold run`: the daemon stays up, spool-status says degraded naming
    the model while its load waits a retry, the good job completes, the bad job goes to
    failed/ after its second load; SIGTERM then ends the daemon with exit 0."""
    config, bad, good = _unloadable_beside_good(tmp_path, tiny_model, model_retry_s=4)
    spool = tmp_path / "spool"
    beat_path = spool / "heartbeats" / "default.json"
    status_cmd = [str(Path(sys.executable).parent / "spool-status"), "--config", str(config)]
    log = tmp_path / "spoold.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*SPOOLD, "run", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_offline_env(),
        )
    degraded: subprocess.CompletedProcess[str] | None = None
    try:
        deadline = time.monotonic() + 180
        while not job_dirs(spool, "failed"):
            assert proc.poll() is None, f"spoold exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, "the bad job not failed within 180 s"
            if degraded is None:
                try:
                    beat = json.loads(beat_path.read_text())
                except (OSError, ValueError):
                    beat = {}
                if any(MISSING_MODEL in p for p in beat.get("problems") or []):
                    status = subprocess.run(
                        status_cmd, capture_output=True, text=True, timeout=30, env=_env()
                    )
                    if not job_dirs(spool, "failed"):  # still retrying when it looked
                        degraded = status
            time.sleep(0.05)
        # The bad job is filed; the good one is done (it ran meanwhile) and the daemon
        # is still up.
        deadline = time.monotonic() + 120
        while not job_dirs(spool, "done") or job_dirs(spool, "processing"):
            assert proc.poll() is None, f"spoold exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, "the good job not done within 120 s"
            time.sleep(0.1)
        time.sleep(1.0)
        assert proc.poll() is None, f"spoold exited {proc.returncode}:\n{log.read_text()}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    assert rc == 0, f"SIGTERM: exit {rc}:\n{log.read_text()[-3000:]}"
    _check_unloadable_outcome(spool, bad, good)
    assert degraded is not None, "never saw the heartbeat name the model while it retried"
    assert degraded.returncode == 1, degraded.stdout  # degraded
    assert MISSING_MODEL in degraded.stdout, degraded.stdout
    loads = [
        e
        for e in log_events(log.read_text(errors="replace"))
        if e.get("event") == "cannot load model"
    ]
    assert [e["attempt"] for e in loads] == [1, 2], loads
    assert _seconds(loads[1]) - _seconds(loads[0]) >= 4 - 0.5, "no backoff between loads"


# -- 7. The engine core killed mid-job: reloaded in-process, suspects re-run ----------


def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return kids


def _engine_cores(pid: int) -> list[int]:
    """The daemon's vLLM EngineCore processes (comm "VLLM::EngineCore", cut to 15)."""
    cores = []
    for kid in _children(pid):
        try:
            if Path(f"/proc/{kid}/comm").read_text().startswith("VLLM::EngineCor"):
                cores.append(kid)
        except OSError:
            continue
    return cores


def test_a_killed_engine_core_is_reloaded_and_its_requests_rerun(
    tiny_model: Path, tmp_path: Path
) -> None:
    """SPEC §3 "A request that kills the engine is isolated", with vLLM's engine core in
    its own process (VLLM_ENABLE_V1_MULTIPROCESSING=1): SIGKILL the EngineCore mid-job.
    The daemon sees the death (EngineDeadError → EngineDied), reloads the engine
    in-process and keeps running; the requests that were in flight become suspects, run
    again in groups on the fresh engine and all succeed (a core killed from outside has
    no culprit: nothing is dead-lettered); the job completes exactly once."""
    reqs = [
        chat(f"d-{i}", f"Tell me about {WORDS[i % 8]} {i}", temperature=0, max_tokens=8)
        if i % 10 == 0  # short ones finish first: a commit, with the rest in flight
        else completion(f"d-{i}", f"One two three {i}", temperature=0, max_tokens=64)
        for i in range(300)
    ]
    config = vllm_config(tmp_path, tiny_model, chunk_size=20)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "die.jsonl", reqs)
    log = tmp_path / "spoold.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*SPOOLD, "run", "--config", str(config), "--drain"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        )
    suspects: set[int] = set()
    try:
        deadline = time.monotonic() + 150
        while True:  # until a chunk is committed: requests are in flight then
            assert proc.poll() is None, f"spoold exited {proc.returncode}:\n{log.read_text()}"
            assert time.monotonic() < deadline, "no commit within 150 s"
            committed = 0
            for d in job_dirs(spool, "processing"):
                try:
                    committed = state(d)["request_counts"]["completed"]
                except (OSError, ValueError, KeyError):
                    continue  # being replaced right now
            if committed > 0:
                break
            time.sleep(0.005)
        first_commit = time.monotonic()
        cores = _engine_cores(proc.pid)
        assert len(cores) == 1, f"expected one EngineCore child of spoold: {cores}"
        os.kill(cores[0], signal.SIGKILL)
        job = only_job(spool, "processing")
        # The daemon lives on: a new EngineCore, the suspects recorded in state.json.
        deadline = time.monotonic() + 150
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"not done 150 s after the kill:\n{log.read_text()}"
            with contextlib.suppress(OSError, ValueError, KeyError):  # replaced, or filed
                suspects.update(state(job)["isolation"]["suspects"])
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait(timeout=60)
    total_s = time.monotonic() - started
    text = log.read_text(errors="replace")
    assert rc == 0, f"spoold exited {rc} after the engine core was killed:\n{text[-4000:]}"

    events = log_events(log.read_text(errors="replace"))
    died = [e for e in events if e.get("event") == "the engine died with requests in flight; "
            "reloading it"]  # fmt: skip
    assert len(died) == 1, text[-4000:]
    assert died[0]["suspects"] > 0, died
    assert any(e.get("event") == "reloading the engine after its death" for e in events)
    loads = [e for e in events if e.get("event") == "loading model"]
    assert len(loads) == 2, loads  # the first load and the reload, in one process
    assert any(e.get("event") == "running suspects alone" for e in events), text[-4000:]

    done = only_job(spool, "done")
    final = state(done)
    assert final["status"] == "completed", final
    assert_exactly_once(done, [r["custom_id"] for r in reqs])
    assert read_results(done, "errors.jsonl") == [], "a request was dead-lettered"
    assert final["request_counts"] == {"total": len(reqs), "completed": len(reqs), "failed": 0}
    assert final["isolation"]["suspects"] == [], final["isolation"]
    out = {r["custom_id"]: r for r in read_results(done, "output.jsonl")}
    assert suspects, "never saw the suspects recorded in state.json"
    assert len(suspects) == died[0]["suspects"], (len(suspects), died)
    for line in suspects:  # every request in flight at the death answered, once
        _check_well_formed(out[reqs[line - 1]["custom_id"]], reqs[line - 1])

    reload_s = _seconds(next(e for e in events if e.get("event") == "running suspects alone"))
    reload_s -= _seconds(died[0])
    print(
        f"\nmultiprocess engine: first commit {first_commit - started:.1f} s after the start;"
        f" reload {reload_s:.1f} s; whole run {total_s:.1f} s; {len(suspects)} suspects"
    )
