"""Durability primitives. The only module that renames, fsyncs or truncates.

Every step that must survive a crash is visible here, in order (see docs/design.md).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(fd: int, data: bytes | Iterable[bytes]) -> None:
    """Write all of `data` (bytes, or blocks of them) to `fd`, fsync it, and close it
    (also when that fails)."""
    try:
        for block in (data,) if isinstance(data, bytes) else data:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


class Fenced(Exception):
    """This incarnation's lease directory is gone: another daemon judged it dead and
    took its claims over (design §2). Nothing it writes lands any more."""

    @classmethod
    def gone(cls, lease_dir: Path) -> Fenced:
        return cls(f"{lease_dir} is gone: another daemon took this one's work over")


def atomic_write(path: Path, data: bytes | Iterable[bytes], via: Path | None = None) -> None:
    """Replace `path` with `data`: temp file + fsync + rename + fsync of the directory.

    With `via` (a lease directory, design §2 W1) the temp is written there, so the
    write fails with Fenced once the directory is gone. A rename that reports an error
    after it happened (a retransmitted NFS RENAME answers ENOENT) is success."""
    where = via if via is not None else path.parent
    tmp = where / f".{path.name}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileNotFoundError:
        if via is not None and not os.path.isdir(via):
            raise Fenced.gone(via) from None
        raise
    try:
        _write_synced(fd, data)
        os.rename(tmp, path)
    except BaseException as e:
        if isinstance(e, OSError) and _renamed_after_all(tmp, where):
            fsync_dir(path.parent)
            return
        # A full disk fails the write or the fsync: the temp goes, or a heartbeat
        # rewritten every beat would leave one per beat.
        with contextlib.suppress(OSError):
            tmp.unlink()
        if via is not None and not os.path.isdir(via):
            raise Fenced.gone(via) from e
        raise
    fsync_dir(path.parent)


def prefix_blocks(path: Path, nbytes: int, block: int = 1 << 20) -> Iterator[bytes]:
    """The first `nbytes` of a file, in blocks (a result file's committed prefix, copied
    without holding it in memory). ValueError if the file is shorter."""
    with open(path, "rb") as f:
        left = nbytes
        while left:
            data = f.read(min(block, left))
            if not data:
                raise ValueError(f"{path} has fewer than the {nbytes} bytes committed")
            left -= len(data)
            yield data


def _renamed_after_all(tmp: Path, where: Path) -> bool:
    """After a failed rename of our temp: whether it happened anyway. The temp is ours
    alone (only a fence removes it, and then its directory is gone too)."""
    return not os.path.lexists(tmp) and os.path.isdir(where)


def atomic_write_json(path: Path, obj: Any, via: Path | None = None) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), via)


def read_json(path: Path) -> Any:
    with open(path, "rb") as f:
        return json.load(f)


def move(src: Path, dst: Path) -> None:
    """Rename a file or a whole directory, then make both directories durable.

    Raises FileNotFoundError when `src` is gone (another daemon moved it first) and
    FileExistsError rather than replacing an existing `dst`. A rename that reports an
    error although it happened (`src` gone, `dst` there: a retransmitted NFS RENAME
    answers ENOENT) is success: the caller must never clean up after it.
    """
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(dst)
    try:
        os.rename(src, dst)
    except OSError:
        if os.path.lexists(src) or not os.path.lexists(dst):
            raise
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def publish(src: Path, dst: Path) -> None:
    """Give a finished temp file its final name without ever replacing an existing file.

    link + unlink rather than rename: rename would silently overwrite `dst`.
    Raises FileExistsError when `dst` exists. Where the filesystem has no hard
    links (SMB/CIFS, vfat, some FUSE mounts: EPERM or ENOTSUP), `move`: it checks
    that `dst` does not exist first, a check a file appearing in between defeats.
    """
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        move(src, dst)
        return
    os.unlink(src)
    fsync_dir(dst.parent)


def write_temp(directory: Path, label: str, chunks: Iterable[bytes]) -> Path:
    """Write `chunks` to a new dot-named temp file in `directory` and fsync it."""
    tmp = directory / f".{label}.{secrets.token_hex(4)}{TMP_SUFFIX}"
    # Opened outside the try: a temp of that name that we did not create is not ours.
    f = open(tmp, "xb")  # noqa: SIM115
    try:
        with f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def make_dir(path: Path) -> None:
    """Create a directory (and parents) durably; fine if it already exists."""
    if path.is_dir():
        return
    path.mkdir(parents=True, exist_ok=True)
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` with `data` only if it does not exist. True if we created it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    try:
        _write_synced(fd, data)
    except BaseException:
        path.unlink(missing_ok=True)  # an empty one would claim the name for nobody
        raise
    fsync_dir(path.parent)
    return True


def remove(path: Path) -> None:
    """Remove a file durably (unlink + fsync of its directory); fine if it is gone,
    also when the unlink said otherwise after it happened."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError:
        if os.path.lexists(path):
            raise
    fsync_dir(path.parent)


def remove_dir(path: Path) -> None:
    """Remove an empty directory durably; fine if it is gone (whatever rmdir said)."""
    try:
        path.rmdir()
    except FileNotFoundError:
        return
    except OSError:
        if os.path.lexists(path):
            raise
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove a directory tree that is ours alone (a fenced lease directory: design §2).
    Never follows symlinks; never used on a directory that may hold a submitted file."""
    if path.is_symlink() or not path.is_dir():
        remove(path)
        return
    for child in path.iterdir():
        remove_tree(child)
    remove_dir(path)


def remove_stray_temps(directory: Path, prefix: str = ".") -> list[Path]:
    """Delete temp files left by an interrupted atomic_write in `directory` (those whose
    names start with `prefix`)."""
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(prefix) and entry.name.endswith(TMP_SUFFIX) and entry.is_file():
            entry.unlink(missing_ok=True)  # another daemon's recovery may be first
            removed.append(entry)
    if removed:
        fsync_dir(directory)
    return removed


class AppendLog:
    """An append-only result file: appends are buffered in memory until `sync()`.

    Nothing reaches the file before `sync()`, so a run that must abandon its work
    (it lost the job to another daemon) can `close()` without writing a byte.
    """

    def __init__(
        self, path: Path, keep_bytes: int, check: Callable[[], None] | None = None
    ) -> None:
        """Open `path`, cutting anything after `keep_bytes` (an uncommitted tail).

        `check` runs after the open and before the first change (design §2 W2: the
        fence check, which raises Fenced): a daemon that took the job over meanwhile
        replaces the file after fencing us, so what we opened is then the old file."""
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            if check is not None:
                check()
            size = os.fstat(self._fd).st_size
            if size < keep_bytes:
                raise RuntimeError(
                    f"{path} has {size} bytes but its checkpoint says {keep_bytes}: "
                    "the file was truncated behind spoold's back"
                )
            if size > keep_bytes:
                os.ftruncate(self._fd, keep_bytes)
                os.fsync(self._fd)
            os.lseek(self._fd, keep_bytes, os.SEEK_SET)
        except BaseException:
            os.close(self._fd)  # a failed cut (EIO) must not leak the descriptor
            self._fd = -1
            raise
        # Appended lines are copied into one buffer that is rewound, not freed, at each
        # sync: it keeps its size from chunk to chunk. Keeping the lines themselves until
        # the sync (or freeing the buffer) made malloc hand memory back to the kernel
        # at every commit and fault it in again: one page fault per output line.
        self._pending = io.BytesIO()
        self._synced = False  # the first sync always fsyncs: the file may be new
        self.size = keep_bytes  # bytes in the file once the pending lines are synced

    def append(self, line: bytes) -> None:
        self.size += self._pending.write(line)

    def _write_out(self) -> None:
        used = self._pending.tell()
        with self._pending.getbuffer() as buffer:
            view = buffer[:used]
            while view:
                view = view[os.write(self._fd, view) :]
            view.release()
        self._pending.seek(0)

    def sync(self) -> None:
        """Write out the pending lines and fsync: everything appended so far is durable.
        Nothing appended since the last sync: nothing to do, it is durable already."""
        if self._synced and not self._pending.tell():
            return
        self._write_out()
        os.fsync(self._fd)
        self._synced = True

    def close(self) -> None:
        """Close, dropping anything not synced (it was never committed)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AppendLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
