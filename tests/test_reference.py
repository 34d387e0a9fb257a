"""docs/reference.md is the contract users and scripts rely on: every key it lists for
state.json, owner.json and the heartbeat is in the files a real run leaves."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers import chat, drain, make_config, only_job, write_jsonl

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "reference.md"


def _section(title: str) -> str:
    text = REFERENCE.read_text(encoding="utf-8")
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def _table_keys(title: str) -> set[str]:
    """The backticked names in the first column of a section's table."""
    keys: set[str] = set()
    for row in re.findall(r"^\| ([^|]+) \|", _section(title), re.M):
        if "…" not in row:
            keys.update(re.findall(r"`([a-z_]+)`", row))
    return keys - {"key"}


def test_the_records_a_run_leaves_carry_every_key_the_reference_names(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "ref.jsonl", [chat("a"), "{nope", chat("b")])
    drain(cfg)
    job = only_job(spool, "done")

    state = json.loads((job / "state.json").read_text())
    assert _table_keys("state.json") <= state.keys()
    assert set(state["request_counts"]) == {"total", "completed", "failed"}

    owner = json.loads((job / "owner.json").read_text())
    named = set(re.findall(r"`([a-z_]+)`", _section("owner.json")))
    assert named and named <= owner.keys()

    beat = json.loads((spool / "heartbeats" / "default.json").read_text())
    assert _table_keys("heartbeats/<instance>.json") <= beat.keys()
    assert beat["status"] == "stopped"

    codes = {json.loads(line)["error"]["code"] for line in (job / "errors.jsonl").open()}
    assert codes <= set(re.findall(r"^\| `([a-z_]+)` \|", _section("Result lines"), re.M))
