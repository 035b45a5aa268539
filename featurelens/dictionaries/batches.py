"""Activation batches for training and evaluating dictionaries: a deterministic, resumable stream of rows
{hook: [batch, d]} from token contexts (one forward pass feeds every hook of a run).

The contexts' order is fixed by the seed, epoch after epoch, and cut into chunks (one `ActivationStore` pass each,
BOS positions left out), so a resumed run recomputes only the chunk holding the row it stopped at.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch

from ..data import ActivationStore
from ..engine.errors import InputError
from .training import Batches

CHUNK_CONTEXTS = 512  # contexts per forward-and-shuffle chunk (about 65k token rows at ctx_len 128)


def model_batches(model: Any, hooks: Sequence[str], contexts: torch.Tensor, batch_size: int, seed: int = 0,
                  model_batch_size: int = 32, epochs: int | None = None, chunk_contexts: int = CHUNK_CONTEXTS) -> Batches:
    """Activation batches {hook: [batch_size, d]} from `contexts`, epoch after epoch, resumable at any row.

    Each epoch orders the contexts by a seeded permutation and cuts them into chunks; each chunk is one
    ActivationStore pass (shuffled rows, BOS left out). The row sequence is deterministic, so `batches(n)`
    recomputes only the chunk holding row n and continues from there. With `epochs`, the stream ends after
    that many (its last batch may be short); without, it goes on.
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
                                        dtype=torch.float32, progress=False)
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
