"""spoold/admission.py on a real spool directory (real files, real renames, real faults),
and the daemon admitting beside a running job: a file dropped behind a long job is
queued within a second of settling, and a fault in incoming/ is a problem, never the
running job's."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from spoold.admission import UNMOVABLE_RETRY_S, Admission, AdmitReport
from spoold.config import LimitsConfig
from spoold.spool import Spool
from tests.helpers import (
    assert_exactly_once,
    chat,
    job_dirs,
    make_config,
    run_spoold,
    start_spoold,
    state,
    wait_for,
    write_jsonl,
)

SETTLE_S = 1.0


class Pickup:
    """An Admission on a spool under tmp_path, on a clock the test moves."""

    def __init__(self, root: Path, instance: str = "a", **limits: Any) -> None:
        self.now = 1000.0
        self.spool = Spool(root, instance)
        self.spool.ensure_layout()
        self.problems: dict[str, str] = {}
        self.disk: str | None = None
        self.admission = Admission(
            self.spool,
            LimitsConfig(**limits),
            SETTLE_S,
            clock=lambda: self.now,
            disk_problem=lambda: self.disk,
            on_problem=self._on_problem,
        )

    def _on_problem(self, topic: str, text: str | None) -> None:
        if text is None:
            self.problems.pop(topic, None)
        else:
            self.problems[topic] = text

    def settled(self) -> AdmitReport:
        """A first look, then another once settle_s has passed: what a settled file gets."""
        self.admission.admit()
        self.now += SETTLE_S
        return self.admission.admit()

    @property
    def incoming(self) -> Path:
        return self.spool.incoming


def requests(n: int, prefix: str = "r") -> list[dict[str, Any]]:
    return [chat(f"{prefix}{i}") for i in range(n)]


def drop(path: Path, n: int, age_s: float = 0.0) -> Path:
    """A job file of `n` requests; `age_s` back-dates its mtime (arrival order)."""
    write_jsonl(path, requests(n, path.stem))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def names(where: Path) -> list[str]:
    return sorted(os.listdir(where))


def sources(spool: Spool, where: str = "processing") -> list[str]:
    return sorted(state(d)["source_name"] for d in job_dirs(spool.root, where))


@contextlib.contextmanager
def unmovable(path: Path) -> Iterator[None]:
    """Make `path` impossible to rename for real: immutable (chattr +i, as root on ext4,
    xfs, btrfs), or, for a user without that right, its directory read-only."""
    if os.geteuid() == 0:
        if shutil.which("chattr") is None:
            pytest.skip("no chattr to make a file immutable")
        made = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
        if made.returncode:
            pytest.skip(f"this filesystem has no immutable files: {made.stderr.strip()}")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.parent.chmod(0o555)
        try:
            yield
        finally:
            path.parent.chmod(0o755)


# -- picking files up ---------------------------------------------------------------


def test_a_settled_file_is_claimed_with_its_count_and_its_fingerprint(tmp_path: Path) -> None:
    p = Pickup(tmp_path / "spool")
    src = write_jsonl(p.incoming / "batch.jsonl", [*requests(3), "", "   "])
    data, st = src.read_bytes(), src.stat()
    first = p.admission.admit()
    assert first.claimed == [] and [e.name for e in first.settling] == ["batch.jsonl"]
    assert p.admission.settle_wait_s(first) == SETTLE_S
    assert names(p.incoming) == ["batch.jsonl"]  # not yet: it may still be written
    p.now += SETTLE_S
    (job_id,) = p.admission.admit().claimed
    assert names(p.incoming) == []
    job = p.spool.processing / job_id
    assert (job / "input.jsonl").read_bytes() == data  # moved by rename, not copied
    assert (job / "input.jsonl").stat().st_ino == st.st_ino
    rec = state(job)
    assert rec["status"] == "queued" and rec["source_name"] == "batch.jsonl"
    assert rec["request_counts"]["total"] == 3 and rec["file_bytes"] == st.st_size
    assert (rec["input_size"], rec["input_mtime_ns"]) == (st.st_size, st.st_mtime_ns)
    assert [n for n in names(p.spool.processing) if n.startswith(".")] == []  # no staging


def test_a_file_still_being_written_is_claimed_only_once_it_stops_changing(
    tmp_path: Path,
) -> None:
    p = Pickup(tmp_path / "spool")
    src = drop(p.incoming / "scp.jsonl", 2)
    p.admission.admit()
    with open(src, "a") as f:  # scp writes in place, under the final name
        f.write(json.dumps(chat("late")) + "\n")
    p.now += SETTLE_S
    report = p.admission.admit()
    assert report.claimed == [] and not p.admission.about_to_settle(report)  # still growing
    p.now += SETTLE_S
    (job_id,) = p.admission.admit().claimed
    assert state(p.spool.processing / job_id)["request_counts"]["total"] == 3


def test_uploads_in_progress_are_left_alone(tmp_path: Path) -> None:
    p = Pickup(tmp_path / "spool")
    uploads = [".hidden.jsonl", "a.jsonl.tmp", "b.jsonl.part", "c.partial", "d.filepart"]
    for name in uploads:
        drop(p.incoming / name, 1)
    report = p.settled()
    assert report == AdmitReport()
    assert names(p.incoming) == sorted(uploads)
    assert job_dirs(p.spool.root, "processing") == job_dirs(p.spool.root, "failed") == []


def _fifo(path: Path) -> None:
    os.mkfifo(path)


@pytest.mark.parametrize(
    ("name", "make", "reason", "kept_as"),
    [
        ("notes.txt", lambda p: p.write_text("hi"), "not a .jsonl file", "notes.txt"),
        ("dir.jsonl", lambda p: p.mkdir(), "a directory, not a file", "dir.jsonl"),
        ("pipe.jsonl", _fifo, "not a regular file", "pipe.jsonl"),
        ("state.json", lambda p: p.write_text("{}"), "not a .jsonl file", "rejected-state.json"),
    ],
)
def test_what_is_not_a_job_goes_to_failed_with_the_reason(
    tmp_path: Path, name: str, make: Any, reason: str, kept_as: str
) -> None:
    p = Pickup(tmp_path / "spool")
    make(p.incoming / name)
    assert p.settled().claimed == []
    assert names(p.incoming) == []
    (job,) = job_dirs(p.spool.root, "failed")
    rec = state(job)
    assert rec["status"] == "failed" and reason in rec["error"], rec["error"]
    assert rec["source_name"] == name and (job / kept_as).exists()


def test_a_symlink_is_rejected_and_never_followed(tmp_path: Path) -> None:
    p = Pickup(tmp_path / "spool")
    target = drop(tmp_path / "elsewhere.jsonl", 2)
    (p.incoming / "link.jsonl").symlink_to(target)
    p.settled()
    (job,) = job_dirs(p.spool.root, "failed")
    assert "symbolic link" in state(job)["error"]
    assert (job / "link.jsonl").is_symlink() and target.exists()  # moved as a link


def test_a_file_over_a_limit_is_rejected_naming_the_key(tmp_path: Path) -> None:
    p = Pickup(tmp_path / "spool", max_requests_per_job=3, max_file_bytes=2000)
    drop(p.incoming / "many.jsonl", 4)
    write_jsonl(p.incoming / "huge.jsonl", [chat("x", content="y" * 3000)])
    drop(p.incoming / "fits.jsonl", 3)
    assert len(p.settled().claimed) == 1
    assert sources(p.spool) == ["fits.jsonl"]
    failed = {state(d)["source_name"]: state(d) for d in job_dirs(p.spool.root, "failed")}
    assert "limits.max_requests_per_job (3)" in failed["many.jsonl"]["error"]
    assert failed["many.jsonl"]["requests_in_file"] == 4
    assert "limits.max_file_bytes (2000)" in failed["huge.jsonl"]["error"]
    assert "split it" in failed["huge.jsonl"]["error"]


# -- the queue limits -----------------------------------------------------------------


def test_queue_limits_keep_files_waiting_in_arrival_order(tmp_path: Path) -> None:
    """limits.max_queue_depth: the rest stay in incoming/ untouched, and nothing behind a
    waiting file jumps the queue; room made, the next in arrival order goes."""
    p = Pickup(tmp_path / "spool", max_queue_depth=1)
    for age, name in ((30, "first"), (20, "second"), (10, "third")):
        drop(p.incoming / f"{name}.jsonl", 1, age_s=age)
    report = p.settled()
    assert len(report.claimed) == 1 and sources(p.spool) == ["first.jsonl"]
    assert report.waiting == ["second.jsonl", "third.jsonl"]
    assert names(p.incoming) == ["second.jsonl", "third.jsonl"]
    (job,) = job_dirs(p.spool.root, "processing")
    job.rename(p.spool.done / job.name)  # the job finished
    report = p.admission.admit()
    assert sources(p.spool) == ["second.jsonl"] and report.waiting == ["third.jsonl"]


def test_the_queued_requests_limit_admits_a_big_file_only_into_an_empty_queue(
    tmp_path: Path,
) -> None:
    """limits.max_total_queued_requests counts unfinished requests; a file larger than
    the limit alone still runs once the queue is empty (nothing is rejected for being
    early), and the smaller file behind it waits its turn."""
    p = Pickup(tmp_path / "spool", max_total_queued_requests=5)
    drop(p.incoming / "a.jsonl", 3, age_s=30)
    drop(p.incoming / "big.jsonl", 8, age_s=20)
    drop(p.incoming / "c.jsonl", 1, age_s=10)
    report = p.settled()
    assert sources(p.spool) == ["a.jsonl"] and report.waiting == ["big.jsonl", "c.jsonl"]
    (job,) = job_dirs(p.spool.root, "processing")
    job.rename(p.spool.done / job.name)
    report = p.admission.admit()
    assert sources(p.spool) == ["big.jsonl"] and report.waiting == ["c.jsonl"]


def test_queue_limits_hold_across_daemons_on_one_spool(tmp_path: Path) -> None:
    """Two daemons' admissions on one spool: each reads the queue's load before every
    claim, so what the other claimed counts (design §2, queue limits across daemons)."""
    a = Pickup(tmp_path / "spool", "a", max_queue_depth=3)
    b = Pickup(tmp_path / "spool", "b", max_queue_depth=3)
    for i in range(6):
        drop(a.incoming / f"f{i}.jsonl", 1, age_s=60 - i)
    a.admission.admit()
    b.admission.admit()
    a.now += SETTLE_S
    b.now += SETTLE_S
    assert len(b.admission.admit().claimed) == 3
    report = a.admission.admit()
    assert report.claimed == [] and len(report.waiting) == 3
    assert sources(a.spool) == ["f0.jsonl", "f1.jsonl", "f2.jsonl"]


def test_a_disk_too_full_holds_every_file_and_says_why(tmp_path: Path) -> None:
    p = Pickup(tmp_path / "spool")
    drop(p.incoming / "a.jsonl", 1, age_s=20)
    drop(p.incoming / "b.jsonl", 1, age_s=10)
    p.disk = "10 MB free on the spool's filesystem < limits.min_free_disk_mb 100"
    report = p.settled()
    assert report.claimed == [] and report.held == p.disk
    assert report.waiting == ["a.jsonl", "b.jsonl"] == names(p.incoming)
    p.disk = None
    assert len(p.admission.admit().claimed) == 2


# -- faults: files that cannot be moved, an incoming/ that cannot be listed -----------


def test_an_unmovable_file_is_a_problem_said_once_and_tried_again_later(
    tmp_path: Path,
) -> None:
    """A file whose rename out of incoming/ fails for real (immutable, or a read-only
    directory): it stays untouched, no staging dir is left, the problem names it and
    the error, it is said once, tried again after UNMOVABLE_RETRY_S; the others go on."""
    p = Pickup(tmp_path / "spool")
    stuck = drop(p.incoming / "stuck.jsonl", 2, age_s=20)
    data = stuck.read_bytes()
    with unmovable(stuck):
        with structlog.testing.capture_logs() as said:
            p.admission.admit()
            p.now += SETTLE_S
            assert p.admission.admit().claimed == []
            p.now += 1
            p.admission.admit()  # within the retry delay: not tried, not said again
        assert stuck.read_bytes() == data
        assert [n for n in names(p.spool.processing)] == []  # no staging dir left
        problem = p.problems["incoming:stuck.jsonl"]
        assert problem.startswith("cannot move incoming/stuck.jsonl: cannot claim stuck.jsonl")
        assert "Operation not permitted" in problem or "Permission denied" in problem
        assert [e["event"] for e in said].count("cannot move entry out of incoming/") == 1
    drop(p.incoming / "other.jsonl", 1)  # the others go on meanwhile
    p.admission.admit()
    p.now += UNMOVABLE_RETRY_S
    assert len(p.admission.admit().claimed) == 2
    assert sources(p.spool) == ["other.jsonl", "stuck.jsonl"]
    assert p.problems == {}


def test_a_rejected_entry_that_cannot_be_moved_is_a_problem_too(tmp_path: Path) -> None:
    p = Pickup(tmp_path / "spool")
    notes = p.incoming / "notes.txt"
    notes.write_text("not a job")
    with unmovable(notes):
        p.settled()
        assert names(p.incoming) == ["notes.txt"]
        assert "not a .jsonl file" in p.problems["incoming:notes.txt"]
    notes.unlink()  # removed by its owner: no longer a problem
    p.admission.admit()
    assert p.problems == {}


def test_an_incoming_that_cannot_be_listed_is_a_problem_and_never_raised(
    tmp_path: Path,
) -> None:
    p = Pickup(tmp_path / "spool")
    drop(p.incoming / "a.jsonl", 1)
    p.incoming.rename(tmp_path / "aside")
    with structlog.testing.capture_logs() as said:
        assert p.admission.try_admit() == AdmitReport()
        assert p.admission.try_admit() == AdmitReport()
    (problem,) = p.problems.values()
    assert str(p.incoming) in problem and "FileNotFoundError" in problem
    assert "can read and write" in problem
    assert len(said) == 1  # said once, shown while it lasts
    (tmp_path / "aside").rename(p.incoming)
    p.admission.try_admit()
    p.now += SETTLE_S
    assert len(p.admission.try_admit().claimed) == 1
    assert p.problems == {}


# -- the daemon: admission beside a running job --------------------------------------


class Running:
    """A `spoold run` subprocess on a fake engine, stopped (and reaped) at the end."""

    def __init__(self, tmp_path: Path, **fake: Any) -> None:
        self.cfg = make_config(
            tmp_path,
            heartbeat={"interval_s": 0.2, "stale_after_s": 5},
            processing={"chunk_size": 50},
            engine={"backend": "fake", "fake": fake},
        )
        self.spool = tmp_path / "spool"
        self.log = tmp_path / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = start_spoold("run", "--config", str(self.cfg), log=out)

    def beat(self) -> dict[str, Any]:
        try:
            beat = json.loads((self.spool / "heartbeats" / "default.json").read_text())
        except (OSError, ValueError):
            return {}
        return beat if isinstance(beat, dict) else {}

    def running(self) -> Path | None:
        jobs = [j for j in job_dirs(self.spool, "processing") if state(j)["status"] == "running"]
        return jobs[0] if jobs else None

    def queued(self, source: str) -> Path | None:
        for j in job_dirs(self.spool, "processing"):
            if state(j)["source_name"] == source and state(j)["status"] == "queued":
                return j
        return None

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def running(tmp_path: Path) -> Iterator[list[Running]]:
    made: list[Running] = []
    yield made
    for r in made:
        if r.proc is not None and r.proc.poll() is None:
            r.proc.kill()
            r.proc.wait()


def test_a_file_dropped_behind_a_long_engine_batch_is_queued_and_cancelled_at_once(
    tmp_path: Path, running: list[Running]
) -> None:
    """README: a file dropped behind a long job is queued, with its job_id, within a
    second of settling, and can be cancelled from there; also while the engine is
    inside a 10 s batch and the runner reports nothing (admission ran in the runner's
    progress callback: then only after the batch)."""
    r = Running(tmp_path, delay_per_request_s=0.05, batch_size=200)
    running.append(r)
    write_jsonl(r.spool / "incoming" / "long.jsonl", requests(400, "l"))
    r.start()
    wait_for(r.running, what="the long job to run")
    time.sleep(0.5)  # inside its first 10 s batch
    dropped = time.monotonic()
    write_jsonl(r.spool / "incoming" / "behind.jsonl", requests(2, "b"))
    job = wait_for(lambda: r.queued("behind.jsonl"), timeout=10, what="behind.jsonl queued")
    assert time.monotonic() - dropped < 0.1 + 1 + 1, "queued only once the batch ended"
    run_spoold("cancel", "--config", str(r.cfg), job.name, check=True)
    asked = time.monotonic()
    wait_for(lambda: (r.spool / "failed" / job.name).is_dir(), timeout=10, what="the cancel")
    assert time.monotonic() - asked < 2.5
    assert state(r.spool / "failed" / job.name)["status"] == "cancelled"
    assert r.running() is not None, "the long job still runs"
    assert r.stop() == 0


def test_an_admission_fault_while_a_job_runs_is_a_problem_not_the_jobs(
    tmp_path: Path, running: list[Running]
) -> None:
    """incoming/ taken away for real while a job runs (a mount gone, an operator's
    `mv`): the running job goes on at its pace and completes once, attempt 1, with no
    error of its own; the heartbeat's problems name incoming/ meanwhile; once it is
    back, a file dropped there is queued while the job still runs and the problem
    goes. The daemon stays up (its loop's own pass reports the fault too)."""
    r = Running(tmp_path, delay_per_request_s=0.002, batch_size=10)
    running.append(r)
    ids = [f"l{i}" for i in range(3000)]
    write_jsonl(r.spool / "incoming" / "long.jsonl", [chat(i) for i in ids])
    r.start()
    wait_for(r.running, what="the long job to run")
    incoming, aside = r.spool / "incoming", tmp_path / "incoming-aside"
    incoming.rename(aside)
    beat = wait_for(
        lambda: any(str(incoming) in p for p in r.beat().get("problems", [])) and r.beat(),
        timeout=10,
        what="the fault in the heartbeat's problems",
    )
    (problem,) = beat["problems"]
    assert "cannot admit files from" in problem and "can read and write" in problem
    done_then = beat["current_job"]["completed"]
    time.sleep(1.0)
    later = r.beat()
    assert (
        later["status"] == "processing" and later["current_job"]["id"] == beat["current_job"]["id"]
    )
    assert later["current_job"]["completed"] > done_then + 100, "the job was held up"
    aside.rename(incoming)
    write_jsonl(incoming / "after.jsonl", requests(2, "a"))
    wait_for(lambda: r.queued("after.jsonl"), timeout=10, what="after.jsonl queued")
    assert r.running() is not None, "the long job ended before the fault was over"
    wait_for(lambda: r.beat().get("problems") == [], timeout=5, what="the problem cleared")
    wait_for(lambda: len(job_dirs(r.spool, "done")) == 2, timeout=60, what="both jobs done")
    assert r.proc is not None and r.proc.poll() is None, "the daemon died"
    assert r.stop() == 0
    (long_job,) = [d for d in job_dirs(r.spool, "done") if state(d)["source_name"] == "long.jsonl"]
    st = state(long_job)
    assert st["status"] == "completed" and st["attempts"] in (0, 1), st
    assert_exactly_once(long_job, ids)
    events = r.events()
    starts = [e for e in events if e.get("event") == "job started"]
    assert len(starts) == 2 and all(e["attempt"] == 1 for e in starts), starts
    assert not [e for e in events if e.get("event", "").startswith("job run")], "a job failed"
    said = [e for e in events if e.get("event", "").startswith("cannot admit files")]
    assert said and all(e["level"] == "error" for e in said)


def test_a_drain_that_cannot_look_at_incoming_exits_1_and_says_why(tmp_path: Path) -> None:
    """--drain processes everything claimable, then exits 0; when incoming/ went away
    meanwhile it cannot know that: exit 1 (not a crash), the reason in its last beat."""
    cfg = make_config(tmp_path, engine={"backend": "fake", "fake": {"delay_per_request_s": 0.002}})
    spool = tmp_path / "spool"
    write_jsonl(spool / "incoming" / "long.jsonl", requests(1500, "l"))
    with open(tmp_path / "drain.log", "ab") as out:
        proc = start_spoold("run", "--config", str(cfg), "--drain", log=out)
    try:
        wait_for(
            lambda: any(state(j)["status"] == "running" for j in job_dirs(spool, "processing")),
            what="the job to run",
        )
        (spool / "incoming").rename(tmp_path / "aside")
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in (tmp_path / "drain.log").read_text()
    beat = json.loads((spool / "heartbeats" / "default.json").read_text())
    assert beat["status"] == "stopped", beat
    assert beat["reason"].startswith("drained, but cannot admit files from incoming/")
    assert str(spool / "incoming") in beat["reason"]
    (done,) = job_dirs(spool, "done")
    assert state(done)["status"] == "completed"
