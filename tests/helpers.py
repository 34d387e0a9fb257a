"""Shared test helpers: spools in temp dirs, request files, running the real `spoold`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml

SPOOLD = [sys.executable, "-m", "spoold"]


def chat(custom_id: str, content: str = "Hello!", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "any", "messages": [{"role": "user", "content": content}], **body},
    }


def completion(custom_id: str, prompt: str = "Once upon", **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "any", "prompt": prompt, **body},
    }


def write_jsonl(path: Path, records: Iterable[dict[str, Any] | str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def make_config(tmp: Path, **overrides: Any) -> Path:
    """A fake-engine config on a spool under `tmp`; `overrides` are nested dicts."""
    cfg: dict[str, Any] = {
        "spool_dir": str(tmp / "spool"),
        "watch": {"settle_seconds": 0.1},
        "heartbeat": {"interval_s": 0.5, "stale_after_s": 5},
        "logging": {"format": "json"},
        "engine": {"backend": "fake"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    path = tmp / "spoold.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (tmp / "spool" / "incoming").mkdir(parents=True, exist_ok=True)
    return path


def run_spoold(
    *args: str, timeout: float = 120, check: bool = False
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*SPOOLD, *args], capture_output=True, text=True, timeout=timeout, env=_env()
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"spoold {args} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}")
    return proc


def start_spoold(*args: str, log: IO[bytes] | None = None) -> subprocess.Popen[bytes]:
    """The real `spoold` in the background (stop it with the pid it returns): its output
    to `log`, or nowhere."""
    return subprocess.Popen(
        [*SPOOLD, *args],
        stdout=log if log is not None else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
        env=_env(),
    )


def drain(config: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return run_spoold("run", "--config", str(config), "--drain", timeout=timeout, check=True)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SPOOLD_CONFIG", None)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def job_dirs(spool: Path, where: str) -> list[Path]:
    base = spool / where
    return sorted(p for p in base.iterdir() if not p.name.startswith(".")) if base.is_dir() else []


def only_job(spool: Path, where: str) -> Path:
    dirs = job_dirs(spool, where)
    assert len(dirs) == 1, f"expected one job in {where}/, found {[d.name for d in dirs]}"
    return dirs[0]


def state(job_dir: Path) -> dict[str, Any]:
    return json.loads((job_dir / "state.json").read_text())


def read_results(job_dir: Path, name: str) -> list[dict[str, Any]]:
    """Parse every line of a result file; fails on a torn or invalid line."""
    path = job_dir / name
    if not path.exists():
        return []
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path} ends in a torn line"
    return [json.loads(line) for line in data.splitlines()]


def assert_exactly_once(job_dir: Path, expected_ids: Iterable[str]) -> None:
    """Every expected custom_id appears exactly once in output ∪ errors."""
    ids = [r["custom_id"] for r in read_results(job_dir, "output.jsonl")]
    ids += [r["custom_id"] for r in read_results(job_dir, "errors.jsonl")]
    counts = Counter(ids)
    expected = set(expected_ids)
    missing = expected - counts.keys()
    dupes = {k: v for k, v in counts.items() if v > 1 and k in expected}
    assert not missing, f"{len(missing)} custom_ids missing, e.g. {sorted(missing)[:5]}"
    assert not dupes, f"custom_ids more than once: {dict(list(dupes.items())[:5])}"


@contextlib.contextmanager
def beating(path: Path, record: dict[str, Any], period_s: float = 0.1) -> Iterator[None]:
    """A live peer's heartbeat, as seen from another host: rewritten every `period_s`
    with its seq growing (liveness is a heartbeat that changes, SPEC §3), until the
    block ends."""
    done = threading.Event()

    def beat() -> None:
        seq = 0
        while True:
            seq += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.test.tmp")
            tmp.write_text(json.dumps({**record, "seq": seq}))
            os.replace(tmp, path)
            if done.wait(period_s):
                return

    thread = threading.Thread(target=beat, name="peer-heartbeat")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 30,
    what: str = "condition",
    poll: float = 0.05,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Until `predicate()` is truthy (returns it); fails after `timeout` seconds, with
    `detail()` (a log's tail) in the message."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    more = f"\n{detail()}" if detail is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{more}")


def kill_once_committed(config: Path, log: Path, at_least: int, timeout: float = 240) -> None:
    """Start `spoold run --drain` (output in `log`) and SIGKILL it once a job in
    processing/ has committed `at_least` results; fails if it exits first."""
    spool = Path(yaml.safe_load(config.read_text())["spool_dir"])

    def committed() -> int:
        best = 0
        for d in job_dirs(spool, "processing"):
            try:
                best = max(best, state(d)["request_counts"]["completed"])
            except (OSError, ValueError, KeyError):
                continue  # being replaced right now
        return best

    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*SPOOLD, "run", "--config", str(config), "--drain"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_env(),
        )
    try:
        wait_for(
            lambda: proc.poll() is not None or committed() >= at_least,
            timeout=timeout,
            poll=0.005,
            what=f"a checkpoint with {at_least} results",
        )
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=30)
    assert rc == -signal.SIGKILL, f"not killed mid-job (exit {rc}):\n{log.read_text()[-3000:]}"


def log_events(text: str) -> list[dict[str, Any]]:
    """spoold's JSON log lines in `text` (other lines, vLLM's or Ray's, skipped)."""
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and "event" in event:
            events.append(event)
    return events
