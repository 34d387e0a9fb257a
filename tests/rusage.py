"""Wall time, CPU time and peak RSS of one command, measured from a small process.

`os.wait4` on a child of the test (or benchmark) process is wrong for memory: at
exec, Linux folds the forking process's peak RSS into the child's `ru_maxrss`, so a
command started from a pytest that has grown to 120 MB reports at least 120 MB. Here
the command is started by a fresh interpreter (~10 MB), which reports its rusage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

_WRAPPER = r"""
import json, os, sys, time
out, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.posix_spawnp(cmd[0], cmd, os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
code = os.waitstatus_to_exitcode(status)
usage = {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "maxrss": ru.ru_maxrss, "code": code}
with open(out, "w") as f:
    json.dump(usage, f)
sys.exit(0)
"""


@dataclass
class Usage:
    wall: float  # seconds
    cpu: float  # user + system seconds
    maxrss_kib: int
    returncode: int


def measure(
    cmd: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    stdout: int | None = subprocess.DEVNULL,
    stderr: int | None = subprocess.DEVNULL,
) -> Usage:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "usage.json"
        subprocess.run(
            [sys.executable, "-c", _WRAPPER, str(out), *cmd],
            env=env if env is not None else dict(os.environ),
            cwd=cwd,
            stdout=stdout,
            stderr=stderr,
            check=True,
        )
        got = json.loads(out.read_text())
    return Usage(got["wall"], got["cpu"], int(got["maxrss"]), int(got["code"]))
