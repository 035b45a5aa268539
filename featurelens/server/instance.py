"""One server per data directory, and a clean data directory when it starts.

`featurelens serve` holds `<data dir>/server/instance.lock` while it runs: a second server on the same directory
stops at once with a message naming the first one's pid, instead of marking the first one's running jobs
"interrupted" (which is what a server does with the jobs it finds running when it starts: they were its own, cut off
by a crash). The lock is the operating system's (flock): a killed server leaves nothing locked.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ..io import clean_stale_tmp, hold_lock

LOCK_FILE = "instance.lock"
# what a server writes to (graphs, job records) and what a crashed save may have left half-swapped (dictionaries)
OWNED_DIRS = ("graphs", "server", "dictionaries")


def clean_on_start(data: Path) -> None:
    """Remove the temporary files killed writers left in the directories the server reads and writes, and put back
    a dictionary whose save was cut off mid-swap (see `featurelens.io.clean_stale_tmp`)."""
    for name in OWNED_DIRS:
        clean_stale_tmp(data / name)


@contextmanager
def instance_lock(data: Path) -> Iterator[None]:
    """Held while a server serves `data`; raises LockedError at once when another server does."""
    with hold_lock(data / "server" / LOCK_FILE, f"the data directory {data} (another `featurelens serve` serves it; "
                                                "stop it first, or serve another --data-dir)"):
        yield
