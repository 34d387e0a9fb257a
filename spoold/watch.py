"""Hints that incoming/ changed: watchdog events (inotify, or polling on network shares).

Events are only hints: the handler sets a flag and the daemon's loop rescans
incoming/ (the truth), also every `watch.rescan_interval_s` without any event.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self._event.set()


class Watcher:
    """Sets `wake` whenever something happens in the watched directories."""

    def __init__(
        self,
        paths: list[Path],
        wake: threading.Event,
        polling: bool,
        poll_interval_s: float = 1.0,
    ) -> None:
        self._observer: BaseObserver = (
            PollingObserver(timeout=poll_interval_s) if polling else Observer()
        )
        handler = _Wake(wake)
        for path in paths:
            self._observer.schedule(handler, str(path), recursive=False)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        # watchdog 7 logs an error for an inotify event read while its thread stops
        # ("queue_events() called when the thread is inactive"): a race in its shutdown,
        # harmless, and nothing we watch matters any more once we stop.
        logging.getLogger("watchdog.observers.inotify").setLevel(logging.CRITICAL)
        self._observer.stop()
        self._observer.join(timeout=5)
