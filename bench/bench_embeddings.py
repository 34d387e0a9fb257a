"""Embeddings: spoold's drain vs one `LLM.embed` call over the same inputs, and what
spoold itself costs per request.

    .venv/bin/python bench/bench_embeddings.py [--requests 5000] [--rounds 3] [--tiny]

1. Throughput. The same N one-sentence `/v1/embeddings` lines (5 to 60 words), the
   real all-MiniLM-L6-v2 of config/embeddings.yaml (`--tiny`: the tests' tiny BERT),
   vLLM's in-process engine, float32. Each method runs in a fresh process, the two
   interleaved `--rounds` times; model loading is excluded from both. `LLM.embed`:
   the one call. spoold: its "job started" to "job finished" log lines (validation,
   every commit, the ledger's audit and the move to done/ included) less the model's
   load time (its "model loaded" line). Target (issue 15): spoold ≥ 0.95 of the call.
2. spoold's own cost per request: CPU seconds of a drain of N embeddings lines on the
   fake engine (zero delay, 384-dimension vectors), less an empty drain's, per request;
   the same for N chat lines beside it, for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

from bench.bench_spool import machine, timed  # noqa: E402
from tests.tinymodel import build_bert, default_bert_dir  # noqa: E402

PY = sys.executable
MINILM = ROOT / "models" / "all-MiniLM-L6-v2"
WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven",
    "knights", "ride", "to", "castle", "by", "sea", "and", "count", "numbers", "in",
    "morning", "light", "of", "paris",
]  # fmt: skip
ENGINE = {
    "dtype": "float32",
    "max_model_len": 256,
    "enforce_eager": True,
    "seed": 0,
    "kv_cache_memory_bytes": 256 << 20,  # on CPU, instead of a share of memory
}

EMBED_CALL = r"""
import json, sys, time
from vllm import LLM
model, path, engine = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
texts = [json.loads(line)["body"]["input"] for line in open(path)]
llm = LLM(model=model, runner="pooling", **engine)
t0 = time.perf_counter()
outs = llm.embed(texts, use_tqdm=False)
print(json.dumps({"seconds": time.perf_counter() - t0, "n": len(outs)}))
"""


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def write_requests(path: Path, texts: list[str]) -> None:
    with open(path, "w") as f:
        for i, text in enumerate(texts):
            line = {
                "custom_id": f"e{i}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "m", "input": text},
            }
            f.write(json.dumps(line) + "\n")


def spool_config(tmp: Path, engine: dict[str, Any]) -> Path:
    cfg = {
        "spool_dir": str(tmp / "spool"),
        "watch": {"settle_seconds": 0},
        "limits": {"max_requests_per_job": 2_000_000, "max_file_bytes": 2_000_000_000},
        "processing": {"chunk_size": 5000},
        "logging": {"format": "json"},
        "engine": engine,
    }
    (tmp / "spool" / "incoming").mkdir(parents=True, exist_ok=True)
    path = tmp / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def spoold_seconds(model: Path, requests: Path, tmp: Path) -> float:
    """The job's run in a fresh `spoold run --drain`, model load excluded."""
    cfg = spool_config(tmp, {"backend": "vllm", "model": str(model), **ENGINE})
    (tmp / "spool" / "incoming" / "job.jsonl").write_bytes(requests.read_bytes())
    proc = subprocess.run(
        [PY, "-m", "spoold", "run", "--config", str(cfg), "--drain"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        raise SystemExit(f"spoold failed:\n{proc.stderr[-3000:]}")
    events = {}
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            events.setdefault(event.get("event"), event)
    loaded = events["model loaded"]["load_s"]
    return _when(events["job finished"]) - _when(events["job started"]) - loaded


def embed_seconds(model: Path, requests: Path) -> float:
    proc = subprocess.run(
        [PY, "-c", EMBED_CALL, str(model), str(requests), json.dumps(ENGINE)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"LLM.embed failed:\n{proc.stderr[-3000:]}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])


def throughput(model: Path, n: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        requests = tmp / "requests.jsonl"
        write_requests(requests, sentences(n))
        ours, theirs = [], []
        for r in range(rounds):
            theirs.append(embed_seconds(model, requests))
            ours.append(spoold_seconds(model, requests, tmp / f"run{r}"))
        ratio = statistics.median(theirs) / statistics.median(ours)
        extra_us = (statistics.median(ours) - statistics.median(theirs)) / n * 1e6
        print(
            f"1. {n} embeddings ({model.name}), {rounds} interleaved rounds: LLM.embed "
            f"{' '.join(f'{s:.2f}' for s in theirs)} s (median "
            f"{n / statistics.median(theirs):.0f}/s), spoold "
            f"{' '.join(f'{s:.2f}' for s in ours)} s (median "
            f"{n / statistics.median(ours):.0f}/s) → spoold/LLM.embed {ratio:.3f} "
            f"(target ≥ 0.95); spoold's extra {extra_us:.0f} µs/request"
        )


def own_cost(n: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        fake = {"backend": "fake", "model": "m", "fake": {"batch_size": 256}}
        embeds = tmp / "embed.jsonl"
        write_requests(embeds, sentences(n))
        chats = tmp / "chat.jsonl"
        with open(chats, "w") as f:
            for i, text in enumerate(sentences(n)):
                body = {"model": "m", "messages": [{"role": "user", "content": text}]}
                f.write(
                    json.dumps(
                        {
                            "custom_id": f"c{i}",
                            "method": "POST",
                            "url": "/v1/chat/completions",
                            "body": body,
                        }
                    )
                    + "\n"
                )
        per: dict[str, list[float]] = {"embeddings": [], "chat": []}
        for r in range(rounds):
            empty = spool_config(tmp / f"empty{r}", fake)
            base = timed([PY, "-m", "spoold", "run", "--config", str(empty), "--drain"])[1]
            for kind, src, extra in (
                ("embeddings", embeds, {"dimensions": 384}),
                ("chat", chats, {}),
            ):
                run = tmp / f"{kind}{r}"
                cfg = spool_config(run, fake)
                text = src.read_text()
                if extra:  # 384-dimension vectors, as all-MiniLM-L6-v2's
                    text = text.replace('"input"', '"dimensions": 384, "input"')
                (run / "spool" / "incoming" / "job.jsonl").write_text(text)
                cpu = timed([PY, "-m", "spoold", "run", "--config", str(cfg), "--drain"])[1]
                per[kind].append((cpu - base) / n * 1e6)
        print(
            f"2. spoold's own CPU per request, fake engine, {n} requests, {rounds} rounds: "
            f"embeddings (384 floats a line) {statistics.median(per['embeddings']):.1f} µs "
            f"({' '.join(f'{x:.1f}' for x in per['embeddings'])}); chat "
            f"{statistics.median(per['chat']):.1f} µs ({' '.join(f'{x:.1f}' for x in per['chat'])})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny BERT, not MiniLM")
    ap.add_argument("--only", choices=("1", "2"))
    args = ap.parse_args()
    print(machine())
    model = build_bert(default_bert_dir()) if args.tiny else MINILM
    if args.only != "2":
        if not (model / "config.json").exists():
            raise SystemExit(f"{model} is missing: make {model.relative_to(ROOT)}/config.json")
        throughput(model, args.requests, args.rounds)
    if args.only != "1":
        own_cost(max(args.requests, 20000), args.rounds)


if __name__ == "__main__":
    main()
