"""GGUF files -> Hugging Face config and tensor names, dequantized to float32 with the `gguf` package."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .convert import UnsupportedModelError
from ..engine.errors import FeaturelensError, MissingFileError


class CorruptFileError(FeaturelensError, ValueError):
    """A weights file that cannot be read; the message names the file."""


def open_gguf(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise MissingFileError(f"no such GGUF file: {path}")
    try:
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise CorruptFileError(f"{path} is not a GGUF file (bad magic bytes)")
        return GGUFReader(str(path))
    except CorruptFileError:
        raise
    except Exception as e:  # the reader raises assorted errors on truncated data
        raise CorruptFileError(f"{path} is corrupt or truncated: {type(e).__name__}: {e}") from e


def _field(reader: Any, key: str, default: Any = None, *, number: bool = False) -> Any:
    """A metadata value; `default` only when the key is absent. A field that is there but cannot be read (or,
    with number=True, is not a number) raises: a corrupt rope base must not quietly become the default."""
    f = reader.fields.get(key)
    if f is None:
        return default
    where = getattr(getattr(reader, "data", None), "filename", None) or "GGUF file"
    try:
        value = f.contents()
    except Exception as e:
        raise CorruptFileError(f"{where}: metadata field {key!r} cannot be read ({type(e).__name__}: {e})") from e
    if number and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CorruptFileError(f"{where}: metadata field {key!r} should be a number, got {value!r}")
    return value


_LAYER_MAP = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def gguf_to_hf(path: Path) -> tuple[dict[str, Any], Callable[[str], torch.Tensor | None]]:
    """(HF config dict, getter of float32 tensors by HF name) for a GGUF file of a supported family."""
    from gguf import dequantize

    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in ("gemma3", "llama", "qwen2", "qwen3", "gemma2", "gemma"):
        raise UnsupportedModelError(f"{path}: GGUF architecture {arch!r} is not supported")
    a = lambda k, d=None: _field(reader, f"{arch}.{k}", d, number=True)  # noqa: E731  (all numeric)
    n_heads, d_model = a("attention.head_count"), a("embedding_length")
    n_kv = a("attention.head_count_kv", n_heads)
    d_head = a("attention.key_length", d_model // n_heads)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = a("vocab_size") or (len(tokens.data) if tokens is not None else None)
    hf: dict[str, Any] = {
        "model_type": {"gemma3": "gemma3_text"}.get(arch, arch),
        "hidden_size": d_model,
        "num_hidden_layers": a("block_count"),
        "intermediate_size": a("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": d_head,
        "vocab_size": vocab,
        "rms_norm_eps": a("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": a("rope.freq_base", 10_000.0),
        "max_position_embeddings": a("context_length", 8192),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", number=True),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", number=True),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", number=True),
    }
    # Gemma 2/3 27B scale queries by d_model/n_heads; every other size by d_head. GGUF metadata does not
    # say which, so (as llama.cpp does) decide by size: the 27B models are the ones with 46 or 62 layers.
    query_scalar = d_model // n_heads if a("block_count") in (46, 62) else d_head
    if arch == "gemma3":
        # The GGUF metadata omits what llama.cpp hard-codes for Gemma 3: the local rope base and the 5:1 pattern.
        hf.update(rope_local_base_freq=10_000.0, sliding_window=a("attention.sliding_window"),
                  sliding_window_pattern=6, query_pre_attn_scalar=query_scalar, hidden_activation="gelu_pytorch_tanh")
    if arch == "gemma2":
        hf.update(sliding_window=a("attention.sliding_window"), query_pre_attn_scalar=query_scalar,
                  attn_logit_softcapping=a("attn_logit_softcapping"), final_logit_softcapping=a("final_logit_softcapping"))
    if arch == "qwen2":
        hf["attention_bias"] = False  # q/k/v biases are implied by the family; o_proj has none

    by_name = {t.name: t for t in reader.tensors}
    hf["tie_word_embeddings"] = "output.weight" not in by_name
    gemma = arch.startswith("gemma")

    def hf_name(gguf_name: str) -> str | None:
        base, _, kind = gguf_name.rpartition(".")
        if base == "token_embd":
            return "embed_tokens." + kind
        if base == "output_norm":
            return "norm." + kind
        if base == "output":
            return "lm_head." + kind
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3:
            site = parts[2]
            if site == "ffn_norm":
                mapped = "pre_feedforward_layernorm" if gemma and arch != "gemma" else "post_attention_layernorm"
            else:
                mapped = _LAYER_MAP.get(site)
            return f"layers.{parts[1]}.{mapped}.{kind}" if mapped else None
        return None

    index = {hf_name(n): n for n in by_name}
    index.pop(None, None)

    def get(name: str) -> torch.Tensor | None:
        gname = index.get(name)
        if gname is None:
            return None
        t = by_name[gname]
        try:
            arr = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise CorruptFileError(f"{path}: tensor {gname} cannot be decoded ({e})") from e
        arr = np.ascontiguousarray(arr, dtype=np.float32).reshape([int(s) for s in reversed(t.shape)])
        if not arr.flags.writeable:  # float32 tensors come straight from the read-only memory map
            arr = arr.copy()
        w = torch.from_numpy(arr)
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # llama.cpp interleaves rotary halves in q and k; undo it to the HF layout.
            heads = n_heads if name.endswith("q_proj.weight") else n_kv
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        if gemma and name.endswith("norm.weight"):
            w = w - 1.0  # llama.cpp stores Gemma norms as (1 + w); HF stores w
        return w

    return hf, get
