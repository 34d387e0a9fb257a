"""heartbeats/<instance>.json: written by the daemon, read by peers and spool-status.

Imports nothing heavy: spool-status uses the readers here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spoold import __version__, fsio
from spoold.job import utcnow

STATUSES = ("starting", "idle", "loading_model", "processing", "throttled", "stopping")


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
    while a long chunk runs. `last_progress_at` says when work last moved.
    """

    def __init__(self, path: Path, interval_s: float, limits: dict[str, Any]) -> None:
        self.path = path
        self.interval_s = interval_s
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
        }
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Fresh fields at every beat (GPU readings), read in the heartbeat's thread.
        self.sampler: Callable[[], dict[str, Any]] | None = None
        # Called with each snapshot once written (the metrics text file).
        self.on_beat: Callable[[dict[str, Any]], None] | None = None

    def set(self, **fields: Any) -> None:
        with self._lock:
            self._fields.update(fields)

    def progress(self, current_job: dict[str, Any] | None) -> None:
        self.set(current_job=current_job, last_progress_at=utcnow())

    def write(self) -> None:
        if self.sampler is not None:
            self.set(**self.sampler())
        with self._lock:
            self._fields["updated_at"] = utcnow()
            snapshot = dict(self._fields)
        fsio.atomic_write_json(self.path, snapshot)
        if self.on_beat is not None:
            self.on_beat(snapshot)

    def start(self) -> None:
        with contextlib.suppress(OSError):  # a full disk: the thread's next beat retries
            self.write()
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            # A full disk must not kill the daemon; the next beat retries.
            with contextlib.suppress(OSError):
                self.write()

    def stop(self, final_status: str = "stopping") -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.set(status=final_status, current_job=None)
        self.write()
