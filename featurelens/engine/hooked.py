"""HookedTransformer: the model a user holds. TransformerLens-style API over `Transformer`."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import ModelConfig
from .hooks import ActivationCache, HookFn, UnknownHookError, full_hook_name, hook_layer
from .hookspec import HookSpec, hook_specs
from .model import ForwardContext, FwdHooks, KVCache, Transformer, resolve_hook_names
from .errors import FeaturelensError, InputError

TextOrTokens = "str | list[str] | torch.Tensor"


class EmptyPromptError(FeaturelensError, ValueError):
    pass


class HookedTransformer(torch.nn.Module):
    """A language model with a hook on every internal activation.

    Load one with `featurelens.load_model`:

    >>> import featurelens as fl
    >>> model = fl.load_model("gemma-3-270m")
    >>> logits, cache = model.run_with_cache("The Eiffel Tower is located in the city of",
    ...                                      names_filter=lambda n: n.endswith("hook_resid_post"))
    >>> cache["resid_post", 6].shape
    torch.Size([1, 10, 640])
    >>> model.generate("The Eiffel Tower is located in the city of", max_new_tokens=5, temperature=0.0)
    'The Eiffel Tower is located in the city of Paris, France. It'
    >>> model.W_Q.shape                                    # [layers, heads, d_model, d_head]
    torch.Size([18, 4, 640, 256])
    """

    def __init__(self, cfg: ModelConfig, tokenizer: Any = None, name: str = ""):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.name = name or cfg.architecture
        self.net = Transformer(cfg)
        self._persistent_hooks: dict[str, list[HookFn]] = {}
        self._persistent_bwd_hooks: dict[str, list[HookFn]] = {}
        self._hook_specs: dict[str, HookSpec] | None = None
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
        return self.net.unembed_weight.T

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The transformer blocks: `model.blocks[L].attn`, `.mlp`, `.ln1`, ..."""
        return self.net.blocks

    def hook_spec(self, name: str | tuple) -> HookSpec:
        """Shape, width, per-token-ness and stop layer of a hook point (see featurelens.engine.hookspec).

        >>> model.hook_spec("blocks.6.hook_resid_post").width
        640
        """
        if self._hook_specs is None:
            self._hook_specs = hook_specs(self.cfg)
        key = full_hook_name(*name) if isinstance(name, tuple) else name
        spec = self._hook_specs.get(key)
        if spec is None:
            raise UnknownHookError(key, self.hook_names)
        return spec

    # ----------------------------------------------------------------- weights, per head (TransformerLens layout)
    # Views of the fused parameters, stacked over layers (new tensors, not aliases: write through model.blocks).
    # Absent biases read as zeros, so that x @ W + b is right for every family.
    def _qkv(self, part: int) -> tuple[torch.Tensor, torch.Tensor]:
        """W [L, heads, D, d] and b [L, heads, d] of q (part 0), k (1) or v (2)."""
        c = self.cfg
        h, kv, d = c.n_heads, c.n_kv_heads, c.d_head
        start, n = [(0, h), (h * d, kv), ((h + kv) * d, kv)][part]
        Ws, bs = [], []
        for blk in self.net.blocks:
            W = blk.attn.W_qkv[start:start + n * d]  # [n d, D]
            Ws.append(W.reshape(n, d, c.d_model).transpose(1, 2))
            b = blk.attn.b_qkv
            bs.append(b[start:start + n * d].reshape(n, d) if b is not None else W.new_zeros(n, d))
        return torch.stack(Ws), torch.stack(bs)

    @property
    def W_Q(self) -> torch.Tensor:
        """[L, h, D, d]: q = ln1(x) @ W_Q[L, head] + b_Q[L, head] (before qk-norm and rotary)."""
        return self._qkv(0)[0]

    @property
    def W_K(self) -> torch.Tensor:
        """[L, kv, D, d]"""
        return self._qkv(1)[0]

    @property
    def W_V(self) -> torch.Tensor:
        """[L, kv, D, d]"""
        return self._qkv(2)[0]

    @property
    def b_Q(self) -> torch.Tensor:
        """[L, h, d]"""
        return self._qkv(0)[1]

    @property
    def b_K(self) -> torch.Tensor:
        """[L, kv, d]"""
        return self._qkv(1)[1]

    @property
    def b_V(self) -> torch.Tensor:
        """[L, kv, d]"""
        return self._qkv(2)[1]

    @property
    def W_O(self) -> torch.Tensor:
        """[L, h, d, D]: attention output = sum over heads of z[head] @ W_O[L, head] + b_O[L] (before Gemma's
        post-attention norm)."""
        c = self.cfg
        return torch.stack([blk.attn.W_O.T.reshape(c.n_heads, c.d_head, c.d_model) for blk in self.net.blocks])

    @property
    def b_O(self) -> torch.Tensor:
        """[L, D]"""
        return torch.stack([blk.attn.b_O if blk.attn.b_O is not None else blk.attn.W_O.new_zeros(self.cfg.d_model)
                            for blk in self.net.blocks])

    @property
    def W_in(self) -> torch.Tensor:
        """[L, D, M]: the MLP's input projection (the "up" projection of a gated MLP)."""
        M = self.cfg.d_mlp
        return torch.stack([blk.mlp.W_in[-M:].T for blk in self.net.blocks])

    @property
    def W_gate(self) -> torch.Tensor:
        """[L, D, M]: the gate projection of a gated MLP."""
        if not self.cfg.gated_mlp:
            raise AttributeError(f"{self.cfg.architecture} has no gated MLP, so no W_gate")
        return torch.stack([blk.mlp.W_in[: self.cfg.d_mlp].T for blk in self.net.blocks])

    @property
    def W_out(self) -> torch.Tensor:
        """[L, M, D]: the MLP's output (down) projection."""
        return torch.stack([blk.mlp.W_out.T for blk in self.net.blocks])

    def _mlp_bias(self, part: str) -> torch.Tensor:
        M, out = self.cfg.d_mlp, []
        for blk in self.net.blocks:
            b = blk.mlp.b_out if part == "out" else blk.mlp.b_in
            n = self.cfg.d_model if part == "out" else M
            if b is None:
                out.append(blk.mlp.W_out.new_zeros(n))
            else:
                out.append(b if part == "out" else (b[:M] if part == "gate" else b[-M:]))
        return torch.stack(out)

    @property
    def b_in(self) -> torch.Tensor:
        """[L, M]"""
        return self._mlp_bias("in")

    @property
    def b_gate(self) -> torch.Tensor:
        """[L, M]"""
        if not self.cfg.gated_mlp:
            raise AttributeError(f"{self.cfg.architecture} has no gated MLP, so no b_gate")
        return self._mlp_bias("gate")

    @property
    def b_out(self) -> torch.Tensor:
        """[L, D]"""
        return self._mlp_bias("out")

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
            raise InputError("this model has no tokenizer; pass token ids instead of text")
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
        tokens, _ = self.pad(rows, padding_side)
        return tokens

    def pad(self, rows: list[list[int]], side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
        """Token lists of different lengths -> (tokens [b, p], attention mask [b, p], 1 = real token).

        Right padding suits a plain forward pass (causal attention never lets a real token see a pad); generation
        pads on the left and passes the mask.

        >>> tokens, mask = model.pad([[2, 651, 6037], [2, 9259]], side="left")
        >>> mask.tolist()
        [[1, 1, 1], [0, 1, 1]]
        """
        if side not in ("right", "left"):
            raise InputError(f"side must be 'right' or 'left', got {side!r}")
        if not rows or any(len(r) == 0 for r in rows):
            raise EmptyPromptError("pad needs at least one row, and every row at least one token")
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
            raise InputError(f"{text!r} is {len(ids)} tokens ({self.to_str_tokens(text, prepend_bos=False)}), not one")
        return ids[0]

    def as_tokens(self, input: Any, prepend_bos: bool | None = None) -> torch.Tensor:
        """Text, a list of texts (right-padded) or token ids [p] or [b, p] -> checked token ids [b, p] on the
        model's device.

        >>> model.as_tokens("Hello").shape
        torch.Size([1, 2])
        """
        if isinstance(input, torch.Tensor):
            tokens = input if input.dim() == 2 else input[None]
            if tokens.numel() == 0:
                raise EmptyPromptError("empty token tensor")
            if tokens.dtype not in (torch.long, torch.int32, torch.int64):
                raise TypeError(f"token ids must be integers, got {tokens.dtype}")
            if tokens.min() < 0 or tokens.max() >= self.cfg.d_vocab:
                raise InputError(f"token ids must lie in [0, {self.cfg.d_vocab}); got {tokens.min()}..{tokens.max()}")
            return tokens.to(self.device)
        return self.to_tokens(input, prepend_bos)

    # ----------------------------------------------------------------- hooks
    def _collect(self, fwd_hooks: FwdHooks = (), bwd_hooks: FwdHooks = ()) -> ForwardContext:
        """A fresh context with the persistent hooks plus this call's."""
        active = {k: list(v) for k, v in self._persistent_hooks.items()}
        bwd = {k: list(v) for k, v in self._persistent_bwd_hooks.items()}
        for hooks, table in ((fwd_hooks, active), (bwd_hooks, bwd)):
            for name, fn in hooks:
                for full in resolve_hook_names(name, self.hook_names):
                    table.setdefault(full, []).append(fn)
        return ForwardContext(active, self.net.hook_points, bwd)

    def _attach(self, name: str | Callable[[str], bool], fn: HookFn, dir: str) -> Callable[[], None]:
        if dir not in ("fwd", "bwd"):
            raise InputError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        table = self._persistent_hooks if dir == "fwd" else self._persistent_bwd_hooks
        names = resolve_hook_names(name, self.hook_names)
        for full in names:
            table.setdefault(full, []).append(fn)

        def remove() -> None:
            for full in names:
                if fn in table.get(full, []):
                    table[full].remove(fn)
                    if not table[full]:
                        del table[full]

        return remove

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: FwdHooks = (), bwd_hooks: FwdHooks = ()) -> Iterator["HookedTransformer"]:
        """Hooks that stay on for every forward pass (and every generation step) inside the block.

        Forward hooks are `fn(activation, hook) -> None | new_activation`; backward hooks are
        `fn(grad, hook) -> None | new_grad`, called with the gradient w.r.t. the activation at that point when a
        backward pass reaches it. Names may be predicates, as in run_with_hooks.

        >>> with model.hooks([("blocks.3.hook_mlp_out", lambda x, hook: x * 0)]):
        ...     ablated = model("The capital of France is")
        """
        removers: list[Callable[[], None]] = []
        try:
            for hooks, dir in ((fwd_hooks, "fwd"), (bwd_hooks, "bwd")):
                for name, fn in hooks:
                    removers.append(self._attach(name, fn, dir))
            yield self
        finally:
            for remove in removers:
                remove()

    def add_hook(self, name: str | Callable[[str], bool], fn: HookFn, dir: str = "fwd") -> Callable[[], None]:
        """Attach a forward (dir="fwd") or backward (dir="bwd") hook until the returned function is called."""
        return self._attach(name, fn, dir)

    def reset_hooks(self) -> None:
        self._persistent_hooks.clear()
        self._persistent_bwd_hooks.clear()

    # ----------------------------------------------------------------- forward passes
    def forward(
        self,
        input: Any,
        *,
        fwd_hooks: FwdHooks = (),
        bwd_hooks: FwdHooks = (),
        stop_at_layer: int | None = None,
        attention_mask: torch.Tensor | None = None,
        prepend_bos: bool | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Text or tokens [b, p] -> logits [b, p, V] (or the residual stream before block `stop_at_layer`)."""
        tokens = self.as_tokens(input, prepend_bos)
        if stop_at_layer is not None and not 0 <= stop_at_layer <= self.cfg.n_layers:
            raise InputError(f"stop_at_layer must be in [0, {self.cfg.n_layers}], got {stop_at_layer}")
        ctx = self._collect(fwd_hooks, bwd_hooks)
        ctx.kv_cache = kv_cache
        return self.net(tokens, ctx, stop_at_layer=stop_at_layer, attention_mask=attention_mask)

    def run_with_hooks(self, input: Any, fwd_hooks: FwdHooks = (), bwd_hooks: FwdHooks = (),
                       **kwargs: Any) -> torch.Tensor:
        """One forward pass with hooks that read or replace activations, and gradients on the way back.

        A forward hook is `fn(activation, hook) -> None | new_activation`; `hook.name` and `hook.layer()` say where
        it is. A backward hook is `fn(grad, hook) -> None | new_grad`: it sees the gradient of whatever is
        differentiated w.r.t. the activation at its point, and what it returns flows on upstream instead.

        >>> grads = {}
        >>> logits = model.run_with_hooks("The capital of France is",
        ...     bwd_hooks=[("blocks.3.hook_resid_post", lambda g, hook: grads.update({hook.name: g}))])
        >>> logits[0, -1].max().backward()
        >>> grads["blocks.3.hook_resid_post"].shape
        torch.Size([1, 6, 640])
        """
        return self.forward(input, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, **kwargs)

    def unembed(self, resid: torch.Tensor, *, fwd_hooks: FwdHooks = (), bwd_hooks: FwdHooks = ()) -> torch.Tensor:
        """Final residual [.., D] -> logits [.., V]: final norm, unembedding and (Gemma 2) soft-cap, as at the end of
        the forward pass. The ln_final hooks run (persistent ones and these), so `ln_final.hook_normalized` is the
        unembedding's input.

        >>> resid = model("The capital of France is", stop_at_layer=model.cfg.n_layers)   # [1, 6, 640]
        >>> torch.equal(model.unembed(resid), model("The capital of France is"))
        True
        """
        if resid.shape[-1] != self.cfg.d_model:
            raise InputError(f"unembed takes a residual stream [.., {self.cfg.d_model}], got {tuple(resid.shape)}")
        return self.net.unembed(resid, self._collect(fwd_hooks, bwd_hooks))

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

        >>> model.generate("The Eiffel Tower is located in the city of", max_new_tokens=3, temperature=0.0,
        ...                return_new_only=True)
        ' Paris, France'

        `interventions` (fl.Steer, fl.Clamp, fl.Ablate, or any object with `.hooks(model) -> [(name, fn)]`) stay
        on for this generation only.
        """
        if interventions:
            if callable(getattr(interventions, "hooks", None)):  # one intervention, not a list
                interventions = [interventions]
            hooks = []
            for it in interventions:
                if not callable(getattr(it, "hooks", None)):
                    raise InputError(f"an intervention needs a .hooks(model) method; {type(it).__name__} has none")
                hooks += list(it.hooks(self))
            with self.hooks(hooks):
                return self.generate(input, max_new_tokens, temperature, top_p, top_k, seed, stop_tokens,
                                     stop_at_eos, prepend_bos, return_new_only)
        from .generate import generate_tokens  # local import keeps this module about the forward pass

        single = isinstance(input, str)
        if isinstance(input, torch.Tensor):
            tokens = self.as_tokens(input)
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
