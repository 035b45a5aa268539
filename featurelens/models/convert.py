"""Hugging Face configs and weights -> our ModelConfig and state dict.

Every source (safetensors directory, hub id, live `transformers` model, GGUF file) is first
expressed in Hugging Face names, then converted here: one mapping per family, in one place.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from ..engine.config import ModelConfig
from ..engine.errors import FeaturelensError

SUPPORTED_MODEL_TYPES = ("gemma3_text", "gemma3", "gemma2", "gemma", "llama", "qwen2", "qwen3", "gpt2")
GEMMA_FAMILY = ("gemma", "gemma2", "gemma3_text")


class UnsupportedModelError(FeaturelensError, ValueError):
    pass


def _rope(hf: Mapping[str, Any], layer_type: str | None = None) -> tuple[float, dict | None]:
    """(base, scaling) from either the transformers-5 `rope_parameters` or the older flat keys."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        if layer_type is not None and layer_type in params:
            params = params[layer_type]
        elif "full_attention" in params:
            params = params["full_attention"]
        kind = params.get("rope_type", "default")
        return float(params.get("rope_theta", 10_000.0)), (dict(params) if kind != "default" else None)
    if layer_type == "sliding_attention" and "rope_local_base_freq" in hf:
        return float(hf["rope_local_base_freq"]), None
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    return float(hf.get("rope_theta", 10_000.0)), scaling


def _layer_types(hf: Mapping[str, Any], n_layers: int, default_pattern: int | None) -> list[str]:
    if hf.get("layer_types"):
        return ["sliding" if t == "sliding_attention" else "global" for t in hf["layer_types"]]
    pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", default_pattern))
    if not pattern:
        return ["global"] * n_layers
    return ["global" if (i + 1) % pattern == 0 else "sliding" for i in range(n_layers)]


# Hugging Face activation names (ACT2FN keys) -> ours. gelu_new and gelu_fast are the tanh approximation too.
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}


def _act(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _token_ids(hf: Mapping[str, Any]) -> dict[str, Any]:
    eos = hf.get("eos_token_id")
    eos_list = [] if eos is None else (list(eos) if isinstance(eos, (list, tuple)) else [eos])
    return {"bos_token_id": hf.get("bos_token_id"), "eos_token_ids": eos_list, "pad_token_id": hf.get("pad_token_id")}


def config_from_hf(hf: Mapping[str, Any]) -> ModelConfig:
    """A Hugging Face config (as a dict) -> ModelConfig."""
    hf = dict(hf)
    if hf.get("model_type") == "gemma3" and "text_config" in hf:  # multimodal wrapper: read the language model
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
    mt = hf.get("model_type")
    if mt == "gemma3":
        mt = "gemma3_text"
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported; supported: {', '.join(sorted(set(SUPPORTED_MODEL_TYPES)))}"
        )

    if mt == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise UnsupportedModelError("GPT-2 with scale_attn_by_inverse_layer_idx is not supported")
        d_model, n_heads = hf["n_embd"], hf["n_head"]
        return ModelConfig(
            architecture="gpt2", n_layers=hf["n_layer"], d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads,
            d_head=d_model // n_heads, d_mlp=hf.get("n_inner") or 4 * d_model, d_vocab=hf["vocab_size"],
            n_ctx=hf.get("n_positions", 1024), norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            positional="learned", attn_bias=True, attn_out_bias=True, gated_mlp=False,
            attn_scale=None if hf.get("scale_attn_weights", True) else 1.0,
            act_fn=_act(hf.get("activation_function", "gelu_new")),
            mlp_bias=True, tied_embeddings=True, default_prepend_bos=True, **_token_ids(hf),
        )

    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_layers = hf["num_hidden_layers"]
    d_head = hf.get("head_dim") or d_model // n_heads
    common = dict(
        n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_head=d_head, d_mlp=hf["intermediate_size"], d_vocab=hf["vocab_size"],
        n_ctx=hf.get("max_position_embeddings", 8192), norm="rms", norm_eps=hf.get("rms_norm_eps", 1e-6),
        **_token_ids(hf),
    )
    if mt in GEMMA_FAMILY:
        if hf.get("use_bidirectional_attention"):
            raise UnsupportedModelError("bidirectional Gemma (an embedding model) is unsupported; the engine is causal")
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if mt == "gemma" and act == "gelu":  # legacy Gemma 1 configs say "gelu" and mean the tanh approximation
            act = "gelu_pytorch_tanh"
        base, scaling = _rope(hf, "full_attention")
        is3, is2 = mt == "gemma3_text", mt == "gemma2"
        local_base = _rope(hf, "sliding_attention")[0] if is3 else None
        return ModelConfig(
            architecture={"gemma3_text": "gemma3", "gemma2": "gemma2", "gemma": "gemma"}[mt], **common,
            post_attn_norm=is3 or is2, post_mlp_norm=is3 or is2, qk_norm=is3,
            rope_base=base, rope_local_base=local_base, rope_scaling=scaling,
            attn_scale=hf["query_pre_attn_scalar"] ** -0.5 if "query_pre_attn_scalar" in hf else None,
            attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
            sliding_window=hf.get("sliding_window") if (is3 or is2) else None,
            layer_types=_layer_types(hf, n_layers, 6 if is3 else (2 if is2 else None)) if (is3 or is2) else [],
            gated_mlp=True, act_fn=_act(act),
            embed_scale=math.sqrt(d_model), tied_embeddings=hf.get("tie_word_embeddings", True),
            default_prepend_bos=True,
        )
    base, scaling = _rope(hf)
    # Qwen 2 ships a sliding_window value but only uses it when use_sliding_window is set.
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    layer_types: list[str] = []
    if window and hf.get("layer_types"):
        layer_types = _layer_types(hf, n_layers, None)
    elif window:  # older Qwen configs: layers from max_window_layers on slide
        first = hf.get("max_window_layers", 28)  # transformers' default
        layer_types = ["sliding" if i >= first else "global" for i in range(n_layers)]
    return ModelConfig(
        architecture=mt, **common, qk_norm=mt == "qwen3", rope_base=base, rope_scaling=scaling,
        attn_bias=mt == "qwen2" or bool(hf.get("attention_bias")), attn_out_bias=bool(hf.get("attention_bias")),
        sliding_window=window, layer_types=layer_types,
        gated_mlp=True, act_fn=_act(hf.get("hidden_act", "silu")),
        mlp_bias=bool(hf.get("mlp_bias")), tied_embeddings=hf.get("tie_word_embeddings", False),  # HF's default here
        default_prepend_bos=mt == "llama",
    )


def _strip_prefix(name: str) -> str:
    for prefix in ("model.language_model.", "language_model.model.", "model.", "transformer."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def state_dict_from_hf(cfg: ModelConfig, hf_state: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors (a mapping, or a getter by name) -> our state dict, float32.

    Gemma's norms compute x * (1 + w); we store the effective multiplier (1 + w) so one norm serves all.
    """
    if callable(hf_state):
        get = hf_state
    else:
        stripped = {_strip_prefix(k): v for k, v in hf_state.items()}
        get = stripped.get

    def need(name: str) -> torch.Tensor:
        t = get(name)
        if t is None:
            raise KeyError(f"weights are missing tensor {name!r}")
        return t.float()

    gemma = cfg.architecture in ("gemma", "gemma2", "gemma3")
    norm_offset = 1.0 if gemma else 0.0
    out: dict[str, torch.Tensor] = {}
    L = cfg.n_layers

    if cfg.architecture == "gpt2":
        out["net.W_E"] = need("wte.weight")
        out["net.W_pos"] = need("wpe.weight")
        for i in range(L):
            p, q = f"h.{i}.", f"net.blocks.{i}."
            out[q + "ln1.w"], out[q + "ln1.b"] = need(p + "ln_1.weight"), need(p + "ln_1.bias")
            out[q + "ln2.w"], out[q + "ln2.b"] = need(p + "ln_2.weight"), need(p + "ln_2.bias")
            out[q + "attn.W_qkv"] = need(p + "attn.c_attn.weight").T  # Conv1D stores [in, out]
            out[q + "attn.b_qkv"] = need(p + "attn.c_attn.bias")
            out[q + "attn.W_O"], out[q + "attn.b_O"] = need(p + "attn.c_proj.weight").T, need(p + "attn.c_proj.bias")
            out[q + "mlp.W_in"], out[q + "mlp.b_in"] = need(p + "mlp.c_fc.weight").T, need(p + "mlp.c_fc.bias")
            out[q + "mlp.W_out"], out[q + "mlp.b_out"] = need(p + "mlp.c_proj.weight").T, need(p + "mlp.c_proj.bias")
        out["net.ln_final.w"], out["net.ln_final.b"] = need("ln_f.weight"), need("ln_f.bias")
        return {k: v.contiguous() for k, v in out.items()}

    out["net.W_E"] = need("embed_tokens.weight")
    two_post_norms = cfg.post_attn_norm
    for i in range(L):
        p, q = f"layers.{i}.", f"net.blocks.{i}."
        out[q + "ln1.w"] = need(p + "input_layernorm.weight") + norm_offset
        if two_post_norms:  # Gemma 2/3 naming: post_attention_layernorm really is after attention
            out[q + "ln1_post.w"] = need(p + "post_attention_layernorm.weight") + norm_offset
            out[q + "ln2.w"] = need(p + "pre_feedforward_layernorm.weight") + norm_offset
            out[q + "ln2_post.w"] = need(p + "post_feedforward_layernorm.weight") + norm_offset
        else:  # Llama naming: post_attention_layernorm is the MLP's input norm
            out[q + "ln2.w"] = need(p + "post_attention_layernorm.weight") + norm_offset
        a = p + "self_attn."
        out[q + "attn.W_qkv"] = torch.cat([need(a + "q_proj.weight"), need(a + "k_proj.weight"), need(a + "v_proj.weight")])
        if cfg.attn_bias:
            out[q + "attn.b_qkv"] = torch.cat([need(a + "q_proj.bias"), need(a + "k_proj.bias"), need(a + "v_proj.bias")])
        out[q + "attn.W_O"] = need(a + "o_proj.weight")
        if cfg.attn_out_bias:
            out[q + "attn.b_O"] = need(a + "o_proj.bias")
        if cfg.qk_norm:
            out[q + "attn.q_norm.w"] = need(a + "q_norm.weight") + norm_offset
            out[q + "attn.k_norm.w"] = need(a + "k_norm.weight") + norm_offset
        m = p + "mlp."
        out[q + "mlp.W_in"] = torch.cat([need(m + "gate_proj.weight"), need(m + "up_proj.weight")])
        out[q + "mlp.W_out"] = need(m + "down_proj.weight")
        if cfg.mlp_bias:
            out[q + "mlp.b_in"] = torch.cat([need(m + "gate_proj.bias"), need(m + "up_proj.bias")])
            out[q + "mlp.b_out"] = need(m + "down_proj.bias")
    out["net.ln_final.w"] = need("norm.weight") + norm_offset
    if not cfg.tied_embeddings:
        lm_head = get("lm_head.weight")
        out["net.W_U"] = (lm_head if lm_head is not None else need("embed_tokens.weight")).float()
    return {k: v.contiguous() for k, v in out.items()}
