"""The job record (state.json), its state machine and the job-directory file names."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import re
import secrets
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, Union

from spoold import fsio

INPUT = "input.jsonl"
STATE = "state.json"
OUTPUT = "output.jsonl"
ERRORS = "errors.jsonl"
OWNER = "owner.json"
CANCEL = "CANCEL"

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = (
    "queued",
    "running",
    "completed",
    "failed",
    "cancelled",
)
ACTIVE = (QUEUED, RUNNING)
TERMINAL = (COMPLETED, FAILED, CANCELLED)
STATUSES = ACTIVE + TERMINAL
_TRANSITIONS = {
    QUEUED: {RUNNING, FAILED, CANCELLED},
    RUNNING: {RUNNING, QUEUED, COMPLETED, FAILED, CANCELLED},
}


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_job_id(source_name: str, now: datetime | None = None) -> str:
    """`<stem>-<yyyymmddThhmmss>-<6 hex>`; the stem is the dropped name, sanitised."""
    stem = source_name[: -len(".jsonl")] if source_name.endswith(".jsonl") else source_name
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")[:80] or "job"
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%S")
    return f"{stem}-{stamp}-{secrets.token_hex(3)}"


@dataclass
class Checkpoint:
    """What has been committed: results files up to these sizes, input up to next_line."""

    validated: bool = False
    next_line: int = 1
    input_offset: int = 0
    done_lines: list[int] = field(default_factory=list)
    output_bytes: int = 0
    errors_bytes: int = 0
    # request_counts as of this checkpoint: a resumed run starts from these.
    completed: int = 0
    failed: int = 0


@dataclass
class Isolation:
    """Requests suspected of killing the engine, being bisected (design §5a)."""

    suspects: list[int] = field(default_factory=list)  # line numbers, ascending
    groups: list[int] = field(default_factory=list)  # sizes partitioning suspects, in order
    strikes: int = 0  # crashes of the first group while it ran alone (a single line)
    trying: bool = False  # the first group is being fed: a crash now is its fault


@dataclass
class RequestCounts:
    total: int = 0
    completed: int = 0
    failed: int = 0


@dataclass
class JobState:
    id: str
    source_name: str
    status: str = QUEUED
    model: str | None = None
    # The vLLM runner the job's kind of work needs ("generate" or "pooling": SPEC §6
    # Endpoints), set with `model` when it first runs.
    runner: str | None = None
    created_at: str = field(default_factory=utcnow)
    started_at: str | None = None
    finished_at: str | None = None
    request_counts: RequestCounts = field(default_factory=RequestCounts)
    error: str | None = None
    attempts: int = 0
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    # Lines validation rejected (they are in errors.jsonl): the run skips them.
    rejected_lines: list[int] = field(default_factory=list)
    file_bytes: int = 0
    requests_in_file: int = 0
    # The input as claimed (design §5c): a change later means an upload still writing.
    input_size: int = -1
    input_mtime_ns: int = 0
    input_ctime_ns: int = 0  # recorded by validation: any later write changes it
    # The input as validation saw it (design §5b): its lines, the blank ones among them.
    input_lines: int = -1
    blank_lines: list[int] = field(default_factory=list)
    # No line above this was handed to the engine since the checkpoint (design §5a).
    fed_through: int = 0
    isolation: Isolation = field(default_factory=Isolation)
    instance: str | None = None
    # The generation of the owner that wrote this record (design §2: owner.json's).
    owner_generation: int = 0
    # The incarnations that may hold the result files open (design §2 step 5): each
    # owner adds itself when it acquires the job; a copy (secure) leaves only the taker.
    writers: list[dict[str, Any]] = field(default_factory=list)
    # How many times `spoold retry` put the job back in the queue (design §6a).
    retries: int = 0
    updated_at: str = field(default_factory=utcnow)

    def transition(self, status: str) -> None:
        """Move to `status`, refusing moves the state machine does not allow."""
        if status not in _TRANSITIONS.get(self.status, set()):
            raise ValueError(f"job {self.id}: cannot go from {self.status} to {status}")
        self.status = status
        if status in TERMINAL:
            self.finished_at = utcnow()

    def requeue(self) -> None:
        """Back in the queue from failed/ (design §6a step 3): it resumes from its
        checkpoint, with fresh attempts and nobody holding its result files."""
        if self.status not in (FAILED, CANCELLED):
            raise ValueError(f"job {self.id}: cannot go from {self.status} to {QUEUED}")
        self.status = QUEUED
        self.error = self.finished_at = None
        self.attempts = 0
        self.writers = []
        self.retries += 1
        if self.checkpoint.completed == 0:
            # No answer came from its model: the model is chosen again from the config
            # (one that could not load may be fixed by now); with answers, it stays.
            self.model = self.runner = None

    @property
    def remaining(self) -> int:
        c = self.request_counts
        return max(0, c.total - c.completed - c.failed)

    def to_dict(self) -> dict[str, Any]:
        """The record as state.json holds it, with the unknown keys it was read with."""
        return _dump_record(self, None)

    @classmethod
    def from_dict(cls, raw: Any) -> JobState:
        """The record from state.json's object. Unknown keys, at any level (a newer
        spoold's), are kept for to_dict; a known key of the wrong type, or a status this
        version does not know, is a RecordError naming the key."""
        state: JobState = _load_record(cls, raw, "")
        if state.status not in STATUSES:
            raise RecordError(f"status: {state.status!r} is not one of {', '.join(STATUSES)}")
        return state


class RecordError(ValueError):
    """A job record that cannot be read: not JSON, not an object, or a known key of the
    wrong type. The message names the key; callers treat it as unparseable JSON."""


@dataclass(frozen=True)
class Unreadable:
    """A job directory whose record cannot be read: it is left where it is, and reported."""

    why: str


def parse_state(data: bytes) -> JobState:
    """A job record from state.json's bytes; RecordError for anything that is not one."""
    try:
        raw = json.loads(data)
    except ValueError as e:  # JSON or UTF-8
        raise RecordError(f"{STATE} is not JSON: {_short(str(e))}") from e
    except RecursionError as e:
        raise RecordError(f"{STATE} is not a job record: nested too deeply") from e
    try:
        return JobState.from_dict(raw)
    except RecordError as e:
        raise RecordError(f"{STATE}: {e}") from e


def load_state(job_dir: Path) -> JobState:
    """A job's record. OSError when state.json cannot be opened; RecordError (a
    ValueError) when its bytes are not a job record."""
    with open(job_dir / STATE, "rb") as f:
        data = f.read()
    return parse_state(data)


def read_job(job_dir: Path) -> JobState | Unreadable | None:
    """A job's record; Unreadable (saying why) when it cannot be read; None when the
    job directory is gone (another daemon moved the job meanwhile)."""
    try:
        return load_state(job_dir)
    except RecordError as e:
        return Unreadable(str(e))
    except FileNotFoundError:
        return Unreadable(f"{STATE} is missing") if os.path.isdir(job_dir) else None
    except OSError as e:
        return Unreadable(f"cannot read {STATE}: {e.strerror or e}")


def unreadable_problem(job_id: str, why: str) -> str:
    """How a job whose record cannot be read is reported (heartbeat, spool-status)."""
    return (
        f"job {job_id} in processing/ cannot be read ({why}); it is left as it is: "
        f"repair its {STATE} or move the job out of processing/"
    )


def save_state(
    job_dir: Path, state: JobState, write: Callable[[Path, bytes], None] | None = None
) -> None:
    """Replace state.json atomically (temp + fsync + rename + fsync dir); `write` is
    the owner's (through its lease directory, design §2 W1)."""
    state.updated_at = utcnow()
    data = (json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n").encode()
    (write or fsio.atomic_write)(job_dir / STATE, data)


# -- reading and writing records, generically over their dataclass fields -----------
#
# Unknown keys a record was read with are kept on the record object (attribute
# _UNKNOWN: unknown key -> value, and field name -> the unknown keys of the sub-record
# in that field). A parent keeps those of the sub-records held directly in its fields,
# so a field given a fresh object (every commit makes a new Checkpoint) still writes
# them back; an element of a list or mapping keeps only its own.

_UNKNOWN = "_unknown_keys"


def unknown_keys(record: object) -> dict[str, Any]:
    """The keys a loaded record held that this version does not know (by field, nested)."""
    return dict(getattr(record, _UNKNOWN, None) or {})


_FIELDS: dict[type[Any], tuple[tuple[str, Any, bool], ...]] = {}


def _init_fields(cls: type[Any]) -> tuple[tuple[str, Any, bool], ...]:
    """(name, type, required) of each field that a record's constructor takes."""
    if cls not in _FIELDS:
        hints = typing.get_type_hints(cls)
        _FIELDS[cls] = tuple(
            (
                f.name,
                hints[f.name],
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(cls)
            if f.init
        )
    return _FIELDS[cls]


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _show(value: Any) -> str:
    return _short(repr(value), 60)


def _load_record(cls: type[Any], raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise RecordError(_at(where, f"expected an object, got {_show(raw)}"))
    values: dict[str, Any] = {}
    unknown: dict[str, Any] = {}
    for name, hint, required in _init_fields(cls):
        key = f"{where}.{name}" if where else name
        if name not in raw:
            if required:
                raise RecordError(f"{key} is missing")
            continue
        values[name] = _load_value(raw[name], hint, key)
        if dataclasses.is_dataclass(values[name]) and unknown_keys(values[name]):
            unknown[name] = unknown_keys(values[name])
    known = {f.name for f in dataclasses.fields(cls)}
    unknown.update((k, v) for k, v in raw.items() if k not in known)
    try:
        record = cls(**values)
    except (TypeError, ValueError) as e:  # a record's own checks (__post_init__)
        raise RecordError(_at(where, str(e))) from e
    if unknown:
        # A slots dataclass has no room for them: only its parent keeps them then.
        with contextlib.suppress(AttributeError):
            object.__setattr__(record, _UNKNOWN, unknown)
    return record


def _load_value(value: Any, hint: Any, where: str) -> Any:
    """`value` (from JSON) as a `hint`; RecordError naming `where` when it is not one."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is object:
        return value
    if origin is Union or origin is types.UnionType:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and _is_container(options[0]):  # its message says where inside
            return _load_value(value, options[0], where)
        for option in options:
            with contextlib.suppress(RecordError):
                return _load_value(value, option, where)
    elif origin is Literal:
        if any(value == a and type(value) is type(a) for a in args):
            return value
    elif origin is list or origin is tuple:
        if isinstance(value, list):
            if origin is list and args[0] in (int, str) and all(type(v) is args[0] for v in value):
                return list(value)  # the common case (line numbers), ten times faster
            tail = origin is list or args[-1:] == (Ellipsis,)
            each = [args[0]] * len(value) if tail else list(args)
            if len(each) == len(value):
                pairs = enumerate(zip(value, each, strict=True))
                items = [_load_value(v, h, f"{where}[{i}]") for i, (v, h) in pairs]
                return items if origin is list else tuple(items)
    elif origin is dict:
        if isinstance(value, dict):
            return {k: _load_value(v, args[1], f"{where}.{k}") for k, v in value.items()}
    elif hint is bool or hint is str:
        if isinstance(value, hint):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(hint):
        return _load_record(hint, value, where)  # type: ignore[arg-type]
    elif isinstance(hint, type) and issubclass(hint, enum.Enum):
        with contextlib.suppress(ValueError):
            return hint(value)
    else:
        raise TypeError(f"{where}: a job record cannot hold a {hint!r}")
    raise RecordError(_at(where, f"expected {_describe(hint)}, got {_show(value)}"))


def _at(where: str, message: str) -> str:
    return f"{where}: {message}" if where else message


def _is_container(hint: Any) -> bool:
    return typing.get_origin(hint) in (list, tuple, dict) or dataclasses.is_dataclass(hint)


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list or origin is tuple:
        return "a list"
    if origin is dict or dataclasses.is_dataclass(hint):
        return "an object"
    names = {bool: "true or false", str: "a string", int: "an integer", float: "a number"}
    return names.get(hint, "null" if hint is type(None) else getattr(hint, "__name__", str(hint)))


_PLAIN = frozenset({int, str, float, bool, type(None)})


def _dump_record(record: Any, inherited: dict[str, Any] | None) -> dict[str, Any]:
    unknown = {**(inherited or {}), **unknown_keys(record)}
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        sub = unknown.get(f.name)
        out[f.name] = _dump_value(getattr(record, f.name), sub if isinstance(sub, dict) else None)
    for key, value in unknown.items():
        out.setdefault(key, value)
    return out


def _dump_value(value: Any, inherited: dict[str, Any] | None) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _dump_record(value, inherited)
    if isinstance(value, list | tuple):
        if all(type(v) in _PLAIN for v in value):
            return list(value)
        return [_dump_value(v, None) for v in value]
    if isinstance(value, dict):
        return {k: _dump_value(v, None) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _check_loadable(hint: Any, where: str, seen: set[type[Any]]) -> None:
    """Refuse, at import, a record field whose type JSON cannot carry back."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is dict and args and args[0] is not str:
        raise TypeError(f"{where}: a job record's mappings have string keys, not {args[0]!r}")
    if origin in (Union, types.UnionType, list, tuple, dict):
        for arg in args:
            if arg is not Ellipsis:
                _check_loadable(arg, where, seen)
    elif dataclasses.is_dataclass(hint) and isinstance(hint, type):
        if hint not in seen:
            seen.add(hint)
            for name, field_hint, _ in _init_fields(hint):
                _check_loadable(field_hint, f"{where}.{name}", seen)
    elif not (
        hint in (Any, object, bool, str, int, float, type(None))
        or origin is Literal
        or (isinstance(hint, type) and issubclass(hint, enum.Enum))
    ):
        raise TypeError(f"{where}: a job record cannot hold a {hint!r}")


_check_loadable(JobState, "JobState", set())
