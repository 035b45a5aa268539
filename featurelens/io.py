"""Atomic file writes: a file (or directory) appears complete under its final name, or not at all.

Every writer goes through one of these, so a crash, a full disk or a Ctrl-C never leaves a half-written file that a
later run would trust. The data is written under a temporary name beside the target (``.<name>.tmp-<pid>``, which
readers never open), flushed to disk (fsync), renamed over the target (``os.replace``, atomic on POSIX and
Windows), and the directory is fsynced so that the rename itself survives a power cut. On failure the temporary file
is removed and the target is left as it was.

>>> atomic_write_json(path, {"format": 1})
>>> atomic_save(path, lambda tmp: save_file(tensors, str(tmp)))       # any writer that takes a path
>>> with atomic_dir(final) as tmp:                                    # a whole directory, renamed into place
...     (tmp / "config.json").write_text("{}")
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

TMP_PREFIX = "."
TMP_MARK = ".tmp-"


def tmp_path(path: str | Path) -> Path:
    """The temporary name a write to `path` uses (hidden, and tagged with this process's id)."""
    path = Path(path)
    return path.with_name(f"{TMP_PREFIX}{path.name}{TMP_MARK}{os.getpid()}")


def is_tmp(path: str | Path) -> bool:
    """Whether `path` is what an interrupted atomic write left behind (never read; safe to remove)."""
    name = Path(path).name
    return name.startswith(TMP_PREFIX) and TMP_MARK in name


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in directory `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_replace(src: str | Path, dst: str | Path) -> None:
    """Move the finished file `src` over `dst` durably: fsync it, rename it, fsync the directory."""
    src, dst = Path(src), Path(dst)
    if src.is_file():
        fsync_file(src)
    os.replace(src, dst)
    fsync_dir(dst.parent)


def atomic_save(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call `write(tmp)` to write the file at a temporary path, then move it to `path` atomically. Returns `path`.

    >>> atomic_save(out / "model.safetensors", lambda tmp: save_file(state, str(tmp)))
    """
    path = Path(path)
    tmp = tmp_path(path)
    try:
        write(tmp)
        atomic_replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_save(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_save(path, lambda tmp: tmp.write_text(text, encoding=encoding))


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2, **kwargs: Any) -> Path:
    """`obj` as JSON (and a final newline); serialization errors are raised before anything is written."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


@contextmanager
def atomic_dir(path: str | Path, *, replace: bool = True) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; on success it is renamed to `path`, on failure removed.

    replace=True swaps out an existing `path` (removed after the new one is complete); replace=False raises
    FileExistsError when it exists.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists")
    tmp = tmp_path(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        old = None
        if path.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside first
            old = path.with_name(f"{TMP_PREFIX}{path.name}.old-{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
