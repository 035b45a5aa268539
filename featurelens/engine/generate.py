"""Autoregressive decoding with a KV cache: greedy, temperature, top-k and nucleus sampling."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .model import KVCache
from .errors import InputError

if TYPE_CHECKING:
    from .hooked import HookedTransformer


def sample_next(
    logits: torch.Tensor, temperature: float, top_p: float | None, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """logits [b, V] -> next token ids [b]."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p; the first always survives
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_tokens(
    model: "HookedTransformer",
    rows: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop_tokens: set[int],
) -> list[list[int]]:
    """Prompts as token lists -> the new tokens of each (stop token included, nothing after it)."""
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if any(len(r) == 0 for r in rows):
        raise InputError("empty prompt: every prompt needs at least one token")
    if max_new_tokens == 0:
        return [[] for _ in rows]
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.device)
        generator.manual_seed(seed)

    tokens, mask = model.pad(rows, "left")  # [b, p]
    b, p = tokens.shape
    total = p + max_new_tokens
    cache = KVCache(model.cfg, b, total, model.device, model.dtype)
    full_mask = torch.zeros((b, total), dtype=torch.long, device=model.device)
    full_mask[:, :p] = mask
    padded = bool((mask == 0).any())

    new: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(b, dtype=torch.bool, device=model.device)
    step_input = tokens
    for step in range(max_new_tokens):
        end = cache.length + step_input.shape[1]
        if step:
            full_mask[:, cache.length : end] = 1
        logits = model.forward(step_input, kv_cache=cache, attention_mask=full_mask[:, :end] if padded else None)
        next_tok = sample_next(logits[:, -1], temperature, top_p, top_k, generator)  # [b]
        for i in range(b):
            if not done[i]:
                t = int(next_tok[i])
                new[i].append(t)
                if t in stop_tokens:
                    done[i] = True
        if bool(done.all()):
            break
        step_input = next_tok[:, None]
    return new
