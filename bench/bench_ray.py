"""The ray backend's start-up cost and throughput: `vllm` vs `ray` with 1 and 2 replicas.

Each variant is a fresh `spoold run --drain` over the same job (the tiny test model,
tests/tinymodel.py; greedy chat, max_tokens 4..64; in-process vLLM engines, float32);
variants are interleaved, `--rounds` times, and medians reported. From spoold's log:
start-up = its "model loaded" event's load_s (the `vllm` engine, or Ray + the replicas
until all are ready); generation = "model loaded" → "job finished"; tokens from the
output's usage.

    .venv/bin/python bench/bench_ray.py [--requests 3000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

sys.path.insert(0, str(ROOT / "bench"))
from bench_vllm_chunking import make_requests  # noqa: E402

from tests.tinymodel import build, default_cache_dir  # noqa: E402

VARIANTS = {
    "vllm": {"backend": "vllm"},
    "ray, 1 replica": {
        "backend": "ray",
        "ray": {"replicas": 1, "resources_per_replica": {"CPU": 1}},
    },
    "ray, 2 replicas": {
        "backend": "ray",
        "ray": {"replicas": 2, "resources_per_replica": {"CPU": 1}},
    },
}


def run_once(
    model: Path, variant: dict[str, object], reqs: list[dict[str, object]]
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool"
        (spool / "incoming").mkdir(parents=True)
        engine = {
            "model": str(model),
            "dtype": "float32",
            "max_model_len": 512,
            "enforce_eager": True,
            "seed": 0,
            "kv_cache_memory_bytes": 64 << 20,
            **variant,
        }
        cfg = Path(tmp) / "spoold.yaml"
        cfg.write_text(yaml.safe_dump({
            "spool_dir": str(spool), "engine": engine, "logging": {"format": "json"},
            "watch": {"settle_seconds": 0.1}, "processing": {"chunk_size": 1000},
        }))  # fmt: skip
        with open(spool / "incoming" / "bench.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in reqs)
        proc = subprocess.run(
            [sys.executable, "-m", "spoold", "run", "--config", str(cfg), "--drain"],
            capture_output=True, text=True, timeout=900, cwd=ROOT,
        )  # fmt: skip
        if proc.returncode != 0:
            raise SystemExit(f"spoold failed:\n{proc.stderr[-3000:]}{proc.stdout[-3000:]}")
        events = {}
        for line in proc.stdout.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "event" in rec:
                events.setdefault(rec["event"], rec)
        ts = {k: datetime.fromisoformat(v["timestamp"].replace("Z", "+00:00")).timestamp()
              for k, v in events.items() if "timestamp" in v}  # fmt: skip
        out = next((spool / "done").iterdir()) / "output.jsonl"
        tokens = sum(
            json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
            for line in out.read_text().splitlines()
        )
        gen = ts["job finished"] - ts["model loaded"]
        return {"startup": events["model loaded"]["load_s"], "gen": gen, "tok_s": tokens / gen}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    model = build(default_cache_dir())
    reqs = make_requests(args.requests, max_tokens=64)
    results: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for round_no in range(args.rounds):
        for name, variant in VARIANTS.items():
            r = run_once(model, variant, reqs)
            results[name].append(r)
            print(f"round {round_no + 1} {name}: start-up {r['startup']:.1f} s, "
                  f"generation {r['gen']:.2f} s, {r['tok_s']:.0f} tok/s", flush=True)  # fmt: skip
    print(f"\n{platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{args.requests} requests, medians of {args.rounds}")  # fmt: skip
    print("| backend | start-up s | generation s | tok/s | runs (tok/s) |\n|---|---|---|---|---|")
    for name, rs in results.items():
        med = {k: statistics.median(r[k] for r in rs) for k in ("startup", "gen", "tok_s")}
        runs = " ".join(f"{r['tok_s']:.0f}" for r in rs)
        print(f"| {name} | {med['startup']:.1f} | {med['gen']:.2f} | {med['tok_s']:.0f} | {runs} |")


if __name__ == "__main__":
    main()
