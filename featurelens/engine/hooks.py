"""Hook points and the activation cache, named as in TransformerLens."""

from __future__ import annotations

import difflib
import re
from typing import Callable, Iterable, Iterator, Mapping

import torch
from .errors import FeaturelensError, InputError

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]

# Per-block hook sites, in the order the forward pass reaches them. Shapes (b=batch, p=pos,
# h=heads, kv=kv heads, d=d_head):
BLOCK_HOOKS = (
    "hook_resid_pre",  # [b, p, d_model]
    "ln1.hook_scale",  # [b, p, 1] the norm's 1/rms (or 1/std): freeze it to make the norm linear
    "ln1.hook_normalized",  # [b, p, d_model] attention input
    "attn.hook_q",  # [b, p, h, d] projection output, before qk-norm and rotary
    "attn.hook_k",  # [b, p, kv, d]
    "attn.hook_v",  # [b, p, kv, d]
    "attn.hook_rot_q",  # [b, p, h, d] after qk-norm and rotary: what meets the keys
    "attn.hook_rot_k",  # [b, p, kv, d]
    "attn.hook_attn_scores",  # [b, h, q_pos, k_pos] scaled, capped and masked, before softmax
    "attn.hook_pattern",  # [b, h, q_pos, k_pos]
    "attn.hook_z",  # [b, p, h, d] pattern-weighted values
    "ln1_post.hook_scale",  # [b, p, 1] Gemma 2/3 only
    "hook_attn_out",  # [b, p, d_model] what attention adds to the residual
    "hook_resid_mid",  # [b, p, d_model]
    "ln2.hook_scale",  # [b, p, 1]
    "ln2.hook_normalized",  # [b, p, d_model] the MLP's input
    "mlp.hook_pre",  # [b, p, d_mlp] gate (or in) projection before the activation
    "mlp.hook_pre_linear",  # [b, p, d_mlp] up projection (gated MLPs only)
    "mlp.hook_post",  # [b, p, d_mlp] what the down projection reads
    "ln2_post.hook_scale",  # [b, p, 1] Gemma 2/3 only
    "hook_mlp_out",  # [b, p, d_model] what the MLP adds to the residual
    "hook_resid_post",  # [b, p, d_model]
)
# hook_embed [b, p, d_model]: the rows of W_E, before Gemma's sqrt(d_model) scale (blocks.0.hook_resid_pre has it);
# hook_pos_embed [b, p, d_model]: GPT-2's learned position embeddings.
GLOBAL_HOOKS_BEFORE = ("hook_embed", "hook_pos_embed")
GLOBAL_HOOKS_AFTER = ("ln_final.hook_scale", "ln_final.hook_normalized")

# Hooks that only exist for some configs.
_POST_NORM_HOOKS = {"ln1_post.hook_scale", "ln2_post.hook_scale"}

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


class HookPoint:
    """What a hook function receives besides the activation: its name and layer.

    During a call it also says where the activation sits in the sequence:
    `positions` [b, p] holds the token positions of this call (pad-aware), and `past` is how many
    positions a KV cache already held before it: 0 for a plain forward pass or a generation's
    prompt, > 0 for the one-token steps of `generate`. `bos` [b, p] is True where the token is the model's
    BOS token (None when the model has none), for steering that leaves BOS alone.
    """

    __slots__ = ("name", "_layer", "positions", "past", "bos")

    def __init__(self, name: str):
        self.name = name
        m = _LAYER_RE.match(name)
        self._layer = int(m.group(1)) if m else None
        self.positions: torch.Tensor | None = None
        self.past = 0
        self.bos: torch.Tensor | None = None

    def layer(self) -> int:
        if self._layer is None:
            raise InputError(f"hook {self.name!r} is not inside a block")
        return self._layer

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r})"


def hook_names_for(n_layers: int, *, post_norms: bool, gated_mlp: bool, learned_pos: bool) -> list[str]:
    """All hook names of a model, in forward order."""
    names = ["hook_embed"] + (["hook_pos_embed"] if learned_pos else [])
    for layer in range(n_layers):
        for site in BLOCK_HOOKS:
            if site in _POST_NORM_HOOKS and not post_norms:
                continue
            if site == "mlp.hook_pre_linear" and not gated_mlp:
                continue
            names.append(f"blocks.{layer}.{site}")
    names += list(GLOBAL_HOOKS_AFTER)
    return names


def hook_layer(name: str) -> int | None:
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


class UnknownHookError(FeaturelensError, KeyError):
    """A hook name the model does not have; the message lists the nearest valid ones."""

    def __init__(self, name: str, valid: Iterable[str]):
        valid = list(valid)
        close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
        if not close:  # fall back to names ending the same way, e.g. "resid_post" -> blocks.*.hook_resid_post
            tail = name.split(".")[-1]
            close = [v for v in valid if v.endswith(tail)][:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        self.name = name
        super().__init__(f"unknown hook name {name!r}{hint}")

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return self.args[0]


_SHORT_NAMES = {
    "embed": "hook_embed",
    "pos_embed": "hook_pos_embed",
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q",
    "k": "attn.hook_k",
    "v": "attn.hook_v",
    "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k",
    "z": "attn.hook_z",
    "pattern": "attn.hook_pattern",
    "attn_scores": "attn.hook_attn_scores",
    "scores": "attn.hook_attn_scores",
    "pre": "mlp.hook_pre",
    "pre_linear": "mlp.hook_pre_linear",
    "post": "mlp.hook_post",
    "mlp_in": "ln2.hook_normalized",
    "normalized": "ln2.hook_normalized",
}


def full_hook_name(name: str, layer: int | None = None) -> str:
    """TransformerLens-style shorthand: ("resid_post", 6) -> "blocks.6.hook_resid_post"."""
    if layer is None:
        return name
    site = _SHORT_NAMES.get(name, name)
    if site in ("hook_embed", "hook_pos_embed"):
        return site
    return f"blocks.{layer}.{site}"


class ActivationCache(Mapping[str, torch.Tensor]):
    """Activations by hook name; also indexable as cache["resid_post", 6].

    >>> cache["blocks.6.hook_resid_post"] is cache["resid_post", 6]
    True
    """

    def __init__(self, store: dict[str, torch.Tensor], valid_names: Iterable[str] = ()):
        self._store = store
        self._valid = list(valid_names)

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        if isinstance(key, tuple):
            key = full_hook_name(*key)
        try:
            return self._store[key]
        except KeyError:
            if key in self._valid:
                raise KeyError(f"{key!r} was not cached (it was filtered out by names_filter or stop_at_layer)") from None
            raise UnknownHookError(key, self._store.keys() or self._valid) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} activations: {', '.join(list(self._store)[:4])}{', ...' if len(self) > 4 else ''})"

    def to(self, device: str | torch.device) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self._store.items()}, self._valid)

    def stack(self, name: str, layers: Iterable[int] | None = None) -> torch.Tensor:
        """Stack one site over layers: cache.stack("resid_post") -> [layers, b, p, d_model]."""
        found = [(hook_layer(k), v) for k, v in self._store.items() if k.endswith("." + _SHORT_NAMES.get(name, name))]
        if layers is not None:
            wanted = set(layers)
            found = [(layer, v) for layer, v in found if layer in wanted]
        if not found:
            raise KeyError(f"no cached activations for site {name!r}")
        return torch.stack([v for _, v in sorted(found, key=lambda lv: lv[0])])
