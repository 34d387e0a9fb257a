"""The engine interface: requests in (pulled lazily), outcomes out (as they finish)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from spoold.validate import Request


@dataclass(slots=True)
class Choice:
    text: str
    finish_reason: str
    logprobs: Any = None


@dataclass(slots=True)
class Completion:
    """A request the engine answered."""

    request: Request
    model: str
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Failure:
    """A request the engine could not answer; becomes an errors.jsonl line."""

    request: Request
    code: str
    message: str
    status: int = 400


Outcome = Completion | Failure


class EngineDied(Exception):
    """The engine died in-process (vLLM's engine core exited) with requests in flight:
    it must be reloaded, and the requests it held are suspects (design §5a)."""


class EngineFatal(Exception):
    """The engine is gone and cannot be loaded again: the daemon exits (exit 1)."""


class ModelLoadError(Exception):
    """A model could not be loaded (unknown name, no network, out of memory)."""


class Engine(ABC):
    model: str
    # Called after every engine step (the loop that makes progress): the daemon
    # pings systemd's watchdog from here, so a hung engine is noticed.
    on_step: Callable[[], None] | None = None

    @abstractmethod
    def run(self, requests: Iterator[Request]) -> Iterator[Outcome]:
        """Answer `requests`, yielding one outcome per request as each finishes.

        The engine pulls from `requests` only as it has room, so a caller can stop
        feeding at any time and still receive every outcome of what was pulled.
        Raising EngineDied means the engine is dead (reload it); any other exception
        means every pulled request still without an outcome failed together, the
        engine still alive: the caller isolates the culprit by bisection.
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""
