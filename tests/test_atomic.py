"""The one atomic-write helper (fastpatch.atomic): a file or directory is replaced whole or not at all."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from fastpatch.atomic import atomic_directory, atomic_file, write_atomic, write_json_atomic


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_write_json_and_text(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "a" / "x.json", {"k": [1, 2], "p": tmp_path})
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"k": [1, 2], "p": str(tmp_path)}
    write_atomic(tmp_path / "t.txt", "héllo\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "héllo\n" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert _mode(tmp_path / "t.txt") == 0o666 & ~umask  # not mkstemp's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "t.txt"]


def test_a_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as fh:
            fh.write("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    with pytest.raises(FileNotFoundError):
        with atomic_file(tmp_path / "missing" / "y", "wb", parents=False) as fh:
            fh.write(b"")


def test_atomic_directory_replaces_whole(tmp_path: Path) -> None:
    target = tmp_path / "d"
    with atomic_directory(target) as tmp:
        (tmp / "one").write_text("1")
    assert [p.name for p in target.iterdir()] == ["one"]
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "two").write_text("2")
            raise RuntimeError("killed")
    assert [p.name for p in target.iterdir()] == ["one"]
    with atomic_directory(target) as tmp:
        (tmp / "two").write_text("2")
    assert [p.name for p in target.iterdir()] == ["two"]
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary or stale directory left
