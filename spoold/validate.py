"""Pure validation: one raw input line → a Request, or a LineError saying what is wrong."""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from spoold.fields import FIELD_CHECKS, HARMLESS
from spoold.unique import IN_MEMORY, UniqueIds

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"
SUPPORTED_URLS = (CHAT_URL, COMPLETIONS_URL, EMBEDDINGS_URL)
DUPLICATE = "duplicate_custom_id"
MODEL_MISMATCH = "model_mismatch"
ENDPOINT_MISMATCH = "endpoint_mismatch"
# The two kinds of work a job can be (SPEC §6 Endpoints), by vLLM's runner names: a
# job's first valid request decides, and its model is loaded with that runner.
GENERATE = "generate"
POOLING = "pooling"


def runner_of(url: str | None) -> str:
    """The vLLM runner a request's url needs."""
    return POOLING if url == EMBEDDINGS_URL else GENERATE


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

    @property
    def is_embedding(self) -> bool:
        return self.url == EMBEDDINGS_URL

    def text(self) -> str:
        """All prompt text of the request (for markers and rough token counts)."""
        if self.url == EMBEDDINGS_URL:
            given = self.body["input"]
            if type(given) is str:
                return given
            return "\n".join(p for p in given if type(p) is str)  # token ids: no text
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
    """Everything wrong with one line: `problems` in plain words, without the line
    number; `code` is the first problem's (what errors.jsonl's consumers key on)."""

    line: int
    custom_id: str | None
    code: str
    problems: tuple[str, ...]

    @property
    def message(self) -> str:
        """The errors.jsonl message: the line number, then every problem."""
        return f"line {self.line}: " + "; ".join(self.problems)


def _show(value: Any) -> str:
    """A value as the user wrote it, short and on one line."""
    return json.dumps(value)[:80]


def _must(obj: dict[str, Any], key: str, what: str, where: str = "") -> str:
    if key not in obj:
        return f"{where}{key} is missing: it must be {what}"
    return f"{where}{key} must be {what}, got {_show(obj[key])}"


def _check_messages(body: dict[str, Any], problems: list[str]) -> None:
    messages = body.get("messages")
    if type(messages) is not list or not messages:
        problems.append(_must(body, "messages", "a non-empty list of message objects", "body."))
        return
    for i, m in enumerate(messages):
        if type(m) is not dict:
            problems.append(f"body.messages[{i}] must be an object, got {_show(m)}")
            continue
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            problems.append(
                _must(
                    m, "role", "system, developer, user, assistant or tool", f"body.messages[{i}]."
                )
            )
        content = m.get("content")
        if type(content) is str or (content is None and role == "assistant"):
            continue
        if type(content) is list and all(
            type(p) is dict and p.get("type") == "text" and type(p.get("text")) is str
            for p in content
        ):
            continue
        problems.append(
            _must(m, "content", "a string or a list of text parts", f"body.messages[{i}].")
        )


def _check_prompt(body: dict[str, Any], problems: list[str]) -> None:
    prompt = body.get("prompt")
    if type(prompt) is str:
        return
    if type(prompt) is list and prompt and all(type(p) is str for p in prompt):
        if len(prompt) > 1:
            problems.append(
                "body.prompt as a list of several prompts is not supported: one prompt per line"
            )
        return
    problems.append(_must(body, "prompt", "a string", "body."))


def _token_ids(v: Any) -> bool:
    return type(v) is list and bool(v) and all(type(t) is int and t >= 0 for t in v)


MAX_INPUTS = 2048  # inputs of one embeddings request (OpenAI's limit)


def _check_input(body: dict[str, Any], problems: list[str]) -> None:
    """`input` as OpenAI (and `vllm serve`) take it: a string, a list of strings, a
    list of token ids, or a list of lists of token ids; lists not empty, and at most
    MAX_INPUTS inputs (each is a vector in the output line)."""
    given = body.get("input")
    if type(given) is str or _token_ids(given):
        return
    if (
        type(given) is list
        and given
        and (all(type(p) is str for p in given) or all(_token_ids(p) for p in given))
    ):
        if len(given) > MAX_INPUTS:
            problems.append(
                f"body.input has {len(given)} inputs: at most {MAX_INPUTS} a request "
                "(as OpenAI's API); split it over several lines"
            )
        return
    problems.append(
        _must(
            body,
            "input",
            "a string, a list of strings, a list of token ids or a list of lists of token "
            "ids (none empty)",
            "body.",
        )
    )


# The fields of an embeddings body beside `input` (what `vllm serve` honours for it).
EMBEDDING_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: type(v) is str, "a string"),
    "encoding_format": (lambda v: v in ("float", "base64"), '"float" or "base64"'),
    "dimensions": (lambda v: v is None or (type(v) is int and v >= 1), "an integer >= 1"),
    "truncate_prompt_tokens": (
        lambda v: v is None or (type(v) is int and v >= -1),
        "-1 or an integer >= 0",
    ),
    "add_special_tokens": (lambda v: type(v) is bool, "a boolean"),
}


def _check_embedding(body: dict[str, Any], problems: list[str]) -> None:
    _check_input(body, problems)
    for key, value in body.items():
        if key == "input" or key in HARMLESS:
            continue
        check = EMBEDDING_FIELDS.get(key)
        if check is None:
            name = f"body.{key}" if key.isidentifier() else f"body[{_show(key)}]"
            problems.append(
                f"{name} is not supported for {EMBEDDINGS_URL} (remove it from the request)"
            )
            continue
        ok, what = check
        if not ok(value):
            problems.append(f"body.{key} must be {what}, got {_show(value)}")


def _check_body(url: str | None, body: dict[str, Any], problems: list[str]) -> None:
    """Append what is wrong with a request body for `url` (None: an unsupported url)."""
    if url == EMBEDDINGS_URL:
        _check_embedding(body, problems)
        return
    if url == CHAT_URL:
        _check_messages(body, problems)
        shape = "messages"
    else:
        if url == COMPLETIONS_URL:
            _check_prompt(body, problems)
        shape = "prompt"
    for key, value in body.items():
        if key == shape or key in HARMLESS:
            continue
        check = FIELD_CHECKS.get(key)
        if check is None:
            if url is None and key in ("messages", "input"):
                continue  # an unsupported url: its prompt's shape is unknown
            name = f"body.{key}" if key.isidentifier() else f"body[{_show(key)}]"
            problems.append(f"{name} is not supported by spoold (remove it from the request)")
            continue
        ok, what = check
        if not ok(value):
            problems.append(f"body.{key} must be {what}, got {_show(value)}")


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


def _not_json(raw: bytes, line: int) -> str:
    """Why a line `_load` refused is not JSON, in plain words, with the column (counted
    in characters from the line's start, as an editor shows it)."""
    text = raw.decode("utf-8")
    if line == 1:
        text = text.removeprefix("\ufeff")
    stripped = text.strip()
    try:
        orjson.loads(stripped)
        return "not JSON"  # not reached: _load refused this very text
    except orjson.JSONDecodeError as e:
        pos, msg = e.pos, e.msg
    col = len(text) - len(text.lstrip()) + pos + 1
    found = re.match(r"[A-Za-z_]\w*|.", stripped[pos:])
    at = found.group()[:40] if found else ""
    if pos == 0:
        return f"not JSON: expected a JSON object, starting with '{{', found {stripped[:40]!r}"
    if "end of data" in msg:
        return (
            "not JSON: the line ends before the JSON object is closed "
            "(a '}', ']' or '\"' is missing)"
        )
    if "after document" in msg:
        return (
            f"not JSON: more text after the end of the JSON object, at column {col} "
            "(one request per line, nothing after it)"
        )
    if "trailing comma" in msg:
        return f"not JSON: a comma before a closing bracket at column {col} (JSON allows none)"
    if "control character" in msg:
        return (
            f"not JSON: a raw control character (a tab, a newline…) in a string at column "
            f"{col}; write it escaped (\\t, \\n)"
        )
    if at == "'":
        return f"not JSON: a single quote at column {col}; JSON strings and keys take double quotes"
    if "literal" in msg or "JSON value" in msg:
        return (
            f"not JSON: unexpected {at!r} at column {col}; a JSON value is an object, a list, "
            "a string in double quotes, a number, true, false or null"
        )
    expected = re.search(r"(?:^|, )expected (.+)$", msg)
    if expected:
        return f"not JSON: expected {expected.group(1)} at column {col}, found {at!r}"
    return f"not JSON: {msg} at column {col}"  # orjson's words, without its "line 1"


def _kind(value: Any) -> str:
    """What a JSON value is, in words ('an array', 'a string', …)."""
    if type(value) is list:
        return "an array"
    if type(value) is str:
        return "a string"
    if value is None or type(value) is bool:
        return json.dumps(value)
    return "a number"


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
    """Parse and check one line of an input file: a Request, or a LineError naming every
    problem of the line. None for a blank line.

    Raises UnicodeDecodeError for bytes that are not UTF-8 (the whole file fails).
    """
    try:
        obj = _load(raw, line)
    except orjson.JSONDecodeError:
        return LineError(line, None, "invalid_json", (_not_json(raw, line),))
    if obj is _BLANK:
        return None
    if type(obj) is not dict:
        found = f'expected a JSON object ({{"custom_id": …}}), found {_kind(obj)}'
        return LineError(line, None, "invalid_request", (found,))
    problems: list[str] = []  # every one: a field that is wrong hides no other
    custom_id: Any = obj.get("custom_id")
    if type(custom_id) is not str or not custom_id:
        problems.append(_must(obj, "custom_id", "a non-empty string"))
        custom_id = None
    if obj.get("method") != "POST":
        problems.append(_must(obj, "method", '"POST"'))
    url: Any = obj.get("url")
    if url not in SUPPORTED_URLS:
        problems.append(_must(obj, "url", f"one of {', '.join(SUPPORTED_URLS)}"))
        url = None  # the body's sampling fields are still checked
    body: Any = obj.get("body")
    if type(body) is dict:
        _check_body(url, body, problems)
    else:
        problems.append(_must(obj, "body", "a JSON object"))
    if problems:
        return LineError(line, custom_id, "invalid_request", tuple(problems))
    return Request(line, custom_id, url, body)


def model_mismatch(request: Request, wanted: str, job_model: str) -> LineError:
    """The error of a line whose body.model runs on `wanted`, in a job on `job_model`."""
    return LineError(
        request.line,
        request.custom_id,
        MODEL_MISMATCH,
        (
            f"body.model {request.body.get('model')!r} runs on {wanted!r}, but this job "
            f"runs on {job_model!r} (set by its first request): submit requests for "
            "another model in a separate file",
        ),
    )


def endpoint_mismatch(request: Request, job_runner: str) -> LineError:
    """The error of a line of the other kind of work than its job's (SPEC §6)."""
    kind = "an embeddings" if job_runner == POOLING else "a generation (chat and completions)"
    return LineError(
        request.line,
        request.custom_id,
        ENDPOINT_MISMATCH,
        (
            f"url {request.url} does not run in this job, which is {kind} job (set by "
            "its first request): submit embeddings and generation requests in separate "
            "files",
        ),
    )


def one_model(
    items: Iterable[Request | LineError],
    resolve: Callable[[object], str],
    job_model: str | None = None,
    one_error_a_line: bool = True,
    job_runner: str | None = None,
) -> Iterator[Request | LineError]:
    """`scan_file`'s items with the one-job-one-model rules applied (for the runner and
    `spoold validate` alike): a valid line of the other kind of work than the job's
    (`job_runner`, else the first valid line's: SPEC §6) becomes an endpoint_mismatch
    error; one whose body.model `resolve`s to another model than the job's
    (`job_model`, else the first valid line's) a model_mismatch error. The line's later
    duplicate_custom_id replacement is dropped (one error a line) unless
    `one_error_a_line` is false."""
    fine: set[object] = set()  # body.model values known to run on the job's model
    mismatched: set[int] = set()
    for item in items:
        if isinstance(item, Request):
            runner = runner_of(item.url)
            job_runner = job_runner or runner
            if runner != job_runner:
                mismatched.add(item.line)
                yield endpoint_mismatch(item, job_runner)
                continue
            name = item.body.get("model")
            if name not in fine:
                wanted = resolve(name)
                job_model = job_model or wanted
                if wanted != job_model:
                    mismatched.add(item.line)
                    yield model_mismatch(item, wanted, job_model)
                    continue
                fine.add(name)
        elif one_error_a_line and item.code == DUPLICATE and item.line in mismatched:
            continue
        yield item


def duplicate_error(line: int, custom_id: str, first_line: int) -> LineError:
    return LineError(
        line,
        custom_id,
        DUPLICATE,
        (
            f"custom_id {custom_id!r} is already used on line {first_line} "
            "(a custom_id must be unique in the file)",
        ),
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
    every_duplicate: bool = False,
) -> Iterator[Request | LineError]:
    """Check every line of an input file, streamed: what admission and validation see.

    Yields one item per non-blank line, in order; then, for every valid line whose
    custom_id appeared on an earlier line, a `duplicate_custom_id` LineError that
    *replaces* the Request already yielded for that line (with `every_duplicate`, also
    one for each invalid line that repeats an id: a second error of that line, for
    `spoold validate`; not in line order when ids spilled). Memory stays bounded
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
                    (f"longer than {max_line_bytes} bytes (limits.max_line_bytes)",),
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
        for line, custom_id, first in ids.duplicates(every_duplicate):
            yield duplicate_error(line, custom_id, first)


def first_request(f: BinaryIO, max_line_bytes: int) -> Request | None:
    """The first valid request of a file (it picks the job's model and its kind of
    work), or None. Reads as far as it takes: usually one line."""
    try:
        for line_no, _, raw in iter_lines(f, 0, 1, max_line_bytes):
            parsed = parse_line(raw, line_no) if raw is not None else None
            if isinstance(parsed, Request):
                return parsed
    except UnicodeDecodeError:
        return None
    return None
