"""`spool-status`: is every daemon on the spool alive, and how far has every job got?

Reads files only (heartbeats, state.json, owner.json); never imports vLLM, torch or
NVML, so it starts fast. Exit codes follow the monitoring-plugin convention:
0 healthy, 1 degraded, 2 down (stale heartbeat or stopped), 3 no daemon ever seen.
Several daemons may share the spool (heartbeats/<instance>.json each): healthy only if
every one is alive and fine; degraded if some are down beside a live one; down if none
is alive. A job in processing/ whose record cannot be read is a problem: degraded at
least. A daemon whose last beat says `stopped` exited cleanly: down at once, not only
once its heartbeat goes stale. One that says `stopping` is still alive, finishing its
chunk.

A job's progress comes from the live heartbeat whose `current_job` is that job, whatever
its instance (fresher than state.json, which moves at commits), else from state.json.

Staleness here is the heartbeat's `updated_at` against this host's wall clock, unlike
the daemons (SPEC §3), which watch `seq` change on their own monotonic clock: a one-shot
reader sees one beat and nothing to compare it with. A heartbeat written on a host whose
clock is off looks younger or older by as much; the human output shows each beat's
`seq`, so running spool-status twice shows whether a daemon still beats.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spoold.config import ConfigError, config_for
from spoold.fsio import read_json
from spoold.heartbeat import beat_age, parse_time, read_heartbeat
from spoold.job import (
    ACTIVE,
    COMPLETED,
    ERRORS,
    OUTPUT,
    OWNER,
    RUNNING,
    STATE,
    JobState,
    Unreadable,
    read_job,
    unreadable_problem,
)
from spoold.layout import (
    DONE,
    FAILED,
    HEARTBEATS,
    INCOMING,
    PROCESSING,
    find_job_dir,
    in_transit_note,
    is_job_name,
    job_dir_entries,
    waiting_files,
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


def _daemons(
    spool: Path, stale_after_s: float, now: float
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every heartbeat (sorted by instance), with what spool-status judges of it; and the
    names of heartbeat files that cannot be read."""
    daemons, unreadable = [], []
    try:
        paths = sorted((spool / HEARTBEATS).glob("*.json"))
    except OSError:
        paths = []
    for path in paths:
        # Beats are replaced by rename: on NFS, a read racing one can fail once (ESTALE).
        beat = read_heartbeat(path) or read_heartbeat(path)
        if beat is None:
            if path.exists():  # not a peer retired meanwhile
                unreadable.append(path.name)
            continue
        if not isinstance(beat.get("instance"), str):
            beat["instance"] = path.stem
        for key in ("pid", "hostname", "status", "reason", "seq", "current_job"):
            beat.setdefault(key, None)
        beat.setdefault("problems", [])
        age = beat_age(beat, now)
        progress = parse_time(beat.get("last_progress_at"))
        beat["age_s"] = None if age is None else round(age, 1)
        beat["stale"] = age is None or age > stale_after_s
        beat["alive"] = not beat["stale"] and beat["status"] != "stopped"
        beat["label"] = f"{beat['instance']}@{beat['hostname']}"
        # Its last beat is when it stopped (the reason is the beat's own `reason`).
        beat["stopped_at"] = beat.get("updated_at") if beat["status"] == "stopped" else None
        beat["since_progress_s"] = None if progress is None else round(now - progress, 1)
        daemons.append(beat)
    daemons.sort(key=lambda d: d["instance"])
    return daemons, unreadable


def _health(daemons: list[dict[str, Any]]) -> int:
    if not daemons:
        return UNKNOWN
    alive = [d for d in daemons if d["alive"]]
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


def _current(daemon: dict[str, Any]) -> dict[str, Any] | None:
    """The job a heartbeat says its daemon runs ({id, completed, failed, total, …})."""
    current = daemon.get("current_job")
    return current if isinstance(current, dict) and isinstance(current.get("id"), str) else None


def _runner(job_id: Any, daemons: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The live daemon whose heartbeat says it runs `job_id` (the freshest, if two do)."""
    running = [d for d in daemons if d["alive"] and (_current(d) or {}).get("id") == job_id]
    return min(running, key=lambda d: d["age_s"] or 0.0, default=None)


def _read_owner(job_dir: Path) -> dict[str, Any] | None:
    """owner.json's record (instance, hostname, pid…), or None when there is none."""
    try:
        owner = read_json(job_dir / OWNER)
    except (OSError, ValueError, RecursionError):
        return None
    return owner if isinstance(owner, dict) else None


def _owner_view(
    owner: dict[str, Any] | None, daemons: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Who holds a job by owner.json, and how its heartbeat looks (alive, stale, …)."""
    if owner is None:
        return None
    view = {k: owner.get(k) for k in ("instance", "hostname", "pid")}
    beat = next((d for d in daemons if d["instance"] == view["instance"]), None)
    if beat is None:
        view["daemon"] = "no heartbeat"
    elif view["pid"] is not None and (beat["hostname"], beat["pid"]) != (
        view["hostname"],
        view["pid"],
    ):
        view["daemon"] = "gone"  # its instance runs again, as another process
    else:
        view["daemon"] = "alive" if beat["alive"] else "stopped" if beat["stopped_at"] else "STALE"
    return view


def _job_view(
    state: dict[str, Any],
    daemons: list[dict[str, Any]],
    now: float,
    owner: dict[str, Any] | None = None,
    waits: bool = False,
) -> dict[str, Any]:
    """A job's progress: live from the heartbeat of the daemon that runs it, whatever
    its instance, else state.json's. `waits`: the job is in processing/, so no live
    runner means it waits for a daemon (`owner`: its owner.json, if any)."""
    counts = state.get("request_counts") or {}
    completed, failed = _int(counts.get("completed")), _int(counts.get("failed"))
    total = _int(counts.get("total"))
    runner = _runner(state.get("id"), daemons)
    current = _current(runner) if runner is not None else None
    view: dict[str, Any] = {
        "id": state.get("id"),
        "source_name": state.get("source_name"),
        "status": state.get("status"),
        "model": state.get("model"),
        "request_counts": counts,
        "progress_from": "state.json",
        "daemon": None,  # the runner's instance
        "runner": None,
        "waiting_for_daemon": waits and runner is None,
        "owner": _owner_view(owner, daemons),
        "requests_per_s": None,
        "tokens_per_s": None,
        "eta_s": None,
    }
    if runner is not None and current is not None:
        view["daemon"] = runner["instance"]
        view["runner"] = {k: runner[k] for k in ("instance", "hostname", "pid", "status", "label")}
        view["tokens_per_s"] = current.get("tokens_per_s")
        # state.json counts move at commits (every chunk_size requests); the running
        # daemon's heartbeat says how far it has got since, about once a second. Right
        # after a commit the beat may lag state.json: the further one is the fresher.
        live_completed, live_failed = _int(current.get("completed")), _int(current.get("failed"))
        if live_completed + live_failed >= completed + failed:
            completed, failed = live_completed, live_failed
            total = _int(current.get("total")) or total
            view["progress_from"] = "heartbeat"
    finished = completed + failed
    view.update(completed=completed, failed=failed, done=finished, total=total)
    started = parse_time(state.get("started_at"))
    # A rate only while a live daemon runs it: a dead runner's job is not moving.
    if runner is not None and started and finished and now > started:
        rate = finished / (now - started)
        view["requests_per_s"] = round(rate, 2)
        view["eta_s"] = round(max(0, total - finished) / rate) if rate > 0 else None
    return view


def build_report(spool: Path, stale_after_s: float, now: float | None = None) -> Report:
    now = time.time() if now is None else now
    report = Report(spool=str(spool), now=now)
    report.daemons, unreadable_beats = _daemons(spool, stale_after_s, now)
    report.exit_code = _health(report.daemons)
    if unreadable_beats and report.exit_code == UNKNOWN:
        report.exit_code = DEGRADED  # a heartbeat file, if torn, says a daemon was here
    unlisted: list[str] = []

    def listed(where: str) -> list[os.DirEntry[str]]:
        try:
            return (waiting_files if where == INCOMING else job_dir_entries)(spool / where)
        except OSError as e:  # not a directory, no permission: said, never a traceback
            unlisted.append(
                f"{spool}/{where} cannot be listed ({e.strerror or e}): its jobs are not "
                "counted; check the spool's permissions (or run as a member of its group)"
            )
            return []

    report.problems.extend(
        f"{spool}/{HEARTBEATS}/{name} cannot be read (not a JSON object): "
        "a daemon not shown; repair or remove the file"
        for name in unreadable_beats
    )
    waiting = len(listed(INCOMING))
    if not (spool / INCOMING).is_dir():
        report.problems.append(f"{spool}/incoming does not exist: is this a spool?")
    queued = running = left = 0
    for d in sorted(listed(PROCESSING), key=lambda d: d.name):
        found = read_job(Path(d.path))
        if isinstance(found, Unreadable):
            report.unreadable.append({"id": d.name, "error": found.why})
            report.problems.append(unreadable_problem(d.name, found.why))
            continue
        if found is None or found.status not in ACTIVE:  # None: moved on meanwhile
            continue
        state = found.to_dict()
        view = _job_view(state, report.daemons, now, _read_owner(Path(d.path)), waits=True)
        report.jobs.append(view)
        left += max(0, view["total"] - view["done"])
        if state.get("status") == RUNNING:
            running += 1
        else:
            queued += 1
    report.jobs.sort(key=lambda j: (j["status"] != RUNNING, j["id"] or ""))
    failed = listed(FAILED)
    report.queue = {
        "waiting": waiting,
        "queued": queued,
        "running": running,
        "done": len(listed(DONE)),
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
    report.problems.extend(unlisted)
    if report.unreadable or unreadable_beats or unlisted:
        report.exit_code = max(report.exit_code, DEGRADED)
    return report


def find_job(spool: Path, job_id: str) -> tuple[Path, dict[str, Any] | Unreadable] | None:
    """(its directory, its state.json or why that cannot be read) of one job, or None."""
    job_dir = find_job_dir(spool, job_id)
    found = read_job(job_dir) if job_dir is not None else None
    if job_dir is None or found is None:
        return None
    return job_dir, found.to_dict() if isinstance(found, JobState) else found


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


def _daemon_line(d: dict[str, Any]) -> str:
    """One daemon: who, where, its state (and why), its beat's age and seq, its job."""
    where = f"  daemon {d['instance']} pid {d.get('pid') or '?'} on {d.get('hostname') or '?'}"
    beat = f"heartbeat {_duration(d['age_s'])} ago (seq {d['seq']})"
    if d.get("status") == "stopped":
        line = f"{where}: stopped at {d['stopped_at']}, {beat}"
        line += f": {d.get('reason') or 'no reason recorded'}"
    else:
        state = f"STALE (last {d.get('status')})" if d["stale"] else d.get("status")
        line = f"{where}: {state}"
        if d.get("reason"):
            line += f" ({d['reason']})"
        line += f", {beat}"
        if d.get("current_job") and d.get("since_progress_s") is not None:
            line += f", last progress {_duration(d['since_progress_s'])} ago"
    current = _current(d)
    if current is not None:
        done = _int(current.get("completed")) + _int(current.get("failed"))
        line += f", job {current['id']} {done}/{_int(current.get('total'))}"
        if current.get("tokens_per_s") is not None:
            line += f" at {current['tokens_per_s']} tok/s"
    problems = [p for p in d.get("problems") or [] if isinstance(p, str)]
    if problems:
        line += f", {len(problems)} problem{'s' if len(problems) > 1 else ''} (below)"
    return line


def _rate(view: dict[str, Any]) -> str:
    rate = f"{view['requests_per_s']} req/s" if view["requests_per_s"] is not None else "-"
    if view["tokens_per_s"] is not None:
        rate += f", {view['tokens_per_s']} tok/s"
    return rate


def _source(view: dict[str, Any]) -> str:
    """Where a job's counts come from: its runner's heartbeat or state.json."""
    if view["progress_from"] == "heartbeat":
        return f"{view['daemon']}'s heartbeat"
    return "state.json"


def _runs_on(view: dict[str, Any]) -> str:
    """Which daemon runs a job, or that it waits for one (and who holds it)."""
    if view["runner"] is not None:
        return f"on {view['runner']['label']}"
    if not view["waiting_for_daemon"]:
        return ""
    owner = view["owner"]
    if owner is None:
        return "waiting for a daemon"
    return (
        f"waiting for a daemon; held by {owner['instance']}@{owner['hostname']} "
        f"pid {owner['pid']} ({owner['daemon']})"
    )


def _replica_lines(engine: Any, stopped: bool) -> list[str]:
    """The ray backend's replicas, from a heartbeat's `engine` section."""
    if not isinstance(engine, dict) or not isinstance(engine.get("replicas"), list):
        return []
    replicas = [r for r in engine["replicas"] if isinstance(r, dict)]
    alive = sum(r.get("alive") is True for r in replicas)
    where = engine.get("address") or "local Ray"
    lines = [f"    ray ({where}): {alive} of {len(replicas)} replicas alive"]
    for r in replicas:
        state = "alive" if r.get("alive") else "stopped" if stopped else "dead"
        lines.append(
            f"      replica {r.get('id')} on {r.get('node') or '?'}: {state}, "
            f"{r.get('completed', 0)} completed"
        )
    return lines


def render(report: Report) -> str:
    lines = [f"spoold at {report.spool}: {HEALTH_WORDS[report.exit_code].upper()}"]
    if not report.daemons:
        lines.append("  no daemon has ever written a heartbeat here")
    for d in report.daemons:
        lines.append(_daemon_line(d))
        for g in d.get("gpu") or []:
            lines.append(
                f"    gpu {g.get('index')}: {g.get('memory_percent')}% memory, "
                f"{g.get('temperature_c')}°C{'' if g.get('healthy', True) else ' UNHEALTHY'}"
            )
        lines.extend(_replica_lines(d.get("engine"), d.get("status") == "stopped"))
    q = report.queue
    lines.append(
        f"queue: {q['waiting']} waiting, {q['queued']} queued, {q['running']} running, "
        f"{q['done']} done, {q['failed']} failed; {q['requests_left']} requests left"
    )
    for j in report.jobs:
        lines.append(
            f"  {j['id']} {j['status']:8} {_bar(j['done'], j['total'])} "
            f"{j['done']}/{j['total']}  {_rate(j)}  ETA {_duration(j['eta_s'])}  {_runs_on(j)}"
        )
    if report.recent_failures:
        lines.append("recent failures:")
        for item in report.recent_failures:
            reason = item["error"] or "no reason recorded"
            lines.append(f"  {item['id']} ({item['status']}): {reason}")
    for p in report.problems:
        lines.append(f"problem: {p}")
    return "\n".join(lines)


def _headline(where: str, state: dict[str, Any]) -> str:
    """`job ID (done/): completed`; a job done with failed requests says how many."""
    counts = state.get("request_counts") or {}
    failed, total = _int(counts.get("failed")), _int(counts.get("total"))
    said = str(state.get("status"))
    if state.get("status") == COMPLETED and failed:
        completed = _int(counts.get("completed"))
        said = f"done, {failed} failed ({completed} of {total} requests completed)"
    return f"job {state.get('id')} ({where}/): {said}"


def results(job_dir: Path) -> dict[str, str | None]:
    """The paths of a job's result files, None for one not written (yet)."""
    return {
        name.split(".")[0]: str(job_dir / name) if (job_dir / name).exists() else None
        for name in (OUTPUT, ERRORS)
    }


def render_job(where: str, state: dict[str, Any], view: dict[str, Any], job_dir: Path) -> str:
    c = state.get("request_counts") or {}
    what = f"  file: {state.get('source_name')}"
    if state.get("model"):
        what += f"   model: {state['model']}"
    lines = [
        _headline(where, state),
        what,
        f"  requests: {c.get('total')} total, {c.get('completed')} completed, "
        f"{c.get('failed')} failed (state.json)",
    ]
    # Only the times that happened: a queued job has not started.
    times = [
        f"{word} {state[key]}"
        for word, key in (
            ("created", "created_at"),
            ("started", "started_at"),
            ("finished", "finished_at"),
        )
        if state.get(key)
    ]
    if times:
        lines.append(f"  {'  '.join(times)}")
    if view["runner"] is not None or view["waiting_for_daemon"]:
        lines.append(
            f"  progress: {view['done']}/{view['total']} ({view['completed']} completed, "
            f"{view['failed']} failed, from {_source(view)}), {_rate(view)}, "
            f"ETA {_duration(view['eta_s'])}, {_runs_on(view)}"
        )
    if state.get("error"):
        lines.append(f"  error: {state['error']}")
    if (note := in_transit_note(job_dir)) is not None:
        lines.append(f"  note: {note}")
    paths = [path for path in results(job_dir).values() if path]
    lines.append(f"  results: {', '.join(paths) or 'none yet'}")
    return "\n".join(lines)


def _waiting_file(spool: Path, name: str) -> Path | None:
    """incoming/<name> if it is a file waiting to be claimed (the id `spoold jobs` gives
    it), else None."""
    if "/" in name or not is_job_name(name):
        return None
    path = spool / INCOMING / name
    try:
        return path if stat.S_ISREG(path.lstat().st_mode) else None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `spool-status --json | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(
        prog="spool-status",
        description="Is the spoold daemon alive, and how far has every job got: daemons "
        "(heartbeat age against heartbeat.stale_after_s), GPU, queue, each active job's "
        "progress, rate and ETA. With JOB_ID: one job, and the paths of its result files.",
        epilog="Exit codes (the monitoring-plugin convention): 0 healthy, 1 degraded (a "
        "problem that needs an operator), 2 down (a stale heartbeat, or the daemon "
        "stopped), 3 no daemon ever seen (or a config error). With JOB_ID the code is the "
        "spool's, and 1 when there is no such job.",
    )
    parser.add_argument(
        "--config",
        metavar="PATH",
        help="config file (default: $SPOOLD_CONFIG, else /etc/spoold/spoold.yaml; with "
        "--spool and no config file, the defaults apply)",
    )
    parser.add_argument(
        "--spool", metavar="DIR", help="the spool directory (overrides spool_dir in the config)"
    )
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("job_id", nargs="?", metavar="JOB_ID", help="show one job")
    args = parser.parse_args(argv)
    try:
        cfg = config_for(args.config, args.spool)
    except ConfigError as e:
        print(f"spool-status: config error: {e}", file=sys.stderr)
        return UNKNOWN
    report = build_report(cfg.spool_dir, cfg.heartbeat.stale_after_s)
    if args.job_id:
        found = find_job(cfg.spool_dir, args.job_id)
        if found is None:
            waiting = _waiting_file(cfg.spool_dir, args.job_id)
            if waiting is None:
                print(f"spool-status: no job {args.job_id!r} in {cfg.spool_dir}", file=sys.stderr)
                return DEGRADED
            if args.json:
                print(json.dumps({"where": INCOMING, "state": None, "path": str(waiting)}))
            else:
                print(f"{waiting}: waiting, not claimed yet (it gets a job id when it is)")
            return report.exit_code
        job_dir, state = found
        where_ = job_dir.parent.name
        if isinstance(state, Unreadable):
            problem = f"job {args.job_id} ({where_}/) cannot be read: {state.why}"
            if args.json:
                print(json.dumps({"where": where_, "state": None, "error": state.why}, indent=2))
            else:
                print(problem)
            return max(report.exit_code, DEGRADED)
        in_processing = where_ == PROCESSING
        owner = _read_owner(job_dir) if in_processing else None
        view = _job_view(state, report.daemons, report.now, owner, waits=in_processing)
        if args.json:
            shown = {"where": where_, "state": state, "progress": view, "results": results(job_dir)}
            print(json.dumps(shown, indent=2))
        else:
            print(render_job(where_, state, view, job_dir))
        return report.exit_code
    print(json.dumps(report.to_dict(), indent=2) if args.json else render(report))
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
