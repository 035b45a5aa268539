"""Atomic file writes: a file (or directory) appears complete under its final name, or not at all.

Every writer goes through one of these, so a crash, a full disk or a Ctrl-C never leaves a half-written file that a
later run would trust. The data is written under a temporary name beside the target
(``.<name>.tmp-<pid>-<thread>-<random>``, unique per write, so threads and processes writing one target never collide;
readers never open such names), flushed to disk (fsync), renamed over the target (``os.replace``, atomic on POSIX and
Windows), and the directory is fsynced so that the rename itself survives a power cut. On failure the temporary file
is removed and the target is left as it was. What a killed process leaves behind (temporary files, a directory
half swapped by `atomic_dir`) is put right by `clean_stale_tmp`, which the server, training and analysis call on the
directories they own when they start.

>>> atomic_write_json(path, {"format": 1})
>>> atomic_save(path, lambda tmp: save_file(tensors, str(tmp)))       # any writer that takes a path
>>> with atomic_dir(final) as tmp:                                    # a whole directory, renamed into place
...     (tmp / "config.json").write_text("{}")
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .engine.errors import FeaturelensError

TMP_PREFIX = "."
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"  # a directory `atomic_dir` moved aside while it swaps the new one in
KEEP_FILE = ".featurelens-keep.json"  # in a directory being swapped in: what to carry over from the old one
# the names this module makes (and `.<name>.tmp-<pid>`, what earlier versions made): the pid is the writer's
_OWNER = re.compile(r"(?:\.tmp-(\d+)(?:-\d+-[0-9a-f]{8})?|\.old-(\d+)-\d+-[0-9a-f]{8})$")


def _unique(path: Path, mark: str) -> Path:
    # pid (whose files these are, see clean_stale_tmp), thread, and randomness: unique per write
    return path.with_name(f"{TMP_PREFIX}{path.name}{mark}{os.getpid()}-{threading.get_ident()}-{uuid.uuid4().hex[:8]}")


def tmp_path(path: str | Path) -> Path:
    """A fresh temporary name for one write to `path`: hidden, beside it, unique to this write."""
    return _unique(Path(path), TMP_MARK)


def is_tmp(path: str | Path) -> bool:
    """Whether `path` is what an atomic write uses or left behind (never read by anything)."""
    name = Path(path).name
    return name.startswith(TMP_PREFIX) and _OWNER.search(name) is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists (another user's), or we cannot tell: leave its files alone
    return True


def clean_stale_tmp(root: str | Path, *, recursive: bool = True) -> list[Path]:
    """Remove what killed writers left under `root` (`.<name>.tmp-*` files and directories) and finish or undo a
    directory swap of `atomic_dir` that was cut off; returns the paths removed or restored.

    Only the leftovers of processes that no longer run are touched (the writer's pid is in the name), so this is
    safe while other processes write beside it.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in (root.rglob(f"{TMP_PREFIX}*") if recursive else root.glob(f"{TMP_PREFIX}*")) if is_tmp(p)]
    done = []
    # an "old" directory first: it may have to go back in place of a missing target
    for p in sorted(found, key=lambda p: (OLD_MARK not in p.name, len(p.parts))):
        if not p.exists() and not p.is_symlink():
            continue  # inside something removed already
        m = _OWNER.search(p.name)
        if m is None or _pid_alive(int(m.group(1) or m.group(2))):
            continue
        if OLD_MARK in p.name:
            target = p.with_name(p.name[len(TMP_PREFIX):p.name.index(OLD_MARK)])
            if not target.exists():
                os.replace(p, target)  # killed between moving the old directory aside and the new one in
                done.append(target)
                continue
            _carry_over(p, target)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        done.append(p)
    return done


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
        crash_point("atomic_save:before-replace")
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


def _carry_over(old: Path, new: Path) -> None:
    """Move the entries `new`'s KEEP_FILE names (glob patterns relative to the directory) from `old` into `new`
    where `new` has none of its own, then drop the KEEP_FILE."""
    keep_file = new / KEEP_FILE
    try:
        patterns = json.loads(keep_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for pattern in patterns:
        for src in sorted(old.glob(pattern)):
            dst = new / src.relative_to(old)
            if dst.parent.is_dir() and not dst.exists():
                os.replace(src, dst)
    keep_file.unlink(missing_ok=True)
    fsync_dir(new)


@contextmanager
def atomic_dir(path: str | Path, *, replace: bool = True, keep: Sequence[str] = ()) -> Iterator[Path]:
    """A temporary directory beside `path` to fill; on success it is renamed to `path`, on failure removed.

    replace=True swaps out an existing `path` (removed after the new one is complete); replace=False raises
    FileExistsError when it exists. keep: glob patterns (relative to `path`, e.g. "checkpoints", "layer_*/analysis")
    of entries of the old directory that are not part of what is written and move into the new one.

    A kill at any point leaves either the old directory or the new one under `path` (or, for an instant, neither,
    with the old one beside it under a `.old-` name): `clean_stale_tmp` on the parent puts the old one back, or
    finishes carrying the kept entries over.
    """
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists")
    tmp = tmp_path(path)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_file(f)
        old = None
        if path.exists():  # a directory cannot be renamed over a non-empty one: move the old one aside first
            if keep:
                atomic_write_json(tmp / KEEP_FILE, list(keep))
            old = _unique(path, OLD_MARK)
            crash_point("atomic_dir:before-swap")
            os.replace(path, old)
            crash_point("atomic_dir:mid-swap")
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            crash_point("atomic_dir:after-swap")
            _carry_over(old, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def crash_point(name: str) -> None:
    """Test hook: FEATURELENS_CRASH_AT=<name> kills this process here (SIGKILL, no cleanup), as a power cut would.
    The crash tests use it to stop a save between two of its steps."""
    if os.environ.get("FEATURELENS_CRASH_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class LockedError(FeaturelensError):
    """Another process holds the lock (see `hold_lock`)."""


@contextmanager
def hold_lock(path: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if needed) while inside; raises LockedError at once when
    another process holds it, its message saying `what` is locked and by which pid. The operating system drops the
    lock when the holder dies, so a killed process never leaves it locked. (Where fcntl does not exist, Windows,
    nothing is locked.)"""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            raise LockedError(f"{what} is in use by another process (pid {holder}; lock file {path})") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        yield
    finally:
        f.close()  # closing the file releases the lock
