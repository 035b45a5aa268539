"""Progress of featurelens's long calls (`attribute`, `train_*`, `analyze`), for a terminal bar and for callers.

Each long call takes `progress` (draw a bar on stderr) and `on_progress`, a function called with a `ProgressEvent`
every time the work advances: the CLI's bars and the web server's job events are two readers of the same counts.
A callback that raises stops the call there (the server cancels a graph job that way).

>>> events = []
>>> g = fl.attribute(model, transcoders, "The cat sat", progress=False, on_progress=events.append)
>>> events[-1]
ProgressEvent(stage='attribution', done=57, total=57, unit='row', finished=True)
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ProgressEvent:
    """How far one stage of a long call has come: `done` of `total` `unit`s (total None: unknown)."""

    stage: str
    done: float
    total: float | None
    unit: str = ""
    finished: bool = False  # the stage's last event (it ended, or stopped early)


OnProgress = Callable[[ProgressEvent], None]


class ProgressBar:
    """A tqdm bar on stderr (when `show`) that also reports every step to `on_progress`.

    Used like tqdm: `update(n)`, `set_postfix(...)`, `close()`; the bar's options (smoothing, leave, ...) pass
    through to tqdm.
    """

    def __init__(self, stage: str, total: float | None, *, unit: str = "", initial: float = 0, show: bool = True,
                 on_progress: OnProgress | None = None, **bar_options: Any):
        from tqdm.auto import tqdm

        self.stage, self.total, self.unit, self.done = stage, total, unit, initial
        self._on_progress = on_progress
        self._closed = False
        bar_options.setdefault("file", sys.stderr)
        bar_options.setdefault("dynamic_ncols", True)
        self._bar = tqdm(total=total, initial=initial, desc=stage, unit=unit, disable=not show, **bar_options)
        self._report(False)

    def _report(self, finished: bool) -> None:
        if self._on_progress is not None:
            self._on_progress(ProgressEvent(self.stage, self.done, self.total, self.unit, finished))

    def update(self, n: float = 1) -> None:
        self.done += n
        self._bar.update(n)
        self._report(False)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        self._bar.set_postfix(*args, **kwargs)

    def close(self) -> None:
        """End the stage (once; later calls do nothing): the bar closes and `on_progress` gets `finished=True`."""
        if self._closed:
            return
        self._closed = True
        self._bar.close()
        self._report(True)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._bar.close()
        if not self._closed and exc[0] is None:
            self.close()
        self._closed = True
