"""One config object that says everything that differs between supported architectures."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any
from .errors import InputError


@dataclass
class ModelConfig:
    """Shape and behaviour of a decoder-only transformer.

    Every architecture difference the engine knows about is a field here; the model code
    branches on these fields and never on the architecture's name.
    """

    architecture: str  # informational: "gemma3", "gemma2", "gemma", "llama", "qwen2", "qwen3", "gpt2"
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int = 8192

    # normalization
    norm: str = "rms"  # "rms" (RMSNorm) or "layer" (LayerNorm with bias)
    norm_eps: float = 1e-6
    post_attn_norm: bool = False  # Gemma 2/3: a norm on the attention output before it joins the residual
    post_mlp_norm: bool = False  # Gemma 2/3: same for the MLP output
    qk_norm: bool = False  # Gemma 3, Qwen 3: RMSNorm over d_head on queries and keys

    # attention
    positional: str = "rope"  # "rope" or "learned" (GPT-2)
    rope_base: float = 10_000.0  # base of global (full-attention) layers
    rope_local_base: float | None = None  # base of sliding-window layers when it differs (Gemma 3)
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear"|"llama3", ...} as in HF configs
    attn_scale: float | None = None  # multiplier on q.k; None means 1/sqrt(d_head)
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention scores
    sliding_window: int | None = None
    layer_types: list[str] = field(default_factory=list)  # per layer: "global" or "sliding"
    attn_bias: bool = False  # bias on q, k, v projections (Qwen 2, GPT-2)
    attn_out_bias: bool = False  # bias on the output projection (GPT-2)

    # MLP
    gated_mlp: bool = True  # act(gate(x)) * up(x) -> down, else act(in(x)) -> out
    act_fn: str = "silu"  # "silu", "gelu_tanh", "gelu"
    mlp_bias: bool = False

    # embeddings and output
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(d_model)
    tied_embeddings: bool = True
    final_softcap: float | None = None  # Gemma 2: tanh soft-capping of the logits

    # tokens
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    default_prepend_bos: bool = True

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = ["global"] * self.n_layers
        if len(self.layer_types) != self.n_layers:
            raise InputError(f"layer_types has {len(self.layer_types)} entries for {self.n_layers} layers")
        if self.n_heads % self.n_kv_heads:
            raise InputError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def q_scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.d_head)

    def rope_base_for(self, layer: int) -> float:
        if self.layer_types[layer] == "sliding" and self.rope_local_base is not None:
            return self.rope_local_base
        return self.rope_base

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown ModelConfig fields: {sorted(unknown)}")
        return cls(**d)
