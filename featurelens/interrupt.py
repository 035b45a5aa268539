"""Ctrl-C that waits for a safe point, so long jobs save their progress before they stop.

Inside `deferred_interrupt()`, the first Ctrl-C (SIGINT) only sets `requested`; the job's loop checks it after each
step, saves its state and raises KeyboardInterrupt. A second Ctrl-C interrupts at once, as usual. Outside the main
thread (where Python cannot install signal handlers), or where SIGINT is ignored, it changes nothing.

>>> with deferred_interrupt() as stop:
...     for step in range(3):
...         if stop.requested:
...             raise KeyboardInterrupt
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator


class InterruptRequest:
    requested: bool = False


@contextmanager
def deferred_interrupt(message: str = "stopping after this step to save progress (Ctrl-C again to stop now)"
                       ) -> Iterator[InterruptRequest]:
    req = InterruptRequest()
    if threading.current_thread() is not threading.main_thread():
        yield req
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # started with SIGINT ignored (nohup, a background job): leave it so
        yield req
        return

    def on_sigint(signum: int, frame: object) -> None:
        if req.requested:  # the second Ctrl-C: the user does not want to wait
            raise KeyboardInterrupt
        req.requested = True
        print(f"\n{message}", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, on_sigint)
    try:
        yield req
    finally:
        signal.signal(signal.SIGINT, previous)
