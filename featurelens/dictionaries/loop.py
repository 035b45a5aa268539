"""The training loop: learners trained together on one activation stream, with a progress bar, checkpoints and
Ctrl-C handling.

Checkpoints (`checkpoints`) are written every `checkpoint_every` steps (default: every CHECKPOINT_SECONDS of
training). A run given `resume=True` continues from the newest readable one. Ctrl-C finishes the current step and
checkpoints it before stopping, so nothing is lost (a second Ctrl-C stops at once, losing only the steps since the
last checkpoint).
"""

from __future__ import annotations

import itertools
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch

from .. import distributed as dist
from ..engine.errors import InputError
from ..interrupt import deferred_interrupt
from ..progress import OnProgress, ProgressBar
from .batches import Batches, combine_shards, reuse_batches
from .checkpoints import CHECKPOINT_FORMAT, check_resumable, checkpoint_files, load_latest_checkpoint, save_checkpoint
from .learner import Learner, optimized
from .train_config import TrainConfig
from .losses import lr_factor

CHECKPOINT_SECONDS = 600  # default checkpoint interval: an interruption loses at most about this much training


@dataclass
class RunResult:
    learners: list[Learner]
    steps: int
    tokens: int
    seconds: float
    resumed_from: int | None  # step


def run_training(learners: list[Learner], batches: "Batches | Sequence[Batches]", tcfg: TrainConfig, out: Path | None,
                 resume: bool = False, progress: bool = True, desc: str = "training",
                 stop_after_steps: int | None = None, on_progress: OnProgress | None = None,
                 checkpoint_dir: Path | None = None) -> RunResult:
    """Train `learners` together on one stream: `batches(tokens_seen)` yields {hook: [n, d]} with rows aligned.

    Checkpoints go to `checkpoint_dir`, by default <out>/checkpoints (none when both are None). `stop_after_steps` ends the run early
    (as an interruption would), for tests and benchmarks. With tcfg.reuse > 1 the stream is served through
    `reuse_batches` (each row seen `reuse` times; tcfg.tokens counts rows trained on, repeats included).
    on_progress: called with a `ProgressEvent` (stage `desc`, tokens trained on) after every step.

    Data parallel (several ranks, `distributed`): `batches` is then a list, this rank's streams out of
    tcfg.shards data shards (rank r holds shards r * len .. (r + 1) * len - 1), each yielding batch_size / shards
    rows; a step's batch is all shards' rows, gradients and statistics are summed over the ranks, and rank 0 writes
    the checkpoints. One process given all the shards' streams trains on exactly the same batches.
    """
    streams = list(batches) if isinstance(batches, (list, tuple)) else [batches]
    n_shards = tcfg.shards if isinstance(batches, (list, tuple)) else 1
    if len(streams) * dist.world_size() != n_shards:
        raise InputError(f"{dist.world_size()} rank(s) given {len(streams)} data shard(s) each, but the run has "
                         f"{n_shards} (TrainConfig.shards must be a multiple of the number of ranks)")
    if tcfg.reuse > 1:
        # a short run needs no more fresh rows than tokens / reuse: a bigger buffer would only cost forward passes
        buffer_tokens = min(tcfg.reuse_buffer_tokens, -(-tcfg.tokens // tcfg.reuse)) // n_shards
        streams = [reuse_batches(b, tcfg.reuse, max(1, buffer_tokens), tcfg.batch_size // n_shards, tcfg.seed)
                   for b in streams]
    batches = streams[0] if n_shards == 1 else \
        combine_shards(streams, n_shards, dist.rank() * len(streams), tcfg.tokens)
    main = dist.is_main()

    ckdir = checkpoint_dir if checkpoint_dir is not None else out / "checkpoints" if out is not None else None
    step, tokens_seen, resumed_from = 0, 0, None
    if resume and ckdir is not None:
        found = load_latest_checkpoint(ckdir)
        if found is not None:
            state, path = found
            check_resumable(state, tcfg, learners, path)
            by_name = {st["name"]: st for st in state["learners"]}
            for lr_ in learners:
                lr_.restore(by_name[lr_.name])
            step, tokens_seen, resumed_from = int(state["step"]), int(state["tokens_seen"]), int(state["step"])
            torch.set_rng_state(state["rng"])
            if progress and main:
                print(f"resuming from {path.name}: step {step}, {tokens_seen:,} of {tcfg.tokens:,} tokens",
                      file=sys.stderr)

    if resumed_from is None:  # a fresh run: every rank starts from rank 0's random weights
        for lr_ in learners:
            dist.broadcast(optimized(lr_.opt))

    def checkpoint() -> None:
        if ckdir is not None and main:
            save_checkpoint(ckdir, {"format": CHECKPOINT_FORMAT, "step": step, "tokens_seen": tokens_seen,
                                    "train_config": tcfg.to_dict(), "rng": torch.get_rng_state(),
                                    "learners": [lr_.state() for lr_ in learners]})

    t0, steps_run = time.perf_counter(), 0
    last_checkpoint = t0
    bar = ProgressBar(desc, tcfg.tokens, initial=min(tokens_seen, tcfg.tokens), unit="tok", unit_scale=True,
                      show=progress and main, on_progress=on_progress if main else None, smoothing=0.05)
    try:
        with deferred_interrupt() as stop:
            it = iter(batches(tokens_seen))
            if dist.active():
                it = _initialize_together(learners, it, tcfg)
            wanted = [lr_ for lr_ in learners if not lr_.initialized and lr_.init_rows()]
            if wanted:  # a fresh run whose skips start at least squares: fit them on the first rows
                first = _first_rows(it, min(max(lr_.init_rows() for lr_ in wanted), tcfg.tokens))
                for lr_ in wanted:
                    lr_.initialize(first)
                it = itertools.chain(first, it)
            while tokens_seen < tcfg.tokens:
                if stop_after_steps is not None and steps_run >= stop_after_steps:
                    break
                try:
                    batch = next(it)
                except StopIteration:
                    warnings.warn(f"the activation stream ended after {tokens_seen:,} of {tcfg.tokens:,} tokens",
                                  stacklevel=2)
                    break
                left = tcfg.tokens - tokens_seen
                if any(len(v) > left for v in batch.values()):  # the last batch stops at the token budget
                    batch = {h: v[:left] for h, v in batch.items()}
                frac = tokens_seen / tcfg.tokens
                lr = tcfg.lr * lr_factor(frac, tcfg.warmup, tcfg.decay)  # type: ignore[operator]
                sparsity_scale = min(1.0, frac / tcfg.sparsity_warmup) if tcfg.sparsity_warmup > 0 else 1.0
                n = 0
                for learner in learners:
                    n = learner.train_step(batch, lr, sparsity_scale)
                step, tokens_seen, steps_run = step + 1, tokens_seen + n, steps_run + 1
                bar.update(n)
                if progress:
                    bar.set_postfix(_postfix(learners), refresh=False)
                due = (step % tcfg.checkpoint_every == 0 if tcfg.checkpoint_every
                       else time.perf_counter() - last_checkpoint >= CHECKPOINT_SECONDS)
                if due and tokens_seen < tcfg.tokens:
                    checkpoint()
                    last_checkpoint = time.perf_counter()
                # Ctrl-C: save this step, then stop (all ranks at the same step, whichever saw it)
                if dist.any_rank(stop.requested) and tokens_seen < tcfg.tokens:
                    checkpoint()
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        found = checkpoint_files(ckdir) if ckdir is not None else []
        if found and main:
            print(f"\ninterrupted at step {step}; the last checkpoint is {found[0].name}: run again with resume=True "
                  f"(--resume) to continue from it", file=sys.stderr)
        raise
    finally:
        bar.close()
    return RunResult(learners, step, tokens_seen, time.perf_counter() - t0, resumed_from)


def _initialize_together(learners: list[Learner], it: Iterator[Mapping[str, torch.Tensor]],
                         tcfg: TrainConfig) -> Iterator[Mapping[str, torch.Tensor]]:
    """Several ranks: every learner not yet started is started by every rank from the same rows, the first batches
    of all ranks gathered in rank (= shard) order, so its scales, geometric median, least-squares skip and offsets
    are those of the whole batch, as in one process. Returns the stream with those batches put back in front."""
    fresh = [lr_ for lr_ in learners if not lr_.initialized]
    if not fresh:
        return it
    want = min(max([lr_.init_rows() for lr_ in fresh] + [1]), tcfg.tokens)
    first = _first_rows(it, -(-want // dist.world_size()))
    gathered = [{h: dist.gather_rows(v) for h, v in b.items()} for b in first]
    for lr_ in fresh:
        lr_.initialize(gathered if lr_.init_rows() else gathered[:1])  # in one process: the first batch
    return itertools.chain(first, it)


def _first_rows(it: Iterator[Mapping[str, torch.Tensor]], rows: int) -> list[Mapping[str, torch.Tensor]]:
    """The stream's first batches, at least `rows` rows (fewer if it ends), to be chained back in front."""
    first: list[Mapping[str, torch.Tensor]] = []
    n = 0
    while n < rows:
        batch = next(it, None)
        if batch is None:
            break
        first.append(batch)
        n += len(next(iter(batch.values())))
    return first


def _postfix(learners: list[Learner]) -> dict[str, str]:
    mean = lambda key: sum(lr_.ema.get(key, float("nan")) for lr_ in learners) / len(learners)  # noqa: E731
    return {"L0": f"{mean('l0'):.1f}", "EV": f"{1 - mean('fvu'):.3f}", "dead": f"{mean('dead'):.1%}"}
