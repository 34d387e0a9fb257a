"""Incarnations, their lease directories, liveness on the observer's clock, fencing.

The protocol is docs/design.md §2. In short: every `spoold run` process is an
incarnation (instance name + random token) with a lease directory under heartbeats/;
everything it changes in a job is renamed out of that directory, so renaming the
directory away (fencing) makes a stalled daemon harmless. Peers are judged alive or
stale by watching their heartbeat change on the observer's own monotonic clock; wall
clocks of different hosts are never compared.

Imports nothing heavy (spool-status reads heartbeats with spoold.heartbeat, not this).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import structlog

from spoold import fsio
from spoold.fsio import Fenced
from spoold.layout import FAILED, PROCESSING

TOKEN_BYTES = 6  # 12 hex digits
LEASE_SUFFIX = ".lease"
FENCED_MARK = ".fenced-"
HEARTBEAT_GRAVE_SUFFIX = ".grave"
POLL_S = 0.05  # how often a starting daemon looks at its instance's heartbeat again

log = structlog.get_logger("spoold.lease")


def _host_id() -> str:
    """The kernel's boot id and this pid namespace: records with the same host_id name
    pids of one pid space, so a pid can be checked. Hostnames alone repeat (cloned VMs,
    containers); an unknown part makes the id unique to this process, so that pids are
    then never trusted."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = f"unknown-{secrets.token_hex(8)}"
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = f"unknown-{secrets.token_hex(8)}"
    return f"{boot}/{pidns}"


HOST_ID = _host_id()


def spoold_alive(pid: object) -> bool:
    """Whether `pid` is a live spoold process in this pid space (a reused pid is not)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if pid == os.getpid():
        return True  # this process (another incarnation of it, or a test's Spool)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Alive, another user's: with /proc mounted hidepid its cmdline cannot be
        # read, and that must not make it dead.
        with contextlib.suppress(OSError):
            return b"spoold" in Path(f"/proc/{pid}/cmdline").read_bytes()
        return True
    try:
        return b"spoold" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False  # exited meanwhile
    except OSError:
        return True  # no /proc to tell: assume it is


def running_here(holder: Holder) -> bool:
    """Whether a holder is a spoold process of our pid space that runs (not stopped by a
    signal, not a zombie): a second daemon of its instance can exit 2 at once rather
    than watch for its next beat. One that is stopped is judged by its heartbeat."""
    if holder.host_id != HOST_ID or holder.pid is None or holder.pid == os.getpid():
        return False
    if not spoold_alive(holder.pid):
        return False
    try:
        stat = Path(f"/proc/{holder.pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[:1]
    return bool(state) and state[0] in ("R", "S")  # D: hung in I/O, may be stale


def lease_dir_name(instance: str, token: str) -> str:
    return f".{instance}.{token}{LEASE_SUFFIX}"


def parse_lease_dir(name: str) -> tuple[str, str] | None:
    """(instance, token) of a lease directory's name, or None."""
    if not (name.startswith(".") and name.endswith(LEASE_SUFFIX)):
        return None
    instance, _, token = name[1 : -len(LEASE_SUFFIX)].rpartition(".")
    return (instance, token) if instance and token else None


def _is_token(value: object) -> bool:
    return isinstance(value, str) and len(value) == 2 * TOKEN_BYTES and value.isalnum()


@dataclass(frozen=True)
class Holder:
    """The incarnation a record names: a heartbeat, an owner.json, a staging dir."""

    instance: str
    token: str | None = None  # None: a record of a spoold from before incarnations
    hostname: str | None = None
    pid: int | None = None
    host_id: str | None = None

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Holder | None:
        instance = record.get("instance")
        if not isinstance(instance, str) or not instance:
            return None
        token, pid = record.get("token"), record.get("pid")
        hostname, host_id = record.get("hostname"), record.get("host_id")
        return cls(
            instance,
            token if _is_token(token) else None,
            hostname if isinstance(hostname, str) else None,
            pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
            host_id if isinstance(host_id, str) else None,
        )

    def provably_dead(self) -> bool:
        """Its process is gone for sure: in our pid space, and no spoold has its pid."""
        return self.host_id == HOST_ID and self.pid is not None and not spoold_alive(self.pid)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.hostname}"


class Verdict(Enum):
    ALIVE = "alive"
    STALE = "stale"  # no change for stale_after_s on our clock
    DEAD = "dead"  # lease directory gone, process gone, or stopped cleanly


def read_record(path: Path) -> dict[str, Any] | None:
    """A JSON object record (heartbeat, owner.json), or None if missing or unreadable."""
    return read_raw(path)[1]


def _fingerprint(beat: dict[str, Any] | None) -> tuple[Any, ...] | None:
    """What must change for a heartbeat to prove its writer alive: its content."""
    if beat is None:
        return None
    keys = ("seq", "updated_at", "token", "pid", "hostname", "status")
    return tuple(json.dumps(beat.get(k), sort_keys=True) for k in keys)


class Observer:
    """Liveness of other incarnations, judged on this process's monotonic clock.

    Something is stale when it has not changed for `stale_after_s` counted from our
    first reading of its current content; every judgement reads it again, so an
    observer that was itself paused sees the beats it missed."""

    def __init__(
        self,
        heartbeats: Path,
        stale_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.heartbeats = heartbeats
        self.stale_after_s = stale_after_s
        self.clock = clock
        # key -> (fingerprint, when first read so, whether it was seen changing)
        self._seen: dict[str, tuple[Any, float, bool]] = {}

    def unchanged_for(self, key: str, fingerprint: Any) -> float:
        """Seconds (our clock) that `key` has had `fingerprint`; 0 when it is new."""
        now = self.clock()
        seen = self._seen.get(key)
        if seen is None or seen[0] != fingerprint:
            self._seen[key] = (fingerprint, now, seen is not None)
            return 0.0
        return now - seen[1]

    def stale(self, key: str, fingerprint: Any) -> bool:
        return self.unchanged_for(key, fingerprint) >= self.stale_after_s

    def beat(self, instance: str) -> dict[str, Any] | None:
        return read_record(self.heartbeats / f"{instance}.json")

    def judge(self, holder: Holder) -> Verdict:
        if (
            holder.token is not None
            and not (self.heartbeats / lease_dir_name(holder.instance, holder.token)).is_dir()
        ):
            return Verdict.DEAD
        if holder.provably_dead():
            return Verdict.DEAD
        beat = self.beat(holder.instance)
        if holder.token is None and not (self.heartbeats / f"{holder.instance}.json").exists():
            # A record of a spoold before incarnations (or written by hand) whose instance
            # never beat here: every daemon writes its heartbeat before it owns anything.
            return Verdict.DEAD
        if (
            beat is not None
            and beat.get("token") == holder.token  # both None: a spoold before tokens
            and beat.get("status") == "stopped"
        ):
            return Verdict.DEAD
        if self.stale(f"beat:{holder.instance}", _fingerprint(beat)):
            return Verdict.STALE
        return Verdict.ALIVE

    def gone(self, holder: Holder) -> bool:
        """Dead or stale: its claims may be taken (after fencing it)."""
        return self.judge(holder) is not Verdict.ALIVE

    def undecided(self, holder: Holder) -> bool:
        """Alive as far as we know, but not seen changing yet: it may still turn out
        stale (--drain waits for those; one seen beating is alive: no need to wait)."""
        if self.judge(holder) is not Verdict.ALIVE:
            return False
        seen = self._seen.get(f"beat:{holder.instance}")
        return seen is not None and not seen[2]


def fence(heartbeats: Path, holder: Holder) -> None:
    """Make an incarnation harmless (design §2): rename its lease directory away, then
    remove it. After the rename nothing it writes through the directory can land."""
    if holder.token is None:
        return  # a spoold from before incarnations: nothing to fence
    lease = heartbeats / lease_dir_name(holder.instance, holder.token)
    grave = heartbeats / f"{lease.name}{FENCED_MARK}{secrets.token_hex(3)}"
    try:
        fsio.move(lease, grave)
    except FileNotFoundError:
        return  # fenced already, or exited
    remove_fenced(grave)


def remove_fenced(grave: Path) -> None:
    """Remove a fenced lease directory (its own incarnation can no longer write into
    it; another fencer may be removing it too). What cannot go yet (an NFS client's
    `.nfs*` file for a temp its writer still holds open) goes at a later recovery."""
    if not rescue_parked(grave):
        # A job could not be put back (a full disk, a failing mount): nothing of the
        # directory goes; a later recovery tries again (it finds `.fenced-` trees).
        return
    # Never a recursive delete: a filing move that resolved the lease directory before
    # the fence (an NFS client's cached handle) may land a job here after the rescue.
    # Files go (temps, graves, unique-id buckets), a directory is a job and stays, and
    # the last rmdir fails rather than delete one that landed meanwhile.
    with contextlib.suppress(OSError):
        for child in grave.iterdir():
            if child.is_dir() and not child.is_symlink():
                return  # landed after the rescue: the next recovery puts it back
            fsio.remove(child)
        fsio.remove_dir(grave)


def rescue_parked(lease_dir: Path) -> bool:
    """Put back in processing/ any job directory parked in a lease directory (design §2
    W3: a job is filed through its owner's lease directory; its owner died or was
    fenced between the two moves). Recovery files it from there (C9). Never removes a
    job: one whose name is taken in processing/ goes to failed/, said loudly. False if
    a job is still there (the directory must then stay)."""
    try:
        parked = [e for e in os.scandir(lease_dir) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return True  # removed meanwhile by another fencer, who rescued first
    except OSError as e:
        log.error("cannot look for parked jobs", lease_dir=str(lease_dir), error=str(e))
        return False
    spool = lease_dir.parent.parent
    rescued = True
    for entry in parked:
        home = spool / PROCESSING / entry.name
        try:
            try:
                fsio.move(Path(entry.path), home)
            except FileExistsError:
                home = spool / FAILED / f"{entry.name}-rescued-{secrets.token_hex(3)}"
                fsio.move(Path(entry.path), home)
                log.error("a job parked in a lease directory had a twin in processing/",
                          job_id=entry.name, moved_to=str(home))  # fmt: skip
        except FileNotFoundError:
            if os.path.lexists(entry.path):  # not a peer's doing: processing/ is missing?
                log.error("cannot put a parked job back", job_id=entry.name,
                          error=f"{home.parent} is missing")  # fmt: skip
                rescued = False
            # else another fencer of the same directory was first
        except OSError as e:
            log.error("cannot put a parked job back", job_id=entry.name, error=str(e))
            rescued = False
    return rescued


def take_record(
    path: Path,
    grave: Path,
    judged: bytes,
    new: bytes,
    displaced: Callable[[bytes], None],
) -> bool:
    """Replace a record judged dead (`judged`: its bytes, read once) by ours, `new`:
    rename it to `grave` (in the taker's own lease directory: a taker fenced meanwhile
    can neither bury nor put back), create ours with O_EXCL, check the grave holds what
    was judged, and that `path` still holds ours. True if ours now.

    If the grave holds another record, a live taker got in between our look and our
    rename, and we buried its fresh record: it is put back over ours (it keeps what it
    won). If someone created a record meanwhile, the buried taker has lost its record
    to that one: `displaced(buried)` must fence it (design §2), or two would hold. A
    taker whose record we buried before it was written finds, at its own last check,
    that `path` no longer holds its record, and steps back."""
    try:
        fsio.move(path, grave)
    except FileNotFoundError:
        return False  # another taker renamed it first (or we are fenced: no grave dir)
    restored = False
    try:
        created = fsio.create_exclusive(path, new)
        try:
            buried: bytes | None = grave.read_bytes()
        except FileNotFoundError:
            buried = None  # our lease dir was fenced: we are dead to everyone
        if buried is None:
            return False
        if buried != judged:
            if created:
                os.replace(grave, path)  # the other taker's record, back over ours
                restored = True
                fsio.fsync_dir(path.parent)
            else:
                displaced(buried)
            return False
        return created and holds(path, new)
    finally:
        if not restored:
            fsio.remove(grave)  # read; kept, one would pile up per take-over


def holds(path: Path, mine: bytes) -> bool:
    """Whether `path` holds our record now (a taker's last check, design §2 step 4)."""
    try:
        return path.read_bytes() == mine
    except FileNotFoundError:
        return False


def read_raw(path: Path) -> tuple[bytes | None, dict[str, Any] | None]:
    """A record's bytes (None if missing) and its object (None if not one)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, None
    except OSError:
        return b"", None
    return raw, parse_record(raw)


def parse_record(raw: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def step_back(path: Path, mine: bytes) -> None:
    """Remove `path` if it still holds our record `mine`, and only then."""
    try:
        if path.read_bytes() != mine:
            return
    except FileNotFoundError:
        return
    fsio.remove(path)


class InstanceTaken(Exception):
    """A live daemon holds this instance name: this one must not run (exit 2)."""


class Lease:
    """This incarnation: its token, its lease directory, its heartbeat's freshness."""

    def __init__(
        self,
        heartbeats: Path,
        instance: str,
        stale_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.heartbeats = heartbeats
        self.instance = instance
        self.stale_after_s = stale_after_s
        self.clock = clock
        self.token = secrets.token_hex(TOKEN_BYTES)
        self.dir = heartbeats / lease_dir_name(instance, self.token)
        self.ok_at: float | None = None  # monotonic start of the last beat that landed
        self.fenced = False
        self.made = False
        self.beating = False  # a daemon's lease: fresh only while its heartbeats land
        self.holding = False  # the instance lease is ours: our heartbeat is ours to write
        self.last_write_s = 0.0  # how long the last heartbeat write took

    @property
    def heartbeat_path(self) -> Path:
        return self.heartbeats / f"{self.instance}.json"

    def identity(self) -> dict[str, Any]:
        return {
            "instance": self.instance,
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "host_id": HOST_ID,
            "token": self.token,
        }

    def holder(self) -> Holder:
        return Holder(self.instance, self.token, socket.gethostname(), os.getpid(), HOST_ID)

    def ensure_dir(self) -> None:
        """Make our lease directory, once: made, a missing one means fenced, and making
        it again would bring a fenced incarnation back to life."""
        if not self.made:
            fsio.make_dir(self.heartbeats)
            self.dir.mkdir()
            fsio.fsync_dir(self.heartbeats)
            self.made = True

    def check(self) -> None:
        """The fence check (design §2 W2): raise Fenced if our lease directory is gone."""
        if self.fenced or not self.dir.is_dir():
            self.fenced = True
            raise Fenced.gone(self.dir)

    def fresh(self) -> bool:
        """Whether we may commit: our last heartbeat began less than stale_after_s / 2
        ago on our clock (design §2), and we are not fenced."""
        if self.fenced:
            return False
        if not self.beating:
            return True  # a command's or a test's: no heartbeat to keep fresh
        return self.ok_at is not None and self.clock() - self.ok_at < self.stale_after_s / 2

    def write(self, path: Path, data: bytes | Iterable[bytes]) -> None:
        """Replace `path` through our lease directory (design §2 W1)."""
        try:
            fsio.atomic_write(path, data, via=self.dir)
        except Fenced:
            self.fenced = True
            raise

    def beat(self, data: bytes) -> None:
        """Write our heartbeat; the lease is fresh from the moment this write began."""
        if not self.holding:
            raise Fenced(f"instance {self.instance!r} is not held by this incarnation")
        began = self.clock()
        self.write(self.heartbeat_path, data)
        self.ok_at = began
        self.last_write_s = self.clock() - began
        self.beating = True

    def claim_instance(
        self, observer: Observer, first_beat: Callable[[], bytes], stopping: Callable[[], bool]
    ) -> bool:
        """Become the one live daemon of our instance name (design §2, the instance
        lease). Raises InstanceTaken naming the holder; False if asked to stop first."""
        self.ensure_dir()  # before the lease record that names it
        path = self.heartbeat_path
        first: object = None
        seen_any = False
        vanished_at: float | None = None
        unreadable_tries = 0
        while True:  # a stop ends only the waiting: a free instance is taken at once
            raw, record = read_raw(path)
            if raw is None and seen_any:
                # Gone since we looked: another starter is taking it over right now. Its
                # record is due at once (then we name it, below); one that never comes
                # is a starter that died in the middle (L2): then the name is free.
                now = self.clock()
                vanished_at = now if vanished_at is None else vanished_at
                if now - vanished_at < self.stale_after_s:
                    if stopping():
                        return False
                    time.sleep(POLL_S)
                    continue
                seen_any, vanished_at = False, None
            if raw is None:
                began = self.clock()
                if fsio.create_exclusive(path, first_beat()):
                    self.ok_at, self.beating, self.holding = began, True, True
                    return True
                continue  # another starter created it first: look at it
            holder = Holder.from_record(record or {})
            fingerprint = _fingerprint(record) if record is not None else raw
            if seen_any and fingerprint != first:
                # The record changed while we watched: its writer is alive. One caught
                # half written (not spoold's own atomic replace) is read again, to name it.
                if holder is None and unreadable_tries < 20:
                    unreadable_tries += 1
                    time.sleep(POLL_S)
                    continue
                who = holder.describe() if holder is not None else "another daemon"
                raise self._taken(f"{who}; its heartbeat {path} changed while this one watched")
            if not seen_any:
                first, seen_any = fingerprint, True
            if holder is not None and holder.token == self.token:
                self.holding = True
                return True
            if (
                holder is not None
                and running_here(holder)
                and observer.judge(holder) is Verdict.ALIVE
            ):
                raise self._taken(holder.describe())
            if holder is None:  # unreadable: judged by its bytes
                dead = observer.stale(f"record:{path}", raw)
            else:
                dead = observer.gone(holder)
            if dead:
                if holder is not None:
                    fence(self.heartbeats, holder)
                grave = self.dir / f"{path.name}{HEARTBEAT_GRAVE_SUFFIX}"
                began = self.clock()
                if take_record(path, grave, raw, first_beat(), self.fence_displaced):
                    self.ok_at, self.beating, self.holding = began, True, True
                    return True
                continue
            if stopping():
                return False
            time.sleep(POLL_S)

    def _taken(self, who: str) -> InstanceTaken:
        return InstanceTaken(
            f"instance {self.instance!r}: another spoold runs as this instance ({who}): "
            "give each daemon on a spool its own instance (config key instance, or "
            "--instance)"
        )

    def fence_displaced(self, record: bytes) -> None:
        """`take_record`'s `displaced`: a live taker's record we buried while another
        created its own; that taker believes it holds the record and must be fenced
        (design §2 step 4). Never ourselves."""
        holder = Holder.from_record(parse_record(record) or {})
        if holder is not None and holder.token != self.token:
            fence(self.heartbeats, holder)

    def release(self) -> None:
        """A clean exit: after the last heartbeat, our lease directory goes (we are
        dead to everyone from here)."""
        self.fenced, self.holding = True, False  # nothing more is written through it
        # Renamed away first, as a fence does: a filing move still in flight (a side
        # thread's) then fails rather than landing in a tree being removed.
        with contextlib.suppress(OSError):
            fence(self.heartbeats, Holder(self.instance, self.token))


def heartbeat_grave_taker(name: str) -> str | None:
    """The token of the taker that made a heartbeat grave (`.<instance>.json.<token>.grave`)."""
    if not (name.startswith(".") and name.endswith(HEARTBEAT_GRAVE_SUFFIX)):
        return None
    token = name[: -len(HEARTBEAT_GRAVE_SUFFIX)].rpartition(".")[2]
    return token if _is_token(token) else None
