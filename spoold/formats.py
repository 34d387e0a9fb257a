"""Pure: OpenAI Batch output and error lines."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from spoold.engines.base import Completion

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(", ", ": ")).encode


def _hex(*parts: object) -> str:
    return hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=12).hexdigest()


def batch_request_id(job_id: str, line: int) -> str:
    """Stable per request: a line redone after a crash gets the same id."""
    return f"batch_req_{_hex(job_id, line)}"


def response_body(c: Completion, created: int) -> dict[str, Any]:
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
        "id": prefix + _hex("body", req.custom_id, req.line),
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
    body.update(c.extra)
    return body


def output_line(job_id: str, c: Completion, created: int) -> bytes:
    line = c.request.line
    record = {
        "id": batch_request_id(job_id, line),
        "custom_id": c.request.custom_id,
        "response": {
            "status_code": 200,
            "request_id": _hex("request", job_id, line),
            "body": response_body(c, created),
        },
        "error": None,
    }
    return _dumps(record).encode() + b"\n"


def error_line(
    job_id: str,
    line: int,
    custom_id: str | None,
    code: str,
    message: str,
    status: int | None = None,
) -> bytes:
    """An errors.jsonl line; `status` set when the request reached an HTTP-like stage."""
    response = None
    if status is not None:
        response = {
            "status_code": status,
            "request_id": _hex("request", job_id, line),
            "body": {"error": {"message": message, "type": code, "param": None, "code": code}},
        }
    record = {
        "id": batch_request_id(job_id, line),
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": message},
    }
    return _dumps(record).encode() + b"\n"
