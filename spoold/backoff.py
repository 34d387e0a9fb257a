"""When to try again: models that failed to load, jobs whose run hit an I/O error.

Pure bookkeeping over an injected clock (design §8); the daemon acts on it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass
class Failing:
    attempts: int  # failures in a row
    error: str  # the last one
    retry_at: float  # on the daemon's monotonic clock


class Backoff:
    """Failures per key and when each key may be tried again: `base_s` after the first
    failure, doubling with each one after it, never more than `cap_s`."""

    def __init__(
        self, base_s: float, cap_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.clock = clock
        self._failing: dict[str, Failing] = {}

    def failed(self, key: str, error: str) -> Failing:
        before = self._failing.get(key)
        attempts = before.attempts + 1 if before else 1
        delay = min(self.base_s * 2 ** (attempts - 1), self.cap_s)
        failing = Failing(attempts, error, self.clock() + delay)
        self._failing[key] = failing
        return failing

    def succeeded(self, key: str) -> bool:
        """Forget `key`'s failures; True if it had any."""
        return self._failing.pop(key, None) is not None

    def get(self, key: str) -> Failing | None:
        return self._failing.get(key)

    def waiting(self, key: str) -> bool:
        """Whether `key` failed and its next try is not due yet."""
        failing = self._failing.get(key)
        return failing is not None and failing.retry_at > self.clock()

    def next_due(self) -> float | None:
        """When the earliest waiting key may be tried again (monotonic), or None."""
        return min((f.retry_at for f in self._failing.values()), default=None)

    def __iter__(self) -> Iterator[tuple[str, Failing]]:
        return iter(list(self._failing.items()))

    def __len__(self) -> int:
        return len(self._failing)
