"""Several daemons, one spool: leases, take-overs and fencing, black-box.

SPEC §3 "Several daemons, one spool" and docs/design.md §2. Every test runs real
`spoold run` processes (the fake engine, slowed down so that a job commits many
chunks over a few seconds) on one temp spool, and injects what a shared spool meets
in production: a daemon stalled inside an fsync (a hung NFS server, through the
LD_PRELOAD fault shim of tests/faultshim.py), SIGSTOP (a paused VM), SIGKILL, wall
clocks minutes apart (the shim's clock offset), two starts of one instance at the
same instant, renames and unlinks that happen and then report an error (a
retransmitted NFS RENAME). The assertions are what a user sees: every request exactly once in done/,
no submitted file lost, a finished job never changed again, the exit codes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.faultshim import shim_env
from tests.helpers import (
    SPOOLD,
    _env,
    assert_exactly_once,
    chat,
    job_dirs,
    make_config,
    read_results,
    run_spoold,
    state,
    wait_for,
    write_jsonl,
)

INTERVAL_S = 0.2
STALE_S = 2.0
# What a finished job directory may hold, however many owners it had (SPEC §2, §3
# "Nothing accumulates").
JOB_FILES = {"input.jsonl", "state.json", "output.jsonl", "errors.jsonl", "owner.json"}


# -- daemons -------------------------------------------------------------------------


class Daemon:
    """One `spoold run --instance NAME` process: JSON logs in <tag>.log, stderr in <tag>.err."""

    def __init__(
        self, config: Path, instance: str, env: dict[str, str] | None = None, tag: str = ""
    ) -> None:
        self.instance = instance
        self.spool = config.parent / "spool"
        tag = tag or instance
        self.log = config.parent / f"{tag}.log"
        self.err = config.parent / f"{tag}.err"
        with open(self.log, "ab") as out, open(self.err, "ab") as err:
            self.proc = subprocess.Popen(
                [*SPOOLD, "run", "--config", str(config), "--instance", instance],
                stdout=out,
                stderr=err,
                env={**_env(), **(env or {})},
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def beat(self) -> dict[str, Any] | None:
        try:
            beat = json.loads((self.spool / "heartbeats" / f"{self.instance}.json").read_text())
        except (OSError, ValueError):
            return None
        return beat if isinstance(beat, dict) else None

    def wait_beating(self, timeout: float = 10) -> None:
        """Until its heartbeat names it and has been rewritten at least once."""

        def beating() -> bool:
            assert self.proc.poll() is None, f"{self.instance} exited {self.proc.returncode}"
            beat = self.beat()
            return bool(beat and beat.get("pid") == self.pid and beat.get("seq", 0) >= 2)

        wait_for(beating, timeout, what=f"{self.instance}'s heartbeat")

    def beating_since(self, old: dict[str, Any] | None) -> bool:
        """Its heartbeat names it again and is no longer `old` (it woke and went on)."""
        beat = self.beat()
        return bool(beat and beat.get("pid") == self.pid and beat != old)

    def events(self, event: str) -> list[dict[str, Any]]:
        """Its log records (JSON lines) whose `event` is `event`."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == event:
                found.append(record)
        return found

    def tail(self) -> str:
        return (self.log.read_text(errors="replace") + self.err.read_text(errors="replace"))[-3000:]

    def stop(self, timeout: float = 20) -> int:
        """SIGCONT (in case it is stopped) and SIGTERM; its exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.instance} still runs {timeout}s after SIGTERM") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Every daemon a test starts is SIGKILLed and reaped at the end, whatever happened."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def start(daemons: list[Daemon], config: Path, instance: str, **env: str) -> Daemon:
    d = Daemon(config, instance, env)
    daemons.append(d)
    d.wait_beating()
    return d


def config(tmp: Path, delay_s: float = 0.02, chunk: int = 10) -> Path:
    """A spool whose jobs commit a chunk of `chunk` requests every `chunk * delay_s` s."""
    return make_config(
        tmp,
        watch={"settle_seconds": 0.1, "rescan_interval_s": 1},
        heartbeat={"interval_s": INTERVAL_S, "stale_after_s": STALE_S},
        processing={"chunk_size": chunk, "stop_timeout_s": 10},
        engine={"backend": "fake", "fake": {"delay_per_request_s": delay_s, "batch_size": 5}},
    )


# -- jobs ----------------------------------------------------------------------------


def drop(spool: Path, name: str, n: int) -> list[str]:
    """Submit `name` with `n` requests (written aside, renamed in); its custom_ids."""
    ids = [f"{name}-{i}" for i in range(n)]
    tmp = write_jsonl(spool / "incoming" / f".{name}.jsonl.part", [chat(i, i) for i in ids])
    os.rename(tmp, spool / "incoming" / f"{name}.jsonl")
    return ids


def owner(job: Path) -> dict[str, Any]:
    try:
        record = json.loads((job / "owner.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def committed_jobs(spool: Path, instance: str | None = None, left: int = 0) -> dict[str, Path]:
    """Running jobs in processing/ that have committed a chunk and have at least `left`
    requests to go: owner instance → job."""
    found = {}
    for job in job_dirs(spool, "processing"):
        try:
            st = state(job)
        except (OSError, ValueError):
            continue  # being replaced or moved right now
        who = owner(job).get("instance")
        done = st["checkpoint"]["completed"]
        to_go = st["request_counts"]["total"] - done
        if who and done > 0 and to_go >= left and instance in (None, who):
            found[who] = job
    return found


def finished(spool: Path, job_id: str) -> Path | None:
    """done/<job_id> once its job is filed there."""
    job = spool / "done" / job_id
    try:
        return job if state(job)["status"] == "completed" else None
    except (OSError, ValueError):
        return None


def by_source(spool: Path) -> dict[str, Path]:
    """done/ jobs by the name they were dropped as."""
    return {state(job)["source_name"]: job for job in job_dirs(spool, "done")}


def assert_done_once(job: Path, ids: list[str]) -> None:
    """Completed, every request exactly once and none failed (the fake engine fails
    none of these), every result line whole, no stray file."""
    st = state(job)
    assert st["status"] == "completed", st
    counts = st["request_counts"]
    assert counts == {"total": len(ids), "completed": len(ids), "failed": 0}, counts
    assert_exactly_once(job, ids)
    lines = read_results(job, "output.jsonl") + read_results(job, "errors.jsonl")
    assert len(lines) == len(ids), f"{len(lines)} result lines for {len(ids)} requests"
    strays = {p.name for p in job.iterdir()} - JOB_FILES
    assert not strays, f"stray files in {job}: {sorted(strays)}"


def snapshot(tree: Path) -> dict[str, bytes]:
    """Every file under `tree`, by relative path, with its bytes."""
    return {
        str(p.relative_to(tree)): p.read_bytes() for p in sorted(tree.rglob("*")) if p.is_file()
    }


def taken_over(d: Daemon, job_id: str) -> list[dict[str, Any]]:
    return [e for e in d.events("job taken over") if e.get("job_id") == job_id]


def shim_faults(log: Path, kind: str) -> list[str]:
    """The faults the shim logged as injected: `stall`, `lie rename`, `lie unlink`."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [line for line in lines if line.startswith(kind + " ")]


# -- 1. stalled inside a commit ------------------------------------------------------


def test_a_daemon_stalled_inside_a_commit_is_fenced_and_changes_nothing_when_it_wakes(
    tmp_path: Path, daemons: list[Daemon], faultshim: Path
) -> None:
    """Injects: every fsync of daemon `a` hangs (FAULTSHIM_STALL_FILE) once it has
    committed a chunk, so it stalls inside a commit and its heartbeat stops. Covers
    C21 (an owner stalled inside a commit, fenced meanwhile) and L3 (a stalled holder
    wakes): `b` takes the job over, securing the results because `a` is alive, and
    finishes it exactly once; when the stall ends, `a` finds itself fenced, goes on
    with new work, and done/<job> does not change by one byte."""
    cfg = config(tmp_path)
    spool = tmp_path / "spool"
    stall, faults = tmp_path / "stall", tmp_path / "faults.log"
    env = shim_env(faultshim, _env(), stall_file=stall, log=faults)
    a = start(daemons, cfg, "a", **env)
    ids = drop(spool, "stalled", 200)
    job = wait_for(lambda: committed_jobs(spool, "a"), 20, what="a to commit a chunk")["a"]
    b = start(daemons, cfg, "b")
    stall.touch()
    wait_for(lambda: shim_faults(faults, "stall"), 10, what="a's fsyncs to stall")

    done = wait_for(lambda: finished(spool, job.name), 30, what="b to take over and finish")
    assert_done_once(done, ids)
    takes = taken_over(b, job.name)
    assert takes, f"b never logged taking {job.name} over:\n{b.tail()}"
    assert takes[0]["from_instance"] == "a" and takes[0]["from_pid"] == a.pid, takes
    assert takes[0]["secured"] is True, "a is alive: its results had to be secured"
    assert owner(done)["instance"] == "b" and state(done)["owner_generation"] >= 2
    assert a.proc.poll() is None, "a stalled daemon is not dead"
    before = snapshot(done)
    assert b.stop() == 0

    stalled_beat = a.beat()
    stall.unlink()  # a's hung fsyncs return: its commit, its heartbeat go on
    wait_for(lambda: a.beating_since(stalled_beat), 15, what=f"a to beat again:\n{a.tail()}")
    after_ids = drop(spool, "after", 30)  # b is gone: a must run this one
    later = wait_for(lambda: by_source(spool).get("after.jsonl"), 20, what="a to run on")
    assert_done_once(later, after_ids)
    assert owner(later)["instance"] == "a"
    time.sleep(2)
    assert a.proc.poll() is None, f"a exited {a.proc.returncode}:\n{a.tail()}"
    assert snapshot(done) == before, "the fenced owner changed a finished job"
    assert a.events("fenced"), "a never logged that it found itself fenced"
    assert not (spool / "processing" / job.name).exists()
    assert not job_dirs(spool, "failed")
    assert a.stop() == 0


# -- 2. SIGSTOP ----------------------------------------------------------------------


def test_a_sigstopped_owner_is_taken_over_and_harmless_after_sigcont(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Injects: SIGSTOP of the job's owner mid-job for longer than stale_after_s (a
    paused VM), then SIGCONT while the taker still runs. Covers C21 and L3 for a
    whole frozen process: the other daemon takes the job over (secured: the owner's
    process is alive) and finishes it exactly once; the woken owner is fenced, goes
    on with the next job, and the finished job is never touched again."""
    cfg = config(tmp_path)
    spool = tmp_path / "spool"
    pair = {"a": start(daemons, cfg, "a"), "b": start(daemons, cfg, "b")}
    ids = drop(spool, "paused", 200)
    busy = wait_for(lambda: committed_jobs(spool), 20, what="a chunk committed")
    who, job = next(iter(busy.items()))
    frozen, other = pair[who], pair["b" if who == "a" else "a"]
    os.kill(frozen.pid, signal.SIGSTOP)

    done = wait_for(lambda: finished(spool, job.name), 30, what="the job to be taken over")
    assert_done_once(done, ids)
    takes = taken_over(other, job.name)
    assert takes, f"{other.instance} never logged taking {job.name} over:\n{other.tail()}"
    assert takes[0]["from_instance"] == who and takes[0]["from_pid"] == frozen.pid, takes
    assert takes[0]["secured"] is True, "a stopped process is alive: results must be secured"
    assert state(done)["owner_generation"] >= 2
    before = snapshot(done)

    frozen_beat = frozen.beat()
    os.kill(frozen.pid, signal.SIGCONT)
    wait_for(lambda: frozen.beating_since(frozen_beat), 15, what=f"{who} to beat again")
    after_ids = drop(spool, "after", 30)
    later = wait_for(lambda: by_source(spool).get("after.jsonl"), 20, what="the next job")
    assert_done_once(later, after_ids)
    time.sleep(2)
    assert frozen.proc.poll() is None, f"{who} exited {frozen.proc.returncode}"
    assert snapshot(done) == before, "the woken owner changed a finished job"
    assert frozen.events("fenced"), f"{who} never logged that it found itself fenced"
    assert not job_dirs(spool, "failed")
    assert frozen.stop() == 0
    assert other.stop() == 0


# -- 3. clocks that disagree ---------------------------------------------------------


@pytest.mark.parametrize("offset_s", [-600, 600], ids=["behind", "ahead"])
def test_daemons_whose_clocks_disagree_take_nothing_from_each_other(
    tmp_path: Path, daemons: list[Daemon], faultshim: Path, offset_s: int
) -> None:
    """Injects: one daemon's wall clock `offset_s` off (ten minutes behind, or ahead;
    FAULTSHIM_CLOCK_OFFSET_S, since libfaketime breaks CPython's time.sleep, see
    tests/faultshim.py), beside a normal one. Liveness is judged on the observer's
    own monotonic clock, so neither ever judges the other stale: ten jobs are each
    run once by one owner (owner_generation 1), no take-over, no fence. Then the
    skewed one is SIGKILLed mid-job, and the normal one takes its job over within
    stale_after_s and a few seconds, and finishes it exactly once."""
    cfg = config(tmp_path, delay_s=0.01)
    spool = tmp_path / "spool"
    skew = start(daemons, cfg, "skew", **shim_env(faultshim, _env(), clock_offset_s=offset_s))
    norm = start(daemons, cfg, "norm")
    beat = skew.beat() or {}
    told = time.mktime(time.strptime(beat["updated_at"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert abs(told - time.mktime(time.gmtime()) - offset_s) < 60, "the clock offset did not apply"

    jobs = {f"j{k}.jsonl": drop(spool, f"j{k}", 40) for k in range(10)}
    wait_for(lambda: len(job_dirs(spool, "done")) == len(jobs), 40, what="ten jobs done")
    for source, job in by_source(spool).items():
        assert_done_once(job, jobs[source])
        assert state(job)["owner_generation"] == 1, f"{source} was taken from a live owner"
    for d in (skew, norm):
        assert not d.events("job taken over"), f"{d.instance} took a live daemon's job"
        assert not d.events("fenced"), f"{d.instance} was fenced while alive"
    owners = {owner(job)["instance"] for job in job_dirs(spool, "done")}
    assert owners == {"skew", "norm"}, f"only {owners} ran jobs"

    assert norm.stop() == 0  # so that the long job is the skewed daemon's
    ids = drop(spool, "long", 400)
    job = wait_for(lambda: committed_jobs(spool, "skew"), 20, what="skew to commit")["skew"]
    norm = start(daemons, cfg, "norm")
    skew.kill()  # SIGKILL, and reaped: its pid is gone
    killed_at = time.monotonic()
    wait_for(lambda: taken_over(norm, job.name), STALE_S + 4, what="norm to take the dead job over")
    assert time.monotonic() - killed_at < STALE_S + 4
    done = wait_for(lambda: finished(spool, job.name), 20, what="the taken-over job")
    assert_done_once(done, ids)
    assert owner(done)["instance"] == "norm"
    assert norm.stop() == 0


# -- 4. one instance name, two starts at once ----------------------------------------


def race_one_instance(base: Path, rnd: int) -> None:
    """Start two gpu0 daemons back to back on `base`'s spool; check the one winner."""
    cfg = config(base, delay_s=0.001)
    pair = [Daemon(cfg, "gpu0", tag=f"r{rnd}-{k}") for k in range(2)]
    try:
        loser = wait_for(
            lambda: next((d for d in pair if d.proc.poll() is not None), None),
            10,
            what=f"round {rnd}: one of two gpu0 daemons to give up",
        )
        survivor = pair[1 - pair.index(loser)]
        time.sleep(3 * INTERVAL_S)
        assert survivor.proc.poll() is None, f"round {rnd}: both exited:\n{survivor.tail()}"
        survivor.wait_beating()
        assert loser.proc.returncode == 2, f"round {rnd}:\n{loser.tail()}"
        said = loser.err.read_text()
        assert "gpu0" in said and str(survivor.pid) in said, f"round {rnd}: {said!r}"

        ids = drop(base / "spool", f"round{rnd}", 20)
        job = wait_for(
            lambda: by_source(base / "spool").get(f"round{rnd}.jsonl"), 20, what="the job"
        )
        assert_done_once(job, ids)
        assert owner(job)["pid"] == survivor.pid
        assert survivor.stop() == 0
        left = sorted(p.name for p in (base / "spool" / "heartbeats").iterdir())
        assert left == ["gpu0.json"], f"round {rnd}: left in heartbeats/: {left}"
    finally:
        for d in pair:
            d.kill()


def test_two_daemons_started_at_once_with_one_instance_name_one_wins(tmp_path: Path) -> None:
    """Injects: two `spoold run --instance gpu0` started back to back, eight rounds
    (even rounds on a fresh spool, where both race to create the heartbeat; odd ones
    on the spool the last survivor stopped cleanly on, where both race to replace its
    record). Covers the instance lease (design §2, its steps 2-4): exactly one keeps
    running, the other exits 2 naming the instance and the survivor's pid; the
    survivor runs a job exactly once and exits 0 on SIGTERM; neither leaves a lease
    directory or a grave behind (no L1 orphan, no L2 grave)."""
    for rnd in range(8):
        base = tmp_path / f"spool{rnd // 2}"
        base.mkdir(exist_ok=True)
        race_one_instance(base, rnd)


# -- 5. renames and unlinks that lie -------------------------------------------------


def input_copies(spool: Path) -> list[bytes]:
    """The bytes of every place a submitted file may be, failed/ aside."""
    places = [p for p in (spool / "incoming").iterdir() if p.is_file()]
    places += (spool / "processing").rglob("input.jsonl")
    places += (spool / "done").glob("*/input.jsonl")
    return [p.read_bytes() for p in places]


@pytest.mark.parametrize("every", [1, 3], ids=["every-call", "every-3rd"])
def test_renames_and_unlinks_that_report_errors_after_acting_lose_no_file(
    tmp_path: Path, faultshim: Path, every: int
) -> None:
    """Injects: every (or every third) rename and unlink under the spool is performed
    and then reported as failed with ENOENT (FAULTSHIM_LIE_RENAME/_UNLINK), as a
    retransmitted NFS RENAME or REMOVE answers, in three daemons one after the other:
    two SIGKILLed once a chunk is committed (so that the next one's recovery fences
    and removes what they left, through lying calls), the third left to run. Whatever
    they make of it, no submitted file is lost (SPEC §3: no error report deletes a
    file), and a plain drain afterwards, without lies, finishes every job exactly once,
    none failed."""
    cfg = config(tmp_path, delay_s=0.02)
    spool = tmp_path / "spool"
    faults = tmp_path / "faults.log"
    jobs = {f"lie{k}.jsonl": drop(spool, f"lie{k}", 40) for k in range(4)}
    submitted = {name: (spool / "incoming" / name).read_bytes() for name in jobs}
    env = shim_env(
        faultshim, _env(), lie_rename=spool, lie_unlink=spool, lie_every=every, log=faults
    )
    for life in range(3):
        liar = Daemon(cfg, "liar", env, tag=f"liar{life}")
        try:
            deadline = time.monotonic() + (5 if life < 2 else 10)
            while time.monotonic() < deadline and liar.proc.poll() is None:
                if len(job_dirs(spool, "done")) == len(jobs):
                    break
                mine = [
                    j for j in committed_jobs(spool).values() if owner(j).get("pid") == liar.pid
                ]
                if life < 2 and mine:
                    break
                time.sleep(0.05)
        finally:
            if life < 2:
                liar.kill()
            elif liar.proc.poll() is None:
                os.kill(liar.pid, signal.SIGTERM)
                try:
                    liar.proc.wait(8)
                except subprocess.TimeoutExpired:
                    liar.kill()
    assert shim_faults(faults, "lie rename"), "no rename was lied about"
    assert shim_faults(faults, "lie unlink"), "no unlink was lied about"
    copies = input_copies(spool)
    lost = [name for name, data in submitted.items() if data not in copies]
    assert not lost, f"submitted files lost: {lost}; failed/: {job_dirs(spool, 'failed')}"

    proc = run_spoold("run", "--config", str(cfg), "--instance", "liar", "--drain", timeout=25)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not job_dirs(spool, "failed"), [state(j) for j in job_dirs(spool, "failed")]
    assert not job_dirs(spool, "processing")
    assert not [p for p in (spool / "incoming").iterdir() if p.name.endswith(".jsonl")]
    done = by_source(spool)
    assert sorted(done) == sorted(jobs), f"done/ holds {sorted(done)}"
    for source, job in done.items():
        assert (job / "input.jsonl").read_bytes() == submitted[source]
        assert_done_once(job, jobs[source])


# -- 6. three daemons, one killed, one stopped ---------------------------------------


def test_three_daemons_one_killed_one_stopped_every_request_once(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Injects: three daemons on twelve jobs of 100-210 requests; once two of them
    own jobs they have committed chunks of, one is SIGKILLed and the other
    SIGSTOPped. The third takes both jobs over (the stopped one's secured) and
    finishes everything: every custom_id of every job exactly once, all in done/,
    nothing failed. At the end the stopped one gets SIGCONT and SIGTERM: it exits 0
    within stop_timeout_s + 5 s and has changed nothing in done/."""
    cfg = config(tmp_path, delay_s=0.005, chunk=20)
    spool = tmp_path / "spool"
    trio = {name: start(daemons, cfg, name) for name in ("a", "b", "c")}
    jobs = {f"m{k}.jsonl": drop(spool, f"m{k}", 100 + 10 * k) for k in range(12)}

    def two_busy() -> dict[str, Path] | None:
        busy = committed_jobs(spool, left=60)  # so that neither ends before the blow
        return busy if len(busy) >= 2 else None

    busy = wait_for(two_busy, 20, what="two daemons in the middle of a job")
    (dead, dead_job), (frozen, frozen_job) = list(busy.items())[:2]
    trio[dead].kill()
    os.kill(trio[frozen].pid, signal.SIGSTOP)
    (survivor,) = set(trio) - {dead, frozen}

    wait_for(lambda: len(job_dirs(spool, "done")) == len(jobs), 45, what="every job done")
    assert not job_dirs(spool, "failed")
    assert not job_dirs(spool, "processing")
    for source, job in by_source(spool).items():
        assert_done_once(job, jobs[source])
    assert taken_over(trio[survivor], dead_job.name), f"{dead}'s job not taken over"
    takes = taken_over(trio[survivor], frozen_job.name)
    assert takes and takes[0]["secured"] is True, takes
    before = snapshot(spool / "done")

    assert trio[frozen].stop(timeout=15) == 0
    assert snapshot(spool / "done") == before, "the stopped daemon changed done/ on waking"
    assert trio[survivor].stop() == 0


# -- 7. queue limits across daemons ----------------------------------------------------


def test_queue_limits_hold_across_daemons_to_within_one_file_each(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """limits.max_queue_depth 2 with two daemons and twelve files dropped at once: each
    daemon looks at processing/ again before every claim, so the queue never holds more
    than the limit plus one file per other daemon (design §2), files wait in incoming/
    meanwhile, and every job is done exactly once in the end."""
    cfg = config(tmp_path, delay_s=0.01)
    raw = yaml.safe_load(cfg.read_text())
    raw["limits"] = {"max_queue_depth": 2}
    cfg.write_text(yaml.safe_dump(raw))
    spool = tmp_path / "spool"
    a, b = start(daemons, cfg, "a"), start(daemons, cfg, "b")
    ids = {f"q{i}": drop(spool, f"q{i}", 30) for i in range(12)}
    most = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and len(job_dirs(spool, "done")) < 12:
        most = max(most, len(job_dirs(spool, "processing")))
        time.sleep(0.005)
    assert 2 <= most <= 3, f"{most} jobs in processing/ at once (limit 2, two daemons)"
    done = by_source(spool)
    assert sorted(done) == sorted(f"{name}.jsonl" for name in ids)
    for name, job_ids in ids.items():
        assert_done_once(done[f"{name}.jsonl"], job_ids)
    assert a.stop() == 0 and b.stop() == 0
