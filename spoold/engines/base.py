"""The engine interface: requests in (pulled lazily), outcomes out (as they finish)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from spoold.validate import GENERATE, Request


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
class Embedding:
    """An embeddings request the engine answered: one vector per input, in order, each
    as the request's encoding_format asks (a list of floats, or the base64 of its
    float32 bytes, little-endian, as `vllm serve` sends it)."""

    request: Request
    model: str
    data: list[Any]
    prompt_tokens: int


@dataclass(slots=True)
class Failure:
    """A request the engine could not answer; becomes an errors.jsonl line."""

    request: Request
    code: str
    message: str
    status: int = 400


Outcome = Completion | Embedding | Failure


class _Idle:
    """What a feed yields when it has nothing to hand out yet but more may come."""

    def __repr__(self) -> str:
        return "IDLE"


# A feed (the `requests` of Engine.run) may yield IDLE: the engine steps what it holds
# and asks again. A feed must block instead of yielding IDLE while the engine holds
# nothing (it would spin). The ray backend's replicas are fed so (design §10).
IDLE: Any = _Idle()


class EngineDied(Exception):
    """The engine died in-process (vLLM's engine core exited) with requests in flight:
    it must be reloaded, and the requests it held are suspects (design §5a)."""


class EngineFatal(Exception):
    """The engine is gone and cannot be loaded again: the daemon exits (exit 1)."""


class ModelLoadError(Exception):
    """A model could not be loaded (unknown name, no network, out of memory)."""


class ClusterUnavailable(Exception):
    """The engine's cluster cannot be reached (the ray backend: Ray could not start or
    connect, or the connection was lost). Not the model's fault and not the job's: the
    job waits, its attempt given back, and the daemon tries again later (design §10)."""


class Engine(ABC):
    model: str
    backend = "engine"  # engine.backend's name for it
    # The vLLM runner the model is loaded with: "generate" (chat and completions
    # requests) or "pooling" (embeddings), as a job's first request needs (SPEC §6).
    runner: str = GENERATE
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

    def revive(self) -> bool:
        """After `run` raised EngineDied: make the engine usable again in place (the
        ray backend replaces its dead replica). False: it cannot, build a new one."""
        return False

    def usable(self) -> bool:
        """Whether the engine can still run (the ray backend: its driver is there)."""
        return True

    def kill_now(self) -> None:  # noqa: B027 - optional hook
        """The stop timer's last resort, just before the process exits: kill what the
        engine started outside this process (the ray backend's driver and Ray)."""

    def describe(self) -> dict[str, Any]:
        """The heartbeat's `engine` section (read from the heartbeat's thread)."""
        return {"backend": type(self).backend, "model": self.model, "runner": self.runner}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the engine's resources."""
