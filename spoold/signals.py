"""SIGTERM and SIGINT as ordinary events: a callback called from a thread of its own.

A Python signal handler runs in the main thread between two bytecodes of whatever
that thread was doing, locks held included (the heartbeat's, an Event's): a handler
that takes one of them waits forever on its own thread. So the handlers installed
here do nothing at all. Python's C-level handler writes the signal's number into a
pipe (`signal.set_wakeup_fd`); a watcher thread blocked on that pipe calls back, from
outside any signal context, where taking a lock is ordinary.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterable
from types import FrameType
from typing import Any

import structlog

log = structlog.get_logger("spoold.signals")

# Installed in this order: once SIGTERM is caught, SIGINT is too.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CLOSE = 0  # no signal has number 0: the byte close() writes to end the thread


def _do_nothing(_signum: int, _frame: FrameType | None) -> None:
    """The Python-level handler: the watcher thread acts on the pipe's byte instead."""


class SignalWatcher:
    """Calls `on_signal(signum)` from its thread for each of `signals` received.

    start() and close() belong to the main thread (Python's rule for signal handlers).
    One at a time per process: there is one wakeup fd.
    """

    def __init__(
        self,
        on_signal: Callable[[signal.Signals], None],
        signals: Iterable[signal.Signals] = STOP_SIGNALS,
    ) -> None:
        self.on_signal = on_signal
        self.signals = tuple(signals)
        self._read_fd = self._write_fd = -1
        self._previous_fd = -1
        self._previous: dict[signal.Signals, Any] = {}
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Route the signals to the callback; until close(), they do nothing else."""
        global _active
        if self._thread is not None:
            return
        self._read_fd, self._write_fd = os.pipe()
        # The C handler must never block, whatever this process is doing; a full pipe
        # loses only repeats of a request already made.
        os.set_blocking(self._write_fd, False)
        try:  # first: it refuses outside the main thread
            self._previous_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        except ValueError:
            self._close_fds()
            raise
        _active = self
        self._thread = threading.Thread(target=self._watch, name="signals", daemon=True)
        self._thread.start()
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, _do_nothing)

    def close(self, restore_handlers: bool = True) -> None:
        """Stop the thread and give the wakeup fd back. restore_handlers=False leaves
        the signals doing nothing: for a process on its way out, which a late SIGTERM
        must not kill (it exits 0, not by a signal)."""
        if self._thread is None:
            return
        self._release(restore_handlers)
        # No signal writes here any more: a blocking write waits for the reader.
        os.set_blocking(self._write_fd, True)
        os.write(self._write_fd, bytes([_CLOSE]))
        self._thread.join()
        self._thread = None
        self._close_fds()

    def _release(self, restore_handlers: bool) -> None:
        global _active
        if restore_handlers:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
        self._previous = {}
        signal.set_wakeup_fd(self._previous_fd)
        if _active is self:
            _active = None

    def _close_fds(self) -> None:
        for fd in (self._write_fd, self._read_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._read_fd = self._write_fd = -1

    def _forget_in_child(self) -> None:
        """In a forked child (multiprocessing's fork, as vLLM may start its engine
        core): the inherited wakeup fd would carry the child's own signals into the
        parent's pipe, where they would look like the parent's."""
        with contextlib.suppress(ValueError, OSError):
            self._release(restore_handlers=True)
        self._thread = None  # not in this process
        self._close_fds()

    def _watch(self) -> None:
        wanted = {int(s): s for s in self.signals}
        while data := os.read(self._read_fd, 512):
            for number in data:
                if number == _CLOSE:
                    return
                signum = wanted.get(number)  # others (SIGALRM, SIGCHLD…) are not ours
                if signum is None:
                    continue
                try:
                    self.on_signal(signum)
                except Exception:  # the next signal must still be heard
                    log.exception("signal callback failed", signal=signum.name)


_active: SignalWatcher | None = None


def _after_fork_in_child() -> None:
    if _active is not None:
        _active._forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
