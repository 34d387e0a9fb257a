"""What issue 12 put on the per-line path, and what it costs.

1. serialisation: `formats.output_line` with the escaping of U+2028, U+2029, U+0085,
   the C1 controls and DEL (SPEC §4, `formats._dumps`) and without it (`orjson.dumps`
   alone, as before), for an ASCII answer, a non-ASCII one (é and curly quotes: the
   scans find lead bytes and the regex runs) and one holding U+2028; timeit, median
   of interleaved repeats.
2. validation (`--against DIR`, a checkout of the commit before): the validation pass
   (`validate.scan_file` + `one_model`, what the runner and `spoold validate` run) over
   bench_spool.py's 200K-request job, this tree and DIR each in a process of its own,
   interleaved; CPU seconds, medians.

    .venv/bin/python bench/bench_lines.py [--repeats 15] [--against DIR --rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_spool import machine, write_job  # noqa: E402

from spoold import formats  # noqa: E402
from spoold.engines.base import Choice, Completion  # noqa: E402
from spoold.validate import Request  # noqa: E402

TEXT = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo " * 3
ANSWERS = {
    "ascii": TEXT,
    "non-ascii": TEXT.replace("echo", "“écho”"),
    "u2028": TEXT.replace("echo", "echo\u2028"),
}


def _unescaped(record: dict[str, object]) -> bytes:
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def serialisation(repeats: int, number: int = 20_000) -> None:
    escaped = formats._dumps
    body = {"model": "any", "messages": [{"role": "user", "content": "Tell me a story about 7."}]}
    print(f"1. formats.output_line, µs per line (median of {repeats} interleaved repeats)")
    print("| answer | before | with escaping | difference |")
    print("|---|---|---|---|")
    for name, text in ANSWERS.items():
        request = Request(7, "req-7", "/v1/chat/completions", {**body, "max_tokens": 32})
        c = Completion(request, "any", [Choice(text, "length")], 9, 32)
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(repeats):
            for label, dumps in (("before", _unescaped), ("after", escaped)):
                formats._dumps = dumps  # type: ignore[assignment]
                t = timeit.timeit(
                    "output_line('job', c, 1764000000)",
                    globals={"output_line": formats.output_line, "c": c},
                    number=number,
                )
                times[label].append(t / number * 1e6)
        formats._dumps = escaped
        before, after = statistics.median(times["before"]), statistics.median(times["after"])
        print(f"| {name} | {before:.3f} | {after:.3f} | {after - before:+.3f} µs |")


_VALIDATE = """
import sys, time
from pathlib import Path
from spoold.validate import scan_file, one_model
path, spill = sys.argv[1], Path(sys.argv[2])
with open(path, "rb") as f:
    t = time.process_time()
    n = sum(1 for _ in one_model(scan_file(f, 16 << 20, spill, 200_000), lambda m: "m"))
    print(time.process_time() - t, n)
"""


def validation(against: Path, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.jsonl"
        write_job(job, 200_000)
        cpu: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(rounds):
            for label, tree in (("before", against), ("after", ROOT)):
                env = {**os.environ, "PYTHONPATH": str(tree)}
                out = subprocess.run(
                    [sys.executable, "-c", _VALIDATE, str(job), tmp],
                    env=env,
                    cwd=tree,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
                assert out[1] == "200000", out
                cpu[label].append(float(out[0]))
    before, after = statistics.median(cpu["before"]), statistics.median(cpu["after"])
    print(f"2. validation pass of 200K requests, CPU s (median of {rounds} interleaved rounds)")
    print(f"   before {before:.3f} ({' '.join(f'{x:.2f}' for x in cpu['before'])})")
    print(f"   after  {after:.3f} ({' '.join(f'{x:.2f}' for x in cpu['after'])})")
    print(f"   ratio  {after / before:.3f}; {(after - before) / 200_000 * 1e6:+.2f} µs a request")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--against", type=Path, help="a checkout of the commit before")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    print(machine())
    serialisation(args.repeats)
    if args.against:
        validation(args.against, args.rounds)


if __name__ == "__main__":
    main()
