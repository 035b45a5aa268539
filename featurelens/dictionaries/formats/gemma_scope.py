"""Gemma Scope's layouts: ``params.npz`` (Gemma Scope) and ``params.safetensors`` (+ config.json, Gemma Scope 2)
JumpReLU SAEs and transcoders, and Gemma Scope 2's cross-layer transcoders (one params file per layer with a 3-d
w_dec). The hook comes from config.json, else from the path (.../gemma-scope-2b-pt-res/layer_12/...,
.../resid_post/layer_6_...), else from the caller (hook_name=...).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ...engine.errors import InputError, MissingFileError
from ..clt import CLTConfig, CrossLayerTranscoder
from ..sae import DictionaryConfig, SparseDictionary
from .clt import clt_from_tensors
from .common import CorruptDictionaryError, read_json, read_safetensors
from .saelens import check_and_load

NPZ_FILE = "params.npz"  # Gemma Scope
GS2_FILE = "params.safetensors"  # Gemma Scope 2 (lower-case tensor names, optional config.json beside it)


def read_gemma_scope(path: Path) -> dict[str, torch.Tensor]:
    """params.npz (Gemma Scope) or params.safetensors (Gemma Scope 2) -> our tensor names and layouts."""
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path) as data:
                raw = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except Exception as e:
            raise CorruptDictionaryError(f"{path}: not a readable .npz file ({e})") from None
    else:
        raw = read_safetensors(path)
    names = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
             "w_skip": "W_skip"}
    out = {names.get(k.lower(), k): v.float() for k, v in raw.items()}
    if "affine_skip_connection" in out:  # Gemma Scope 2 stores the skip as [d_in, d_out]
        out["W_skip"] = out.pop("affine_skip_connection").T.contiguous()
    return out

_HF_HOOKS = (  # Gemma Scope 2 config.json hook points -> ours
    (r"model\.layers\.(\d+)\.output$", "blocks.{}.hook_resid_post"),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.output$", "blocks.{}.ln2.hook_normalized"),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.output$", "blocks.{}.hook_mlp_out"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.input$", "blocks.{}.attn.hook_z"),
)


def _hf_hook(name: str | None) -> str | None:
    for pattern, ours in _HF_HOOKS:
        m = re.match(pattern, name or "")
        if m:
            return ours.format(m.group(1))
    return None


def _guess_gemma_scope_hooks(path: Path) -> tuple[str, str | None]:
    """Hooks from a Gemma Scope path: google/gemma-scope-2b-pt-res/layer_12/... or .../resid_post/layer_6_.../."""
    s = str(path.resolve())
    m = re.search(r"layer_(\d+)", s)
    if m:
        layer = int(m.group(1))
        if "transcoder" in s or "clt" in s:
            return f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
        for keys, site in ((("resid_post", "-res"), "hook_resid_post"), (("mlp_out", "-mlp"), "hook_mlp_out"),
                           (("attn_out", "-att"), "attn.hook_z")):
            if any(k in s for k in keys):
                return f"blocks.{layer}.{site}", None
    raise InputError(f"{path}: cannot tell which hook this Gemma Scope file reads; pass hook_name=... "
                     f"(and hook_name_out=... for a transcoder)")


def load_gemma_scope(path: Path, device: Any, hook_name: str | None, hook_name_out: str | None,
                      model_name: str | None) -> SparseDictionary:
    tensors = read_gemma_scope(path)
    if "W_enc" not in tensors or "W_dec" not in tensors:
        raise CorruptDictionaryError(f"{path}: missing W_enc / W_dec (found {', '.join(sorted(tensors)) or 'nothing'})")
    hf_cfg = read_json(path.parent / "config.json") if (path.parent / "config.json").is_file() else {}
    if hook_name is None:
        hook_name, hook_name_out = _hf_hook(hf_cfg.get("hf_hook_point_in")), hook_name_out or _hf_hook(hf_cfg.get("hf_hook_point_out"))
        if hook_name is None:
            hook_name, guessed_out = _guess_gemma_scope_hooks(path)
            hook_name_out = hook_name_out or guessed_out
    d_in, d_sae = tensors["W_enc"].shape
    d_out = tensors["W_dec"].shape[1]
    transcoder = hook_name_out is not None or d_out != d_in
    cfg = DictionaryConfig(d_in=d_in, d_sae=d_sae, arch="jumprelu" if "threshold" in tensors else "relu",
                           transcoder=transcoder, d_out=d_out, skip="W_skip" in tensors, hook_name=hook_name,
                           hook_name_out=hook_name_out, model_name=model_name or str(hf_cfg.get("model_name", "")),
                           apply_b_dec_to_input=False)
    dictionary = check_and_load(SparseDictionary(cfg), tensors, path)
    dictionary.stats, dictionary.source = {}, path
    return dictionary.to(device)


def gemma_scope_clt_files(path: Path) -> dict[int, Path] | None:
    """{layer: file} when `path` holds a Gemma Scope 2 cross-layer transcoder (one params file per layer, its name
    or folder saying layer_<L>, each with a 3-d w_dec [d_sae, n_layers, d_model]); otherwise None."""
    from safetensors import safe_open

    if not path.is_dir():
        return None
    files: dict[int, Path] = {}
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*/params.safetensors")):
        m = re.search(r"layer_(\d+)", str(f.relative_to(path)))
        if m:
            files.setdefault(int(m.group(1)), f)
    if not files:
        return None
    try:
        with safe_open(str(files[min(files)]), framework="pt") as fh:
            if "w_dec" not in fh.keys() or len(fh.get_slice("w_dec").get_shape()) != 3:
                return None
    except Exception:
        return None
    return files


def load_gemma_scope_clt(path: str | Path, device: str | torch.device = "cpu",
                         model_name: str | None = None) -> CrossLayerTranscoder:
    """A Gemma Scope 2 cross-layer transcoder from its per-layer files (JumpReLU; w_enc [d_model, d_sae], w_dec
    [d_sae, n_layers, d_model] of which the layers >= L are used, b_enc, b_dec, threshold, affine_skip_connection
    [d_model, d_model] applied as x @ it). Reads blocks.L.ln2.hook_normalized, writes blocks.L.hook_mlp_out."""
    path = Path(path).expanduser()
    files = gemma_scope_clt_files(path)
    if files is None:
        raise CorruptDictionaryError(f"{path}: not a Gemma Scope 2 cross-layer transcoder (no per-layer files with a "
                                     f"3-d w_dec)")
    n = max(files) + 1
    missing = [i for i in range(n) if i not in files]
    if missing:
        raise MissingFileError(f"{path}: layer {missing[0]}'s file is missing (found layers {sorted(files)})")
    tensors: dict[str, torch.Tensor] = {}
    for i in range(n):
        t = read_safetensors(files[i])
        for key in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold"):
            if key not in t:
                raise CorruptDictionaryError(f"{files[i]}: layer {i}: missing {key}")
        if t["w_dec"].dim() != 3 or t["w_dec"].shape[1] != n:
            raise CorruptDictionaryError(f"{files[i]}: layer {i}: w_dec has shape {list(t['w_dec'].shape)}; a "
                                         f"{n}-layer CLT needs [d_sae, {n}, d_model]")
        tensors[f"W_enc_{i}"] = t["w_enc"].float()
        tensors[f"W_dec_{i}"] = t["w_dec"][:, i:].float().contiguous()
        tensors[f"b_enc_{i}"], tensors[f"b_dec_{i}"] = t["b_enc"].float(), t["b_dec"].float()
        tensors[f"threshold_{i}"] = t["threshold"].float()
        if "affine_skip_connection" in t:
            tensors[f"W_skip_{i}"] = t["affine_skip_connection"].float().T.contiguous()
    d_in, d_sae = tensors["W_enc_0"].shape
    cfg = CLTConfig(layers=list(range(n)), d_in=d_in, d_sae=d_sae, arch="jumprelu",
                    d_out=tensors["b_dec_0"].shape[0], skip="W_skip_0" in tensors, model_name=model_name or "")
    clt = clt_from_tensors(cfg, tensors, path, device)
    clt.stats, clt.source = {}, path
    return clt
