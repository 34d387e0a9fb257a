"""systemd's notify protocol, written directly to $NOTIFY_SOCKET (no dependency).

READY=1, STATUS=…, WATCHDOG=1 and STOPPING=1 as datagrams; a no-op outside systemd.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._address: str | bytes | None = None
        if address:
            # '@name' is Linux's abstract namespace: a leading NUL byte.
            self._address = "\0" + address[1:] if address.startswith("@") else address
        usec = os.environ.get("WATCHDOG_USEC")
        self.watchdog_interval_s = int(usec) / 2e6 if usec and usec.isdigit() else None
        self._last_ping = 0.0
        self._last_status = ""

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, message: str) -> None:
        if self._address is None:
            return
        # systemd gone or the socket unreadable: never a reason to stop working.
        with (
            contextlib.suppress(OSError),
            socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s,
        ):
            s.sendto(message.encode(), self._address)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            self.send(f"STATUS={status}")

    def watchdog(self) -> None:
        """Ping the watchdog; called from the loop that makes progress, rate-limited."""
        now = time.monotonic()
        interval = self.watchdog_interval_s if self.watchdog_interval_s is not None else 1.0
        if now - self._last_ping >= min(interval, 1.0):
            self._last_ping = now
            self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1\nSTATUS=stopping")
