"""The systemd files, checked by the real tools: systemd-analyze (verify, and the security
score), and systemd-sysusers / systemd-tmpfiles applied into a temporary root (SPEC §8)."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SERVICES = ("spoold.service", "spoold@.service")
API_SERVICE = "spoold-api.service"  # `spoold serve` (SPEC §10)
analyze = shutil.which("systemd-analyze")
sysusers = shutil.which("systemd-sysusers")
tmpfiles = shutil.which("systemd-tmpfiles")
MISSING = "not installed (`make systemd-analyze` installs Debian's systemd package)"
needs_analyze = pytest.mark.skipif(analyze is None, reason=f"systemd-analyze is {MISSING}")
if sysusers is None or tmpfiles is None:
    APPLY_SKIP = f"systemd-sysusers or systemd-tmpfiles is {MISSING}"
elif os.geteuid() != 0:
    APPLY_SKIP = "systemd-tmpfiles --create gives the spool to its owners: needs root"
else:
    APPLY_SKIP = ""
needs_apply = pytest.mark.skipif(bool(APPLY_SKIP), reason=APPLY_SKIP)


def _installed(tmp_path: Path) -> list[Path]:
    """The units as installed, pointing ExecStart at this venv's spoold."""
    spoold = Path(sys.executable).parent / "spoold"
    out = []
    for name in (*SERVICES, API_SERVICE):
        text = (UNITS / name).read_text().replace("/opt/spoold/bin/spoold", str(spoold))
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


@needs_analyze
def test_units_verify_cleanly(tmp_path: Path) -> None:
    units = _installed(tmp_path)
    proc = subprocess.run(
        [str(analyze), "verify", *map(str, units)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if "spoold" in line]
    assert not ours, "\n".join(ours)


@needs_analyze
@pytest.mark.parametrize("name", [*SERVICES, API_SERVICE])
def test_security_exposure_is_ok(tmp_path: Path, name: str) -> None:
    unit = next(u for u in _installed(tmp_path) if u.name == name)
    if name.startswith("spoold@"):
        unit = unit.rename(tmp_path / "spoold@0.service")
    proc = subprocess.run(
        [str(analyze), "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+) (\w+)", proc.stdout)
    assert match, proc.stdout[-2000:] + proc.stderr
    score = float(match.group(1))
    print(f"{name}: exposure {score} {match.group(2)}")
    assert score <= 2.5, proc.stdout


def test_units_match_the_contract() -> None:
    for name in SERVICES:
        text = (UNITS / name).read_text()
        for needed in (
            "Type=notify",
            "NotifyAccess=main",
            "WatchdogSec=",
            "Restart=on-failure",
            "KillMode=mixed",
            "TimeoutStopSec=",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/spool/spoold",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "ProtectHome=yes",
            "CacheDirectory=spoold",
            "HF_HOME=",
        ):
            assert needed in text, f"{name} lacks {needed}"
    assert "CUDA_VISIBLE_DEVICES=%i" in (UNITS / "spoold@.service").read_text()


# --- sysusers.d and tmpfiles.d, applied for real -------------------------------------------

# What spoold.tmpfiles promises, as (mode, owner, group), relative to the root.
SPOOL_DIRS = {
    "var/spool/spoold": (0o750, "spoold", "spoold-users"),
    "var/spool/spoold/incoming": (0o2770, "spoold", "spoold-users"),  # setgid: drops keep it
    "var/spool/spoold/processing": (0o2750, "spoold", "spoold-users"),
    "var/spool/spoold/done": (0o2750, "spoold", "spoold-users"),
    "var/spool/spoold/failed": (0o2750, "spoold", "spoold-users"),
    "var/spool/spoold/heartbeats": (0o2755, "spoold", "spoold-users"),
    "etc/spoold": (0o755, "root", "root"),
}


@dataclass(frozen=True)
class Identity:
    """The credentials a process runs with."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    umask: int


def _tool(*argv: str | Path) -> str:
    """Run a system tool; its stderr, after checking it succeeded without complaining
    about a line of our files (the tools name them `path:line: …`)."""
    proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stderr}"
    ours = [line for line in proc.stderr.splitlines() if "spoold.conf" in line]
    assert not ours, "\n".join(ours)
    return proc.stderr


def _apply(root: Path) -> None:
    """The README's install step 2, into `root`: the files copied to sysusers.d and
    tmpfiles.d, then applied by name (the tools look the name up in those directories)."""
    assert sysusers is not None and tmpfiles is not None
    for kind in ("sysusers", "tmpfiles"):
        (root / f"etc/{kind}.d").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(UNITS / f"spoold.{kind}", root / f"etc/{kind}.d/spoold.conf")
    _tool(sysusers, f"--root={root}", "spoold.conf")
    _tool(tmpfiles, "--create", f"--root={root}", "spoold.conf")


@pytest.fixture
def root() -> Iterator[Path]:
    """A root with spoold.sysusers and spoold.tmpfiles applied. Made with mkdtemp and
    opened to all, not under tmp_path (0700 above it), so other uids can reach it."""
    made = Path(tempfile.mkdtemp(prefix="spoold-root-"))
    try:
        made.chmod(0o755)
        _apply(made)
        yield made
    finally:
        shutil.rmtree(made)


def _table(path: Path) -> dict[str, list[str]]:
    """/etc/passwd or /etc/group: name → the fields after it."""
    rows = (line.split(":") for line in path.read_text().splitlines() if line)
    return {row[0]: row[1:] for row in rows}


def _gid(root: Path, name: str) -> int:
    if name == "root":  # systemd-tmpfiles knows root without a lookup; sysusers adds none
        return 0
    groups = _table(root / "etc/group")
    assert name in groups, (
        f"group {name!r} is not in {root}/etc/group: declare it in spoold.sysusers"
    )
    return int(groups[name][1])


def _login(root: Path, user: str, umask: int) -> Identity:
    """`user` as initgroups makes it: its primary group and every group that lists it."""
    passwd = _table(root / "etc/passwd")
    assert user in passwd, f"user {user!r} is not in {root}/etc/passwd"
    uid, gid = int(passwd[user][1]), int(passwd[user][2])
    member_of = [int(f[1]) for f in _table(root / "etc/group").values() if user in f[2].split(",")]
    return Identity(uid, gid, tuple(sorted({gid, *member_of})), umask)


def _settings(unit: str, key: str) -> list[str]:
    text = (UNITS / unit).read_text()
    return [w for m in re.finditer(rf"^{key}=(.*)$", text, re.M) for w in m.group(1).split()]


def _service(root: Path, unit: str) -> Identity:
    """Who the unit's daemon runs as, resolved in `root` as systemd does: User= with its
    initgroups, Group= as the primary group, plus SupplementaryGroups=, under UMask=."""
    (user,), (group,), (umask,) = (_settings(unit, k) for k in ("User", "Group", "UMask"))
    login = _login(root, user, int(umask, 8))
    gid = _gid(root, group)
    extra = [_gid(root, name) for name in _settings(unit, "SupplementaryGroups")]
    return Identity(login.uid, gid, tuple(sorted({gid, *login.groups, *extra})), login.umask)


def _as(who: Identity, script: str, spool: Path) -> subprocess.CompletedProcess[str]:
    """A shell script run with `who`'s credentials; the spool is $S."""
    return subprocess.run(
        ["sh", "-euc", script],
        user=who.uid,
        group=who.gid,
        extra_groups=list(who.groups),
        umask=who.umask,
        cwd="/",
        env={"PATH": "/usr/bin:/bin", "S": str(spool)},
        capture_output=True,
        text=True,
        timeout=30,
    )


@needs_apply
def test_sysusers_declares_the_service_user_and_the_uploaders_group(root: Path) -> None:
    passwd, groups = _table(root / "etc/passwd"), _table(root / "etc/group")
    _, uid, gid, _, home, shell = passwd["spoold"]
    assert int(uid) < 1000 and int(gid) == _gid(root, "spoold"), passwd["spoold"]
    assert home == "/var/spool/spoold" and shell.endswith("/nologin"), passwd["spoold"]
    assert int(groups["spoold-users"][1]) < 1000, groups["spoold-users"]
    assert "spoold" in groups["spoold-users"][2].split(","), groups["spoold-users"]
    for unit in SERVICES:  # every User=, Group=, SupplementaryGroups= the units name exists
        daemon = _service(root, unit)
        assert _gid(root, "spoold-users") in daemon.groups, f"{unit} runs outside spoold-users"
    # Applied again (an upgrade, every boot): nothing changes, the ids stay.
    before = [(root / "etc" / f).read_text() for f in ("passwd", "group")]
    _apply(root)
    assert [(root / "etc" / f).read_text() for f in ("passwd", "group")] == before


@needs_apply
def test_tmpfiles_creates_the_spool_with_its_owners_and_modes(root: Path) -> None:
    users = {int(f[1]): name for name, f in _table(root / "etc/passwd").items()} | {0: "root"}
    groups = {int(f[1]): name for name, f in _table(root / "etc/group").items()} | {0: "root"}

    def layout() -> dict[str, tuple[int, str, str]]:
        made = {}
        for path in sorted(p for p in root.rglob("*") if p.is_dir()):
            st = path.stat()
            made[str(path.relative_to(root))] = (
                stat.S_IMODE(st.st_mode),
                users.get(st.st_uid, str(st.st_uid)),
                groups.get(st.st_gid, str(st.st_gid)),
            )
        return made

    made = layout()
    assert {k: v for k, v in made.items() if k in SPOOL_DIRS} == SPOOL_DIRS
    others = {"etc", "etc/sysusers.d", "etc/tmpfiles.d", "var", "var/spool"}
    assert set(made) - set(SPOOL_DIRS) == others, made  # nothing else
    # A spool an admin broke is put right by running --create again.
    incoming = root / "var/spool/spoold/incoming"
    incoming.chmod(0o777)
    os.chown(incoming, 0, 0)
    _apply(root)
    assert layout() == made


@needs_apply
@pytest.mark.parametrize("unit", SERVICES)
def test_an_uploader_in_the_group_drops_jobs_and_reads_results(root: Path, unit: str) -> None:
    closed = [p for p in root.parents if not p.stat().st_mode & stat.S_IXOTH]
    if closed:
        pytest.skip(f"{closed[0]} is not searchable by other users, so no uploader reaches it")
    useradd, usermod = shutil.which("useradd"), shutil.which("usermod")
    if useradd is None or usermod is None:
        pytest.skip("useradd/usermod (Debian's passwd package) are not installed")
    # README step 2: each person who drops files joins spoold-users.
    _tool(useradd, f"--root={root}", "--no-create-home", "--user-group", "alice")
    _tool(usermod, f"--root={root}", "-aG", "spoold-users", "alice")
    alice = _login(root, "alice", umask=0o027)  # nothing for others: the group is the way in
    daemon = _service(root, unit)
    outsider = Identity(uid=64999, gid=64999, groups=(), umask=0o022)
    spool = root / "var/spool/spoold"

    # alice uploads as rsync does: under a dot name, renamed once whole (SPEC §2).
    drop = 'echo "{}" > "$S/incoming/.j.part"; mv "$S/incoming/.j.part" "$S/incoming/job.jsonl"'
    proc = _as(alice, drop, spool)
    assert proc.returncode == 0, proc.stderr
    assert (spool / "incoming/job.jsonl").stat().st_gid == _gid(root, "spoold-users")
    # The daemon's moves (SPEC §2), with its credentials: it reads alice's file (mode 0640,
    # so through the group), claims it into a job directory, writes results, files the job.
    daemon_moves = """
        cat "$S/incoming/job.jsonl" > /dev/null
        mkdir "$S/processing/j1"
        mv "$S/incoming/job.jsonl" "$S/processing/j1/input.jsonl"
        echo '{"custom_id": "a"}' > "$S/processing/j1/output.jsonl"
        mv "$S/processing/j1" "$S/done/j1"
        mkdir "$S/processing/j2"
        echo '{"status": "running"}' > "$S/processing/j2/state.json"
        echo '{"status": "running"}' > "$S/heartbeats/gpu0.json"
    """
    proc = _as(daemon, daemon_moves, spool)
    assert proc.returncode == 0, proc.stderr
    # alice reads her results, the progress of a running job and the heartbeat (what
    # spool-status reads), but cannot change them.
    proc = _as(
        alice,
        'ls "$S/done"; cat "$S/done/j1/output.jsonl" "$S/processing/j2/state.json"'
        ' "$S/heartbeats/gpu0.json"',
        spool,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "j1",
        '{"custom_id": "a"}',
        '{"status": "running"}',
        '{"status": "running"}',
    ]
    proc = _as(alice, 'echo "{}" >> "$S/done/j1/output.jsonl"', spool)
    assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
    # Someone outside the group can neither drop a file nor read one.
    for script in ('echo "{}" > "$S/incoming/x.jsonl"', 'cat "$S/done/j1/output.jsonl"'):
        proc = _as(outsider, script, spool)
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, (script, proc)
