"""What filing a job through its owner's lease directory (docs/design.md §2 W3) costs.

Before: the terminal state.json, then one rename processing/<id> → done/<id> (and the
fsync of both directories). Now: processing/<id> → <lease>/<id>, a read of state.json
there (still the record we judged?), <lease>/<id> → done/<id>: one rename, two
directory fsyncs and one small read more. Both on real job directories made by the
real claim and acquire, interleaved rounds, medians (these machines are noisy).

    .venv/bin/python bench/bench_filing.py [--jobs 200] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spoold import fsio
from spoold.job import COMPLETED, RUNNING, load_state
from spoold.spool import Spool, classify


def _jobs(spool: Spool, n: int) -> list[Path]:
    """`n` acquired jobs with a terminal record, as a run leaves them before the move."""
    dirs = []
    for i in range(n):
        src = spool.incoming / f"j{i}.jsonl"
        src.write_bytes(b'{"custom_id": "a"}\n')
        entry = classify(src)
        assert entry is not None
        job_id = spool.claim(entry, 1, src.stat().st_size)
        assert job_id is not None
        job_dir = spool.processing / job_id
        assert spool.acquire(job_dir)
        state = load_state(job_dir)
        state.transition(RUNNING)
        state.transition(COMPLETED)
        spool.save(job_dir, state)
        dirs.append(job_dir)
    return dirs


def _round(root: Path, n: int, through_lease: bool) -> float:
    """Seconds per job to file `n` jobs, one way or the other."""
    spool = Spool(root, f"bench{int(through_lease)}")
    spool.ensure_layout()
    dirs = _jobs(spool, n)
    began = time.perf_counter()
    for job_dir in dirs:
        if through_lease:
            spool.finish(job_dir, load_state(job_dir))
        else:  # before W3's lease passage: the record, then one plain move
            state = load_state(job_dir)
            spool.save(job_dir, state)
            fsio.move(job_dir, spool.done / job_dir.name)
    elapsed = time.perf_counter() - began
    spool.lease.release()
    return elapsed / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(dir=Path.cwd()) as tmp:
        for r in range(args.rounds):
            for through_lease in (False, True) if r % 2 == 0 else (True, False):
                root = Path(tmp) / f"r{r}-{int(through_lease)}"
                times[through_lease].append(_round(root, args.jobs, through_lease))
    before, now = (statistics.median(times[k]) * 1e3 for k in (False, True))
    print(f"file one job, plain move:        {before:.2f} ms (median of {args.rounds})")
    print(f"file one job, through the lease: {now:.2f} ms (+{now - before:.2f} ms)")


if __name__ == "__main__":
    main()
