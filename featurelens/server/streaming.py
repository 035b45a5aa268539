"""Default and steered continuations generated side by side, one token at a time, for server-sent events.

The two continuations decode in lockstep: one step of the default, one step of the steered, each with its own KV
cache and its own random generator seeded alike, so each equals what `model.generate(prompt, seed=seed, ...)`
returns without and with the interventions (the test checks this). The model lock is taken per step, so other
requests' forward passes interleave with a long generation.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterator, Sequence

import torch


class _Decoder:
    """One prompt's generation state: its KV cache, generator, tokens so far, and the text already sent."""

    def __init__(self, model: Any, prompt_ids: list[int], max_new_tokens: int, seed: int | None):
        from ..engine.model import KVCache

        self.model = model
        self.prompt = list(prompt_ids)
        self.new: list[int] = []
        self.cache = KVCache(model.cfg, 1, len(prompt_ids) + max_new_tokens, model.device, model.dtype)
        self.generator = None
        if seed is not None:
            self.generator = torch.Generator(device=model.device)
            self.generator.manual_seed(seed)
        self.step_input = torch.tensor([prompt_ids], device=model.device)
        self.sent = ""
        self.done = False

    def step(self, temperature: float, top_p: float | None, stops: set[int]) -> str:
        """Sample one token; returns the text it adds (decoded with the whole sequence so spaces survive)."""
        from ..engine.generate import sample_next

        logits = self.model.forward(self.step_input, kv_cache=self.cache)
        tok = int(sample_next(logits[:, -1], temperature, top_p, None, self.generator)[0])
        self.new.append(tok)
        self.step_input = torch.tensor([[tok]], device=self.model.device)
        if tok in stops:
            self.done = True
        tk = self.model.tokenizer
        before = tk.decode(self.prompt, skip_special_tokens=True)
        after = tk.decode(self.prompt + self.new, skip_special_tokens=True)
        text = after[len(before):] if after.startswith(before) else tk.decode(self.new, skip_special_tokens=True)
        # A token that ends inside a multi-byte character decodes to U+FFFD until the next one completes it.
        if text.endswith("\ufffd") and not self.done:
            return ""
        delta = text[len(self.sent):] if text.startswith(self.sent) else text
        self.sent = text
        return delta


def sse(event: str, data: Any) -> str:
    """One server-sent event."""
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def side_by_side(model: Any, lock: threading.RLock, prompt: str, hooks: Sequence[tuple[str, Any]],
                 max_new_tokens: int, temperature: float, top_p: float | None, seed: int | None,
                 stop: threading.Event | None = None) -> Iterator[tuple[str, str, int]]:
    """Yield (side, text, step) for side "default" and "steered", alternating, until both are done."""
    with lock:
        ids = model.encode(prompt)
    if len(ids) + max_new_tokens > model.cfg.n_ctx:
        from ..errors import InputError

        raise InputError(f"the prompt is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the "
                         f"model's context of {model.cfg.n_ctx} tokens")
    stops = set(model.cfg.eos_token_ids)
    sides = {"default": _Decoder(model, ids, max_new_tokens, seed), "steered": _Decoder(model, ids, max_new_tokens, seed)}
    for i in range(max_new_tokens):
        for name, dec in sides.items():
            if dec.done or (stop is not None and stop.is_set()):
                continue
            with lock, torch.inference_mode():
                if name == "steered":
                    with model.hooks(fwd_hooks=list(hooks)):
                        delta = dec.step(temperature, top_p, stops)
                else:
                    delta = dec.step(temperature, top_p, stops)
            yield name, delta, i
        if all(d.done for d in sides.values()) or (stop is not None and stop.is_set()):
            break
