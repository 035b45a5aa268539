"""Transcoder sets in our layout: each layer's transcoder in <dir>/layer_<L>/ (a dictionary directory in SAELens's
layout) and an index, featurelens.json, listing the layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...engine.errors import MissingFileError
from ...io import atomic_dir
from ..sae import TranscoderSet
from .common import DIR_KEEP, FORMAT_VERSION, META_FILE, CorruptDictionaryError, read_json, write_json
from .saelens import load_saelens, save_saelens


def save_transcoder_set(tset: TranscoderSet, path: str | Path, stats: dict[str, Any] | None = None) -> Path:
    """Each layer's transcoder in <path>/layer_<L>/ (a dictionary directory SAELens reads), and an index."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path, keep=(*DIR_KEEP, "layer_*/*")) as tmp:  # every layer and the index, as one
        for layer, tc in tset.items():
            save_saelens(tc, tmp / f"layer_{layer}", (stats or {}).get(str(layer)))
        index = {"featurelens_format": FORMAT_VERSION, "kind": "transcoder_set",
                 "layers": {str(layer): f"layer_{layer}" for layer in tset.layers},
                 "n_layers_model": getattr(tset, "n_layers_model", None)}
        write_json(tmp / META_FILE, index)
    return path


def load_transcoder_set(path: Path, meta: dict[str, Any], device: Any) -> TranscoderSet:
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CorruptDictionaryError(f"{path / META_FILE}: a transcoder set needs a non-empty 'layers' mapping")
    loaded = {}
    for layer, sub in layers.items():
        if not (path / sub).is_dir():
            raise MissingFileError(f"{path / sub}: missing: {path / META_FILE} lists layer {layer} there")
        sub_meta = read_json(path / sub / META_FILE) if (path / sub / META_FILE).is_file() else None
        tc = load_saelens(path / sub, sub_meta, device)
        loaded[int(layer)] = tc
    widths = {(tc.d_in, tc.d_out) for tc in loaded.values()}
    if len(widths) > 1:
        raise CorruptDictionaryError(f"{path}: the layers' transcoders disagree on d_in / d_out ({sorted(widths)})")
    return TranscoderSet(loaded, n_layers_model=meta.get("n_layers_model"))
