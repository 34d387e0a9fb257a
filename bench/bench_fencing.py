"""What fencing (docs/design.md §2) costs per commit.

A commit's bookkeeping before fencing: read owner.json (still ours?), replace
state.json with a temp file in the job directory. With fencing: the same read (a
token compared), the lease's freshness (a clock read), and state.json written in the
lease directory under heartbeats/ and renamed across directories into the job.
Both on a real `state.json` of a 200K-request job's size, interleaved rounds,
medians (these machines are noisy: ±20%).

    .venv/bin/python bench/bench_fencing.py [--commits 2000] [--rounds 7]
    .venv/bin/python bench/bench_fencing.py --against DIR   # + 200K drains, DIR vs this tree

`--against DIR` (a checkout of the commit before fencing: `git worktree add DIR
0bc20d3`) also runs a 200,000-request job through `spoold run --drain` (fake engine
at zero delay, bench_spool.py's job and config) with each tree in turn, interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoold import fsio  # noqa: E402
from spoold.job import OWNER, Checkpoint, JobState, save_state  # noqa: E402
from spoold.spool import Spool  # noqa: E402

# Commits of a 200K-request job at the default chunk_size (5,000): 40 chunk commits
# and 80 records before half chunks are fed (design §5a), the same write each.
WRITES_PER_200K_JOB = 40 + 80


def _state() -> JobState:
    state = JobState(id="bench-20261201T000000-abcdef", source_name="bench.jsonl")
    state.request_counts.total = 200_000
    state.checkpoint = Checkpoint(validated=True, next_line=100_001, done_lines=list(range(50)))
    return state


def _unfenced(job: Path, state: JobState, n: int) -> float:
    """Seconds per commit, as before fencing: owner.json read, state.json in place."""
    me = {"instance": "bench", "pid": os.getpid()}
    start = time.perf_counter()
    for _ in range(n):
        owner = fsio.read_json(job / OWNER)
        assert owner.get("instance") == me["instance"] and owner.get("pid") == me["pid"]
        save_state(job, state)
    return (time.perf_counter() - start) / n


def _fenced(spool: Spool, job: Path, state: JobState, n: int) -> float:
    """Seconds per commit with fencing: token check, freshness, via the lease dir."""
    start = time.perf_counter()
    for _ in range(n):
        assert spool.still_owner(job)
        assert spool.lease.fresh()
        spool.save(job, state)
    return (time.perf_counter() - start) / n


def _drain(tree: Path, spool_cfg: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one `spoold run --drain` with the code of `tree`."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "spoold", "run", "--config", str(spool_cfg), "--drain"],
        cwd=tree,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"spoold from {tree} failed")
    return wall, usage.ru_utime + usage.ru_stime


def drains(against: Path, n: int, rounds: int) -> None:
    """A 200K-request job, drained by the code of `against` and of this tree in turn."""
    sys.path.insert(0, str(ROOT / "bench"))
    from bench_spool import spool_config, write_job

    times: dict[str, list[tuple[float, float]]] = {"before": [], "fenced": []}
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        src = Path(tmp) / "job.jsonl"
        write_job(src, n)
        for r in range(rounds):
            order = [("before", against), ("fenced", ROOT)]
            for tag, tree in order if r % 2 == 0 else order[::-1]:
                where = Path(tmp) / f"{tag}{r}"
                cfg = spool_config(where)
                shutil.copy(src, where / "spool" / "incoming" / "job.jsonl")
                times[tag].append(_drain(tree, cfg))
                shutil.rmtree(where)
    for tag, runs in times.items():
        walls, cpus = [w for w, _ in runs], [c for _, c in runs]
        print(f"{n} requests, {tag}: wall {' '.join(f'{w:.2f}' for w in walls)} s "
              f"(median {statistics.median(walls):.2f}), CPU median "
              f"{statistics.median(cpus):.2f} s")  # fmt: skip
    b = statistics.median(w for w, _ in times["before"])
    a = statistics.median(w for w, _ in times["fenced"])
    print(f"fenced / before: {a / b:.3f} (wall medians)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--commits", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--against", type=Path, help="a checkout of the code before fencing")
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--drain-rounds", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT) as tmp:
        spool = Spool(Path(tmp) / "spool", "bench")
        spool.ensure_layout()
        plain = spool.processing / "plain"
        fenced = spool.processing / "fenced"
        for job in (plain, fenced):
            job.mkdir()
        state = _state()
        save_state(fenced, state)
        assert spool.acquire(fenced)
        (plain / OWNER).write_text(json.dumps({"instance": "bench", "pid": os.getpid()}))
        before, after = [], []
        for _ in range(args.rounds):  # interleaved: a slow spell hits both alike
            before.append(_unfenced(plain, state, args.commits))
            after.append(_fenced(spool, fenced, state, args.commits))
    b, a = statistics.median(before), statistics.median(after)
    print(f"state.json: {len(json.dumps(state.to_dict(), indent=2))} bytes")
    print(f"per commit, before fencing: median {b * 1e6:.0f} µs "
          f"({min(before) * 1e6:.0f}–{max(before) * 1e6:.0f})")  # fmt: skip
    print(f"per commit, fenced:         median {a * 1e6:.0f} µs "
          f"({min(after) * 1e6:.0f}–{max(after) * 1e6:.0f})")  # fmt: skip
    print(f"difference: {(a - b) * 1e6:+.0f} µs per commit, {(a / b - 1) * 100:+.1f}%; "
          f"{(a - b) * WRITES_PER_200K_JOB * 1e3:+.1f} ms per 200K-request job "
          f"({WRITES_PER_200K_JOB} writes)")  # fmt: skip
    if args.against is not None:
        drains(args.against.resolve(), args.requests, args.drain_rounds)


if __name__ == "__main__":
    main()
