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


def make_requests(n: int, seed: int = 0) -> list[dict[str, object]]:
    rng = random.Random(seed)
    return [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"Tell me a story about {i}."}],
                "max_tokens": rng.randint(4, 256),
                "temperature": 0,
            },
        }
        for i in range(n)
    ]


def run_llm_chat(model: Path, requests: list[dict[str, object]], chunk: int) -> dict[str, float]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model), **ENGINE_ARGS)
    convs = [r["body"]["messages"] for r in requests]  # type: ignore[index]
    params = [SamplingParams(temperature=0, max_tokens=r["body"]["max_tokens"]) for r in requests]  # type: ignore[index]
    results = {}
    for label, size in (("one LLM.chat call", len(requests)), (f"LLM.chat per {chunk}", chunk)):
        t0 = time.perf_counter()
        tokens = 0
        for start in range(0, len(convs), size):
            outs = llm.chat(
                convs[start : start + size], params[start : start + size], use_tqdm=False
            )
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        elapsed = time.perf_counter() - t0
        results[label] = (elapsed, tokens)
    return results  # type: ignore[return-value]


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--chunk", type=int, default=500)
    args = ap.parse_args()
    model = build(default_cache_dir())
    requests = make_requests(args.requests)
    print(
        f"machine: {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"python {platform.python_version()}"
    )
    import vllm

    print(
        f"vllm {vllm.__version__}; {args.requests} chat requests, max_tokens 4..256, "
        f"chunk {args.chunk}"
    )
    rows = run_llm_chat(model, requests, args.chunk)
    rows["spoold run --drain"] = run_spoold(model, requests, args.chunk)
    base = rows["one LLM.chat call"]
    base_rate = base[1] / base[0]
    print(f"{'method':28} {'seconds':>8} {'tokens':>8} {'tok/s':>8} {'vs one call':>12}")
    for label, (secs, tokens) in rows.items():
        rate = tokens / secs
        print(f"{label:28} {secs:8.1f} {tokens:8d} {rate:8.0f} {rate / base_rate:12.3f}")


if __name__ == "__main__":
    main()
