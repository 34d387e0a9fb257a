"""Pure validation: one raw input line → a Request, or a LineError saying what is wrong."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from spoold.unique import IN_MEMORY, UniqueIds

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL)
DUPLICATE = "duplicate_custom_id"
MODEL_MISMATCH = "model_mismatch"


# Not frozen: a frozen dataclass's __init__ costs twice as much, and two are built per
# request (validation, then the run). Nothing mutates a Request.
@dataclass(slots=True)
class Request:
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]

    @property
    def is_chat(self) -> bool:
        return self.url == CHAT_URL

    def text(self) -> str:
        """All prompt text of the request (for markers and rough token counts)."""
        if self.is_chat:
            parts: list[str] = []
            for m in self.body["messages"]:
                content = m.get("content")
                if isinstance(content, str):
                    parts.append(content)
                elif isinstance(content, list):
                    parts.extend(p.get("text", "") for p in content if isinstance(p, dict))
            return "\n".join(parts)
        prompt = self.body["prompt"]
        return prompt if isinstance(prompt, str) else "\n".join(prompt)


@dataclass(frozen=True, slots=True)
class LineError:
    line: int
    custom_id: str | None
    code: str
    message: str


# These run for every field of every line: exact type() checks inline (a bool is not a
# number here; parsed JSON has no subclasses), no helper calls.
_NUM = (int, float)


def _int_list(v: Any) -> bool:
    return type(v) is list and all(type(i) is int for i in v)


def _str_or_str_list(v: Any) -> bool:
    return type(v) is str or (type(v) is list and len(v) <= 16 and all(type(s) is str for s in v))


# Sampling and output fields the engines honour: name → (check, what it must be).
_FIELD_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: type(v) is str, "a string"),
    "max_tokens": (lambda v: v is None or (type(v) is int and v >= 1), "an integer >= 1"),
    "max_completion_tokens": (
        lambda v: v is None or (type(v) is int and v >= 1),
        "an integer >= 1",
    ),
    "temperature": (
        lambda v: v is None or (type(v) in _NUM and 0 <= v <= 2),
        "a number in [0, 2]",
    ),
    "top_p": (lambda v: v is None or (type(v) in _NUM and 0 < v <= 1), "a number in (0, 1]"),
    "top_k": (
        lambda v: v is None or (type(v) is int and (v == -1 or v >= 0)),
        "-1 or an integer >= 0",
    ),
    "min_p": (lambda v: v is None or (type(v) in _NUM and 0 <= v <= 1), "a number in [0, 1]"),
    "n": (lambda v: v is None or (type(v) is int and 1 <= v <= 128), "an integer in [1, 128]"),
    "stop": (lambda v: v is None or _str_or_str_list(v), "a string or a list of strings"),
    "seed": (lambda v: v is None or type(v) is int, "an integer"),
    "presence_penalty": (
        lambda v: v is None or (type(v) in _NUM and -2 <= v <= 2),
        "a number in [-2, 2]",
    ),
    "frequency_penalty": (
        lambda v: v is None or (type(v) in _NUM and -2 <= v <= 2),
        "a number in [-2, 2]",
    ),
    "repetition_penalty": (lambda v: v is None or (type(v) in _NUM and v > 0), "a number > 0"),
    "logprobs": (
        lambda v: v is None or type(v) is bool or type(v) is int,
        "a boolean or integer",
    ),
    "top_logprobs": (
        lambda v: v is None or (type(v) is int and 0 <= v <= 20),
        "an integer in [0, 20]",
    ),
    "response_format": (lambda v: type(v) is dict and "type" in v, "an object with 'type'"),
    "stream": (lambda v: v is None or v is False, "false (batch jobs cannot stream)"),
    "echo": (lambda v: v is None or v is False, "false"),
    "suffix": (lambda v: v is None, "null"),
    "best_of": (lambda v: v is None or v == 1, "1"),
    "ignore_eos": (lambda v: type(v) is bool, "a boolean"),
    "min_tokens": (lambda v: type(v) is int and v >= 0, "an integer >= 0"),
    "skip_special_tokens": (lambda v: type(v) is bool, "a boolean"),
    # vLLM's own sampling extras (what `vllm serve` accepts beside OpenAI's fields).
    "logit_bias": (
        lambda v: v is None or (type(v) is dict and all(type(b) in _NUM for b in v.values())),
        "an object of token id → bias",
    ),
    "stop_token_ids": (lambda v: v is None or _int_list(v), "a list of token ids"),
    "allowed_token_ids": (lambda v: v is None or _int_list(v), "a list of token ids"),
    "bad_words": (lambda v: v is None or _str_or_str_list(v), "a list of strings"),
    "include_stop_str_in_output": (lambda v: type(v) is bool, "a boolean"),
    "spaces_between_special_tokens": (lambda v: type(v) is bool, "a boolean"),
    "truncate_prompt_tokens": (
        lambda v: v is None or (type(v) is int and v >= -1),
        "-1 or an integer >= 0",
    ),
    "structured_outputs": (lambda v: v is None or type(v) is dict, "an object"),
}
# Accepted and ignored: they do not change what the engine computes.
_HARMLESS = {"user", "metadata", "store", "service_tier", "stream_options"}


def _check_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "body.messages must be a non-empty list of message objects"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"body.messages[{i}] must be an object"
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            return f"body.messages[{i}].role must be system, developer, user, assistant or tool"
        content = m.get("content")
        if isinstance(content, str):
            continue
        if content is None and role == "assistant":
            continue
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            continue
        return f"body.messages[{i}].content must be a string or a list of text parts"
    return None


def _check_prompt(prompt: Any) -> str | None:
    if isinstance(prompt, str):
        return None
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) > 1:
            return "body.prompt as a list of several prompts is not supported: one prompt per line"
        return None
    return "body.prompt must be a string"


def check_body(url: str, body: Any) -> str | None:
    """What is wrong with a request body for `url`, or None."""
    if not isinstance(body, dict):
        return "body must be a JSON object"
    problem = (
        _check_messages(body.get("messages"))
        if url == CHAT_URL
        else _check_prompt(body.get("prompt"))
    )
    if problem:
        return problem
    shape_key = "messages" if url == CHAT_URL else "prompt"
    for key, value in body.items():
        if key == shape_key or key in _HARMLESS:
            continue
        check = _FIELD_CHECKS.get(key)
        if check is None:
            return f"body.{key} is not supported by spoold; remove it from the request"
        ok, what = check
        if not ok(value):
            return f"body.{key} must be {what}, got {json.dumps(value)[:80]}"
    return None


_BLANK = object()  # what _load says of a blank line (JSON `null` is None)


def _load(raw: bytes, line: int) -> Any:
    """One line's JSON value, or _BLANK. orjson parses the bytes as they are (and checks
    they are UTF-8): the common case. What it refuses is looked at again as text, with
    a first line's BOM and surrounding whitespace stripped. Raises JSONDecodeError for
    what is not JSON, UnicodeDecodeError for bytes that are not UTF-8."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        text = raw.decode("utf-8")
        if line == 1 and text.startswith("\ufeff"):
            text = text[1:]
        text = text.strip()
        return orjson.loads(text) if text else _BLANK


def read_request(raw: bytes, line: int) -> Request | None:
    """A line that validation already accepted, parsed without checking it again.

    The input never changes after the claim, and every line validation rejected is
    skipped by its number, so the run pass only needs the fields. None for a blank.
    """
    obj = _load(raw, line)
    if obj is _BLANK:
        return None
    return Request(line, obj["custom_id"], obj["url"], obj["body"])


def parse_line(raw: bytes, line: int) -> Request | LineError | None:
    """Parse and check one line of an input file. None for a blank line.

    Raises UnicodeDecodeError for bytes that are not UTF-8 (the whole file fails).
    """
    try:
        obj = _load(raw, line)
    except orjson.JSONDecodeError as e:
        return LineError(line, None, "invalid_json", f"line {line}: not valid JSON ({e})")
    if obj is _BLANK:
        return None
    if type(obj) is not dict:
        return LineError(line, None, "invalid_request", f"line {line}: must be a JSON object")
    custom_id = obj.get("custom_id")
    if type(custom_id) is not str or not custom_id:
        return LineError(
            line, None, "invalid_request", f"line {line}: custom_id must be a non-empty string"
        )
    url: Any = obj.get("url")
    problem: str | None
    if obj.get("method") != "POST":
        problem = f'method must be "POST", got {json.dumps(obj.get("method"))}'
    elif url not in SUPPORTED_URLS:
        problem = f"url must be one of {', '.join(SUPPORTED_URLS)}, got {json.dumps(url)}"
    else:
        problem = check_body(url, obj.get("body"))
    if problem:
        return LineError(line, custom_id, "invalid_request", f"line {line}: {problem}")
    return Request(line, custom_id, url, obj["body"])


def model_mismatch(request: Request, wanted: str, job_model: str) -> LineError:
    """The error of a line whose body.model runs on `wanted`, in a job on `job_model`."""
    return LineError(
        request.line,
        request.custom_id,
        MODEL_MISMATCH,
        f"line {request.line}: body.model {request.body.get('model')!r} runs on "
        f"{wanted!r}, but this job runs on {job_model!r} (set by its first request): "
        "submit requests for another model in a separate file",
    )


def one_model(
    items: Iterable[Request | LineError],
    resolve: Callable[[object], str],
    job_model: str | None = None,
) -> Iterator[Request | LineError]:
    """`scan_file`'s items with the one-model-per-job rule applied (for the runner and
    `spoold validate` alike): a valid line whose body.model `resolve`s to another model
    than the job's (`job_model`, else the first valid line's) becomes a model_mismatch
    error, and its later duplicate_custom_id replacement is dropped: one error a line."""
    fine: set[object] = set()  # body.model values known to run on the job's model
    mismatched: set[int] = set()
    for item in items:
        if isinstance(item, Request):
            name = item.body.get("model")
            if name not in fine:
                wanted = resolve(name)
                job_model = job_model or wanted
                if wanted != job_model:
                    mismatched.add(item.line)
                    yield model_mismatch(item, wanted, job_model)
                    continue
                fine.add(name)
        elif item.code == DUPLICATE and item.line in mismatched:
            continue
        yield item


def duplicate_error(line: int, custom_id: str, first_line: int) -> LineError:
    return LineError(
        line,
        custom_id,
        DUPLICATE,
        f"line {line}: custom_id {custom_id!r} already used on line {first_line}; "
        "custom_id must be unique in a file",
    )


class NotUtf8Error(ValueError):
    """The file is not UTF-8 text: the whole job fails."""

    def __init__(self, line: int, byte: int) -> None:
        super().__init__(f"not UTF-8 text (line {line}, byte {byte})")
        self.line = line


def iter_lines(
    f: BinaryIO, offset: int, first_line: int, max_line_bytes: int
) -> Iterator[tuple[int, int, bytes | None]]:
    """(line number, end offset, raw bytes or None when longer than the cap), streamed."""
    f.seek(offset)
    line_no = first_line
    while True:
        raw = f.readline(max_line_bytes + 1)
        if not raw:
            return
        offset += len(raw)
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                offset += len(rest)
            offset += len(rest)
            yield line_no, offset, None
        else:
            yield line_no, offset, raw
        line_no += 1


@dataclass
class Shape:
    """What a scan saw of a file's lines: how many, and which were blank (skipped)."""

    lines: int = 0
    blank: list[int] = field(default_factory=list)


def scan_file(
    f: BinaryIO,
    max_line_bytes: int,
    spill_dir: Path | None = None,
    expected: int = 0,
    shape: Shape | None = None,
) -> Iterator[Request | LineError]:
    """Check every line of an input file, streamed: what admission and validation see.

    Yields one item per non-blank line, in order; then, for every valid line whose
    custom_id appeared on an earlier line, a `duplicate_custom_id` LineError that
    *replaces* the Request already yielded for that line. Memory stays bounded
    (`unique.UniqueIds`: past `expected` ids it spills to `spill_dir`). Raises
    NotUtf8Error for a file that is not UTF-8 text. `shape`, if given, is filled in
    (for the ledger's audit, which then need not read the input again).
    """
    with contextlib.ExitStack() as stack:
        if spill_dir is None and expected > IN_MEMORY:
            spill_dir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        ids = stack.enter_context(UniqueIds(expected, spill_dir))
        for line_no, _, raw in iter_lines(f, 0, 1, max_line_bytes):
            if shape is not None:
                shape.lines = line_no
            if raw is None:
                yield LineError(
                    line_no,
                    None,
                    "line_too_long",
                    f"line {line_no}: longer than {max_line_bytes} bytes (limits.max_line_bytes)",
                )
                continue
            try:
                parsed = parse_line(raw, line_no)
            except UnicodeDecodeError as e:
                raise NotUtf8Error(line_no, e.start) from None
            if parsed is None:
                if shape is not None:
                    shape.blank.append(line_no)
                continue
            if parsed.custom_id is not None:
                ids.add(line_no, parsed.custom_id, isinstance(parsed, Request))
            yield parsed
        for line, custom_id, first in ids.duplicates():
            yield duplicate_error(line, custom_id, first)


def first_request(f: BinaryIO, max_line_bytes: int, max_lines: int = 1000) -> Request | None:
    """The first valid request of a file (to pick the job's model), or None."""
    try:
        for line_no, _, raw in iter_lines(f, 0, 1, max_line_bytes):
            if line_no > max_lines:
                return None
            parsed = parse_line(raw, line_no) if raw is not None else None
            if isinstance(parsed, Request):
                return parsed
    except UnicodeDecodeError:
        return None
    return None
