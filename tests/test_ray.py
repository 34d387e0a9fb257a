"""The ray backend for real (design §10): a local Ray (or a Ray head these tests start),
two CPU replicas of the tiny test model, `spoold run` as a process. Nothing is mocked:
replicas are killed with SIGKILL, the cluster's head is killed and started again.

Engine start-ups cost ~20 s each here (Ray, then two vLLM loads on 2 cores), so each
test does several things with one daemon.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    completion,
    log_events,
    make_config,
    only_job,
    read_results,
    start_spoold,
    state,
    wait_for,
    write_jsonl,
)

REQUIRE = os.environ.get("SPOOLD_REQUIRE_VLLM") == "1"
for _module in ("vllm", "ray"):
    if importlib.util.find_spec(_module) is None:
        if REQUIRE:
            raise ImportError(f"SPOOLD_REQUIRE_VLLM=1 but {_module} is not installed")
        pytest.skip(f"{_module} is not installed", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

MAX_MODEL_LEN = 512
BIN = Path(sys.executable).parent
RAY_NAMES = ("ray::", "raylet", "gcs_server", "raydriver", "dashboard", "ray/_private")


@pytest.fixture(scope="module", autouse=True)
def in_process_engine() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        yield


def engine_section(model: Path, backend: str, **ray: Any) -> dict[str, Any]:
    engine: dict[str, Any] = {
        "backend": backend,
        "model": str(model),
        "dtype": "float32",
        "max_model_len": MAX_MODEL_LEN,
        "enforce_eager": True,
        "seed": 0,
        "kv_cache_memory_bytes": 64 << 20,
    }
    if backend == "ray":
        engine["ray"] = {"replicas": 2, "resources_per_replica": {"CPU": 1}, **ray}
    return engine


def config(tmp: Path, model: Path, backend: str, **extra: Any) -> Path:
    ray = extra.pop("ray", {})
    return make_config(tmp, engine=engine_section(model, backend, **ray), **extra)


# -- processes ------------------------------------------------------------------------


def ray_processes() -> dict[int, str]:
    """Every process on this machine that is Ray's or spoold's ray driver, by pid."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        cmd = raw.replace(b"\0", b" ").decode(errors="replace")
        if any(name in cmd for name in RAY_NAMES):
            found[int(entry)] = cmd[:200]
    return found


@pytest.fixture
def no_ray_left() -> Iterator[Callable[[], None]]:
    """A check that no Ray process started during the test is left (kills and fails
    on any, so that the next test starts clean)."""
    before = set(ray_processes())

    def check() -> None:
        deadline = time.monotonic() + 10
        while True:
            left = {p: c for p, c in ray_processes().items() if p not in before}
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"Ray processes left behind: {left}"

    yield check
    left = {p for p in ray_processes() if p not in before}
    for pid in left:  # a test that failed early: clean up what it started
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def replica_pids(daemon: int) -> list[int]:
    pids = []
    for pid in descendants(daemon):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::Replica"):
                pids.append(pid)
    return pids


def heartbeat(spool: Path) -> dict[str, Any]:
    try:
        return json.loads((spool / "heartbeats" / "default.json").read_text())
    except (OSError, ValueError):
        return {}


def first_chunk(spool: Path, log: Path, timeout: float = 180) -> None:
    """Until the running job has committed its first chunk (200 results)."""
    wait_for(
        lambda: (heartbeat(spool).get("current_job") or {}).get("completed", 0) >= 200,
        timeout,
        "the first chunk",
        detail=lambda: _tail(log),
    )


def _tail(log: Path, n: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def events(log: Path) -> list[dict[str, Any]]:
    return log_events(log.read_text(errors="replace"))


@contextlib.contextmanager
def running(cfg: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`spoold run` (live) with its output in `log`, killed on the way out if still there."""
    with open(log, "wb") as f:
        daemon = start_spoold("run", "--config", str(cfg), log=f)
    try:
        yield daemon
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


def drain_to(config_path: Path, log: Path, timeout: float = 300) -> int:
    with open(log, "wb") as f:
        proc = subprocess.run(
            [*SPOOLD, "run", "--config", str(config_path), "--drain"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=_env(),
            timeout=timeout,
        )
    return proc.returncode


# -- requests -------------------------------------------------------------------------


def greedy_requests(n: int, max_tokens: int = 16) -> list[dict[str, Any]]:
    reqs = []
    for i in range(n):
        body: dict[str, Any] = {"max_tokens": 1 + (i * 5) % max_tokens, "temperature": 0}
        if i % 2:
            reqs.append(completion(f"g-{i}", f"Once upon a time number {i} said", **body))
        else:
            if i % 10 == 4:
                body.update(logprobs=True, top_logprobs=2)
            reqs.append(chat(f"g-{i}", f"Tell me a story about number {i}.", **body))
    return reqs


def normalized(record: dict[str, Any]) -> dict[str, Any]:
    """A result line without what depends on the job's id and the clock."""
    out = json.loads(json.dumps(record))
    out.pop("id", None)
    response = out.get("response") or {}
    response.pop("request_id", None)
    body = response.get("body") or {}
    body.pop("id", None)
    body.pop("created", None)
    return out


def by_custom_id(job: Path, name: str) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: normalized(r) for r in read_results(job, name)}


# -- the tests ------------------------------------------------------------------------


def test_ray_backend_gives_the_vllm_backends_lines_on_two_replicas(
    tmp_path: Path,
    tiny_model: Path,
    no_ray_left: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Also: `address: null` is a Ray of the daemon's own, whatever $RAY_ADDRESS (or a
    `ray start` of someone else's, remembered in /tmp/ray) names: here a dead one."""
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{_free_port()}")
    reqs = greedy_requests(300)
    long_prompt = " ".join(["word"] * 700)  # past max_model_len: one error line
    reqs.insert(137, completion("too-long", long_prompt, max_tokens=4, temperature=0))

    results = {}
    for backend in ("vllm", "ray"):
        tmp = tmp_path / backend
        tmp.mkdir()
        cfg = config(tmp, tiny_model, backend)
        write_jsonl(tmp / "spool" / "incoming" / "same.jsonl", reqs)
        log = tmp / "spoold.log"
        assert drain_to(cfg, log) == 0, _tail(log)
        job = only_job(tmp / "spool", "done")
        results[backend] = job
        assert_exactly_once(job, [r["custom_id"] for r in reqs])
        if backend == "ray":
            beat = heartbeat(tmp / "spool")
            ray_log = log

    vllm_out, ray_out = (by_custom_id(results[b], "output.jsonl") for b in ("vllm", "ray"))
    assert len(ray_out) == 300
    assert ray_out.keys() == vllm_out.keys()
    differ = [k for k in vllm_out if vllm_out[k] != ray_out[k]]
    assert not differ, f"{len(differ)} lines differ, e.g. {differ[0]}: {ray_out[differ[0]]}"
    vllm_err, ray_err = (by_custom_id(results[b], "errors.jsonl") for b in ("vllm", "ray"))
    assert list(ray_err) == ["too-long"]
    assert ray_err == vllm_err
    assert state(results["ray"])["request_counts"] == {"total": 301, "completed": 300, "failed": 1}

    # Both replicas served requests; the heartbeat lists them (closed: not alive).
    assert beat["status"] == "stopped"
    engine = beat["engine"]
    assert engine["backend"] == "ray"
    replicas = engine["replicas"]
    assert [r["id"] for r in replicas] == [0, 1]
    assert all(r["completed"] > 0 for r in replicas), replicas
    assert sum(r["completed"] for r in replicas) == 301
    assert all(r["node"] and r["alive"] is False for r in replicas)
    ready = [e for e in events(ray_log) if e["event"] == "ray replicas ready"]
    assert len(ready) == 1  # started once for the job, not per chunk
    no_ray_left()


def test_a_killed_replica_loses_nothing_and_sigterm_leaves_no_ray(
    tmp_path: Path, tiny_model: Path, no_ray_left: Callable[[], None]
) -> None:
    """One replica's process SIGKILLed mid-job: the job completes, each request once,
    a replacement joins; a second job, stopped by SIGTERM mid-run, leaves no Ray
    process and is queued at its checkpoint; a later drain finishes it exactly once."""
    cfg = config(tmp_path, tiny_model, "ray", processing={"chunk_size": 200})
    spool = tmp_path / "spool"
    first = greedy_requests(3000, max_tokens=32)
    write_jsonl(spool / "incoming" / "first.jsonl", first)
    log = tmp_path / "spoold.log"
    with running(cfg, log) as daemon:
        first_chunk(spool, log)
        victims = replica_pids(daemon.pid)
        assert len(victims) == 2, victims
        os.kill(victims[0], signal.SIGKILL)

        def done() -> list[Path]:
            d = spool / "done"
            return [p for p in d.iterdir() if p.name.startswith("first")] if d.is_dir() else []

        job = wait_for(done, 240, "the first job to complete", detail=lambda: _tail(log))[0]
        assert_exactly_once(job, [r["custom_id"] for r in first])
        st = state(job)
        assert st["status"] == "completed"
        assert st["request_counts"] == {"total": 3000, "completed": 3000, "failed": 0}
        assert len(read_results(job, "output.jsonl")) == 3000
        died = [e for e in events(log) if e["event"] == "a ray replica died"]
        assert died and died[0]["requests"] > 0, _tail(log)

        def replaced() -> list[dict[str, Any]]:
            listed = heartbeat(spool).get("engine", {}).get("replicas", [])
            alive = [r for r in listed if r["alive"]]
            return listed if len(alive) == 2 and len(listed) == 3 else []

        listed = wait_for(replaced, 120, "a replacement replica", detail=lambda: _tail(log))
        assert {r["id"] for r in listed if not r["alive"]} == {died[0]["replica"]}
        assert 2 in {r["id"] for r in listed if r["alive"]}

        second = greedy_requests(3000, max_tokens=32)
        for r in second:
            r["custom_id"] = "second-" + r["custom_id"]
        write_jsonl(spool / "incoming" / "second.jsonl", second)

        def second_running() -> bool:
            job = heartbeat(spool).get("current_job") or {}
            return job.get("id", "").startswith("second") and job.get("completed", 0) >= 200

        wait_for(second_running, 120, "the second job to run", detail=lambda: _tail(log))
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0, _tail(log)
    assert heartbeat(spool)["status"] == "stopped"
    no_ray_left()
    paused = only_job(spool, "processing")
    st = state(paused)
    assert st["status"] == "queued"
    assert 0 < st["checkpoint"]["completed"] < 3000
    assert drain_to(cfg, tmp_path / "drain.log") == 0, _tail(tmp_path / "drain.log")
    assert_exactly_once(_done(spool, "second"), [r["custom_id"] for r in second])
    no_ray_left()


def _done(spool: Path, prefix: str) -> Path:
    found = [p for p in (spool / "done").iterdir() if p.name.startswith(prefix)]
    assert len(found) == 1, found
    return found[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_cluster_address_is_a_config_error_at_start(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there
    cfg = config(tmp_path, Path("/nonexistent-model"), "ray", ray={"address": f"127.0.0.1:{port}"})
    started = time.monotonic()
    proc = subprocess.run(
        [*SPOOLD, "run", "--config", str(cfg), "--drain"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "engine.ray.address" in proc.stderr and f"127.0.0.1:{port}" in proc.stderr
    assert time.monotonic() - started < 30
    assert not (tmp_path / "spool" / "processing").exists() or not list(
        (tmp_path / "spool" / "processing").iterdir()
    )


class Head:
    """A Ray head these tests start (`ray start --head --block`, its own session), and
    kill with its whole process group."""

    def __init__(self, port: int, log: Path) -> None:
        self.port, self.log = port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen(
                [str(BIN / "ray"), "start", "--head", "--block", f"--port={self.port}",
                 "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
                stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            time.sleep(0.3)
        raise AssertionError(f"the Ray head did not start:\n{_tail(self.log)}")

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


def test_a_lost_cluster_pauses_the_job_and_it_resumes_exactly_once(
    tmp_path: Path,
    tiny_model: Path,
    no_ray_left: Callable[[], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = _free_port()
    head = Head(port, tmp_path / "head.log")
    head.start()
    cfg = config(
        tmp_path,
        tiny_model,
        "ray",
        ray={"address": f"127.0.0.1:{port}"},
        processing={"chunk_size": 200, "model_retry_s": 1},
    )
    spool = tmp_path / "spool"
    reqs = greedy_requests(3000, max_tokens=32)
    write_jsonl(spool / "incoming" / "far.jsonl", reqs)
    log = tmp_path / "spoold.log"
    # Ray 2.60 clusters use token authentication; with an explicit address a driver
    # sends the token only when told to (README "Engines").
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with running(cfg, log) as daemon, contextlib.ExitStack() as cleanup:
        cleanup.callback(head.kill)
        first_chunk(spool, log)
        head.kill()  # the whole cluster: GCS, raylet, the replicas

        def paused() -> str:
            problems = heartbeat(spool).get("problems") or []
            return next((p for p in problems if "engine.ray.address" in p), "")

        problem = wait_for(
            paused, 120, "the pause to show in the heartbeat", detail=lambda: _tail(log)
        )
        assert f"127.0.0.1:{port}" in problem and "jobs wait" in problem
        job = only_job(spool, "processing")
        assert state(job)["status"] in ("queued", "running")
        assert not (spool / "done").exists() or not list((spool / "done").iterdir())
        time.sleep(3)  # a try or two against nothing
        head.start()
        found = wait_for(
            lambda: list((spool / "done").iterdir()) if (spool / "done").is_dir() else [],
            300,
            "the job to complete",
            detail=lambda: _tail(log),
        )
        assert wait_for(lambda: not paused(), 30, "the problem to clear", detail=lambda: _tail(log))
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    done = found[0]
    assert_exactly_once(done, [r["custom_id"] for r in reqs])
    st = state(done)
    assert st["request_counts"] == {"total": 3000, "completed": 3000, "failed": 0}
    lost = [
        e for e in events(log) if e["event"] == "the ray cluster is unavailable; jobs wait for it"
    ]
    assert lost, _tail(log)
    assert not [e for e in events(log) if e["event"] == "request crashes the engine; dead-lettered"]
    assert re.search(r"ray cluster is back", log.read_text())
    no_ray_left()


def test_no_replica_left_is_an_engine_that_cannot_be_reloaded_and_nothing_is_blamed(
    tmp_path: Path, tiny_model: Path, no_ray_left: Callable[[], None]
) -> None:
    """replicas: 1, its process SIGKILLed after its model went away: the replacement
    cannot load it, so no replica is left. The daemon exits 1 (as when the `vllm`
    engine cannot be reloaded) without wedging and without blaming the requests it had
    in flight; with the model back, the job finishes exactly once, no line dead-lettered."""
    model = tmp_path / "model"
    subprocess.run(["cp", "-r", str(tiny_model), str(model)], check=True)
    cfg = config(tmp_path, model, "ray", ray={"replicas": 1}, processing={"chunk_size": 200})
    spool = tmp_path / "spool"
    reqs = greedy_requests(3000, max_tokens=32)
    write_jsonl(spool / "incoming" / "lone.jsonl", reqs)
    log = tmp_path / "spoold.log"
    with running(cfg, log) as daemon:
        first_chunk(spool, log)
        (victim,) = replica_pids(daemon.pid)
        model.rename(tmp_path / "model.away")
        os.kill(victim, signal.SIGKILL)
        assert daemon.wait(180) == 1, _tail(log)
    assert "cannot be reloaded" in heartbeat(spool)["reason"], heartbeat(spool)
    no_ray_left()
    job = only_job(spool, "processing")
    assert not read_results(job, "errors.jsonl")
    (tmp_path / "model.away").rename(model)
    assert drain_to(cfg, tmp_path / "drain.log") == 0, _tail(tmp_path / "drain.log")
    done = only_job(spool, "done")
    assert_exactly_once(done, [r["custom_id"] for r in reqs])
    assert not read_results(done, "errors.jsonl")  # nobody was blamed
    assert state(done)["request_counts"] == {"total": 3000, "completed": 3000, "failed": 0}
    no_ray_left()


def _floats(value: Any) -> list[float]:
    """An embedding as floats, from a list or from base64 of float32 little-endian."""
    if isinstance(value, str):
        return [x for (x,) in struct.iter_unpack("<f", base64.b64decode(value))]
    return list(value)


def test_ray_backend_runs_an_embeddings_job_as_the_vllm_backend_does(
    tmp_path: Path, tiny_bert: Path, no_ray_left: Callable[[], None]
) -> None:
    """SPEC §6 Endpoints with `backend: ray`: the replicas load the model with the
    pooling runner, and the job's lines are the `vllm` backend's (vectors within 1e-5
    a component: batches are made up differently), its error lines the same."""
    reqs = [
        {
            "custom_id": f"e-{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {
                "model": "m",
                "input": [f"the knight {i} rode", f"to the sea {i % 7}"] if i % 3 else f"fox {i}",
                **({"encoding_format": "base64"} if i % 4 == 1 else {}),
            },
        }
        for i in range(200)
    ]
    reqs.insert(50, chat("a-chat", "Hello!"))
    results = {}
    for backend in ("vllm", "ray"):
        tmp = tmp_path / backend
        tmp.mkdir()
        cfg = config(tmp, tiny_bert, backend, ray={"replicas": 1})
        write_jsonl(tmp / "spool" / "incoming" / "emb.jsonl", reqs)
        log = tmp / "spoold.log"
        assert drain_to(cfg, log) == 0, _tail(log)
        results[backend] = only_job(tmp / "spool", "done")
        assert_exactly_once(results[backend], [r["custom_id"] for r in reqs])
    vllm_out, ray_out = (by_custom_id(results[b], "output.jsonl") for b in ("vllm", "ray"))
    assert ray_out.keys() == vllm_out.keys() and len(ray_out) == 200
    for cid, rec in ray_out.items():
        ours, ref = rec["response"]["body"], vllm_out[cid]["response"]["body"]
        assert ours["usage"] == ref["usage"] and len(ours["data"]) == len(ref["data"]), cid
        for mine, theirs in zip(ours["data"], ref["data"], strict=True):
            a, b = (_floats(v) for v in (mine["embedding"], theirs["embedding"]))
            assert len(a) == len(b), cid
            assert max(abs(x - y) for x, y in zip(a, b, strict=True)) <= 1e-5, cid
    ray_err = by_custom_id(results["ray"], "errors.jsonl")
    assert ray_err == by_custom_id(results["vllm"], "errors.jsonl")
    assert [e["error"]["code"] for e in ray_err.values()] == ["endpoint_mismatch"]
    no_ray_left()
