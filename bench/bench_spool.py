"""The spool must never be the bottleneck, and its cost must not grow with the job.

Fake engine at zero delay, so what is measured is spoold itself. Prints each figure
with its target and the machine it ran on:

1. overhead: a 200,000-request job through `spoold run --drain` vs a bare Python loop
   (read, json.loads, build the output line, write, one fsync at the end);
2. scaling: 10K vs 200K per-request time and peak RSS (and 1M once with --million);
3. resume: kill -9 at 90% of a 200K job, then time to finish vs the last 10% fresh;
4. pickup latency: rename into incoming/ → job running, inotify and polling;
5. spool-status with 10,000 finished jobs;
6. the ledger audit of a 200K job;
7. `spoold jobs` with 10,000 finished jobs.

    .venv/bin/python bench/bench_spool.py [--only overhead,scaling,resume,pickup,status,ledger,jobs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
sys.path.insert(0, str(ROOT))
from tests import rusage  # noqa: E402


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cpus, Python {platform.python_version()}"


def write_job(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            req = {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "any",
                    "messages": [{"role": "user", "content": f"Tell me a story about {i}."}],
                    "max_tokens": 32,
                },
            }
            f.write(json.dumps(req) + "\n")


def spool_config(tmp: Path, **over: Any) -> Path:
    cfg: dict[str, Any] = {
        "spool_dir": str(tmp / "spool"),
        "watch": {"settle_seconds": 0},
        "limits": {
            "max_requests_per_job": 2_000_000,
            "max_total_queued_requests": 2_000_000,
            "max_file_bytes": 2_000_000_000,
        },
        "logging": {"format": "json"},
        "engine": {"backend": "fake", "fake": {"batch_size": 256}},
    }
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    (tmp / "spool" / "incoming").mkdir(parents=True, exist_ok=True)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + sys) and peak RSS (KiB) of one process,
    measured from a small process (tests/rusage.py: our own RSS would count too)."""
    usage = rusage.measure(cmd, cwd=ROOT, stderr=None)
    if usage.returncode != 0:
        raise SystemExit(f"{cmd[:4]} exited {usage.returncode}")
    return usage.wall, usage.cpu, usage.maxrss_kib


def drain(cfg: Path) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one `spoold run --drain`."""
    wall, _, rss = timed([PY, "-m", "spoold", "run", "--config", str(cfg), "--drain"])
    return wall, rss


def bare_loop(src: Path, dst: Path) -> None:
    """The floor: read, parse, build an OpenAI batch output line, write; one fsync."""
    created = int(time.time())
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for i, raw in enumerate(fin):
            req = json.loads(raw)
            body = {
                "id": f"chatcmpl-{i}",
                "object": "chat.completion",
                "created": created,
                "model": req["body"]["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "alpha bravo charlie"},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
            }
            line = {
                "id": f"batch_req_{i}",
                "custom_id": req["custom_id"],
                "response": {"status_code": 200, "request_id": str(i), "body": body},
                "error": None,
            }
            fout.write(json.dumps(line).encode() + b"\n")
        fout.flush()
        os.fsync(fout.fileno())


def bench_overhead(n: int = 200_000, rounds: int = 5) -> None:
    """Bare loop and spoold, each a process of its own, interleaved `rounds` times: this
    VM's speed drifts. CPU time (user + sys) is shown beside wall time: it is what the
    code costs, less the time the VM's neighbours took."""
    bare: list[tuple[float, float, int]] = []
    spoold: list[tuple[float, float, int]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        src = tmp / "job.jsonl"
        write_job(src, n)
        for r in range(rounds):
            bare.append(timed([PY, __file__, "--bare-loop", str(src), str(tmp / "bare.out")]))
            run_dir = tmp / f"run{r}"
            cfg = spool_config(run_dir)
            shutil.copy(src, run_dir / "spool" / "incoming" / "job.jsonl")
            spoold.append(timed([PY, "-m", "spoold", "run", "--config", str(cfg), "--drain"]))
            shutil.rmtree(run_dir)
    for i, what in ((0, "wall"), (1, "CPU")):
        ratios = [s[i] / b[i] for s, b in zip(spoold, bare, strict=True)]
        print(
            f"1. overhead ({what}), {n} requests, {rounds} interleaved rounds, process start "
            f"included: bare loop {' '.join(f'{b[i]:.2f}' for b in bare)} s, spoold --drain "
            f"{' '.join(f'{x[i]:.2f}' for x in spoold)} s → median {statistics.median(ratios):.2f}×"
            f" (best {min(ratios):.2f}×, worst {max(ratios):.2f}×; target ≤ 1.5×)"
        )


def bench_scaling(sizes: tuple[int, ...] = (10_000, 200_000), rounds: int = 3) -> None:
    """Per-request CPU time and peak RSS by job size. Start-up (interpreter, imports,
    recovery) is the same for every size: a drain of an empty spool, timed in the same
    rounds, is taken off. CPU time (user + sys), because a 10K job is ~0.15 s of work
    and wall time on this VM swings more than that."""
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            src = tmp / "job.jsonl"
            write_job(src, n)
            per, rss, secs = [], 0, []
            for r in range(rounds if n <= 200_000 else 1):
                empty = spool_config(tmp / f"empty{r}")
                startup = timed([PY, "-m", "spoold", "run", "--config", str(empty), "--drain"])
                cfg = spool_config(tmp / f"run{r}")
                shutil.copy(src, tmp / f"run{r}" / "spool" / "incoming" / "job.jsonl")
                wall, cpu, peak = timed(
                    [PY, "-m", "spoold", "run", "--config", str(cfg), "--drain"]
                )
                shutil.rmtree(tmp / f"run{r}")
                per.append((cpu - startup[1]) / n * 1e6)
                secs.append(wall)
                rss = max(rss, peak)
        rows.append((n, statistics.median(per), rss))
        print(
            f"2. scaling: {n:>9} requests: wall {' '.join(f'{x:.2f}' for x in secs)} s; "
            f"CPU per request (start-up excluded) {' '.join(f'{x:.2f}' for x in per)} µs, "
            f"median {statistics.median(per):.2f}; peak RSS {rss / 1024:.1f} MiB"
        )
    small, big = rows[0], rows[1]
    print(
        f"   per-request ratio {big[0]}/{small[0]}: {big[1] / small[1]:.3f} (target ≤ 1.1); "
        f"RSS growth {(big[2] - small[2]) / 1024:.1f} MiB (target ≤ 20)"
    )


def bench_ledger(n: int = 200_000, rounds: int = 5) -> None:
    """What the exactly-once bookkeeping of issue 10 costs a 200K job, in-process on a
    finished job: the ledger audit run before it is filed as completed, and the
    state.json writes that record the suspects before they are fed (one per half
    chunk: n / (chunk_size / 2) of them)."""
    from spoold import ledger
    from spoold.job import load_state, save_state

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = spool_config(tmp)
        write_job(tmp / "spool" / "incoming" / "job.jsonl", n)
        drain(cfg)
        (job,) = (tmp / "spool" / "done").iterdir()
        st = load_state(job)
        audits, writes = [], []
        marks = n // 2500
        for _ in range(rounds):
            t0 = time.perf_counter()
            report = ledger.audit(job, st.id, st.input_lines, st.blank_lines)
            audits.append(time.perf_counter() - t0)
            assert report.balanced and report.total == n
            t0 = time.perf_counter()
            for _ in range(marks):
                save_state(job, st)
            writes.append(time.perf_counter() - t0)
    print(
        f"6. ledger audit of a {n}-request job: {' '.join(f'{x:.3f}' for x in audits)} s, "
        f"median {statistics.median(audits):.3f} s; {marks} suspect records (state.json "
        f"writes): {' '.join(f'{x:.3f}' for x in writes)} s, median "
        f"{statistics.median(writes):.3f} s"
    )


def bench_resume(n: int = 200_000) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = spool_config(tmp, processing={"chunk_size": 5000})
        spool = tmp / "spool"
        write_job(spool / "incoming" / "job.jsonl", n)
        proc = subprocess.Popen(
            [PY, "-m", "spoold", "run", "--config", str(cfg), "--drain"],
            stdout=subprocess.DEVNULL,
            cwd=ROOT,
        )
        target = int(n * 0.9)
        while True:
            processing = spool / "processing"
            jobs = (
                [p for p in processing.iterdir() if not p.name.startswith(".")]
                if (processing.is_dir())
                else []
            )
            if jobs:
                try:
                    done = json.loads((jobs[0] / "state.json").read_text())["request_counts"]
                    if done["completed"] >= target:
                        break
                except (OSError, ValueError, KeyError):
                    pass
            if proc.poll() is not None:
                raise SystemExit("finished before the kill; use a bigger job")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        (job,) = [p for p in (spool / "processing").iterdir() if not p.name.startswith(".")]
        left = n - json.loads((job / "state.json").read_text())["request_counts"]["completed"]
        resume_s, _ = drain(cfg)
        # The same number of requests, fresh.
        fresh_dir = Path(tempfile.mkdtemp())
        fresh_cfg = spool_config(fresh_dir, processing={"chunk_size": 5000})
        write_job(fresh_dir / "spool" / "incoming" / "job.jsonl", left)
        fresh_s, _ = drain(fresh_cfg)
        shutil.rmtree(fresh_dir)
    print(
        f"3. resume: killed at {n - left}/{n}; resume+finish {resume_s:.2f} s vs the remaining "
        f"{left} fresh {fresh_s:.2f} s → recovery adds {resume_s - fresh_s:+.2f} s (target < 1 s)"
    )


def bench_pickup(rounds: int = 5) -> None:
    for polling in (False, True):
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            settle = 0.5
            cfg = spool_config(
                tmp, watch={"settle_seconds": settle, "polling": polling, "rescan_interval_s": 30}
            )
            spool = tmp / "spool"
            proc = subprocess.Popen(
                [PY, "-m", "spoold", "run", "--config", str(cfg)],
                stdout=subprocess.DEVNULL,
                cwd=ROOT,
            )
            try:
                beat = spool / "heartbeats" / "default.json"
                while not beat.exists():
                    time.sleep(0.01)
                time.sleep(0.5)
                lat = []
                for r in range(rounds):
                    src = tmp / f".r{r}.jsonl.tmp"
                    write_job(src, 10)
                    t0 = time.perf_counter()
                    os.rename(src, spool / "incoming" / f"r{r}.jsonl")
                    while not any(
                        p.name.startswith(f"r{r}-") for p in (spool / "done").iterdir()
                    ) and not any(
                        p.name.startswith(f"r{r}-") for p in (spool / "processing").iterdir()
                    ):
                        time.sleep(0.002)
                    lat.append(time.perf_counter() - t0 - settle)
                    time.sleep(0.3)
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait()
        mode = "polling" if polling else "inotify"
        print(
            f"4. pickup ({mode}): median {statistics.median(lat):.3f} s, max {max(lat):.3f} s "
            f"after the {settle} s settle time (target ≤ 1 s)"
        )


def finished_spool(spool: Path, jobs: int = 10_000, failed: int = 50) -> None:
    """A spool holding `jobs` finished jobs in done/ and `failed` in failed/, each with a
    state.json of the size a real one has (every key JobState writes)."""
    from spoold.job import JobState, RequestCounts

    for sub in ("incoming", "processing", "done", "failed", "heartbeats"):
        (spool / sub).mkdir(parents=True)
    for i in range(jobs + failed):
        where, name = ("done", f"job{i:05d}") if i < jobs else ("failed", f"bad{i}")
        record = JobState(
            id=f"{name}-20261127T000000-abcdef",
            source_name=f"{name}.jsonl",
            status="completed" if where == "done" else "failed",
            model="fake-model",
            request_counts=RequestCounts(total=10, completed=10 - i % 3, failed=i % 3),
        )
        job = spool / where / record.id
        job.mkdir()
        (job / "state.json").write_text(json.dumps(record.to_dict(), indent=2))


def median_ms(cmd: list[str], rounds: int = 7) -> tuple[float, float]:
    """Median and best wall time of a command, in ms."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, min(times) * 1000


def bench_status(jobs: int = 10_000) -> None:
    with tempfile.TemporaryDirectory() as d:
        spool = Path(d) / "spool"
        finished_spool(spool, jobs)
        median, best = median_ms([str(Path(PY).parent / "spool-status"), "--spool", str(spool)])
    print(
        f"5. spool-status with {jobs} finished jobs: median {median:.0f} ms wall, "
        f"best {best:.0f} ms (target ≤ 150 ms)"
    )


def bench_jobs(jobs: int = 10_000) -> None:
    """`spoold jobs` reads every job's state.json (and nothing else): all of them, one
    state's, and an empty spool (the interpreter and imports)."""
    exe = str(Path(PY).parent / "spoold")
    with tempfile.TemporaryDirectory() as d:
        spool = Path(d) / "spool"
        finished_spool(spool, jobs)
        (Path(d) / "empty").mkdir()
        figures = [
            (what, *median_ms([exe, "jobs", "--spool", str(where), *extra]))
            for what, where, extra in (
                ("all, table", spool, []),
                ("all, --json", spool, ["--json"]),
                ("--state failed", spool, ["--state", "failed"]),
                ("empty spool", Path(d) / "empty", []),
            )
        ]
    shown = "; ".join(f"{what} median {m:.0f} ms (best {b:.0f})" for what, m, b in figures)
    print(f"7. spoold jobs with {jobs} finished jobs: {shown} (target ≤ 1 s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--only", default="overhead,scaling,resume,pickup,status,ledger,jobs")
    ap.add_argument("--million", action="store_true", help="also run 1M requests (scaling)")
    ap.add_argument("--bare-loop", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_loop:
        bare_loop(Path(args.bare_loop[0]), Path(args.bare_loop[1]))
        return
    print(machine())
    only = set(args.only.split(","))
    if "overhead" in only:
        bench_overhead()
    if "scaling" in only:
        bench_scaling((10_000, 200_000, 1_000_000) if args.million else (10_000, 200_000))
    if "resume" in only:
        bench_resume()
    if "pickup" in only:
        bench_pickup()
    if "status" in only:
        bench_status()
    if "ledger" in only:
        bench_ledger()
    if "jobs" in only:
        bench_jobs()


if __name__ == "__main__":
    main()
