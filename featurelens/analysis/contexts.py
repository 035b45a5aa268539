"""Which contexts an analysis reads: held-out text (the corpus's test split, topped up from the end of the train
split when it is too short), or contexts given as a tensor."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch

from ..data import DEFAULT_CORPUS, load_contexts
from ..engine.errors import InputError


def select_contexts(model: Any, data: Any, n_tokens: int | None, ctx_len: int, split: str,
                    progress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """The contexts an analysis reads, and a description of them. `data`: a LongTensor [n, ctx] or a source."""
    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32) or data.numel() == 0:
            raise InputError("contexts must be a non-empty integer tensor [n_contexts, ctx_len]")
        ctx = data.long().cpu()
        if n_tokens is not None:
            ctx = ctx[: max(1, math.ceil(n_tokens / ctx.shape[1]))]
        return ctx, {"source": "<tensor>", "split": None}
    source = DEFAULT_CORPUS if data is None else data
    need = None if n_tokens is None else max(1, math.ceil(n_tokens / ctx_len))
    ctx = load_contexts(model, source, ctx_len=ctx_len, split=split, progress=progress)
    info: dict[str, Any] = {"source": str(source) if isinstance(source, (str, Path)) else "<texts>", "split": split}
    if need is not None and len(ctx) < need and split == "test":
        train = load_contexts(model, source, ctx_len=ctx_len, split="train", progress=progress)
        extra = min(need - len(ctx), len(train))
        if extra:
            # Taken from the end of the train split: a dictionary trained on part of it most often used its start.
            ctx = torch.cat([ctx, train[len(train) - extra:]])
            info["extra_train_contexts"] = extra
            if progress:
                print(f"featurelens: the test split holds {len(ctx) - extra:,} contexts ({(len(ctx) - extra) * ctx_len:,} "
                      f"tokens); adding the last {extra:,} contexts of the train split to reach {n_tokens:,} tokens",
                      file=sys.stderr, flush=True)
    if need is not None:
        ctx = ctx[:need]
    return ctx, info
