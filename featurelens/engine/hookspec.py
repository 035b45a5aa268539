"""One table of what every hook point holds: its shape, whether it is per token, and how far the model must run.

Everything that needs "how wide is this activation?" or "which blocks must run to produce it?" (dictionaries,
activation streams, steering, analysis) asks here instead of parsing hook names itself.

>>> spec = model.hook_spec("blocks.3.attn.hook_z")
>>> spec.shape, spec.width, spec.per_token, spec.stop_layer      # gemma-3-270m: 4 heads of 256
((4, 256), 1024, True, 4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import ModelConfig
from .hooks import UnknownHookError, hook_layer, hook_names_for


@dataclass(frozen=True)
class HookSpec:
    """What the activation at hook point `name` looks like.

    shape: the trailing shape at one token position, e.g. (n_heads, d_head) for attn.hook_z, (1,) for a norm's
        hook_scale. Per-token activations are [batch, pos, *shape]. For the two that are not per token
        (attn.hook_attn_scores and attn.hook_pattern, [batch, n_heads, q_pos, k_pos]) shape is (n_heads,): the
        dimensions between the batch and the two position axes.
    width: prod(shape), the length of one position's activation flattened (a dictionary's d_in).
    per_token: False for attention scores and patterns, which are per pair of positions.
    stop_layer: how many blocks must run to produce it (`stop_at_layer=` in run_with_cache): layer + 1 for
        blocks.L.*, 0 for the embeddings, None when the whole model must run (ln_final.*).
    """

    name: str
    shape: tuple[int, ...]
    width: int
    per_token: bool
    stop_layer: int | None


def _site_shape(cfg: ModelConfig, site: str) -> tuple[int, ...]:
    h, kv, d = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
    if site.endswith("hook_scale"):
        return (1,)
    by_site = {
        "attn.hook_q": (h, d), "attn.hook_rot_q": (h, d), "attn.hook_z": (h, d),
        "attn.hook_k": (kv, d), "attn.hook_rot_k": (kv, d), "attn.hook_v": (kv, d),
        "attn.hook_attn_scores": (h,), "attn.hook_pattern": (h,),
        "mlp.hook_pre": (cfg.d_mlp,), "mlp.hook_pre_linear": (cfg.d_mlp,), "mlp.hook_post": (cfg.d_mlp,),
    }
    return by_site.get(site, (cfg.d_model,))  # residual stream, block outputs, normalized inputs, embeddings


def hook_specs(cfg: ModelConfig) -> dict[str, HookSpec]:
    """Every hook point of a model with this config, in forward order."""
    names = hook_names_for(cfg.n_layers, post_norms=cfg.post_attn_norm, gated_mlp=cfg.gated_mlp,
                           learned_pos=cfg.positional == "learned")
    out: dict[str, HookSpec] = {}
    for name in names:
        layer = hook_layer(name)
        site = name.split(".", 2)[2] if layer is not None else name
        shape = _site_shape(cfg, site)
        if layer is not None:
            stop: int | None = layer + 1
        else:
            stop = 0 if name in ("hook_embed", "hook_pos_embed") else None
        per_token = site not in ("attn.hook_attn_scores", "attn.hook_pattern")
        out[name] = HookSpec(name, shape, math.prod(shape), per_token, stop)
    return out


def hook_spec(cfg: ModelConfig, name: str) -> HookSpec:
    """The spec of one hook point; an unknown name raises UnknownHookError with the nearest valid names."""
    specs = hook_specs(cfg)
    if name not in specs:
        raise UnknownHookError(name, specs)
    return specs[name]
