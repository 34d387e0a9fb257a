"""spoold's continuous feeding vs one LLM.chat call vs LLM.chat per chunk (the seed's design).

Same requests, same tiny model (tests/tinymodel.py), in-process vLLM engine, float32,
temperature 0, max_tokens drawn from 4..256 so a chunk's tail is real. Times cover
generation only (engine start excluded): for spoold, from its "job started" to its
"job finished" log lines. Prints tokens/s for each and spoold's ratio to the one-shot call.

    .venv/bin/python bench/bench_vllm_chunking.py [--requests 2000] [--chunk 500]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from tests.tinymodel import build, default_cache_dir  # noqa: E402

ENGINE_ARGS = {
    "dtype": "float32",
    "max_model_len": 512,
    "enforce_eager": True,
    "seed": 0,
    "kv_cache_memory_bytes": 64 << 20,
}


def make_requests(n: int, seed: int = 0, max_tokens: int = 256) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"Tell me a story about {i}."}],
                "max_tokens": rng.randint(4, max_tokens),
                "temperature": 0,
            },
        }
        for i in range(n)
    ]


def run_llm_chat(model: Path, requests: list[dict[str, object]], chunk: int) -> tuple[float, int]:
    """LLM.chat over `chunk` requests at a time (all of them: one call). Generation only."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), **ENGINE_ARGS)
    convs = [r["body"]["messages"] for r in requests]  # type: ignore[index]
    params = [SamplingParams(temperature=0, max_tokens=r["body"]["max_tokens"]) for r in requests]  # type: ignore[index]
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(convs), chunk):
        outs = llm.chat(convs[start : start + chunk], params[start : start + chunk], use_tqdm=False)
        tokens += sum(len(o.outputs[0].token_ids) for o in outs)
    return time.perf_counter() - t0, tokens


def run_spoold(model: Path, requests: list[dict[str, object]], chunk: int) -> tuple[float, int]:
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        spool = Path(tmp) / "spool"
        (spool / "incoming").mkdir(parents=True)
        cfg = {
            "spool_dir": str(spool),
            "watch": {"settle_seconds": 0},
            "processing": {"chunk_size": chunk},
            "logging": {"format": "json"},
            "engine": {
                "backend": "vllm",
                "model": str(model),
                "dtype": ENGINE_ARGS["dtype"],
                "max_model_len": ENGINE_ARGS["max_model_len"],
                "extra_args": {
                    k: ENGINE_ARGS[k] for k in ("enforce_eager", "seed", "kv_cache_memory_bytes")
                },
            },
        }
        (Path(tmp) / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        with open(spool / "incoming" / "bench.jsonl", "w") as f:
            for r in requests:
                f.write(json.dumps(r) + "\n")
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "spoold",
                "run",
                "--config",
                str(Path(tmp) / "cfg.yaml"),
                "--drain",
            ],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        stamps = {}
        for line in proc.stdout.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") in ("job started", "job finished"):
                stamps[rec["event"]] = datetime.fromisoformat(
                    rec["timestamp"].replace("Z", "+00:00")
                )
        elapsed = (stamps["job finished"] - stamps["job started"]).total_seconds()
        (job,) = (spool / "done").iterdir()
        tokens = 0
        with open(job / "output.jsonl") as f:
            for line in f:
                tokens += json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
        return elapsed, tokens


def measure(method: str, n: int, chunk: int) -> tuple[float, int]:
    """Run one method in a fresh process (same engine set-up for all), return (s, tokens)."""
    proc = subprocess.run(
        [sys.executable, __file__, "--method", method, "--requests", str(n), "--chunk", str(chunk)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result["seconds"], result["tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3, help="each method this often, interleaved")
    ap.add_argument("--method", choices=["one-call", "per-chunk", "spoold"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = build(default_cache_dir())
    requests = make_requests(args.requests)
    if args.method:  # a child run: one measurement, printed as JSON
        if args.method == "spoold":
            secs, tokens = run_spoold(model, requests, args.chunk)
        else:
            size = len(requests) if args.method == "one-call" else args.chunk
            secs, tokens = run_llm_chat(model, requests, size)
        print(json.dumps({"seconds": secs, "tokens": tokens}))
        return
    import vllm

    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"python {platform.python_version()}, vllm {vllm.__version__}"
    )
    print(
        f"{args.requests} chat requests, temperature 0, max_tokens 4..256, chunk {args.chunk}; "
        f"each method in its own process, {args.rounds} rounds interleaved"
    )
    labels = {
        "one-call": "one LLM.chat call",
        "per-chunk": f"LLM.chat per {args.chunk}",
        "spoold": "spoold run --drain",
    }
    runs: dict[str, list[tuple[float, int]]] = {m: [] for m in labels}
    for _ in range(args.rounds):
        for method in labels:
            runs[method].append(measure(method, args.requests, args.chunk))
    # This VM's wall times swing by ±20% between identical runs: compare medians, show all.
    medians = {m: statistics.median(r[0] for r in rs) for m, rs in runs.items()}
    tokens = {m: rs[0][1] for m, rs in runs.items()}
    base_rate = tokens["one-call"] / medians["one-call"]
    print(f"{'method':24} {'median s':>9} {'tokens':>7} {'tok/s':>7} {'vs one call':>11}  runs (s)")
    for method, label in labels.items():
        rate = tokens[method] / medians[method]
        each = " ".join(f"{r[0]:.1f}" for r in runs[method])
        print(
            f"{label:24} {medians[method]:9.1f} {tokens[method]:7d} {rate:7.0f} "
            f"{rate / base_rate:11.3f}  {each}"
        )


if __name__ == "__main__":
    main()
