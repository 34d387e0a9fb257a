"""Faults for one real daemon among several, set by its environment: fsyncs that hang,
renames and unlinks that succeed but report failure (tests/faultshim.c, LD_PRELOAD),
and a wall clock that is off (the shim's clock offset, or libfaketime).

What CPython 3.11 calls (strace and libpython's imports agree): os.rename and os.replace
call rename(3), or renameat with dir_fd; os.unlink/os.remove call unlink, or unlinkat with
dir_fd; os.rmdir calls rmdir, or unlinkat(AT_REMOVEDIR) with dir_fd; os.fsync and
os.fdatasync call fsync and fdatasync. Never renameat2 nor a `__` alias; the shim wraps
them all.

libfaketime (Debian bookworm's 0.9.10) under CPython 3.11, as tests/test_faultshim.py
pins down:
- `FAKETIME="-300"` / `"+5m"` / `"-300.5"` is a constant offset and the clock keeps
  ticking; a leading "@" starts the clock at an absolute date (ticking), an absolute date
  without "@" freezes it. FAKETIME_NO_CACHE matters only for a faketimerc file, not here.
- By default it fakes CLOCK_MONOTONIC too: time.monotonic() then reads about the faked
  wall time (1.8e9, still advancing at the right rate), and every lock, Event, Condition
  or Queue timeout hangs for ever, since CPython waits with sem_clockwait on
  CLOCK_MONOTONIC, which libfaketime does not wrap: an absolute deadline in 2027 against
  a real monotonic clock of hours.
- With FAKETIME_DONT_FAKE_MONOTONIC=1 (what `faketime_env` sets) time.monotonic() is the
  real one and those timeouts work, but time.sleep() raises OSError(EINVAL): libfaketime
  shifts the absolute CLOCK_MONOTONIC deadline of clock_nanosleep by the wall offset. So
  do subprocess waits with a timeout. Threads are fine either way (.so.1 or MT).
- File times (st_mtime) are the kernel's, not shifted: as on a host whose clock is off.
So a daemon whose wall clock is minutes off but whose time runs on normally needs the
shim's FAULTSHIM_CLOCK_OFFSET_S (`shim_env(so, clock_offset_s=-300)`): it shifts
CLOCK_REALTIME alone (time.time(), datetime.now()); monotonic time and every sleep stay
true. `faketime_env` is for a process that never calls time.sleep.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

SOURCE = Path(__file__).with_name("faultshim.c")

# shim_env's knobs, each FAULTSHIM_<NAME> in faultshim.c.
KNOBS = frozenset(
    {
        "stall_file",
        "stall_max_s",
        "lie_rename",
        "lie_unlink",
        "lie_every",
        "lie_errno",
        "clock_offset_s",
        "log",
    }
)


def build_faultshim(directory: Path) -> Path:
    """Compile faultshim.c into `directory` (reused while newer than the source)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc): the fault-shim tests need one (`make faults`)")
    so = directory / "faultshim.so"
    if so.exists() and so.stat().st_mtime >= SOURCE.stat().st_mtime:
        return so
    cmd = [cc, "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(so), str(SOURCE)]
    subprocess.run([*cmd, "-ldl", "-lpthread"], check=True, capture_output=True, text=True)
    return so


def _preload(lib: Path, base: dict[str, str]) -> dict[str, str]:
    """A copy of `base` with `lib` first in LD_PRELOAD, keeping what was there."""
    env = dict(base)
    env["LD_PRELOAD"] = ":".join(p for p in (str(lib), env.get("LD_PRELOAD", "")) if p)
    return env


def shim_env(so: Path, base: dict[str, str] | None = None, **knobs: object) -> dict[str, str]:
    """os.environ (or `base`) with the shim preloaded and FAULTSHIM_<KNOB> set, e.g.
    `shim_env(so, stall_file=trigger, log=tmp / "faults.log")`."""
    unknown = set(knobs) - KNOBS
    if unknown:
        raise TypeError(f"unknown faultshim knobs {sorted(unknown)}; known: {sorted(KNOBS)}")
    env = _preload(so, dict(os.environ) if base is None else base)
    env.update({f"FAULTSHIM_{k.upper()}": str(v) for k, v in knobs.items()})
    return env


def find_libfaketime() -> Path | None:
    """Debian's libfaketime.so.1 (multiarch path, else what dpkg says it installed)."""
    hits = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    hits += glob.glob("/usr/lib/faketime/libfaketime.so.1")
    if not hits and shutil.which("dpkg"):
        listed = subprocess.run(["dpkg", "-L", "libfaketime"], capture_output=True, text=True)
        hits = [p for p in listed.stdout.split() if p.endswith("/libfaketime.so.1")]
    return Path(hits[0]) if hits else None


def faketime_env(offset_s: float, base: dict[str, str] | None = None) -> dict[str, str]:
    """os.environ (or `base`) under libfaketime: the wall clock `offset_s` off and ticking,
    monotonic time real; time.sleep breaks (module docstring). Skips without libfaketime."""
    lib = find_libfaketime()
    if lib is None:
        pytest.skip("libfaketime missing (Debian's libfaketime; `make faults` installs it)")
    env = _preload(lib, dict(os.environ) if base is None else base)
    env["FAKETIME"] = f"{offset_s:+.6f}"
    env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
    return env


@pytest.fixture(scope="session")
def faultshim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shim, built once per session; skips the test where there is no C compiler."""
    return build_faultshim(tmp_path_factory.mktemp("faultshim"))


@pytest.fixture
def faketime() -> Callable[..., dict[str, str]]:
    """`faketime_env`, for a test that skips where libfaketime is missing."""
    if find_libfaketime() is None:
        pytest.skip("libfaketime missing (Debian's libfaketime; `make faults` installs it)")
    return faketime_env
