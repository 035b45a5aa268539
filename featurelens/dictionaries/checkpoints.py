"""Training checkpoints: dictionaries, optimizer state, counters and RNG, written atomically to <out>/checkpoints/
as step-<n>.pt (the last two kept), read back newest first (a damaged newest one is skipped with a warning), and
checked against the run that wants to resume from them.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..engine.errors import InputError
from ..io import atomic_save
from .train_config import TrainConfig

if TYPE_CHECKING:
    from .learner import Learner

CHECKPOINT_FORMAT = 1
_CKPT_RE = re.compile(r"^step-(\d{8})\.pt$")


def checkpoint_files(ckdir: Path) -> list[Path]:
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if _CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)), reverse=True)  # type: ignore[union-attr]


def save_checkpoint(ckdir: Path, state: dict[str, Any], keep: int = 2) -> Path:
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"step-{state['step']:08d}.pt"
    atomic_save(path, lambda tmp: torch.save(state, tmp))
    for old in checkpoint_files(ckdir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(ckdir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that reads back; a damaged newest one is reported and skipped."""
    for path in checkpoint_files(ckdir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") != CHECKPOINT_FORMAT:
                raise InputError(f"unknown checkpoint format {state.get('format')!r}")
            return state, path
        except Exception as e:  # a truncated or foreign file: fall back to the previous checkpoint
            warnings.warn(f"{path}: unreadable checkpoint ({e}); trying an older one", stacklevel=2)
    return None


def check_resumable(state: dict[str, Any], tcfg: TrainConfig, learners: list[Learner], path: Path) -> None:
    saved = state.get("train_config", {})
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # a field newer than the checkpoint
    diffs = [f"{k}: checkpoint {saved.get(k, defaults[k])!r}, now {getattr(tcfg, k)!r}"
             for k in TrainConfig.STRUCTURAL if saved.get(k, defaults[k]) != getattr(tcfg, k)]
    names = {st["name"] for st in state["learners"]}
    missing = [lr_.name for lr_ in learners if lr_.name not in names]
    if missing:
        diffs.append(f"dictionaries {missing} are not in the checkpoint (it has {sorted(names)})")
    for st in state["learners"]:
        mine = next((lr_ for lr_ in learners if lr_.name == st["name"]), None)
        if mine is None:
            continue
        sig = mine.signature()
        saved_sig = {k: st["config"].get(k) for k in sig}
        if saved_sig != sig:
            diffs.append(f"{st['name']}: checkpoint " + ", ".join(f"{k}={v}" for k, v in saved_sig.items())
                         + ", now " + ", ".join(f"{k}={v}" for k, v in sig.items()))
    if diffs:
        raise InputError(f"cannot resume from {path}: the run differs from it ({'; '.join(diffs)}); "
                         "use the same settings, or start over with overwrite=True (--overwrite)")


def has_checkpoints(out: Path) -> bool:
    """Whether <out>/checkpoints holds a checkpoint (of the whole run, or of a layer group's): an unfinished run."""
    ckdir = out / "checkpoints"
    return ckdir.is_dir() and any(ckdir.rglob("step-*.pt"))


def clear_checkpoints(out: Path) -> None:
    ckdir = out / "checkpoints"
    if ckdir.is_dir():
        shutil.rmtree(ckdir)
