"""Activation batches for training and evaluating dictionaries: a deterministic, resumable stream of rows
{hook: [batch, d]} from token contexts (one forward pass feeds every hook of a run).

The contexts' order is fixed by the seed, epoch after epoch, and cut into chunks (one `ActivationStore` pass each,
BOS positions left out), so a resumed run recomputes only the chunk holding the row it stopped at.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from ..data import ActivationStore
from ..engine.errors import InputError

Batches = Callable[[int], Iterable[Mapping[str, torch.Tensor]]]  # tokens already seen -> batches from there on
CHUNK_CONTEXTS = 512  # contexts per forward-and-shuffle chunk (about 65k token rows at ctx_len 128)


def model_batches(model: Any, hooks: Sequence[str], contexts: torch.Tensor, batch_size: int, seed: int = 0,
                  model_batch_size: int = 32, epochs: int | None = None, chunk_contexts: int = CHUNK_CONTEXTS,
                  autocast: bool | None = None) -> Batches:
    """Activation batches {hook: [batch_size, d]} from `contexts`, epoch after epoch, resumable at any row.

    Each epoch orders the contexts by a seeded permutation and cuts them into chunks; each chunk is one
    ActivationStore pass (shuffled rows, BOS left out). The row sequence is deterministic, so `batches(n)`
    recomputes only the chunk holding row n and continues from there. With `epochs`, the stream ends after
    that many (its last batch may be short); without, it goes on. autocast: as `ActivationStore`'s (default: bfloat16
    autocast for a float32 model on CUDA).
    """
    bos = model.cfg.bos_token_id
    n = len(contexts)

    def rows_in(ctx: torch.Tensor) -> int:
        return int((ctx != bos).sum()) if bos is not None else ctx.numel()

    def gen(tokens_seen: int) -> Iterator[dict[str, torch.Tensor]]:
        skip, epoch = tokens_seen, 0
        epoch_rows = rows_in(contexts)
        if epoch_rows == 0:
            raise InputError("the contexts hold no tokens besides BOS")
        epoch, skip = divmod(skip, epoch_rows)
        pending: list[dict[str, torch.Tensor]] = []
        n_pending = 0
        while epochs is None or epoch < epochs:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            for c in range(0, n, chunk_contexts):
                chunk = contexts[perm[c:c + chunk_contexts]]
                rows = rows_in(chunk)
                if skip >= rows:
                    skip -= rows
                    continue
                store = ActivationStore(model, list(hooks), chunk, batch_size=batch_size, model_batch_size=model_batch_size,
                                        buffer_tokens=max(batch_size, rows), seed=seed * 100_003 + epoch * 1009 + c,
                                        dtype=torch.float32, progress=False, autocast=autocast)
                for part in store:
                    if skip:
                        cut = min(skip, len(part[hooks[0]]))
                        part = {h: v[cut:] for h, v in part.items()}
                        skip -= cut
                    if len(part[hooks[0]]) == 0:
                        continue
                    pending.append(part)
                    n_pending += len(part[hooks[0]])
                    while n_pending >= batch_size:
                        merged = {h: torch.cat([p[h] for p in pending]) for h in hooks}
                        yield {h: v[:batch_size] for h, v in merged.items()}
                        rest = {h: v[batch_size:] for h, v in merged.items()}
                        n_pending -= batch_size
                        pending = [rest] if n_pending else []
            epoch += 1
        if n_pending:
            yield {h: torch.cat([p[h] for p in pending]) for h in hooks}

    return gen


CHUNK_BYTES = 2**30  # activations held per chunk (the store's buffer briefly holds about twice that)


def chunk_for(tokens: int, contexts: torch.Tensor, row_width: int) -> int:
    """Contexts per chunk: CHUNK_CONTEXTS, fewer when a chunk's activations (row_width floats a token, all hooks)
    would pass CHUNK_BYTES (18 layers' transcoders), and no more than the whole run needs (a short run)."""
    ctx = contexts.shape[1]
    by_memory = CHUNK_BYTES // (ctx * row_width * 4)
    by_need = -(-tokens // max(1, ctx - 1)) + 1
    return max(1, min(CHUNK_CONTEXTS, by_memory, by_need))


def iterate_tensors(x: torch.Tensor, batch_size: int, hook: str, y: torch.Tensor | None = None,
                    hook_out: str | None = None, seed: int = 0, epochs: int | None = None) -> Batches:
    """Batches from activations already in memory (shuffled each epoch): for cached activations and tests."""

    def gen(tokens_seen: int) -> Iterator[dict[str, torch.Tensor]]:
        n = x.shape[0]
        g = torch.Generator().manual_seed(seed)
        epoch, skip = 0, tokens_seen
        while epochs is None or epoch < epochs:
            perm = torch.randperm(n, generator=g)
            for s in range(0, n - batch_size + 1, batch_size):
                if skip >= batch_size:
                    skip -= batch_size
                    continue
                rows = perm[s:s + batch_size]
                batch = {hook: x[rows]}
                if y is not None and hook_out is not None:
                    batch[hook_out] = y[rows]
                yield batch
            epoch += 1

    return gen


PROBE = "probe:"  # batch key prefix of a response probe: PROBE + hook_in holds dx, PROBE + hook_out the MLP's dy


def with_mlp_probes(batches: Batches, model: Any, layers: Sequence[int], hooks_in: Sequence[str],
                    hooks_out: Sequence[str], scale: float, batch_size: int, seed: int = 0) -> Batches:
    """Add to every batch, for each layer, a small perturbation dx of each row's MLP input and the MLP's response
    dy = (mlp(x + dx) - mlp(x - dx)) / 2 (a central difference, hook_mlp_out's post-norm included), for
    transcoders trained to respond like the MLP (TrainConfig.response_coefficient).

    dx is `scale` times the difference between the row and another row of the same batch: perturbations along
    the directions the activations actually vary in, which is where upstream features push. Deterministic given
    the batch and its index, so a resumed stream gives the same probes.
    """
    blocks = [model.blocks[layer] for layer in layers]

    def gen(tokens_seen: int) -> Iterator[dict[str, torch.Tensor]]:
        index = tokens_seen // batch_size
        for batch in batches(tokens_seen):
            batch = dict(batch)
            g = torch.Generator().manual_seed(seed * 1_000_003 + index)
            for blk, h_in, h_out in zip(blocks, hooks_in, hooks_out):
                x = batch[h_in]  # [B, D] float32
                partner = torch.randperm(len(x), generator=g).to(x.device)
                dx = scale * (x[partner] - x)
                w = next(blk.parameters())
                xm = x.to(w.dtype)
                dy = (blk.mlp_output(xm + dx.to(w.dtype)) - blk.mlp_output(xm - dx.to(w.dtype))).float() / 2
                batch[PROBE + h_in], batch[PROBE + h_out] = dx, dy
            index += 1
            yield batch

    return gen


def reuse_batches(batches: Batches, reuse: int, buffer_tokens: int, batch_size: int, seed: int = 0) -> Batches:
    """Serve every row of `batches` `reuse` times: fill a buffer of buffer_tokens rows (held as bfloat16, half the
    memory of float32; the activations' own precision is about that anyway), then yield it `reuse` times in fresh
    random orders, then refill. Resumable at any row like the stream it wraps: buffer b holds the inner stream's rows
    [b * buffer_tokens, (b + 1) * buffer_tokens) and its orders depend only on (seed, b).
    """
    per_buffer = max(batch_size, buffer_tokens // batch_size * batch_size)  # whole batches per pass

    def gen(tokens_seen: int) -> Iterator[dict[str, torch.Tensor]]:
        b, skip = divmod(tokens_seen, per_buffer * reuse)
        inner = iter(batches(b * per_buffer))
        while True:
            # rows are copied into one preallocated buffer as they come: the peak is one buffer (plus one inner
            # batch), not the parts and their concatenation, nor the previous buffer, which is dropped first
            buf: dict[str, torch.Tensor] = {}
            extra: dict[str, torch.Tensor] | None = None
            n = 0
            for part in inner:
                m = len(next(iter(part.values())))
                take = min(m, per_buffer - n)
                for h, v in part.items():
                    if h not in buf:
                        buf[h] = torch.empty((per_buffer, *v.shape[1:]), device=v.device,
                                             dtype=torch.bfloat16 if v.is_floating_point() else v.dtype)
                    buf[h][n:n + take] = v[:take]
                if take < m:  # rows past the buffer (the inner batches need not divide it) start the next one
                    extra = {h: v[take:].to(torch.bfloat16) if v.is_floating_point() else v[take:]
                             for h, v in part.items()}
                n += take
                del part
                if n >= per_buffer:
                    break
            if n == 0:
                return
            buf = {h: v[:n] for h, v in buf.items()}
            rows = n
            g = torch.Generator().manual_seed(seed * 1_000_003 + b)
            order = torch.cat([torch.randperm(rows, generator=g) for _ in range(reuse)])
            for s in range(0, len(order), batch_size):
                if skip >= batch_size:
                    skip -= batch_size
                    continue
                sel = order[s + skip:s + batch_size]
                skip = 0
                yield {h: v[sel].float() if v.is_floating_point() else v[sel] for h, v in buf.items()}
            del buf
            if extra is not None:
                inner = _chain_first(extra, inner)
            b += 1

    return gen


def combine_shards(streams: Sequence[Batches], shards: int, first_shard: int, budget: int) -> Batches:
    """This rank's part of each step's batch: the next batch of each of its shard streams (global shard ids
    first_shard, first_shard + 1, ...), concatenated. Every shard yields batches of one size b, so after
    `tokens_seen` rows of all `shards` each shard stands at tokens_seen / shards. The last step is cut shard by
    shard to an equal share of the `budget` rows left, so one process holding all shards and several ranks holding
    some see the same rows."""

    def gen(tokens_seen: int) -> Iterator[dict[str, torch.Tensor]]:
        its = [iter(s(tokens_seen // shards)) for s in streams]
        seen = tokens_seen
        while seen < budget:
            parts = [next(it, None) for it in its]
            if any(p is None for p in parts):
                return
            b = len(next(iter(parts[0].values())))  # type: ignore[union-attr]
            share = min(b, (budget - seen) // shards)
            if share <= 0:
                return
            yield {h: torch.cat([p[h][:share] for p in parts]) for h in parts[0]}  # type: ignore[index]
            seen += share * shards

    return gen


def _chain_first(first: dict[str, torch.Tensor], rest: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    yield {h: v.float() if v.is_floating_point() else v for h, v in first.items()}
    yield from rest
