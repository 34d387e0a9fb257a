"""metrics.textfile: written atomically each heartbeat, parsed by prometheus_client."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.helpers import chat, drain, make_config, write_jsonl

parser = pytest.importorskip("prometheus_client.parser")


def test_metrics_textfile_parses_and_counts(tmp_path: Path) -> None:
    prom = tmp_path / "textfile" / "spoold.prom"
    prom.parent.mkdir()
    cfg = make_config(tmp_path, metrics={"textfile": str(prom)}, heartbeat={"interval_s": 0.2})
    write_jsonl(tmp_path / "spool" / "incoming" / "a.jsonl", [chat(str(i)) for i in range(30)])
    write_jsonl(tmp_path / "spool" / "incoming" / "b.jsonl", ["{bad", chat("x")])
    (tmp_path / "spool" / "incoming" / "notes.txt").write_text("not a job")
    drain(cfg)
    text = prom.read_text()
    families = {f.name: f for f in parser.text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    inst = ("instance", "default")
    assert samples[("spoold_jobs", (inst, ("state", "done")))] == 2
    assert samples[("spoold_jobs", (inst, ("state", "failed")))] == 1
    assert samples[("spoold_requests_completed_total", (inst,))] == 31
    assert samples[("spoold_requests_failed_total", (inst,))] == 1
    assert samples[("spoold_tokens_generated_total", (inst,))] > 0
    beat = samples[("spoold_heartbeat_timestamp_seconds", (inst,))]
    assert abs(beat - time.time()) < 60
    assert samples[("spoold_up", (inst,))] == 0  # the drain ended: its last beat is `stopped`
    assert families["spoold_requests_completed"].type == "counter"
    assert not [p for p in prom.parent.iterdir() if p.name.endswith(".prom") and p != prom]
