"""Cross-layer transcoders in our layout: a directory with cfg.json (the `CLTConfig`), clt_weights.safetensors and
featurelens.json (the config again, and training statistics).

Weights are keyed by model layer: W_enc_L [d_in, d_sae], b_enc_L, threshold_L, W_dec_L [d_sae, n_out, d_out],
b_dec_L [d_out], W_skip_L [d_out, d_in].
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping

import torch

from ...io import atomic_dir, atomic_save, atomic_write_json
from ..clt import CLTConfig, CrossLayerTranscoder
from .common import DIR_KEEP, CorruptDictionaryError, read_json, read_safetensors

CLT_KIND = "cross_layer_transcoder"
CLT_WEIGHTS = "clt_weights.safetensors"


def clt_tensors(clt: CrossLayerTranscoder) -> dict[str, torch.Tensor]:
    """Weights keyed by model layer: W_enc_L [d_in, d_sae], b_enc_L, threshold_L, W_dec_L [d_sae, n_out, d_out],
    b_dec_L [d_out], W_skip_L [d_out, d_in]."""
    out: dict[str, torch.Tensor] = {}
    for i, l in enumerate(clt.layers):
        out[f"W_enc_{l}"] = clt.W_enc[i].detach().cpu().contiguous()
        out[f"b_enc_{l}"] = clt.b_enc[i].detach().cpu().contiguous()
        if clt.threshold is not None:
            out[f"threshold_{l}"] = clt.threshold[i].detach().cpu().contiguous()
        out[f"W_dec_{l}"] = clt.decoder(l).detach().cpu().contiguous()
        out[f"b_dec_{l}"] = clt.b_dec[i].detach().cpu().contiguous()
        if clt.W_skip is not None:
            out[f"W_skip_{l}"] = clt.W_skip[i].detach().cpu().contiguous()
    return out


def save_clt(clt: CrossLayerTranscoder, path: str | Path, stats: dict[str, Any] | None = None) -> Path:
    """Write `clt` to the directory `path`: cfg.json (its config), clt_weights.safetensors, featurelens.json.
    The directory is saved whole (`atomic_dir`)."""
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(clt.cfg, dtype=str(clt.dtype).replace("torch.", ""))
    tensors = clt_tensors(clt)
    with atomic_dir(path, keep=DIR_KEEP) as tmp:  # the whole directory, so a crash never mixes old and new files
        atomic_save(tmp / CLT_WEIGHTS, lambda f: save_file(tensors, str(f), metadata={"format": "pt"}))
        atomic_write_json(tmp / "cfg.json", {"architecture": CLT_KIND, **cfg.to_dict()}, default=str)
        meta = {"featurelens_format": 1, "kind": CLT_KIND, "config": cfg.to_dict()}
        if stats:
            meta["stats"] = stats
        atomic_write_json(tmp / "featurelens.json", meta, default=str)
    return path


def clt_from_tensors(cfg: CLTConfig, tensors: Mapping[str, torch.Tensor], source: Path | str,
                     device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """A CLT from weights named as in `clt_tensors`, checking every name and shape; errors name the file and layer."""
    clt = CrossLayerTranscoder(cfg)
    want = {name: tuple(t.shape) for name, t in clt_tensors(clt).items()}
    for name, shape in want.items():
        layer = name.rsplit("_", 1)[1]
        if name not in tensors:
            raise CorruptDictionaryError(f"{source}: layer {layer} is missing ({name} not found; a {cfg.arch} "
                                         f"cross-layer transcoder over layers {cfg.layers} needs it)")
        if tuple(tensors[name].shape) != shape:
            raise CorruptDictionaryError(f"{source}: layer {layer}: {name} has shape {list(tensors[name].shape)}, but "
                                         f"the config (d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out}) needs "
                                         f"{list(shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise CorruptDictionaryError(f"{source}: layer {layer}: {name} contains NaN or infinite values")
    unexpected = sorted(k for k in tensors if k not in want and k.split("_")[0] in ("W", "threshold"))
    skipish = [k for k in unexpected if k.startswith("W_skip")]
    if skipish:
        raise CorruptDictionaryError(f"{source}: holds {skipish[0]} but its config says skip=false: a skip "
                                     f"transcoder read as a plain one would drop its skip path")
    with torch.no_grad():
        for i, l in enumerate(cfg.layers):
            clt.W_enc[i].copy_(tensors[f"W_enc_{l}"])
            clt.b_enc[i].copy_(tensors[f"b_enc_{l}"])
            if clt.threshold is not None:
                clt.threshold[i].copy_(tensors[f"threshold_{l}"])
            clt.W_dec[i].copy_(tensors[f"W_dec_{l}"].reshape(cfg.d_sae, -1))
            clt.b_dec[i].copy_(tensors[f"b_dec_{l}"])
            if clt.W_skip is not None:
                clt.W_skip[i].copy_(tensors[f"W_skip_{l}"])
    for p in clt.parameters():
        p.requires_grad_(False)
    return clt.to(device).eval()


def load_clt(path: str | Path, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Read a CLT directory written by `save_clt` (`load_dictionary` calls this for such directories)."""
    path = Path(path).expanduser()
    meta = read_json(path / "featurelens.json") if (path / "featurelens.json").is_file() else None
    raw = meta.get("config") if meta and isinstance(meta.get("config"), dict) else None
    where = path / "featurelens.json"
    if raw is None:
        raw, where = read_json(path / "cfg.json"), path / "cfg.json"
    try:
        cfg = CLTConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise CorruptDictionaryError(f"{where}: not a valid cross-layer transcoder config ({e})") from None
    clt = clt_from_tensors(cfg, read_safetensors(path / CLT_WEIGHTS), path / CLT_WEIGHTS, device)
    clt.stats, clt.source = (meta or {}).get("stats", {}), path
    return clt


def clt_config_json(path: Path) -> dict[str, Any] | None:
    """The config of the CLT directory `path`, or None when it is not one (for `load_dictionary`'s detection)."""
    for name in ("featurelens.json", "cfg.json"):
        f = path / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            if isinstance(d, dict) and (d.get("kind") == CLT_KIND or d.get("architecture") == CLT_KIND):
                return d
    return None
