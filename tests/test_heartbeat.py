"""The heartbeat file tells the truth soon: a change of status is written at once, not
at the next `heartbeat.interval_s` (an operator's `spool-status` right after a job must
not say `starting`)."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.helpers import chat, make_config, start_spoold, wait_for, write_jsonl


def _beat(spool: Path) -> dict[str, object]:
    try:
        return dict(json.loads((spool / "heartbeats" / "default.json").read_text()))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def test_a_new_status_is_written_at_once_not_at_the_next_beat(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, heartbeat={"interval_s": 60, "stale_after_s": 300})
    spool = tmp_path / "spool"
    daemon = start_spoold("run", "--config", str(cfg))
    try:
        # With a beat every 60 s, only the status changes can bring these in time.
        wait_for(lambda: _beat(spool).get("status") == "idle", timeout=20, what="idle")
        seq = _beat(spool)["seq"]
        write_jsonl(spool / "incoming" / "j.jsonl", [chat(f"r{i}") for i in range(5)])
        wait_for(lambda: list((spool / "done").glob("j-*")), timeout=20, what="the job")
        wait_for(lambda: _beat(spool)["seq"] > seq and _beat(spool)["status"] == "idle",
                 timeout=5, what="idle again after the job")  # fmt: skip
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0
    finally:
        daemon.kill()
        daemon.wait()
    beat = _beat(spool)
    assert beat["status"] == "stopped" and beat["reason"] == "SIGTERM"
