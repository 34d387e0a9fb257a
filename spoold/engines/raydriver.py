"""The ray backend's driver process and its replicas (design §10).

Run (`main`, FD as its argument) by `spoold.engines.rayengine.RayEngine`:
FD is its end of a socket pair carrying pickled messages. This process calls
`ray.init`, starts the replicas (`Replica` actors, each holding spoold's own
`VllmEngine`), hands them the daemon's requests and sends their outcomes back. The
daemon never imports Ray: a lost cluster ends this process (Ray itself terminates a
driver that lost its GCS), not the daemon.

Messages, daemon → driver: ("start", settings), ("reqs", [(key, Request)…]),
("shutdown",). Driver → daemon: ("ready", replicas), ("load_failed", why),
("out", replica_id, its completed count, [(key, payload)…]), ("died", replica_id, keys,
why), ("failed", replica_id, keys, why), ("replicas", replicas), ("lost", why).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from spoold import __version__
from spoold.config import EngineConfig
from spoold.engines.base import IDLE, Completion, Embedding, EngineDied, Outcome
from spoold.validate import Request

TAKE_WAIT_S = 0.2  # a replica's take() waits this long for an outcome
STEPS_EVERY_S = 1.0  # at most this often, the daemon hears that replicas step on
KEEP_DEAD = 4  # replicas that died, still listed (alive: false)
UNAVAILABLE_GRACE_S = 10.0  # a replica unreachable this long (its GCS up) is dead
# Environment a replica on another node needs from the daemon's (vLLM and hub settings).
PASSED_ENV = ("VLLM_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "SPOOLD_")


def payload_of(outcome: Outcome) -> tuple[Any, ...]:
    """An outcome without its request (the daemon holds that): what travels back."""
    if isinstance(outcome, Completion):
        return (
            "c",
            outcome.model,
            outcome.choices,
            outcome.prompt_tokens,
            outcome.completion_tokens,
            outcome.extra,
        )
    if isinstance(outcome, Embedding):
        return ("e", outcome.model, outcome.data, outcome.prompt_tokens)
    return ("f", outcome.code, outcome.message, outcome.status)


class Replica:
    """One engine replica, a Ray actor (threaded: `put`/`take` run beside the engine's
    thread). The engine runs over the inbox without running dry (base.IDLE)."""

    def __init__(self, engine_cfg: EngineConfig, model: str, version: str, runner: str) -> None:
        if version != __version__:
            raise RuntimeError(
                f"spoold {__version__} is installed on this node, the daemon runs spoold "
                f"{version}: install the same version on every node of the cluster"
            )
        from spoold.engines.vllm import VllmEngine

        self.engine = VllmEngine(engine_cfg, model, runner)
        self.cond = threading.Condition()
        self.inbox: collections.deque[tuple[int, Request]] = collections.deque()
        self.outbox: list[tuple[int, tuple[Any, ...]]] = []
        self.failures: list[tuple[list[int], str]] = []  # batches the engine raised for
        self.fatal: str | None = None  # the engine died: this replica is done
        self.held: dict[int, tuple[int, Request]] = {}  # id(request) → (key, request)
        self.steps = 0  # engine steps: progress even before a request finishes
        self.engine.on_step = self._stepped
        threading.Thread(target=self._loop, name="engine", daemon=True).start()

    def info(self) -> dict[str, Any]:
        import ray

        return {"node": ray.util.get_node_ip_address(), "window": self.engine.window}

    def _stepped(self) -> None:
        self.steps += 1

    def put(self, batch: list[tuple[int, Request]]) -> None:
        with self.cond:
            self.inbox.extend(batch)
            self.cond.notify_all()

    def take(
        self, wait_s: float
    ) -> tuple[list[tuple[int, tuple[Any, ...]]], list[tuple[list[int], str]], str | None, int]:
        """What finished since the last take (waits up to `wait_s` for something), and
        the engine's step count."""
        with self.cond:
            self.cond.wait_for(
                lambda: self.outbox or self.failures or self.fatal is not None, wait_s
            )
            out, self.outbox = self.outbox, []
            failures, self.failures = self.failures, []
            return out, failures, self.fatal, self.steps

    def _feed(self) -> Any:
        while True:
            with self.cond:
                if not self.inbox and self.held:
                    item = IDLE  # step what the engine holds, then look again
                else:
                    self.cond.wait_for(lambda: bool(self.inbox))
                    item = self.inbox.popleft()
            if item is IDLE:
                yield IDLE
                continue
            _, request = item
            self.held[id(request)] = item
            yield request

    def _loop(self) -> None:
        while True:
            try:
                for outcome in self.engine.run(self._feed()):
                    key, _ = self.held.pop(id(outcome.request))
                    with self.cond:
                        self.outbox.append((key, payload_of(outcome)))
                        self.cond.notify_all()
            except EngineDied as e:
                with self.cond:
                    self.fatal = f"the engine died: {e}"
                    self.cond.notify_all()
                return
            except Exception as e:  # the engine raised for what it held, and lives
                keys = [key for key, _ in self.held.values()]
                self.held.clear()
                with self.cond:
                    self.failures.append((keys, f"{type(e).__name__}: {e}"))
                    self.cond.notify_all()


@dataclass
class _Rep:
    """The driver's view of one replica."""

    id: int
    actor: Any
    ready: Any = None  # the info() call while it starts
    node: str = ""
    window: int = 0
    alive: bool = False
    completed: int = 0
    held: set[int] = field(default_factory=set)
    take: Any = None
    steps: int = 0
    unavailable_since: float | None = None


class Driver:
    def __init__(self, conn: Connection, settings: dict[str, Any]) -> None:
        self.conn = conn
        self.settings = settings
        self.engine_cfg: EngineConfig = settings["engine"]
        self.model: str = settings["model"]
        self.runner: str = settings["runner"]
        self.reps: dict[int, _Rep] = {}
        self.next_id = 0
        self.queue: collections.deque[tuple[int, Request]] = collections.deque()
        self.gcs: tuple[str, int] | None = None
        self.actor_class: Any = None
        self.wanted: dict[str, float] = {}  # one replica's resources, fixed at start
        self.stepped_at = 0.0  # when the daemon last heard that replicas step on
        self.stepped = False

    # -- start --------------------------------------------------------------------

    def connect(self) -> None:
        import ray

        address = self.settings["address"]
        env = {k: v for k, v in os.environ.items() if k.startswith(PASSED_ENV)}
        ray.init(
            # "local": always a Ray of our own. None would join the cluster named by
            # $RAY_ADDRESS or /tmp/ray/ray_current_cluster (a `ray start` of someone
            # else, or a dead one it then waits for).
            address=address or "local",
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": env} if env else None,
        )
        with contextlib.suppress(Exception):  # not with ray:// (Ray Client)
            host, _, port = ray.get_runtime_context().gcs_address.rpartition(":")
            self.gcs = (host, int(port))

    def resources(self, total: dict[str, float]) -> dict[str, float]:
        """One replica's resources: engine.ray.resources_per_replica, else a GPU per
        tensor_parallel_size where the cluster (its `total` resources) has GPUs, else a
        CPU."""
        wanted = self.settings["resources"]
        if wanted is not None:
            return dict(wanted)
        gpus = total.get("GPU", 0)
        return {"GPU": float(self.engine_cfg.tensor_parallel_size)} if gpus else {"CPU": 1.0}

    def replica_count(self, resources: dict[str, float], total: dict[str, float]) -> int:
        if self.settings["replicas"] is not None:
            return int(self.settings["replicas"])
        gpus = total.get("GPU", 0)
        per = resources.get("GPU") or 1
        return max(1, int(gpus // per))

    def start_replica(self) -> _Rep:
        import ray

        res = self.wanted
        options: dict[str, Any] = {
            "num_cpus": res.get("CPU", 0),
            "num_gpus": res.get("GPU", 0),
            "max_concurrency": 4,
            "max_restarts": 0,
        }
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU")}
        if custom:
            options["resources"] = custom
        if self.actor_class is None:
            self.actor_class = ray.remote(Replica)
        actor = self.actor_class.options(**options).remote(
            self.engine_cfg, self.model, __version__, self.runner
        )
        rep = _Rep(self.next_id, actor)
        self.next_id += 1
        rep.ready = actor.info.remote()
        self.reps[rep.id] = rep
        return rep

    def start(self) -> None:
        import ray

        total = ray.cluster_resources()
        self.wanted = self.resources(total)
        count = self.replica_count(self.wanted, total)
        fit = min(
            (int(total.get(k, 0) // v) for k, v in self.wanted.items() if v > 0), default=count
        )
        if fit == 0:
            have = ", ".join(f"{k}: {v:g}" for k, v in sorted(total.items()) if "node:" not in k)
            why = (
                f"engine.ray.resources_per_replica {self.wanted} is more than the whole "
                f"cluster has ({have}): no replica can be placed"
            )
            self.send(("load_failed", why))
            raise SystemExit(0)
        if fit < count:
            room = f"room for {fit} of engine.ray.replicas = {count} replicas of {self.wanted}"
            print(f"spoold ray driver: the cluster has {room}; starting {fit}", file=sys.stderr)
            count = fit
        for _ in range(count):
            self.start_replica()
        errors = []
        for rep in list(self.reps.values()):
            try:
                self._ready(rep, ray.get(rep.ready))
            except Exception as e:
                errors.append(_reason(e))
                self._drop(rep)
        if not any(r.alive for r in self.reps.values()):
            self.send(("load_failed", errors[0] if errors else "no replica started"))
            raise SystemExit(0)
        for why in errors:
            print(f"spoold ray driver: a replica did not start: {why}", file=sys.stderr)
        self.send(("ready", self.describe()))

    def _ready(self, rep: _Rep, info: dict[str, Any]) -> None:
        rep.ready = None
        rep.node, rep.window = info["node"], info["window"]
        rep.alive = True
        rep.take = rep.actor.take.remote(TAKE_WAIT_S)

    def _drop(self, rep: _Rep) -> None:
        import ray

        rep.alive = False
        rep.ready = rep.take = None
        with contextlib.suppress(Exception):
            ray.kill(rep.actor, no_restart=True)

    def describe(self) -> list[dict[str, Any]]:
        dead = [r.id for r in self.reps.values() if not r.alive and r.ready is None]
        for gone in dead[:-KEEP_DEAD]:  # the heartbeat lists the last few that died
            del self.reps[gone]
        return [
            {
                "id": r.id,
                "node": r.node,
                "alive": r.alive,
                "completed": r.completed,
                "window": r.window if r.alive else 0,
                "starting": r.ready is not None,
            }
            for r in self.reps.values()
        ]

    def send(self, msg: tuple[Any, ...]) -> None:
        self.conn.send(msg)

    # -- the loop -----------------------------------------------------------------

    def serve(self) -> None:
        import ray

        while True:
            busy = any(r.held for r in self.reps.values()) or bool(self.queue)
            starting = [r for r in self.reps.values() if r.ready is not None]
            timeout = 0.0 if busy or starting else 0.5
            while self.conn.poll(timeout):
                timeout = 0.0
                msg = self.conn.recv()
                if msg[0] == "reqs":
                    self.queue.extend(msg[1])
                elif msg[0] == "shutdown":
                    return
            self.dispatch()
            if self.stepped and time.monotonic() - self.stepped_at >= STEPS_EVERY_S:
                self.stepped, self.stepped_at = False, time.monotonic()
                self.send(("steps",))
            refs = {r.take: r for r in self.reps.values() if r.take is not None}
            refs.update({r.ready: r for r in self.reps.values() if r.ready is not None})
            if not refs:
                # No replica alive or starting: what waits here will not be answered.
                if self.queue:
                    keys = [key for key, _ in self.queue]
                    self.queue.clear()
                    self.send(("died", -1, keys, "no ray replica is alive or starting"))
                self.conn.poll(0.5)
                continue
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=0.02 if busy else 0.1)
            for ref in ready:
                rep = refs[ref]
                if ref is rep.ready:
                    self._started(rep, ref)
                else:
                    self._took(rep, ref)

    def dispatch(self) -> None:
        """Hand the queue to the live replicas, each request to the one with the most
        room left in its window (the daemon keeps the total within the windows)."""
        live = [r for r in self.reps.values() if r.alive]
        if not live or not self.queue:
            return
        batches: dict[int, list[tuple[int, Request]]] = {r.id: [] for r in live}
        while self.queue:
            rep = min(live, key=lambda r: len(r.held) - r.window)
            key, request = self.queue.popleft()
            rep.held.add(key)
            batches[rep.id].append((key, request))
        for rep in live:
            if batches[rep.id]:
                rep.actor.put.remote(batches[rep.id])

    def _started(self, rep: _Rep, ref: Any) -> None:
        import ray

        try:
            self._ready(rep, ray.get(ref))
        except Exception as e:
            print(f"spoold ray driver: a replacement replica did not start: {_reason(e)}",
                  file=sys.stderr)  # fmt: skip
            self._drop(rep)
            del self.reps[rep.id]
        self.send(("replicas", self.describe()))

    def _took(self, rep: _Rep, ref: Any) -> None:
        import ray
        from ray.exceptions import ActorUnavailableError

        try:
            out, failures, fatal, steps = ray.get(ref)
        except ActorUnavailableError as e:
            now = time.monotonic()
            rep.unavailable_since = rep.unavailable_since or now
            self._check_cluster(e)
            if now - rep.unavailable_since < UNAVAILABLE_GRACE_S:
                rep.take = rep.actor.take.remote(TAKE_WAIT_S)
                return
            self._died(rep, f"unreachable for {UNAVAILABLE_GRACE_S:g} s: {_reason(e)}")
            return
        except Exception as e:  # RayActorError: its process or its node is gone
            self._check_cluster(e)
            self._died(rep, _reason(e))
            return
        rep.unavailable_since = None
        if steps != rep.steps:
            rep.steps, self.stepped = steps, True
        if out:
            for key, _ in out:
                rep.held.discard(key)
            rep.completed += len(out)
            self.send(("out", rep.id, rep.completed, out))
        for keys, why in failures:
            rep.held.difference_update(keys)
            self.send(("failed", rep.id, keys, why))
        if fatal is not None:
            self._died(rep, fatal)
            return
        rep.take = rep.actor.take.remote(TAKE_WAIT_S)

    def _died(self, rep: _Rep, why: str) -> None:
        """A replica is gone: its replacement starts now (placed by Ray where there is
        room), then the daemon hears of both, the replicas first."""
        keys = sorted(rep.held)
        rep.held.clear()
        self._drop(rep)
        self.start_replica()
        self.send(("replicas", self.describe()))
        self.send(("died", rep.id, keys, f"replica {rep.id} on {rep.node or '?'}: {why}"))

    def _check_cluster(self, error: BaseException) -> None:
        """A replica call failed: if the cluster's GCS is gone too, the cluster is lost
        (not the replica): say so and end (design §10)."""
        if self.gcs is None:
            return
        try:
            socket.create_connection(self.gcs, timeout=2.0).close()
        except OSError as e:
            self.send(("lost", f"the cluster's GCS at {self.gcs[0]}:{self.gcs[1]} is gone "
                               f"({e}) after: {_reason(error)}"))  # fmt: skip
            # No ray.shutdown(): without its GCS it may wait for minutes. The daemon
            # kills this process group (a local Ray's processes with it).
            os._exit(0)

    def close(self) -> None:
        import ray

        for rep in self.reps.values():
            self._drop(rep)
        with contextlib.suppress(Exception):
            ray.shutdown()


def _reason(e: BaseException) -> str:
    """A one-line reason from a Ray error (which may carry a remote traceback)."""
    cause = getattr(e, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else e) or type(e).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else type(e).__name__
    return f"{type(e).__name__}: {last}"[:1000]


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the daemon (pid `parent`) dies (Linux): then Ray is shut down here,
    not left. The daemon starts this from its main thread, which lives as long as it."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the prctl
        raise SystemExit(0)


def main() -> int:
    conn = Connection(int(sys.argv[1]))
    _die_with_parent(int(sys.argv[2]))

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides (its own SIGINT)
    _, settings = conn.recv()
    driver = Driver(conn, settings)
    try:
        try:
            driver.connect()
        except Exception as e:
            where = settings["address"] or "a local Ray"
            hint = ""
            if settings["address"] not in (None, "auto") and "RAY_AUTH_MODE" not in os.environ:
                hint = (
                    " (a cluster with token authentication, Ray's default, needs "
                    "RAY_AUTH_MODE=token and its token in spoold's environment)"
                )
            driver.send(("lost", f"cannot start or reach Ray (engine.ray.address: {where}): "
                                 f"{_reason(e)}{hint}"))  # fmt: skip
            return 0
        try:
            driver.start()
        except SystemExit:
            raise
        except Exception as e:
            driver.send(("load_failed", _reason(e)))
            return 0
        driver.serve()
    except (EOFError, OSError):
        pass  # the daemon is gone
    finally:
        driver.close()
    return 0
