"""The job record (state.json), its state machine and the job-directory file names."""

from __future__ import annotations

import dataclasses
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

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
    # No line above this was handed to the engine since the checkpoint (design §5a).
    fed_through: int = 0
    isolation: Isolation = field(default_factory=Isolation)
    instance: str | None = None
    updated_at: str = field(default_factory=utcnow)

    def transition(self, status: str) -> None:
        """Move to `status`, refusing moves the state machine does not allow."""
        if status not in _TRANSITIONS.get(self.status, set()):
            raise ValueError(f"job {self.id}: cannot go from {self.status} to {status}")
        self.status = status
        if status in TERMINAL:
            self.finished_at = utcnow()

    @property
    def remaining(self) -> int:
        c = self.request_counts
        return max(0, c.total - c.completed - c.failed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> JobState:
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}
        values["request_counts"] = RequestCounts(**raw.get("request_counts", {}))
        values["checkpoint"] = Checkpoint(**raw.get("checkpoint", {}))
        values["isolation"] = Isolation(**raw.get("isolation", {}))
        return cls(**values)


def load_state(job_dir: Path) -> JobState:
    return JobState.from_dict(fsio.read_json(job_dir / STATE))


def save_state(job_dir: Path, state: JobState) -> None:
    """Replace state.json atomically (temp + fsync + rename + fsync dir)."""
    state.updated_at = utcnow()
    fsio.atomic_write_json(job_dir / STATE, state.to_dict())
