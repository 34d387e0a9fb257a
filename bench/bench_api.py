"""`spoold serve` on a spool of 10,000 finished jobs: `batches.retrieve` and
`batches.list` (newest 20) per second through a real server on loopback, and the
server's peak RSS across a 150 MB upload.

    .venv/bin/python bench/bench_api.py [--jobs 10000] [--rounds 5]

Each round times 200 retrieves (of random jobs) and 50 lists, interleaved, over one
keep-alive connection (httpx, as the openai client uses); medians over the rounds.
Targets (issue 14): the newest 20 listed in under 50 ms; the upload's RSS flat.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_spool import PY, finished_spool, machine


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as d:
        spool = Path(d) / "spool"
        finished_spool(spool, args.jobs)
        ids = sorted(p.name for p in (spool / "done").iterdir())
        port = _port()
        config = Path(d) / "spoold.yaml"
        config.write_text(
            yaml.safe_dump(
                {"spool_dir": str(spool), "api": {"port": port}, "logging": {"format": "json"}}
            )
        )
        server = subprocess.Popen(
            [PY, "-m", "spoold", "serve", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}/v1"
        try:
            with httpx.Client(timeout=60) as http:
                for _ in range(300):
                    try:
                        http.get(f"http://127.0.0.1:{port}/health")
                        break
                    except httpx.HTTPError:
                        time.sleep(0.1)
                t0 = time.perf_counter()
                first = http.get(f"{base}/batches", params={"limit": 20}).json()
                cold = (time.perf_counter() - t0) * 1000
                assert len(first["data"]) == 20 and first["has_more"], first
                retrieve_ms, list_ms = [], []
                rng = random.Random(7)
                for _ in range(args.rounds):
                    t0 = time.perf_counter()
                    for _ in range(200):
                        batch_id = rng.choice(ids)
                        got = http.get(f"{base}/batches/{batch_id}")
                        assert got.status_code == 200 and got.json()["status"] == "completed"
                    retrieve_ms.append((time.perf_counter() - t0) * 1000 / 200)
                    t0 = time.perf_counter()
                    for _ in range(50):
                        page = http.get(f"{base}/batches", params={"limit": 20}).json()
                        assert len(page["data"]) == 20
                    list_ms.append((time.perf_counter() - t0) * 1000 / 50)
                r, li = statistics.median(retrieve_ms), statistics.median(list_ms)
                print(
                    f"batches.retrieve: median {r:.2f} ms ({1000 / r:.0f}/s), "
                    f"rounds {', '.join(f'{x:.2f}' for x in retrieve_ms)}"
                )
                print(
                    f"batches.list newest 20 of {args.jobs + 50}: median {li:.1f} ms "
                    f"({1000 / li:.0f}/s; target < 50 ms), first (cold cache) {cold:.0f} ms, "
                    f"rounds {', '.join(f'{x:.1f}' for x in list_ms)}"
                )
                line = json.dumps({"custom_id": "x", "body": {"p": "y" * 900}}).encode() + b"\n"
                big = Path(d) / "big.jsonl"
                with open(big, "wb") as f:
                    for _ in range(150 * 1024 * 1024 // len(line)):
                        f.write(line)
                http.post(f"{base}/files", data={"purpose": "batch"}, files={"file": b"{}\n"})
                before = _hwm_mib(server.pid)
                t0 = time.perf_counter()
                with open(big, "rb") as f:
                    up = http.post(f"{base}/files", data={"purpose": "batch"}, files={"file": f})
                took = time.perf_counter() - t0
                assert up.status_code == 200, up.text
                print(
                    f"150 MB upload: {took:.1f} s ({150 / took:.0f} MB/s), server peak RSS "
                    f"{before:.0f} → {_hwm_mib(server.pid):.0f} MiB"
                )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
