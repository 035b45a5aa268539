"""The streaming stage of an analysis: contexts through the model (up to the dictionary's hook) and the dictionary
into the per-feature statistics (`Accumulator`), with its state saved to disk so an interrupted run resumes.

The state is written atomically to ``building/state.safetensors`` every `checkpoint_every` seconds, on Ctrl-C, and
at the end of the stream.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dist
from ..data import content_mask
from ..interrupt import deferred_interrupt
from ..io import atomic_save
from ..progress import OnProgress, ProgressBar
from .accumulate import Accumulator
from .timings import AnalysisTimings

STATE_FILE = "state.safetensors"


def load_state(acc: Accumulator, path: Path) -> int:
    from safetensors.torch import load_file

    state = load_file(str(path))
    acc.load_state_dict(state)
    return int(state["n_done"])


def save_state(acc: Accumulator, path: Path, done: int) -> None:
    from safetensors.torch import save_file

    state = acc.state_dict()
    state["n_done"] = torch.tensor(done, dtype=torch.int64)
    if "cofire_idx" in state and acc.cfg.d_sae ** 2 < 2**31:
        state["cofire_idx"] = state["cofire_idx"].to(torch.int32)
    atomic_save(path, lambda tmp: save_file(state, str(tmp)))


def merge_over_ranks(acc: Accumulator) -> None:
    """Several ranks, each having streamed its own batches: every rank's `acc` becomes the merge of all of them
    (counts summed, top-K and sample lists merged in rank order), as one process streaming everything makes it."""
    if not dist.active():
        return
    for k in acc._SUMS:
        setattr(acc, k, dist.all_sum(getattr(acc, k).clone()))
    if acc.cofire is not None:
        dist.all_sum(acc.cofire)
    gathered = {k: dist.gather_rows(getattr(acc, k)).view(dist.world_size(), *getattr(acc, k).shape)
                for k in acc._LISTS}
    for k in acc._LISTS:
        setattr(acc, k, gathered[k][0].clone())
    other = Accumulator(dataclasses.replace(acc.cfg, cofire=False), seed=acc.seed)  # lists only
    for w in range(1, dist.world_size()):
        for k in acc._LISTS:
            setattr(other, k, gathered[k][w])
        acc.merge_lists(other)


class SharedForward:
    """`model` for analysing several dictionaries over the same contexts (a transcoder set's 18 layers): its
    `run_with_cache` records all of `hooks` in one forward pass per batch of tokens and answers the same tokens
    from that record afterwards, so the model runs once for all of them, not once per dictionary. Everything else
    is the model's. The record holds every batch seen ([tokens, width] float32 per hook), so keep it for one set.

    >>> shared = SharedForward(model, [f"blocks.{l}.ln2.hook_normalized" for l in range(18)])
    >>> for layer in range(18): fl.analyze(shared, tcs[layer], n_tokens=10_000)
    """

    def __init__(self, model: Any, hooks: list[str]):
        self.model, self.hooks = model, list(hooks)
        stops = [model.hook_spec(h).stop_layer for h in self.hooks]
        self._stop = None if any(s is None for s in stops) else max(stops)
        self._record: dict[tuple, dict[str, torch.Tensor]] = {}

    def __getattr__(self, name: str) -> Any:  # only what this class does not define
        return getattr(self.model, name)

    def run_with_cache(self, tokens: torch.Tensor, names_filter: Any = None, stop_at_layer: Any = None,
                       **kw: Any) -> tuple[None, dict[str, torch.Tensor]]:
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter or ())
        if kw or not names or not set(names) <= set(self.hooks):  # not what it records: the model itself answers
            return self.model.run_with_cache(tokens, names_filter=names_filter, stop_at_layer=stop_at_layer, **kw)
        key = (tuple(tokens.shape), hashlib.sha1(tokens.cpu().numpy().tobytes()).hexdigest())
        rec = self._record.get(key)
        if rec is None:
            _, cache = self.model.run_with_cache(tokens, names_filter=self.hooks, stop_at_layer=self._stop)
            rec = self._record[key] = {h: cache[h] for h in self.hooks}
        return None, {h: rec[h] for h in names}


def stream(model: Any, dictionary: Any, acc: Accumulator, contexts: torch.Tensor, done: int, batch_size: int,
           state_path: Path, checkpoint_every: float, timings: AnalysisTimings, progress: bool,
           stop_after: int | None, on_progress: OnProgress | None = None, rank: int = 0, world: int = 1) -> bool:
    """Stream contexts[done:] through model and dictionary into acc. Returns True when stopped early (testing).

    Several ranks (`rank` of `world`): the stream's batches are dealt round-robin, this rank taking batches
    rank, rank + world, ...; `done` is then the first context of the next batch this rank has not read."""
    hook = dictionary.cfg.hook_name
    stop = model.hook_spec(hook).stop_layer
    n_ctx, T = contexts.shape
    dev = model.device
    dict_dev = getattr(dictionary, "device", dev)
    starts = [s for s in range(0, n_ctx, batch_size) if (s // batch_size) % world == rank]
    mine = sum(min(batch_size, n_ctx - s) for s in starts)
    bar = ProgressBar("analyzing", mine * T, initial=sum(min(batch_size, n_ctx - s) for s in starts if s < done) * T,
                      unit="tok", unit_scale=True, show=progress, on_progress=on_progress)
    last_save = time.perf_counter()
    n_batches = 0
    todo = [s for s in starts if s >= done]
    try:
        with torch.inference_mode(), deferred_interrupt() as interrupt:
            for i, done in enumerate(todo):
                tokens = contexts[done: done + batch_size]
                t0 = time.perf_counter()
                _, cache = model.run_with_cache(tokens.to(dev), names_filter=[hook], stop_at_layer=stop)
                x = cache[hook]
                t1 = time.perf_counter()
                B = x.shape[0]
                f = dictionary.encode(x.reshape(B * T, -1).to(dict_dev)).float().cpu().view(B, T, -1)
                t2 = time.perf_counter()
                acc.update(f, content_mask(tokens, model), done, batch_index=done // batch_size)
                t3 = time.perf_counter()
                timings.model_forward += t1 - t0
                timings.encoding += t2 - t1
                timings.bookkeeping += t3 - t2
                timings.tokens += B * T
                last = i == len(todo) - 1
                done = n_ctx if last else todo[i + 1]
                n_batches += 1
                bar.update(B * T)
                if last or time.perf_counter() - last_save >= checkpoint_every or interrupt.requested or \
                        (stop_after is not None and n_batches >= stop_after):
                    t4 = time.perf_counter()
                    save_state(acc, state_path, done)
                    timings.checkpointing += time.perf_counter() - t4
                    last_save = time.perf_counter()
                if stop_after is not None and n_batches >= stop_after and done < n_ctx:
                    return True
                if interrupt.requested and done < n_ctx:  # Ctrl-C: the state is saved; stop
                    print(f"analysis saved after {done * T:,} of {n_ctx * T:,} tokens: run it again to continue",
                          file=sys.stderr)
                    raise KeyboardInterrupt
    finally:
        bar.close()
    return False
