"""The hooked transformer: one compact, config-driven forward pass for every supported family.

Shapes in comments: b=batch, p=positions of this call, t=key positions (past + this call),
h=query heads, kv=key/value heads, d=d_head, D=d_model, M=d_mlp, V=d_vocab.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .hooks import HookFn, HookPoint, UnknownHookError, hook_names_for
from .errors import InputError

FwdHooks = Sequence[tuple["str | Callable[[str], bool]", HookFn]]


class ForwardContext:
    """Per-call state shared by the blocks: active hooks, positions, masks and the KV cache.

    `hooks` maps every hooked name to its forward hooks; a name with only backward hooks is in it too (with an
    empty list), so the layers' "is this point hooked?" checks take the path that materializes it.
    """

    __slots__ = ("hooks", "bwd_hooks", "hook_points", "positions", "masks", "kv_cache", "key_valid", "q_start",
                 "buffers", "bos")

    def __init__(self, hooks: dict[str, list[HookFn]], hook_points: dict[str, HookPoint],
                 bwd_hooks: dict[str, list[HookFn]] | None = None):
        self.hooks = hooks
        self.bwd_hooks = bwd_hooks or {}
        for name in self.bwd_hooks:
            self.hooks.setdefault(name, [])
        self.hook_points = hook_points
        self.positions: torch.Tensor | None = None  # [b, p] rotary / learned positions
        self.bos: torch.Tensor | None = None  # [b, p] True at BOS tokens
        self.masks: dict[int | None, torch.Tensor | None] = {}  # window -> [b|1, 1, p, t] bool, None = plain causal
        self.kv_cache: KVCache | None = None
        self.key_valid: torch.Tensor | None = None  # [b, t] False on padding
        self.q_start = 0  # index of this call's first position in the key buffer
        self.buffers: dict[str, torch.Tensor] = {}  # scratch space reused by the layers of this call

    def scratch(self, key: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A buffer that every layer of this call reuses (never another call), for intermediates no hook sees.

        Large fresh tensors cost page faults on every allocation; the MLP's [b*p, 2*d_mlp] input does not need them.
        """
        buf = self.buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        fns = self.hooks.get(name)
        if fns is None:
            return x
        hook = self.hook_points[name]
        hook.positions, hook.past, hook.bos = self.positions, self.q_start, self.bos
        for fn in fns:
            out = fn(x, hook)
            if out is not None:
                _check_replacement(name, out, x)
                x = out
        bwd = self.bwd_hooks.get(name)
        if bwd and torch.is_grad_enabled():
            x = self._on_gradient(x, hook, bwd)
        return x

    def _on_gradient(self, x: torch.Tensor, hook: HookPoint, fns: list[HookFn]) -> torch.Tensor:
        """Call the backward hooks with d(output)/d(x) when a backward pass reaches x; a hook's return value
        replaces the gradient that flows on upstream."""
        if x.requires_grad:
            # A node of its own: where two hook points hold the same tensor (hook_embed and blocks.0.hook_resid_pre
            # without an embedding scale), the later point's replacement must reach the earlier point's hook.
            x = x.view_as(x)
        else:  # nothing upstream needs a gradient (frozen weights), but the hook reads this one
            x = x.detach().requires_grad_(True)
        # The hook point is shared: restore this call's view of it.
        positions, past, bos = self.positions, self.q_start, self.bos

        def on_grad(grad: torch.Tensor) -> torch.Tensor:
            hook.positions, hook.past, hook.bos = positions, past, bos
            for fn in fns:
                out = fn(grad, hook)
                if out is not None:
                    _check_replacement(hook.name + " (backward)", out, grad)
                    grad = out
            return grad

        x.register_hook(on_grad)
        return x


def _check_replacement(name: str, out: Any, x: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise InputError(
            f"hook on {name} returned {type(out).__name__} "
            f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}; expected a tensor of shape {tuple(x.shape)}"
        )


class KVCache:
    """Preallocated keys and values for incremental decoding: [b, kv, max_len, d] per layer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (batch, cfg.n_kv_heads, max_len, cfg.d_head)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.length = 0  # positions filled (advanced once per forward, after the last layer)
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise InputError(f"KV cache holds {self.max_len} positions; this call needs {end}")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def inv_rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2, -1) + eps) as [..., 1]: one pass over x (a vector norm), then arithmetic on the small result."""
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return (n * n).div_(x.shape[-1]).add_(eps).rsqrt_()


class Norm(nn.Module):
    """RMSNorm or LayerNorm whose scale (1/rms) is a hook point, so it can be frozen."""

    def __init__(self, cfg: ModelConfig, dim: int, name: str):
        super().__init__()
        self.kind, self.eps, self.dim = cfg.norm, cfg.norm_eps, dim
        self.w = nn.Parameter(torch.ones(dim))
        self.b = nn.Parameter(torch.zeros(dim)) if cfg.norm == "layer" else None
        self.scale_name = f"{name}.hook_scale"
        self.normalized_name = f"{name}.hook_normalized"

    def forward(self, x: torch.Tensor, ctx: ForwardContext, hook_normalized: bool = True) -> torch.Tensor:
        if self.scale_name not in ctx.hooks:  # fewest passes over x when nobody watches the scale
            if self.kind == "rms":
                # F.rms_norm is not fused on CPU (pow, mean, rsqrt, mul, mul); this makes 3 passes instead of 4.
                xf = x.float()
                out = xf * inv_rms(xf, self.eps)
                out = out.mul_(self.w) if _inplace_ok(out, self.w) else out * self.w.float()
                out = out.to(x.dtype)
            else:
                out = F.layer_norm(x.float(), (self.dim,), self.w.float(), self.b.float(), self.eps).to(x.dtype)
        else:
            xf = x.float()
            if self.kind == "layer":
                xf = xf - xf.mean(-1, keepdim=True)
            scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., 1]
            scale = ctx(self.scale_name, scale)
            out = xf * scale * self.w.float()
            if self.b is not None:
                out = out + self.b.float()
            out = out.to(x.dtype)
        return ctx(self.normalized_name, out) if hook_normalized else out

    def add_to(self, resid: torch.Tensor, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """resid + norm(x), with the weight multiply and the residual add in one pass where nothing hooks the scale."""
        if self.kind != "rms" or self.scale_name in ctx.hooks or x.dtype != torch.float32 or resid.dtype != torch.float32:
            return resid + self(x, ctx, hook_normalized=False)
        return torch.addcmul(resid, x * inv_rms(x, self.eps), self.w)


class HeadNorm(nn.Module):
    """QK-norm: RMSNorm over d_head, shared by all heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps, self.dim = cfg.norm_eps, cfg.d_head
        self.w = nn.Parameter(torch.ones(cfg.d_head))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (self.dim,), self.w.float(), self.eps).to(x.dtype)


def _inplace_ok(out: torch.Tensor, *others: torch.Tensor) -> bool:
    """May `out` (a fresh intermediate) be overwritten in place? Not while autograd may need it."""
    return not torch.is_grad_enabled() or not (out.requires_grad or any(o.requires_grad for o in others))


def rope_inv_freq(cfg: ModelConfig, base: float, scaled: bool) -> torch.Tensor:
    """Inverse frequencies [d/2] in float32, with the HF rope scalings we support."""
    inv_freq = 1.0 / (base ** (torch.arange(0, cfg.d_head, 2, dtype=torch.int64).float() / cfg.d_head))
    rs = cfg.rope_scaling if scaled else None
    if not rs:
        return inv_freq
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        return inv_freq / rs["factor"]
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled_freq = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled_freq / factor + smooth * scaled_freq
        medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
        return torch.where(medium, smoothed, scaled_freq)
    if kind == "default":
        return inv_freq
    raise NotImplementedError(f"rope scaling {kind!r} is not supported")


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF-convention rotary embedding (halves, not interleaved). x [b, p, n, d], cos/sin [b, p, 1, d]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


_QK_HOOKS = ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k")


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.W_qkv = nn.Parameter(torch.empty((h + 2 * kv) * d, cfg.d_model))  # q, k and v stacked: one matmul
        self.b_qkv = nn.Parameter(torch.zeros((h + 2 * kv) * d)) if cfg.attn_bias else None
        self.W_O = nn.Parameter(torch.empty(cfg.d_model, h * d))
        self.b_O = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.attn_out_bias else None
        self.q_norm = HeadNorm(cfg) if cfg.qk_norm else None
        self.k_norm = HeadNorm(cfg) if cfg.qk_norm else None
        self.window = cfg.sliding_window if cfg.layer_types[layer] == "sliding" else None
        p = f"blocks.{layer}.attn."
        self.names = {s: p + s for s in ("hook_q", "hook_k", "hook_v", "hook_rot_q", "hook_rot_k",
                                          "hook_attn_scores", "hook_pattern", "hook_z")}

    def forward(self, x: torch.Tensor, ctx: ForwardContext, rope: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        cfg, n = self.cfg, self.names
        b, p, _ = x.shape
        h, kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        qkv = F.linear(x, self.W_qkv, self.b_qkv)  # [b, p, (h + 2kv) d]
        q, k, v = qkv.split((h * d, kv * d, kv * d), dim=-1)
        if rope is not None and qkv.dtype == torch.float32 and not any(n[s] in ctx.hooks for s in _QK_HOOKS):
            qk = self._qk_norm_rope(qkv[..., : (h + kv) * d].view(b, p, h + kv, d), rope)
            q, k = qk[:, :, :h], qk[:, :, h:]
            v = ctx(n["hook_v"], v.view(b, p, kv, d))
        else:
            q = ctx(n["hook_q"], q.view(b, p, h, d))
            k = ctx(n["hook_k"], k.view(b, p, kv, d))
            v = ctx(n["hook_v"], v.view(b, p, kv, d))
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = rotate(q, rope[0], rope[1]), rotate(k, rope[0], rope[1])
        q = ctx(n["hook_rot_q"], q).transpose(1, 2)  # [b, h, p, d]
        k = ctx(n["hook_rot_k"], k).transpose(1, 2)  # [b, kv, p, d]
        v = v.transpose(1, 2)
        if ctx.kv_cache is not None:
            k, v = ctx.kv_cache.update(self.layer, k, v)  # [b, kv, t, d]
        mask = ctx.masks[self.window]  # [b|1, 1, p, t] bool or None (plain causal, p == t)

        explicit = cfg.attn_softcap is not None or n["hook_attn_scores"] in ctx.hooks or n["hook_pattern"] in ctx.hooks
        if explicit:
            group = h // kv
            k_rep = k.repeat_interleave(group, dim=1) if group > 1 else k  # [b, h, t, d]
            v_rep = v.repeat_interleave(group, dim=1) if group > 1 else v
            scores = (q @ k_rep.transpose(-1, -2)) * cfg.q_scale  # [b, h, p, t]
            if cfg.attn_softcap is not None:
                scores = torch.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
            if mask is None:
                mask = torch.ones(p, k.shape[2], dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~mask, float("-inf"))
            scores = ctx(n["hook_attn_scores"], scores)
            pattern = ctx(n["hook_pattern"], torch.softmax(scores.float(), dim=-1).to(q.dtype))
            z = pattern @ v_rep  # [b, h, p, d]
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=cfg.q_scale, enable_gqa=kv != h
            )
        z = ctx(n["hook_z"], z.transpose(1, 2))  # [b, p, h, d] (SDPA's output is laid out so: no copy)
        return F.linear(z.reshape(b, p, h * d), self.W_O, self.b_O)  # [b, p, D]

    def _qk_norm_rope(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """QK-norm then rotary embedding of queries and keys together: 6 passes over them instead of ~24.

        x [b, p, h + kv, d] (a view into the qkv output). With s = 1/rms(x) and w the norm weight,
        rope(x s w) = (x s) * (w cos) + roll(x s, d/2) * (roll(w, d/2) sign sin), where sign is -1 on the first
        half (HF's rotate_half). The weight folds into [.., p, h + kv, d] tables that are small when the
        positions are shared by the batch.
        """
        cos_sin = rope[2]  # [2, b|1, p, 1, d]: cos and sign * sin
        h, kv, d = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.d_head
        if self.q_norm is not None:
            w = torch.cat((self.q_norm.w.expand(h, d), self.k_norm.w.expand(kv, d)))  # [h + kv, d]
            x = x * inv_rms(x, self.q_norm.eps)
            cos_sin = cos_sin * torch.stack((w, w.roll(d // 2, -1)))[:, None, None]  # one op: [2, b|1, p, h + kv, d]
        cos, sin_signed = cos_sin[0], cos_sin[1]
        out = x * cos
        rolled = x.roll(d // 2, -1)
        return out.addcmul_(rolled, sin_signed) if _inplace_ok(out, rolled) else torch.addcmul(out, rolled, sin_signed)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        n_in = 2 * cfg.d_mlp if cfg.gated_mlp else cfg.d_mlp
        self.W_in = nn.Parameter(torch.empty(n_in, cfg.d_model))  # gated: [gate; up] stacked for one matmul
        self.b_in = nn.Parameter(torch.zeros(n_in)) if cfg.mlp_bias else None
        self.W_out = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.mlp_bias else None
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[cfg.act_fn]
        p = f"blocks.{layer}.mlp."
        self.names = {s: p + s for s in ("hook_pre", "hook_pre_linear", "hook_post")}

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        n = self.names
        if self.cfg.gated_mlp and n["hook_pre"] not in ctx.hooks and n["hook_pre_linear"] not in ctx.hooks \
                and _inplace_ok(x, self.W_in):
            # Nobody sees gate and up: compute them into this call's scratch buffer (out= needs no autograd).
            x2 = x.reshape(-1, x.shape[-1])
            hidden = ctx.scratch("mlp_in", (x2.shape[0], self.W_in.shape[0]), x)
            if self.b_in is None:
                torch.mm(x2, self.W_in.t(), out=hidden)
            else:
                torch.addmm(self.b_in, x2, self.W_in.t(), out=hidden)
            gate, up = hidden.chunk(2, dim=-1)
            post = ctx(n["hook_post"], self.act(gate).mul_(up).view(*x.shape[:-1], -1))  # [b, p, M]
            return F.linear(post, self.W_out, self.b_out)
        hidden = F.linear(x, self.W_in, self.b_in)  # [b, p, M or 2M]
        if self.cfg.gated_mlp:
            gate, up = hidden.chunk(2, dim=-1)
            act, up = self.act(ctx(self.names["hook_pre"], gate)), ctx(self.names["hook_pre_linear"], up)
            post = act.mul_(up) if _inplace_ok(act, up) else act * up  # act is fresh: reuse its memory
        else:
            post = self.act(ctx(self.names["hook_pre"], hidden))
        post = ctx(self.names["hook_post"], post)  # [b, p, M]
        return F.linear(post, self.W_out, self.b_out)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        p = f"blocks.{layer}."
        self.ln1 = Norm(cfg, cfg.d_model, p + "ln1")
        self.attn = Attention(cfg, layer)
        self.ln1_post = Norm(cfg, cfg.d_model, p + "ln1_post") if cfg.post_attn_norm else None
        self.ln2 = Norm(cfg, cfg.d_model, p + "ln2")
        self.mlp = MLP(cfg, layer)
        self.ln2_post = Norm(cfg, cfg.d_model, p + "ln2_post") if cfg.post_mlp_norm else None
        self.names = {s: p + s for s in ("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")}

    def forward(self, resid: torch.Tensor, ctx: ForwardContext, rope: Any) -> torch.Tensor:
        n = self.names
        resid = ctx(n["hook_resid_pre"], resid)  # [b, p, D]
        attn_out = self.attn(self.ln1(resid, ctx), ctx, rope)
        if self.ln1_post is not None and n["hook_attn_out"] not in ctx.hooks:
            resid = self.ln1_post.add_to(resid, attn_out, ctx)  # post-norm and residual add in one pass
        else:
            if self.ln1_post is not None:
                attn_out = self.ln1_post(attn_out, ctx, hook_normalized=False)
            resid = resid + ctx(n["hook_attn_out"], attn_out)
        resid = ctx(n["hook_resid_mid"], resid)
        mlp_out = self.mlp(self.ln2(resid, ctx), ctx)
        if self.ln2_post is not None and n["hook_mlp_out"] not in ctx.hooks:
            resid = self.ln2_post.add_to(resid, mlp_out, ctx)
        else:
            if self.ln2_post is not None:
                mlp_out = self.ln2_post(mlp_out, ctx, hook_normalized=False)
            resid = resid + ctx(n["hook_mlp_out"], mlp_out)
        return ctx(n["hook_resid_post"], resid)

    @torch.no_grad()
    def mlp_output(self, x: torch.Tensor) -> torch.Tensor:
        """What a transcoder replaces: hook_mlp_out from the MLP's normalized input x [..., D] (ln2's output), the
        post-MLP norm included, with no hooks."""
        ctx = ForwardContext({}, {})
        out = self.mlp(x, ctx)
        return self.ln2_post(out, ctx, hook_normalized=False) if self.ln2_post is not None else out


class Transformer(nn.Module):
    """The bare network: tokens in, logits (or the residual stream at a layer) out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model)) if cfg.positional == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_final = Norm(cfg, cfg.d_model, "ln_final")
        self.W_U = None if cfg.tied_embeddings else nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.hook_names = hook_names_for(
            cfg.n_layers,
            post_norms=cfg.post_attn_norm,
            gated_mlp=cfg.gated_mlp,
            learned_pos=cfg.positional == "learned",
        )
        self.hook_points = {name: HookPoint(name) for name in self.hook_names}
        self._inv_freq: dict[tuple[float, bool], torch.Tensor] = {}
        self._rope_tables: dict[tuple, dict] = {}  # (p, device, dtype, inference) -> rope cache of positions 0..p-1

    @property
    def unembed_weight(self) -> torch.Tensor:
        """[V, D]: the unembedding matrix (the embedding itself when tied)."""
        return self.W_E if self.W_U is None else self.W_U

    def unembed(self, resid: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Final residual [.., D] -> logits [.., V]: final norm (its hooks run), unembedding, soft-cap."""
        logits = F.linear(self.ln_final(resid, ctx), self.unembed_weight)
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits

    def _rope(self, layer: int, positions: torch.Tensor, cache: dict) -> tuple[torch.Tensor, ...] | None:
        """(cos, sin, stack(cos, sign * sin)) [b, p, 1, d] for this layer's rope base, once per forward and base."""
        cfg = self.cfg
        if cfg.positional != "rope":
            return None
        base = cfg.rope_base_for(layer)
        scaled = not (cfg.layer_types[layer] == "sliding" and cfg.rope_local_base is not None)
        key = (base, scaled)
        if key not in cache:
            if key not in self._inv_freq:
                self._inv_freq[key] = rope_inv_freq(cfg, base, scaled)
            inv_freq = self._inv_freq[key].to(positions.device)
            freqs = positions.float()[..., None] * inv_freq  # [b, p, d/2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]  # [b, p, 1, d]
            dtype = self.W_E.dtype
            sin = emb.sin()
            sign = torch.ones(cfg.d_head, device=sin.device)
            sign[: cfg.d_head // 2] = -1.0
            cos = emb.cos()
            cache[key] = (cos.to(dtype), sin.to(dtype), torch.stack((cos, sin * sign)).to(dtype))
        return cache[key]

    def build_masks(self, ctx: ForwardContext, p: int, t: int, device: torch.device) -> None:
        """Boolean [b|1, 1, p, t] masks per window size; None where plain causal attention is exact."""
        windows = {self.cfg.sliding_window if lt == "sliding" else None for lt in self.cfg.layer_types}
        q_idx = torch.arange(ctx.q_start, ctx.q_start + p, device=device)[:, None]
        k_idx = torch.arange(t, device=device)[None, :]
        for window in windows:
            window_binds = window is not None and ctx.q_start + p - 1 >= window
            if ctx.key_valid is None and ctx.q_start == 0 and not window_binds:
                ctx.masks[window] = None
                continue
            allowed = k_idx <= q_idx
            if window_binds:
                allowed = allowed & (q_idx - k_idx < window)
            allowed = allowed[None, None]
            if ctx.key_valid is not None:
                # Every query may see itself, so padded rows never softmax over nothing.
                allowed = (allowed & ctx.key_valid[:, None, None, :]) | (k_idx == q_idx)[None, None]
            ctx.masks[window] = allowed

    def forward(
        self,
        tokens: torch.Tensor,
        ctx: ForwardContext,
        stop_at_layer: int | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [b, p] -> logits [b, p, V], or the residual stream [b, p, D] before block `stop_at_layer`.

        attention_mask [b, t] (1 = real token, 0 = padding) covers the KV cache plus this call.
        """
        cfg = self.cfg
        b, p = tokens.shape
        device = tokens.device
        past = ctx.kv_cache.length if ctx.kv_cache is not None else 0
        ctx.q_start = past
        if attention_mask is not None:
            ctx.key_valid = attention_mask.bool()
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + p]
        else:
            positions = torch.arange(past, past + p, device=device).expand(b, p)
        ctx.positions = positions
        ctx.bos = tokens == cfg.bos_token_id if cfg.bos_token_id is not None else None
        self.build_masks(ctx, p, past + p, device)

        resid = ctx("hook_embed", F.embedding(tokens, self.W_E))  # [b, p, D], rows of W_E: before the scale
        if cfg.embed_scale != 1.0:
            resid = resid * torch.tensor(cfg.embed_scale, dtype=resid.dtype)
        if self.W_pos is not None:
            resid = resid + ctx("hook_pos_embed", self.W_pos[positions])
        n_run = cfg.n_layers if stop_at_layer is None else stop_at_layer
        # Without padding every row has the same positions: rotary tables [1, p, 1, d] broadcast over the batch,
        # and for positions 0..p-1 they are the same on every call, so they are kept (for the last few lengths).
        rope_positions = positions if attention_mask is not None else positions[:1]
        rope_cache: dict = {}
        if attention_mask is None and past == 0:
            key = (p, device, self.W_E.dtype, torch.is_inference_mode_enabled())
            if key not in self._rope_tables and len(self._rope_tables) >= 4:
                self._rope_tables.clear()
            rope_cache = self._rope_tables.setdefault(key, {})
        for layer in range(n_run):
            resid = self.blocks[layer](resid, ctx, self._rope(layer, rope_positions, rope_cache))
        if ctx.kv_cache is not None and n_run == cfg.n_layers:
            ctx.kv_cache.length += p
        if stop_at_layer is not None:
            return resid
        return self.unembed(resid, ctx)  # [b, p, V]


def resolve_hook_names(name: "str | Callable[[str], bool]", valid: list[str]) -> list[str]:
    """A hook name or a predicate -> the matching valid names; unknown names raise with suggestions."""
    if callable(name):
        return [n for n in valid if name(n)]
    if name not in valid:
        raise UnknownHookError(name, valid)
    return [name]
