"""Dictionaries on disk: one module per layout, and `load_dictionary` / `save_dictionary` on top, which tell the
layouts apart and pick the module.

* `saelens`: one SAE or transcoder, SAELens's directory (cfg.json + sae_weights.safetensors, + our featurelens.json).
* `transcoder_set`: our per-layer transcoders, <dir>/layer_<L>/ (each a SAELens directory) + featurelens.json.
* `clt`: our cross-layer transcoders (cfg.json + clt_weights.safetensors + featurelens.json).
* `circuit_tracer`: circuit-tracer's config.yaml + per-layer safetensors, transcoder sets and CLTs, written and read.
* `gemma_scope`: Gemma Scope's params.npz, Gemma Scope 2's params.safetensors (+ config.json) SAEs and transcoders,
  and Gemma Scope 2's cross-layer transcoders (read only).
* `common`: what they share (errors naming the file, JSON / safetensors readers, file names).

>>> d = fl.load_dictionary("~/sae-l6")          # whichever layout the directory holds
>>> fl.save_dictionary(d, "~/copy")             # our layout for its kind (SAE / transcoder, set, CLT)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ...engine.errors import InputError, MissingFileError
from ..clt import CrossLayerTranscoder
from ..sae import SparseDictionary, TranscoderSet
from .circuit_tracer import CONFIG as CIRCUIT_TRACER_CONFIG, load_circuit_tracer, save_circuit_tracer
from .clt import clt_config_json, load_clt, save_clt
from .common import CFG_FILE, META_FILE, WEIGHTS_FILE, CorruptDictionaryError, read_json
from .gemma_scope import GS2_FILE, NPZ_FILE, gemma_scope_clt_files, load_gemma_scope, load_gemma_scope_clt
from .saelens import load_saelens, save_saelens
from .transcoder_set import load_transcoder_set, save_transcoder_set


def clt_layer_of(path: Path) -> int | None:
    """L when `path` is <a cross-layer transcoder's directory>/layer_L (a layer it has), else None. Such a folder
    holds no weights of its own, at most the analysis of those features."""
    m = re.fullmatch(r"layer_(\d+)", path.name)
    if m is None or (path / CFG_FILE).is_file():
        return None
    cfg = clt_config_json(path.parent)
    if cfg is None:
        return None
    layers = cfg.get("layers", (cfg.get("config") or {}).get("layers"))
    if isinstance(layers, list) and int(m.group(1)) not in layers:
        raise MissingFileError(f"{path}: the cross-layer transcoder in {path.parent} has no layer {m.group(1)}; its "
                               f"layers are {layers}")
    return int(m.group(1))


def load_dictionary(path: str | Path, *, device: str | torch.device = "cpu", hook_name: str | None = None,
                    hook_name_out: str | None = None, model_name: str | None = None) -> Any:
    """Read a dictionary in any layout featurelens knows (see the module docstring).

    Returns a `SparseDictionary`, a `TranscoderSet` (per-layer transcoders) or a `CrossLayerTranscoder`.
    `hook_name` / `hook_name_out` / `model_name` override what the files say (Gemma Scope files say nothing).
    """
    path = Path(path).expanduser()
    layer = clt_layer_of(path)
    if layer is not None:  # <clt dir>/layer_L: the CLT's layer-L features as one dictionary
        view = load_clt(path.parent, device=device).layer_features(layer)
        view.stats = {}
        return view
    if not path.exists():
        raise MissingFileError(f"{path}: no such dictionary (expected a directory with {CFG_FILE} and {WEIGHTS_FILE})")
    if path.is_file():
        if path.name.endswith(".npz") or path.name == GS2_FILE:
            return load_gemma_scope(path, device, hook_name, hook_name_out, model_name)
        if path.name in (CFG_FILE, WEIGHTS_FILE, META_FILE, CIRCUIT_TRACER_CONFIG):
            path = path.parent
        else:
            raise InputError(f"{path}: not a dictionary (pass its directory, or a Gemma Scope params.npz)")
    meta = read_json(path / META_FILE) if (path / META_FILE).is_file() else None
    if meta is not None and meta.get("kind") == "transcoder_set":
        return load_transcoder_set(path, meta, device)
    if clt_config_json(path) is not None:
        return load_clt(path, device=device)
    if (path / CIRCUIT_TRACER_CONFIG).is_file() and not (path / CFG_FILE).is_file():
        return load_circuit_tracer(path, device=device, model_name=model_name)
    if not (path / CFG_FILE).is_file():
        if gemma_scope_clt_files(path) is not None:
            return load_gemma_scope_clt(path, device=device, model_name=model_name)
        for name in (NPZ_FILE, GS2_FILE):
            if (path / name).is_file():
                return load_gemma_scope(path / name, device, hook_name, hook_name_out, model_name)
    return load_saelens(path, meta, device, hook_name, hook_name_out, model_name)


def save_dictionary(dictionary: Any, path: str | Path, stats: dict[str, Any] | None = None) -> Path:
    """Write `dictionary` to the directory `path` (created if needed) in our layout for its kind: SAELens's for an
    SAE or transcoder, per-layer directories for a `TranscoderSet`, ours for a `CrossLayerTranscoder`; returns the
    path. `stats` (training settings, metrics) goes to featurelens.json. circuit-tracer's layout is
    `save_circuit_tracer`."""
    if isinstance(dictionary, SparseDictionary):
        return save_saelens(dictionary, path, stats)
    if isinstance(dictionary, TranscoderSet):
        return save_transcoder_set(dictionary, path, stats)
    if isinstance(dictionary, CrossLayerTranscoder):
        return save_clt(dictionary, path, stats)
    raise InputError(f"save_dictionary writes an SAE or transcoder, a TranscoderSet or a CrossLayerTranscoder, got "
                     f"{type(dictionary).__name__}")


__all__ = ["CorruptDictionaryError", "META_FILE", "load_circuit_tracer", "load_clt", "load_dictionary",
           "save_circuit_tracer", "save_clt", "save_dictionary", "save_transcoder_set"]
