"""The unit files, checked by the real systemd-analyze (verify, and the security score)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parent.parent / "systemd"
analyze = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(analyze is None, reason="systemd-analyze is not installed")


def _installed(tmp_path: Path) -> list[Path]:
    """The units as installed, pointing ExecStart at this venv's spoold."""
    spoold = Path(sys.executable).parent / "spoold"
    out = []
    for name in ("spoold.service", "spoold@.service"):
        text = (UNITS / name).read_text().replace("/opt/spoold/bin/spoold", str(spoold))
        (tmp_path / name).write_text(text)
        out.append(tmp_path / name)
    return out


def test_units_verify_cleanly(tmp_path: Path) -> None:
    units = _installed(tmp_path)
    proc = subprocess.run(
        [str(analyze), "verify", *map(str, units)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    ours = [line for line in proc.stderr.splitlines() if "spoold" in line]
    assert not ours, "\n".join(ours)


@pytest.mark.parametrize("name", ["spoold.service", "spoold@.service"])
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
    for name in ("spoold.service", "spoold@.service"):
        text = (UNITS / name).read_text()
        for needed in (
            "Type=notify",
            "NotifyAccess=main",
            "WatchdogSec=",
            "Restart=on-failure",
            "KillMode=mixed",
            "TimeoutStopSec=",
            "User=spoold",
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
    tmpfiles = (UNITS / "spoold.tmpfiles").read_text()
    assert re.search(r"/var/spool/spoold/incoming\s+2770", tmpfiles)
