"""Pure: OpenAI Batch output and error lines."""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Any

import orjson

from spoold.engines.base import Completion, Embedding

# What str.splitlines() (and JavaScript's line terminators) split on beyond what JSON
# escapes already (controls below 0x20): U+0085, U+2028, U+2029; with them the other C1
# controls and DEL, which terminals act on. As UTF-8 these byte sequences mean only
# these characters, and outside strings a JSON line is ASCII: replacing them in the
# encoded line is exact.
_SPLITTERS = re.compile(rb"\x7f|\xc2[\x80-\x9f]|\xe2\x80[\xa8\xa9]")
_C1 = re.compile(rb"\xc2[\x80-\x9f]")
_SEPARATORS = re.compile(rb"\xe2\x80[\xa8\xa9]")


def _escaped(m: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % ord(m.group().decode())


def _dumps(record: dict[str, Any]) -> bytes:
    """One result line: compact JSON, `\n`-terminated, the only line break in it (SPEC §4)."""
    # NumPy arrays (the vllm engine's embeddings) are written as `vllm serve` writes
    # them: orjson's shortest float32 form.
    data = orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE | orjson.OPT_SERIALIZE_NUMPY)
    # `int in bytes` is a memchr; a regex searches only where a lead byte is (curly
    # quotes and dashes, common in model output, start with 0xE2 too), and the line is
    # rewritten only where one of the characters is.
    if 0x7F in data or (
        not data.isascii()
        and (
            (0xC2 in data and _C1.search(data) is not None)
            or (0xE2 in data and _SEPARATORS.search(data) is not None)
        )
    ):
        return _SPLITTERS.sub(_escaped, data)
    return data


@functools.lru_cache(maxsize=64)
def _job_hash(job_id: str) -> str:
    return hashlib.blake2b(job_id.encode(), digest_size=8).hexdigest()


def _ids(job_id: str, line: int) -> tuple[str, str, str]:
    """(batch id, request id, body id) of one line: stable, so a line redone after a
    crash gets the same ids; unique per line and, through the job's hash, per job."""
    h = _job_hash(job_id)
    x = "%08x" % line  # noqa: UP031 - the cheapest way, and this runs for every line
    return h + x, x + h, f"{h}-{line}"


def batch_request_id(job_id: str, line: int) -> str:
    return f"batch_req_{_ids(job_id, line)[0]}"


def response_body(c: Completion, created: int, body_id: str) -> dict[str, Any]:
    """The body `vllm serve` (and OpenAI) would answer for this request."""
    req = c.request
    model = req.body.get("model") or c.model
    if req.is_chat:
        choices: list[dict[str, Any]] = [
            {
                "index": i,
                "message": {"role": "assistant", "content": ch.text},
                "logprobs": ch.logprobs,
                "finish_reason": ch.finish_reason,
            }
            for i, ch in enumerate(c.choices)
        ]
        obj, prefix = "chat.completion", "chatcmpl-"
    else:
        choices = [
            {
                "index": i,
                "text": ch.text,
                "logprobs": ch.logprobs,
                "finish_reason": ch.finish_reason,
            }
            for i, ch in enumerate(c.choices)
        ]
        obj, prefix = "text_completion", "cmpl-"
    body: dict[str, Any] = {
        "id": prefix + body_id,
        "object": obj,
        "created": created,
        "model": model,
        "choices": choices,
        "usage": {
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        },
    }
    if c.extra:
        body.update(c.extra)
    return body


def embedding_body(e: Embedding, created: int, body_id: str) -> dict[str, Any]:
    """The body `vllm serve` answers at /v1/embeddings for this request."""
    return {
        "id": "embd-" + body_id,
        "object": "list",
        "created": created,
        "model": e.request.body.get("model") or e.model,
        "data": [
            {"index": i, "object": "embedding", "embedding": vector}
            for i, vector in enumerate(e.data)
        ],
        "usage": {
            "prompt_tokens": e.prompt_tokens,
            "total_tokens": e.prompt_tokens,
            "completion_tokens": 0,
            "prompt_tokens_details": None,
            "completion_tokens_details": None,
        },
    }


def output_line(job_id: str, c: Completion | Embedding, created: int) -> bytes:
    batch_id, request_id, body_id = _ids(job_id, c.request.line)
    body = (
        embedding_body(c, created, body_id)
        if isinstance(c, Embedding)
        else response_body(c, created, body_id)
    )
    record = {
        "id": f"batch_req_{batch_id}",
        "custom_id": c.request.custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }
    return _dumps(record)


def error_line(
    job_id: str,
    line: int,
    custom_id: str | None,
    code: str,
    message: str,
    status: int | None = None,
) -> bytes:
    """An errors.jsonl line; `status` set when the request reached an HTTP-like stage."""
    batch_id, request_id, _ = _ids(job_id, line)
    response = None
    if status is not None:
        response = {
            "status_code": status,
            "request_id": request_id,
            "body": {"error": {"message": message, "type": code, "param": None, "code": code}},
        }
    record = {
        "id": f"batch_req_{batch_id}",
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": message},
    }
    return _dumps(record)
