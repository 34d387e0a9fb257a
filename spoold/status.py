"""`spool-status`: is the daemon alive, and how far has every job got?

Reads files only (heartbeats, state.json); never imports vLLM, torch or NVML, so it
starts fast. Exit codes follow the monitoring-plugin convention:
0 healthy, 1 degraded, 2 down (stale heartbeat or stopped), 3 no daemon ever seen.
A job in processing/ whose record cannot be read is a problem: degraded at least.
A daemon whose last beat says `stopped` exited cleanly: down at once, not only once its
heartbeat goes stale. One that says `stopping` is still alive, finishing its chunk.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spoold.config import Config, ConfigError, load_config, resolve_config_path
from spoold.heartbeat import beat_age, parse_time, read_heartbeat
from spoold.job import ACTIVE, RUNNING, STATE, JobState, Unreadable, read_job, unreadable_problem
from spoold.layout import (
    DONE,
    FAILED,
    INCOMING,
    PROCESSING,
    count_waiting,
    find_job_dir,
    job_dir_entries,
)

HEALTHY, DEGRADED, DOWN, UNKNOWN = 0, 1, 2, 3
HEALTH_WORDS = {HEALTHY: "healthy", DEGRADED: "degraded", DOWN: "down", UNKNOWN: "no daemon"}
RECENT_FAILURES = 5


@dataclass
class Report:
    spool: str
    now: float
    daemons: list[dict[str, Any]] = field(default_factory=list)
    queue: dict[str, int] = field(default_factory=dict)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    recent_failures: list[dict[str, Any]] = field(default_factory=list)
    # Jobs in processing/ whose record cannot be read: {id, error}; left where they are.
    unreadable: list[dict[str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    exit_code: int = UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        return {
            "health": HEALTH_WORDS[self.exit_code],
            "exit_code": self.exit_code,
            "spool": self.spool,
            "daemons": self.daemons,
            "queue": self.queue,
            "jobs": self.jobs,
            "recent_failures": self.recent_failures,
            "unreadable_jobs": self.unreadable,
            "problems": self.problems,
        }


def _read_state(job_dir: Path) -> dict[str, Any] | None:
    try:
        with open(job_dir / STATE, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _daemons(spool: Path, stale_after_s: float, now: float) -> list[dict[str, Any]]:
    daemons = []
    try:
        paths = sorted((spool / "heartbeats").glob("*.json"))
    except OSError:
        paths = []
    for path in paths:
        beat = read_heartbeat(path)
        if beat is None:
            continue
        age = beat_age(beat, now)
        progress = parse_time(beat.get("last_progress_at"))
        beat["age_s"] = None if age is None else round(age, 1)
        beat["stale"] = age is None or age > stale_after_s
        # Its last beat is when it stopped (the reason is the beat's own `reason`).
        beat["stopped_at"] = beat.get("updated_at") if beat.get("status") == "stopped" else None
        beat["since_progress_s"] = None if progress is None else round(now - progress, 1)
        daemons.append(beat)
    return daemons


def _health(daemons: list[dict[str, Any]]) -> int:
    if not daemons:
        return UNKNOWN
    alive = [d for d in daemons if not d["stale"] and d.get("status") != "stopped"]
    if not alive:
        return DOWN
    # Stopping: alive, committing its last chunk, but taking no more work.
    if len(alive) < len(daemons) or any(
        d.get("status") in ("throttled", "stopping") for d in alive
    ):
        return DEGRADED
    gpus = [g for d in alive for g in (d.get("gpu") or [])]
    if any(g.get("healthy") is False for g in gpus) or any(d.get("problems") for d in alive):
        return DEGRADED
    return HEALTHY


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _job_view(state: dict[str, Any], daemons: list[dict[str, Any]], now: float) -> dict[str, Any]:
    counts = state.get("request_counts") or {}
    total = int(counts.get("total") or 0)
    finished = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
    view: dict[str, Any] = {
        "id": state.get("id"),
        "source_name": state.get("source_name"),
        "status": state.get("status"),
        "model": state.get("model"),
        "request_counts": counts,
        "done": finished,
        "total": total,
        "requests_per_s": None,
        "tokens_per_s": None,
        "eta_s": None,
    }
    for d in daemons:
        current = d.get("current_job") or {}
        if current.get("id") == state.get("id") and not d["stale"]:
            view["tokens_per_s"] = current.get("tokens_per_s")
            view["daemon"] = d.get("instance")
            # state.json counts move at commits (every chunk_size requests); the running
            # daemon's heartbeat says how far it has got since, about once a second.
            live = _int(current.get("completed")) + _int(current.get("failed"))
            if live > finished:
                finished = view["done"] = live
    started = parse_time(state.get("started_at"))
    if state.get("status") == RUNNING and started and finished and now > started:
        rate = finished / (now - started)
        view["requests_per_s"] = round(rate, 2)
        view["eta_s"] = round(max(0, total - finished) / rate) if rate > 0 else None
    return view


def build_report(spool: Path, stale_after_s: float, now: float | None = None) -> Report:
    now = time.time() if now is None else now
    report = Report(spool=str(spool), now=now)
    report.daemons = _daemons(spool, stale_after_s, now)
    report.exit_code = _health(report.daemons)
    waiting = count_waiting(spool / INCOMING)
    if not (spool / INCOMING).is_dir():
        report.problems.append(f"{spool}/incoming does not exist: is this a spool?")
    queued = running = left = 0
    for d in sorted(job_dir_entries(spool / PROCESSING), key=lambda d: d.name):
        found = read_job(Path(d.path))
        if isinstance(found, Unreadable):
            report.unreadable.append({"id": d.name, "error": found.why})
            report.problems.append(unreadable_problem(d.name, found.why))
            continue
        if found is None or found.status not in ACTIVE:  # None: moved on meanwhile
            continue
        state = found.to_dict()
        view = _job_view(state, report.daemons, now)
        report.jobs.append(view)
        left += max(0, view["total"] - view["done"])
        if state.get("status") == RUNNING:
            running += 1
        else:
            queued += 1
    report.jobs.sort(key=lambda j: (j["status"] != RUNNING, j["id"] or ""))
    failed = job_dir_entries(spool / FAILED)
    report.queue = {
        "waiting": waiting,
        "queued": queued,
        "running": running,
        "done": len(job_dir_entries(spool / DONE)),
        "failed": len(failed),
        "requests_left": left,
    }
    recent = []
    for d in failed:
        try:
            recent.append((os.stat(os.path.join(d.path, STATE)).st_mtime, d.path))
        except OSError:
            continue
    for _, path in sorted(recent, reverse=True)[:RECENT_FAILURES]:
        state = _read_state(Path(path)) or {}
        recent_item = {k: state.get(k) for k in ("id", "source_name", "status", "error")}
        recent_item["finished_at"] = state.get("finished_at")
        report.recent_failures.append(recent_item)
    for beat in report.daemons:
        seen = set(report.problems)  # unreadable jobs: found here too, said once
        report.problems.extend(
            f"{beat.get('instance')}: {problem}"
            for problem in beat.get("problems") or []
            if isinstance(problem, str) and problem not in seen
        )
    if report.unreadable:
        report.exit_code = max(report.exit_code, DEGRADED)
    return report


def find_job(spool: Path, job_id: str) -> tuple[str, dict[str, Any] | Unreadable] | None:
    """(processing|done|failed, state.json, or why it cannot be read) of one job, or None."""
    job_dir = find_job_dir(spool, job_id)
    found = read_job(job_dir) if job_dir is not None else None
    if job_dir is None or found is None:
        return None
    return job_dir.parent.name, found.to_dict() if isinstance(found, JobState) else found


# -- rendering ---------------------------------------------------------------------


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _bar(done: int, total: int, width: int = 24) -> str:
    frac = done / total if total else 0.0
    filled = int(frac * width)
    return "[" + "#" * filled + "." * (width - filled) + f"] {frac * 100:5.1f}%"


def render(report: Report) -> str:
    lines = [f"spoold at {report.spool}: {HEALTH_WORDS[report.exit_code].upper()}"]
    if not report.daemons:
        lines.append("  no daemon has ever written a heartbeat here")
    for d in report.daemons:
        where = f"  daemon {d.get('instance')} pid {d.get('pid')} on {d.get('hostname')}"
        if d.get("status") == "stopped":
            line = f"{where}: stopped at {d['stopped_at']} ({_duration(d['age_s'])} ago)"
            lines.append(line + f": {d.get('reason') or 'no reason recorded'}")
            continue
        state = "STALE" if d["stale"] else d.get("status")
        line = f"{where}: {state}, heartbeat {_duration(d['age_s'])} ago"
        if d.get("reason"):
            line += f" ({d['reason']})"
        if d.get("current_job") and d.get("since_progress_s") is not None:
            line += f", last progress {_duration(d['since_progress_s'])} ago"
        lines.append(line)
        for g in d.get("gpu") or []:
            lines.append(
                f"    gpu {g.get('index')}: {g.get('memory_percent')}% memory, "
                f"{g.get('temperature_c')}°C{'' if g.get('healthy', True) else ' UNHEALTHY'}"
            )
    q = report.queue
    lines.append(
        f"queue: {q['waiting']} waiting, {q['queued']} queued, {q['running']} running, "
        f"{q['done']} done, {q['failed']} failed; {q['requests_left']} requests left"
    )
    for j in report.jobs:
        rate = f"{j['requests_per_s']} req/s" if j["requests_per_s"] is not None else "-"
        if j["tokens_per_s"] is not None:
            rate += f", {j['tokens_per_s']} tok/s"
        lines.append(
            f"  {j['id']} {j['status']:8} {_bar(j['done'], j['total'])} "
            f"{j['done']}/{j['total']}  {rate}  ETA {_duration(j['eta_s'])}"
        )
    if report.recent_failures:
        lines.append("recent failures:")
        for item in report.recent_failures:
            reason = item["error"] or "no reason recorded"
            lines.append(f"  {item['id']} ({item['status']}): {reason}")
    for p in report.problems:
        lines.append(f"problem: {p}")
    return "\n".join(lines)


def render_job(where: str, state: dict[str, Any]) -> str:
    c = state.get("request_counts") or {}
    lines = [
        f"job {state.get('id')} ({where}/): {state.get('status')}",
        f"  file: {state.get('source_name')}   model: {state.get('model')}",
        f"  requests: {c.get('total')} total, {c.get('completed')} completed, "
        f"{c.get('failed')} failed",
        f"  created {state.get('created_at')}  started {state.get('started_at')}  "
        f"finished {state.get('finished_at')}",
    ]
    if state.get("error"):
        lines.append(f"  error: {state['error']}")
    return "\n".join(lines)


def _config(args: argparse.Namespace) -> Config:
    if args.spool and not args.config:
        cfg = Config()
    else:
        path = resolve_config_path(args.config)
        named = args.config or os.environ.get("SPOOLD_CONFIG")
        # A config that was named must exist; the default one may be absent (defaults).
        cfg = load_config(path) if (named or path.exists()) else Config()
    if args.spool:
        cfg.spool_dir = Path(args.spool)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="spool-status", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--config", help="config file (default: $SPOOLD_CONFIG or /etc/spoold/…)")
    where.add_argument("--spool", help="spool directory (instead of a config)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("job_id", nargs="?", metavar="JOB_ID", help="show one job")
    args = parser.parse_args(argv)
    try:
        cfg = _config(args)
    except ConfigError as e:
        print(f"spool-status: config error: {e}", file=sys.stderr)
        return UNKNOWN
    report = build_report(cfg.spool_dir, cfg.heartbeat.stale_after_s)
    if args.job_id:
        found = find_job(cfg.spool_dir, args.job_id)
        if found is None:
            print(f"spool-status: no job {args.job_id!r} in {cfg.spool_dir}", file=sys.stderr)
            return DEGRADED
        where_, state = found
        if isinstance(state, Unreadable):
            problem = f"job {args.job_id} ({where_}/) cannot be read: {state.why}"
            if args.json:
                print(json.dumps({"where": where_, "state": None, "error": state.why}, indent=2))
            else:
                print(problem)
            return max(report.exit_code, DEGRADED)
        if args.json:
            view = _job_view(state, report.daemons, report.now)
            print(json.dumps({"where": where_, "state": state, "progress": view}, indent=2))
        else:
            print(render_job(where_, state))
        return report.exit_code
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
