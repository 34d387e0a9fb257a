"""heartbeats/<instance>.json: written by the daemon, read by peers and spool-status.

Imports nothing heavy: spool-status uses the readers here.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spoold import __version__, fsio
from spoold.fsio import Fenced
from spoold.job import utcnow

STATUSES = (
    "starting",
    "idle",
    "loading_model",
    "processing",
    "throttled",
    "stopping",  # still alive: finishing (or abandoning) its chunk
    "stopped",  # the last beat of a daemon that exited cleanly; `reason` says why
)
STOP_JOIN_S = 2.0  # how long stop() waits for a beat in flight (a hung filesystem)
# A change of status is written at once, not at the next beat (`spool-status` right
# after a job must not say `starting`), but beats come at most this often for it.
STATUS_BEAT_GAP_S = 0.5


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch for an ISO 8601 UTC string, or None."""
    if not isinstance(value, str):
        return None
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def read_heartbeat(path: Path) -> dict[str, Any] | None:
    try:
        data = fsio.read_json(path)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def beat_age(beat: dict[str, Any], now: float) -> float | None:
    """Seconds since a heartbeat record was written; None if it says no time."""
    updated = parse_time(beat.get("updated_at"))
    return None if updated is None else max(0.0, now - updated)


def heartbeat_age(path: Path, now: float | None = None) -> float | None:
    """Seconds since the heartbeat at `path` was written; None if there is none."""
    beat = read_heartbeat(path)
    return None if beat is None else beat_age(beat, time.time() if now is None else now)


class Heartbeat:
    """Rewrites the heartbeat file every `interval_s` from its own thread.

    The daemon's loop only updates fields (`set`); the thread keeps the file fresh
    while a long chunk runs. `last_progress_at` says when work last moved; `seq` grows
    by one at every write, so peers see a beat change on their own clock.
    """

    def __init__(
        self,
        path: Path,
        interval_s: float,
        limits: dict[str, Any],
        write: Callable[[bytes], None] | None = None,
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        # How a beat lands: the daemon's lease (spoold.lease.Lease.beat, through its
        # lease directory, design §2); by default a plain atomic write.
        self.writer: Callable[[bytes], None] = write or (
            lambda data: fsio.atomic_write(self.path, data)
        )
        # Called (from the heartbeat's thread) when a beat finds the lease fenced, and
        # when a beat cannot be written (the daemon says so, once in a while).
        self.on_fenced: Callable[[], None] | None = None
        self.on_error: Callable[[OSError], None] | None = None
        now = utcnow()
        self._fields: dict[str, Any] = {
            "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "instance": path.stem,
            "version": __version__,
            "status": "starting",
            "reason": None,
            "started_at": now,
            "updated_at": now,
            "last_progress_at": now,
            "current_job": None,
            "gpu": None,
            "limits": limits,
            "problems": [],
            "seq": 0,
        }
        self._lock = threading.Lock()  # the fields
        # One write at a time, so the file's seq only grows, and the last beat is last.
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Fresh fields at every beat (GPU readings), read in the heartbeat's thread.
        self.sampler: Callable[[], dict[str, Any]] | None = None
        # Called with each snapshot once written (the metrics text file).
        self.on_beat: Callable[[dict[str, Any]], None] | None = None

    def set(self, **fields: Any) -> None:
        with self._lock:
            changed = "status" in fields and fields["status"] != self._fields["status"]
            self._fields.update(fields)
        if changed:
            self._wake.set()

    def progress(self, current_job: dict[str, Any] | None) -> None:
        self.set(current_job=current_job, last_progress_at=utcnow())

    def write(self) -> None:
        with self._write_lock:
            self._write({})

    def record(self, **final: Any) -> tuple[bytes, dict[str, Any]]:
        """The next beat's bytes (its seq counted) and its fields; `final` is set in
        the same step as the snapshot is taken, so no set() from another thread lands
        in between."""
        sampled = self.sampler() if self.sampler is not None else {}
        with self._lock:
            self._fields.update(sampled, **final)
            self._fields["seq"] += 1
            self._fields["updated_at"] = utcnow()
            snapshot = dict(self._fields)
        return (json.dumps(snapshot, indent=2, sort_keys=True) + "\n").encode(), snapshot

    def _write(self, final: dict[str, Any]) -> None:
        data, snapshot = self.record(**final)
        self.writer(data)
        if self.on_beat is not None:
            self.on_beat(snapshot)

    def start(self) -> None:
        try:
            self.write()
        except OSError:
            pass  # a full disk: the thread's next beat retries
        except Fenced:
            if self.on_fenced is not None:
                self.on_fenced()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # Beats are due interval_s after the last one *began*: a slow write does not
        # stretch the gap between the moments that keep the lease fresh (design §2).
        began = time.monotonic()
        while not self._stop.is_set():
            if self._wake.wait(max(0.0, began + self.interval_s - time.monotonic())):
                # A new status: written now, unless a beat began less than the gap ago.
                gap = min(STATUS_BEAT_GAP_S, self.interval_s)
                if self._stop.wait(max(0.0, began + gap - time.monotonic())):
                    break
                self._wake.clear()
            if self._stop.is_set():
                break
            began = time.monotonic()
            # A full disk must not kill the daemon; the next beat retries.
            try:
                self.write()
            except OSError as e:
                if self.on_error is not None:
                    self.on_error(e)
            except Fenced:
                # Another daemon took our work over (design §2): the daemon starts a
                # new incarnation and gives us its lease; until then beats fail.
                if self.on_fenced is not None:
                    self.on_fenced()

    def stop(
        self,
        final_status: str = "stopped",
        reason: str | None = None,
        timeout_s: float = STOP_JOIN_S,
    ) -> None:
        """End the thread and write a last beat (`final_status`, and `reason` if given).

        Waits at most `timeout_s` for a beat in flight: one stuck in a hung filesystem
        write would hold the last beat too, so then there is none (OSError as for a
        failed write) rather than a stop that never ends."""
        deadline = time.monotonic() + timeout_s
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        final: dict[str, Any] = {"status": final_status, "current_job": None}
        if reason is not None:
            final["reason"] = reason
        if not self._write_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"{self.path}: a heartbeat write is stuck; no last beat")
        try:
            self._write(final)
        finally:
            self._write_lock.release()
