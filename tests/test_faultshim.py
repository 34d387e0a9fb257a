"""tests/faultshim.c and libfaketime, for real: a child Python under LD_PRELOAD, so the
fault tests built on them can trust that a fault they ask for is the one injected."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.faultshim import shim_env

# The child's outcome of one call: "ok", or the errno name it raised.
OUTCOME = """
import errno, json, os, sys, time
def outcome(fn, *args, **kw):
    try:
        fn(*args, **kw)
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
"""


def child(env: dict[str, str], code: str, cwd: Path, timeout: float = 10) -> Any:
    """Run `code` in a child Python with `env`; what it prints (JSON) on its last line."""
    proc = subprocess.run(
        [sys.executable, "-c", OUTCOME + textwrap.dedent(code)],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


# -- lying renames and unlinks -----------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        "os.rename('job.tmp', 'job')",
        "os.replace('job.tmp', 'job')",
        "os.rename('job.tmp', 'job', src_dir_fd=fd, dst_dir_fd=fd)",  # renameat
    ],
)
def test_a_lying_rename_moved_the_file_yet_raises(
    faultshim: Path, tmp_path: Path, call: str
) -> None:
    """The rename happened; Python is told FileNotFoundError, as after a retransmitted
    NFS RENAME. A path without the substring is left alone."""
    log = tmp_path / "faults.log"
    env = shim_env(faultshim, lie_rename="job", log=log)
    (tmp_path / "job.tmp").write_text("x")
    (tmp_path / "other.tmp").write_text("y")
    got = child(
        env,
        f"""
        fd = os.open(".", os.O_RDONLY)
        lied = outcome(lambda: {call})
        print(json.dumps([lied, outcome(os.rename, "other.tmp", "other")]))
        """,
        tmp_path,
    )
    assert got == ["ENOENT", "ok"]
    assert (tmp_path / "job").read_text() == "x"
    assert not (tmp_path / "job.tmp").exists()
    assert (tmp_path / "other").exists()
    assert log_lines(log) == ["lie rename job.tmp -> job"]


def test_every_second_matching_rename_lies_and_a_failed_one_is_not_counted(
    faultshim: Path, tmp_path: Path
) -> None:
    """EVERY=2 counts successful matching calls only; a real failure stays as it was."""
    env = shim_env(faultshim, lie_rename="f", lie_every=2, lie_errno=5)
    got = child(
        env,
        """
        out = []
        for i in range(4):
            open(f"f{i}", "w").close()
            out.append(outcome(os.rename, f"f{i}", f"g{i}"))
            if i == 1:
                out.append(outcome(os.rename, "f-missing", "g-missing"))
        print(json.dumps(out))
        """,
        tmp_path,
    )
    assert got == ["ok", "EIO", "ENOENT", "ok", "EIO"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g0", "g1", "g2", "g3"]


@pytest.mark.parametrize(
    "call", ["os.unlink('doomed')", "os.remove('doomed')", "os.unlink('doomed', dir_fd=fd)"]
)
def test_a_lying_unlink_removed_the_file_yet_raises(
    faultshim: Path, tmp_path: Path, call: str
) -> None:
    log = tmp_path / "faults.log"
    (tmp_path / "doomed").write_text("x")
    got = child(
        shim_env(faultshim, lie_unlink="doomed", log=log),
        f"fd = os.open('.', os.O_RDONLY)\nprint(json.dumps(outcome(lambda: {call})))",
        tmp_path,
    )
    assert got == "ENOENT"
    assert not (tmp_path / "doomed").exists()
    assert log_lines(log) == ["lie unlink doomed"]


@pytest.mark.parametrize("call", ["os.rmdir('gone')", "os.rmdir('gone', dir_fd=fd)"])
def test_a_lying_rmdir_removed_the_directory_yet_raises(
    faultshim: Path, tmp_path: Path, call: str
) -> None:
    """rmdir shares the unlink knobs (and, with dir_fd, CPython's unlinkat)."""
    (tmp_path / "gone").mkdir()
    got = child(
        shim_env(faultshim, lie_unlink="gone"),
        f"fd = os.open('.', os.O_RDONLY)\nprint(json.dumps(outcome(lambda: {call})))",
        tmp_path,
    )
    assert got == "ENOENT"
    assert not (tmp_path / "gone").exists()


# -- stalled fsync -----------------------------------------------------------------------

STALLED = """
import threading
def sync(fn):
    fd = os.open(fn.__name__, os.O_WRONLY | os.O_CREAT)
    t0 = time.monotonic()
    fn(fd)
    took[fn.__name__] = time.monotonic() - t0
took = {}
threads = [threading.Thread(target=sync, args=(f,)) for f in (os.fsync, os.fdatasync)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(took))
"""


def test_fsync_blocks_in_every_thread_while_the_trigger_exists(
    faultshim: Path, tmp_path: Path
) -> None:
    """fsync and fdatasync from two threads hang until the test removes the trigger,
    then both return at once: a hard NFS mount whose server came back."""
    trigger, log = tmp_path / "stall", tmp_path / "faults.log"
    trigger.touch()
    env = shim_env(faultshim, stall_file=trigger, log=log)
    proc = subprocess.Popen(
        [sys.executable, "-c", OUTCOME + STALLED],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 5
        while len(log_lines(log)) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(line.split()[1] for line in log_lines(log)) == ["fdatasync", "fsync"]
        time.sleep(0.5)
        assert proc.poll() is None, "fsync returned while the trigger existed"
        trigger.unlink()
        removed = time.monotonic()
        out, _ = proc.communicate(timeout=5)
        assert time.monotonic() - removed < 1.0
    finally:
        proc.kill()
        proc.wait()
    took = json.loads(out)
    assert set(took) == {"fsync", "fdatasync"}
    assert all(s >= 0.5 for s in took.values()), took
    assert all(
        line.startswith(("stall fsync fd=", "stall fdatasync fd=")) for line in log_lines(log)
    )


def test_a_stall_ends_after_its_bound(faultshim: Path, tmp_path: Path) -> None:
    """FAULTSHIM_STALL_MAX_S bounds a block even while the trigger stays."""
    trigger = tmp_path / "stall"
    trigger.touch()
    took = child(shim_env(faultshim, stall_file=trigger, stall_max_s=0.3), STALLED, tmp_path)
    assert all(0.3 <= s < 2.0 for s in took.values()), took


def test_no_knobs_no_faults(faultshim: Path, tmp_path: Path) -> None:
    """Preloaded with nothing set, every wrapped call is the real one."""
    got = child(
        shim_env(faultshim),
        """
        open("a", "w").close(); os.mkdir("d")
        fd = os.open("a", os.O_WRONLY)
        out = [outcome(os.fsync, fd), outcome(os.rename, "a", "b"), outcome(os.unlink, "b"),
               outcome(os.rmdir, "d"), outcome(os.unlink, "b")]
        print(json.dumps(out))
        """,
        tmp_path,
    )
    assert got == ["ok", "ok", "ok", "ok", "ENOENT"]


def test_unknown_knob_is_refused(faultshim: Path) -> None:
    with pytest.raises(TypeError, match="lie_renames"):
        shim_env(faultshim, lie_renames="x")


# -- skewed wall clocks ------------------------------------------------------------------

CLOCKS = """
import datetime, threading
w0, m0 = time.time(), time.monotonic()
waited = threading.Event().wait(0.2)
slept = outcome(time.sleep, 0.05)
now = datetime.datetime.now(datetime.timezone.utc).timestamp()
print(json.dumps({"wall": w0, "mono": m0, "wall_adv": time.time() - w0,
                  "mono_adv": time.monotonic() - m0, "now": now, "slept": slept}))
"""


def _clocks(env: dict[str, str], cwd: Path) -> tuple[dict[str, Any], float, float]:
    """The child's clocks, and the parent's wall and monotonic time taken alongside."""
    wall, mono = time.time(), time.monotonic()
    return child(env, CLOCKS, cwd), wall, mono


def test_the_shim_offsets_the_wall_clock_alone(faultshim: Path, tmp_path: Path) -> None:
    """clock_offset_s: time.time() and datetime.now() 300 s behind and ticking;
    time.monotonic(), Event timeouts and time.sleep untouched."""
    got, wall, mono = _clocks(shim_env(faultshim, clock_offset_s=-300), tmp_path)
    assert got["wall"] - wall == pytest.approx(-300, abs=2)
    assert got["now"] - wall == pytest.approx(-300, abs=2)
    assert got["mono"] - mono == pytest.approx(0, abs=2)
    assert got["wall_adv"] == pytest.approx(got["mono_adv"], abs=0.05)
    assert got["mono_adv"] >= 0.25
    assert got["slept"] == "ok"


def test_libfaketime_offsets_the_wall_clock_not_monotonic_and_breaks_sleep(
    faketime: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """faketime_env: the wall clock 300 s ahead and ticking, monotonic real so Event
    timeouts work; time.sleep raises EINVAL (libfaketime 0.9.10's clock_nanosleep)."""
    got, wall, mono = _clocks(faketime(300), tmp_path)
    assert got["wall"] - wall == pytest.approx(300, abs=2)
    assert got["now"] - wall == pytest.approx(300, abs=2)
    assert got["mono"] - mono == pytest.approx(0, abs=2)
    assert got["wall_adv"] == pytest.approx(got["mono_adv"], abs=0.05)
    assert got["mono_adv"] >= 0.2
    assert got["slept"] == "EINVAL"


def test_libfaketime_faking_monotonic_too_hangs_lock_timeouts(
    faketime: Callable[..., dict[str, str]], tmp_path: Path
) -> None:
    """Without FAKETIME_DONT_FAKE_MONOTONIC, time.monotonic() reads about the faked wall
    time and a 0.1 s Event timeout never fires (sem_clockwait is not wrapped)."""
    env = faketime(-300)
    del env["FAKETIME_DONT_FAKE_MONOTONIC"]
    code = "print(json.dumps(time.monotonic() - time.time()), flush=True)\n"
    code += "import threading; threading.Event().wait(0.1); print('woke')"
    proc = subprocess.Popen(
        [sys.executable, "-c", OUTCOME + code], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert abs(json.loads(proc.stdout.readline())) < 60
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=1.0)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
