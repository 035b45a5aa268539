"""HookedTransformer: the model a user holds. TransformerLens-style API over `Transformer`."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import ModelConfig
from .hooks import ActivationCache, HookFn, hook_layer
from .model import ForwardContext, FwdHooks, KVCache, Transformer, resolve_hook_names

TextOrTokens = "str | list[str] | torch.Tensor"


class EmptyPromptError(ValueError):
    pass


class HookedTransformer(torch.nn.Module):
    """A language model with a hook on every internal activation.

    Load one with `featurelens.load_model`:

    >>> import featurelens as fl
    >>> model = fl.load_model("gemma-3-270m")
    >>> logits, cache = model.run_with_cache("The Eiffel Tower is located in the city of",
    ...                                      names_filter=lambda n: n.endswith("hook_resid_post"))
    >>> cache["resid_post", 6].shape
    torch.Size([1, 11, 640])
    >>> model.generate("The capital of France is", max_new_tokens=5, temperature=0.0)
    'The capital of France is **Paris**...'
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None, name: str = ""):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.name = name or cfg.architecture
        self.net = Transformer(cfg)
        self._persistent_hooks: dict[str, list[HookFn]] = {}
        self.requires_grad_(False)  # an object of study, not training: activations may still carry gradients

    # ----------------------------------------------------------------- introspection
    @property
    def hook_names(self) -> list[str]:
        return self.net.hook_names

    @property
    def W_E(self) -> torch.Tensor:
        return self.net.W_E

    @property
    def W_U(self) -> torch.Tensor:
        """[D, V] as in TransformerLens."""
        return self.net.unembed.T

    @property
    def device(self) -> torch.device:
        return self.net.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.W_E.dtype

    def __repr__(self) -> str:
        c = self.cfg
        return (f"HookedTransformer({self.name!r}: {c.architecture}, {c.n_layers} layers, d_model={c.d_model}, "
                f"heads={c.n_heads}/{c.n_kv_heads}, d_vocab={c.d_vocab}, {self.dtype}, {self.device})")

    # ----------------------------------------------------------------- tokens
    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass token ids instead of text")
        return self.tokenizer

    def encode(self, text: str, prepend_bos: bool | None = None) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"expected a string, got {type(text).__name__}")
        if text == "":
            raise EmptyPromptError("empty prompt: give at least one character of text")
        ids = self._require_tokenizer().encode(text, add_special_tokens=False)
        bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if bos and self.cfg.bos_token_id is not None:
            ids = [self.cfg.bos_token_id] + ids
        return ids

    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None, padding_side: str = "right") -> torch.Tensor:
        """Text -> token ids [b, p] on the model's device; a list of prompts is padded."""
        if isinstance(text, str):
            text = [text]
        if not text:
            raise EmptyPromptError("no prompts given")
        rows = [self.encode(t, prepend_bos) for t in text]
        tokens, _ = self._pad(rows, padding_side)
        return tokens

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        pad = self.cfg.pad_token_id if self.cfg.pad_token_id is not None else 0
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(0, len(r)) if side == "right" else slice(width - len(r), width)
            tokens[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return tokens.to(self.device), mask.to(self.device)

    def to_str_tokens(self, text: str | torch.Tensor | list[int], prepend_bos: bool | None = None) -> list[str]:
        ids = self.encode(text, prepend_bos) if isinstance(text, str) else torch.as_tensor(text).flatten().tolist()
        tok = self._require_tokenizer()
        return [tok.decode([i]) for i in ids]

    def to_string(self, tokens: torch.Tensor | list[int]) -> str | list[str]:
        t = torch.as_tensor(tokens)
        tok = self._require_tokenizer()
        if t.dim() == 2:
            return [tok.decode(row, skip_special_tokens=False) for row in t.tolist()]
        return tok.decode(t.tolist(), skip_special_tokens=False)

    def to_single_token(self, text: str) -> int:
        ids = self.encode(text, prepend_bos=False)
        if len(ids) != 1:
            raise ValueError(f"{text!r} is {len(ids)} tokens ({self.to_str_tokens(text, prepend_bos=False)}), not one")
        return ids[0]

    def _as_tokens(self, input: Any, prepend_bos: bool | None = None) -> torch.Tensor:
        if isinstance(input, torch.Tensor):
            tokens = input if input.dim() == 2 else input[None]
            if tokens.numel() == 0:
                raise EmptyPromptError("empty token tensor")
            if tokens.dtype not in (torch.long, torch.int32, torch.int64):
                raise TypeError(f"token ids must be integers, got {tokens.dtype}")
            if tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab:
                raise ValueError(f"token ids must lie in [0, {self.cfg.d_vocab}); got {tokens.min()}..{tokens.max()}")
            return tokens.to(self.device)
        return self.to_tokens(input, prepend_bos)

    # ----------------------------------------------------------------- hooks
    def _collect(self, fwd_hooks: FwdHooks) -> dict[str, list[HookFn]]:
        active: dict[str, list[HookFn]] = {k: list(v) for k, v in self._persistent_hooks.items()}
        for name, fn in fwd_hooks:
            for full in resolve_hook_names(name, self.hook_names):
                active.setdefault(full, []).append(fn)
        return active

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: FwdHooks = ()) -> Iterator["HookedTransformer"]:
        """Hooks that stay on for every forward pass (and every generation step) inside the block.

        >>> with model.hooks([("blocks.3.hook_mlp_out", lambda x, hook: x * 0)]):
        ...     ablated = model("The capital of France is")
        """
        added: list[tuple[str, HookFn]] = []
        try:
            for name, fn in fwd_hooks:
                for full in resolve_hook_names(name, self.hook_names):
                    self._persistent_hooks.setdefault(full, []).append(fn)
                    added.append((full, fn))
            yield self
        finally:
            for full, fn in added:
                fns = self._persistent_hooks[full]
                fns.remove(fn)
                if not fns:
                    del self._persistent_hooks[full]

    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn) -> Callable[[], None]:
        """Attach a hook until the returned function is called."""
        names = resolve_hook_names(name, self.hook_names)
        for full in names:
            self._persistent_hooks.setdefault(full, []).append(fn)

        def remove() -> None:
            for full in names:
                if fn in self._persistent_hooks.get(full, []):
                    self._persistent_hooks[full].remove(fn)
                    if not self._persistent_hooks[full]:
                        del self._persistent_hooks[full]

        return remove

    def reset_hooks(self) -> None:
        self._persistent_hooks.clear()

    def steer(self, source: Any, features: Any = None, *, mode: str = "relative", positions: Any = "all"):
        """Context manager: steer every forward pass and generation step inside the block.

        >>> with model.steer(sae, {1234: 8.0}):             # strength x decoder direction at the SAE's hook
        ...     model.generate("I think the weather today is", max_new_tokens=20, seed=0)
        >>> with model.steer([fl.Clamp(sae, 1234, 20.0), fl.Ablate(sae, 77)]): ...
        >>> with model.steer(fl.steering_vector(model, happy, sad, ("resid_post", 6)), 4.0): ...

        See featurelens.interventions.steering for modes ("relative" to the feature's max activation, or
        "absolute") and positions ("all", "prompt", "generated", or a list of token positions).
        """
        from ..interventions.steering import steer

        return steer(self, source, features, mode=mode, positions=positions)

    # ----------------------------------------------------------------- forward passes
    def forward(
        self,
        input: Any,
        *,
        fwd_hooks: FwdHooks = (),
        stop_at_layer: int | None = None,
        attention_mask: torch.Tensor | None = None,
        prepend_bos: bool | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Text or tokens [b, p] -> logits [b, p, V] (or the residual stream before block `stop_at_layer`)."""
        tokens = self._as_tokens(input, prepend_bos)
        if stop_at_layer is not None and not 0 <= stop_at_layer <= self.cfg.n_layers:
            raise ValueError(f"stop_at_layer must be in [0, {self.cfg.n_layers}], got {stop_at_layer}")
        ctx = ForwardContext(self._collect(fwd_hooks), self.net.hook_points)
        ctx.kv_cache = kv_cache
        return self.net(tokens, ctx, stop_at_layer=stop_at_layer, attention_mask=attention_mask)

    def run_with_hooks(self, input: Any, fwd_hooks: FwdHooks = (), **kwargs: Any) -> torch.Tensor:
        """One forward pass with hooks that read or replace activations.

        A hook is `fn(activation, hook) -> None | new_activation`; `hook.name` and `hook.layer()` say where it is.
        """
        return self.forward(input, fwd_hooks=fwd_hooks, **kwargs)

    def run_with_cache(
        self,
        input: Any,
        names_filter: str | Sequence[str] | Callable[[str], bool] | None = None,
        stop_at_layer: int | None = None,
        fwd_hooks: FwdHooks = (),
        detach: bool = True,
        device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, ActivationCache]:
        """Forward pass that records activations. Returns (logits, cache).

        `names_filter` picks what to record (a name, a list of names, or a predicate). When every recorded
        activation lies before some layer and `stop_at_layer` is given, nothing past it is computed and the
        first value is the residual stream there instead of logits.
        """
        if names_filter is None:
            names = list(self.hook_names)
        elif isinstance(names_filter, str):
            names = resolve_hook_names(names_filter, self.hook_names)
        elif callable(names_filter):
            names = [n for n in self.hook_names if names_filter(n)]
        else:
            names = [m for n in names_filter for m in resolve_hook_names(n, self.hook_names)]
        if stop_at_layer is not None:
            names = [n for n in names if (hook_layer(n) if hook_layer(n) is not None else -1) < stop_at_layer
                     and not n.startswith("ln_final")]
        store: dict[str, torch.Tensor] = {}

        def save(x: torch.Tensor, hook: Any) -> None:
            y = x.detach() if detach else x
            store[hook.name] = y.to(device) if device is not None else y

        hooks = list(fwd_hooks) + [(n, save) for n in names]
        out = self.forward(input, fwd_hooks=hooks, stop_at_layer=stop_at_layer, **kwargs)
        ordered = {n: store[n] for n in self.hook_names if n in store}
        return out, ActivationCache(ordered, self.hook_names)

    # ----------------------------------------------------------------- generation
    @torch.inference_mode()
    def generate(
        self,
        input: str | list[str] | torch.Tensor,
        max_new_tokens: int = 20,
        temperature: float = 1.0,
        top_p: float | None = None,
        top_k: int | None = None,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        stop_at_eos: bool = True,
        prepend_bos: bool | None = None,
        return_new_only: bool = False,
        interventions: Sequence[Any] | None = None,
    ) -> Any:
        """Continue prompts with a KV cache; greedy when temperature == 0.

        Strings in, strings out (prompt + continuation, or only the continuation with return_new_only);
        a token tensor in, a token tensor out. Batched prompts are left-padded. Hooks active through
        `model.hooks(...)` apply at every step.

        >>> model.generate("The capital of France is", max_new_tokens=10, temperature=0.0)

        `interventions` (fl.Steer, fl.Clamp, fl.Ablate) stay on for this generation only.
        """
        if interventions:
            with self.steer(interventions):
                return self.generate(input, max_new_tokens, temperature, top_p, top_k, seed, stop_tokens,
                                     stop_at_eos, prepend_bos, return_new_only)
        from .generate import generate_tokens  # local import keeps this module about the forward pass

        single = isinstance(input, str)
        if isinstance(input, torch.Tensor):
            tokens = self._as_tokens(input)
            rows = [r for r in tokens.tolist()]
        else:
            prompts = [input] if single else list(input)
            if not prompts:
                raise EmptyPromptError("no prompts given")
            rows = [self.encode(t, prepend_bos) for t in prompts]
        stops = set(stop_tokens or [])
        if stop_at_eos:
            stops |= set(self.cfg.eos_token_ids)
        new_rows = generate_tokens(
            self, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
            seed=seed, stop_tokens=stops,
        )
        if isinstance(input, torch.Tensor):
            width = max(len(r) for r in new_rows)
            pad = self.cfg.pad_token_id or 0
            out = torch.full((len(rows), tokens.shape[1] + width), pad, dtype=torch.long)
            for i, (r, n) in enumerate(zip(rows, new_rows)):
                out[i, : len(r) + len(n)] = torch.tensor(r + n)
            return out[:, tokens.shape[1]:] if return_new_only else out
        tok = self._require_tokenizer()
        texts = []
        for prompt, r, n in zip(([input] if single else list(input)), rows, new_rows):
            # Decode with the prompt so word-initial spaces survive, then cut the prompt off.
            before = tok.decode(r, skip_special_tokens=True)
            after = tok.decode(r + n, skip_special_tokens=True)
            new_text = after[len(before):] if after.startswith(before) else tok.decode(n, skip_special_tokens=True)
            texts.append(new_text if return_new_only else prompt + new_text)
        return texts[0] if single else texts
