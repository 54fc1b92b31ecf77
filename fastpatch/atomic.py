"""Atomic file and directory writes: the one helper every file fastpatch writes goes through.

A file is written under a temporary name in its own directory, flushed and fsynced, given the
permissions an ordinary ``open`` would (``mkstemp`` makes files 0600), renamed over its final name,
and the directory is fsynced, so after a crash a reader sees the old file or the new one, never a
torn one. A directory (a checkpoint, a saved editor, a model cache) is built the same way: a
temporary directory beside its final place, every file in it fsynced, then one rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_directory",
    "atomic_file",
    "fsync_dir",
    "json_default",
    "publish_directory",
    "temp_dir_beside",
    "write_atomic",
    "write_json_atomic",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory (so a rename inside it is durable); a no-op where directories have no fds."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], mode: str = "w", encoding: str | None = "utf-8", parents: bool = True
) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode`` is ``"w"`` (text, ``encoding``) or ``"wb"``; ``parents``: create missing parent
    directories (else a missing one is a ``FileNotFoundError``). On an exception the temporary
    file is removed and ``path`` is untouched.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    target = Path(path)
    if parents:
        target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_atomic(path: str | os.PathLike[str], data: str | bytes | memoryview) -> None:
    """Write text (UTF-8) or bytes to ``path`` atomically."""
    if isinstance(data, str):
        with atomic_file(path, "w") as fh:
            fh.write(data)
    else:
        with atomic_file(path, "wb") as fh:
            fh.write(data)


def json_default(obj: Any) -> Any:
    """``json.dump``'s ``default``: arrays and tensors as lists, scalars as numbers, paths as text."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json_atomic(path: str | os.PathLike[str], obj: Any, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON (UTF-8, a final newline) to ``path`` atomically."""
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=indent, ensure_ascii=False, default=json_default)
        fh.write("\n")


def temp_dir_beside(target: str | os.PathLike[str]) -> Path:
    """A new empty directory beside ``target`` (same filesystem, so it can be renamed into place),
    with the permissions an ordinary ``mkdir`` would give (``mkdtemp`` makes it 0700)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def publish_directory(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Make the finished directory ``tmp`` the directory ``target`` in one rename.

    Every file under ``tmp`` is fsynced and given ordinary permissions first; an existing
    ``target`` is moved aside and deleted (a reader sees the old or the new one).
    """
    tmp, target = Path(tmp), Path(target)
    mask = _umask()
    for f in tmp.rglob("*"):
        f.chmod((0o777 if f.is_dir() else 0o666) & ~mask)  # some writers create 0600 files
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        else:
            fsync_dir(f)
    fsync_dir(tmp)
    stale = None
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
        os.replace(target, stale / "old")
    os.rename(tmp, target)
    fsync_dir(target.parent)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary directory to fill; on a clean exit it replaces ``target`` atomically
    (:func:`publish_directory`); on an exception it is deleted and ``target`` is untouched."""
    tmp = temp_dir_beside(target)
    try:
        yield tmp
        publish_directory(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
