import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoold import fsio


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "state.json"
    fsio.atomic_write(p, b"one")
    fsio.atomic_write(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["state.json"]


def test_remove_stray_temps_only_removes_ours(tmp_path: Path) -> None:
    (tmp_path / ".state.json.ab12.tmp").write_text("x")
    (tmp_path / "user.tmp").write_text("x")
    (tmp_path / "output.jsonl").write_text("x")
    fsio.remove_stray_temps(tmp_path)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["output.jsonl", "user.tmp"]


def test_move_never_replaces(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        fsio.move(tmp_path / "a", tmp_path / "b")
    with pytest.raises(FileNotFoundError):
        fsio.move(tmp_path / "missing", tmp_path / "c")
    fsio.move(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not (tmp_path / "a").exists()


@pytest.mark.parametrize("no_links", [False, True])
def test_publish_never_replaces_even_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_links: bool
) -> None:
    if no_links:  # what link() says on SMB/CIFS or vfat

        def refuse(*_: object) -> None:
            raise PermissionError(errno.EPERM, "Operation not permitted")

        monkeypatch.setattr(os, "link", refuse)
    tmp = fsio.write_temp(tmp_path, "x.jsonl", [b"new"])
    (tmp_path / "x.jsonl").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        fsio.publish(tmp, tmp_path / "x.jsonl")
    assert (tmp_path / "x.jsonl").read_bytes() == b"old"
    fsio.publish(tmp, tmp_path / "y.jsonl")
    assert (tmp_path / "y.jsonl").read_bytes() == b"new" and not tmp.exists()


def test_append_log_truncates_uncommitted_tail(tmp_path: Path) -> None:
    p = tmp_path / "output.jsonl"
    p.write_bytes(b'{"a": 1}\n{"b": 2}\n{"torn')
    with fsio.AppendLog(p, keep_bytes=9) as log:
        log.append(b'{"c": 3}\n')
        assert p.read_bytes() == b'{"a": 1}\n'  # nothing written before sync
        log.sync()
        assert log.size == 18
    assert p.read_bytes() == b'{"a": 1}\n{"c": 3}\n'


def test_append_log_chunks_after_a_bigger_one_write_only_their_own_bytes(tmp_path: Path) -> None:
    # The pending buffer is reused from chunk to chunk: a short chunk after a long one
    # must not carry the long one's tail along.
    p = tmp_path / "output.jsonl"
    with fsio.AppendLog(p, 0) as log:
        for i in range(1000):
            log.append(b"long line %d\n" % i)
        log.sync()
        log.append(b"short\n")
        log.sync()
        log.sync()  # nothing new: a no-op
        log.append(b"last\n")
        log.sync()
        assert log.size == p.stat().st_size
    lines = p.read_bytes().splitlines()
    assert len(lines) == 1002 and lines[-2:] == [b"short", b"last"]


def test_append_log_close_without_sync_writes_nothing(tmp_path: Path) -> None:
    p = tmp_path / "output.jsonl"
    with fsio.AppendLog(p, 0) as log:
        log.append(b"x\n")
    assert p.read_bytes() == b""


def test_append_log_refuses_a_file_shorter_than_its_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "output.jsonl"
    p.write_bytes(b"abc")
    with pytest.raises(RuntimeError, match="truncated"):
        fsio.AppendLog(p, keep_bytes=10)


def test_create_exclusive(tmp_path: Path) -> None:
    p = tmp_path / "owner.json"
    assert fsio.create_exclusive(p, b"1")
    assert not fsio.create_exclusive(p, b"2")
    assert p.read_bytes() == b"1"


def test_remove_tree_does_not_follow_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    staging = tmp_path / "staging"
    staging.mkdir()
    os.symlink(outside, staging / "link")
    fsio.remove_tree(staging)
    assert not staging.exists() and (outside / "keep").exists()


# -- a full disk (a real tmpfs, filled up) --------------------------------------------


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str = "1m") -> Iterator[Path]:
    """A real tmpfs of `size` mounted at `where` (created), unmounted afterwards.
    Skips the test where mounting is not permitted (not root, no CAP_SYS_ADMIN)."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to fill up (needs root): {mount.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill(path: Path) -> int:
    """Append to `path` until the filesystem is full (ENOSPC); the bytes it now holds."""
    with open(path, "ab", buffering=0) as f:
        for block in (1 << 16, 4096):
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * block)
        return f.tell()


def test_atomic_write_on_a_full_disk_raises_and_leaves_no_temp(tmp_path: Path) -> None:
    """The write (or fsync) of the temp file fails with ENOSPC: the temp is removed,
    the old file stays as it was (a heartbeat rewritten every beat on a full disk used
    to leave one temp per beat)."""
    with mounted_tmpfs(tmp_path / "full") as disk:
        p = disk / "state.json"
        fsio.atomic_write(p, b"old")
        fill(disk / "filler")
        for _ in range(3):
            with pytest.raises(OSError) as e:
                fsio.atomic_write(p, b"new" * 10_000)
            assert e.value.errno == errno.ENOSPC
        assert sorted(x.name for x in disk.iterdir()) == ["filler", "state.json"]
        assert p.read_bytes() == b"old"


def test_write_temp_and_create_exclusive_on_a_full_disk_leave_nothing(tmp_path: Path) -> None:
    with mounted_tmpfs(tmp_path / "full") as disk:
        fill(disk / "filler")
        with pytest.raises(OSError):
            fsio.write_temp(disk, "x.jsonl", [b"line\n" * 10_000])
        with pytest.raises(OSError):
            fsio.create_exclusive(disk / "owner.json", b'{"instance": "x"}' * 1000)
        assert [x.name for x in disk.iterdir()] == ["filler"]


def test_remove(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    fsio.remove(tmp_path / "x")
    fsio.remove(tmp_path / "x")  # gone already: nothing to do
    assert list(tmp_path.iterdir()) == []
