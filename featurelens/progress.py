"""Progress of featurelens's long calls (`attribute`, `train_*`, `analyze`), for a terminal bar and for callers.

Each long call takes `progress` (draw a bar on stderr) and `on_progress`, a function called with a `ProgressEvent`
every time the work advances: the terminal's bars (`TerminalBar`, which `progress=True` adds) and the web server's
job events are two readers of the same events. A callback that raises stops the call there (the server cancels a
graph job that way); callbacks are called at every step, so they should be quick.

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


class TerminalBar:
    """An `on_progress` that draws each stage as a tqdm bar on stderr: what `progress=True` shows.

    Options (smoothing, leave, unit_scale, ...) pass through to tqdm."""

    def __init__(self, **bar_options: Any):
        bar_options.setdefault("file", sys.stderr)
        bar_options.setdefault("dynamic_ncols", True)
        self._options = bar_options
        self._bars: dict[str, Any] = {}

    def __call__(self, e: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(e.stage)
        if bar is None:
            bar = self._bars[e.stage] = tqdm(total=e.total, initial=e.done, desc=e.stage, unit=e.unit or "it",
                                             **self._options)
        elif e.done != bar.n:
            bar.update(e.done - bar.n)
        if e.finished:
            self.close(e.stage)

    def set_postfix(self, stage: str, *args: Any, **kwargs: Any) -> None:
        bar = self._bars.get(stage)
        if bar is not None:
            bar.set_postfix(*args, **kwargs)

    def close(self, stage: str) -> None:
        bar = self._bars.pop(stage, None)
        if bar is not None:
            bar.close()


class ProgressBar:
    """One stage of a long call: `update(n)` after each step reports a `ProgressEvent` to `on_progress` and, when
    `show`, to a `TerminalBar` (the bar's options pass through to tqdm). `close()` ends the stage (`finished`);
    leaving a `with` block by an exception only takes the bar off the terminal."""

    def __init__(self, stage: str, total: float | None, *, unit: str = "", initial: float = 0, show: bool = True,
                 on_progress: OnProgress | None = None, **bar_options: Any):
        self.stage, self.total, self.unit, self.done = stage, total, unit, initial
        self._terminal = TerminalBar(**bar_options) if show else None
        self._sinks = [f for f in (self._terminal, on_progress) if f is not None]
        self._closed = False
        self._report(False)

    def _report(self, finished: bool) -> None:
        e = ProgressEvent(self.stage, self.done, self.total, self.unit, finished)
        for sink in self._sinks:
            sink(e)

    def update(self, n: float = 1) -> None:
        self.done += n
        self._report(False)

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Extra figures beside the terminal bar (training's loss and L0)."""
        if self._terminal is not None:
            self._terminal.set_postfix(self.stage, *args, **kwargs)

    def close(self) -> None:
        """End the stage (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        self._report(True)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._closed = True
            if self._terminal is not None:
                self._terminal.close(self.stage)
