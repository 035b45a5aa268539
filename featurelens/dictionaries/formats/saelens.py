"""SAELens's layout, so SAELens reads ours and we read theirs.

A dictionary is a directory::

    cfg.json                  SAELens config: d_in, d_sae, architecture, hook_name, model_name, dtype, device,
                              apply_b_dec_to_input, normalize_activations, k (topk), d_out (transcoders), ...
    sae_weights.safetensors   W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out],
                              threshold [d_sae] (jumprelu), W_skip [d_out, d_in] (skip transcoders)
    featurelens.json          ours: the architecture as trained (e.g. batchtopk), training settings and
                              statistics; optional, a directory without it is read from cfg.json alone

Architectures map to SAELens's names: relu -> "standard", topk -> "topk", jumprelu -> "jumprelu", batchtopk ->
"jumprelu" (its inference rule is a threshold, as in SAELens). Transcoders: relu -> "transcoder" /
"skip_transcoder", jumprelu and batchtopk -> "jumprelu_transcoder". SAELens has no TopK transcoder; a TopK
transcoder with d_in == d_out and no skip is written as "topk" with apply_b_dec_to_input false (SAELens's TopKSAE
then computes exactly the transcoder) plus hook_name_out; other TopK transcoders are "topk_transcoder", which only
featurelens reads.

Read side, besides our own files: SAELens 5.x (flat) and 6.x ("metadata" block) cfg.json.

A dictionary directory is saved whole (`featurelens.io.atomic_dir`: written into a temporary directory beside it,
fsynced, then swapped in), so a crash leaves the old dictionary or the new one, never new weights beside an old
cfg.json. What else lives in the directory (checkpoints/, analysis/, ...) is carried over into the new one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from ...dtypes import dtype_name
from ...engine.errors import InputError, MissingFileError
from ...engine.hooks import hook_layer
from ...io import atomic_dir, atomic_save
from ..sae import DictionaryConfig, SparseDictionary
from .common import (CFG_FILE, DIR_KEEP, FORMAT_VERSION, META_FILE, WEIGHTS_FILE, CorruptDictionaryError, read_json, read_safetensors,
                     write_json)

_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_FROM_SAELENS = {  # SAELens name -> (arch, transcoder, skip); the last three are featurelens-only names
    "standard": ("relu", False, False), "topk": ("topk", False, False), "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False), "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False), "jumprelu_skip_transcoder": ("jumprelu", True, True),
    "topk_transcoder": ("topk", True, False), "topk_skip_transcoder": ("topk", True, True),
}


def saelens_architecture(cfg: DictionaryConfig) -> str:
    if not cfg.transcoder:
        return _TO_SAELENS[cfg.arch]
    if cfg.arch == "relu":
        return "skip_transcoder" if cfg.skip else "transcoder"
    if cfg.arch == "topk" and not cfg.skip and cfg.d_out == cfg.d_in:
        return "topk"
    base = "topk" if cfg.arch == "topk" else "jumprelu"
    return f"{base}_skip_transcoder" if cfg.skip else f"{base}_transcoder"


def saelens_config(cfg: DictionaryConfig) -> dict[str, Any]:
    """The cfg.json SAELens reads (flat keys, understood by SAELens 5.x and 6.x alike)."""
    arch = saelens_architecture(cfg)
    act = "topk" if cfg.arch == "topk" else "relu"
    out: dict[str, Any] = {
        "architecture": arch,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": cfg.dtype,
        "device": "cpu",
        "model_name": cfg.model_name,
        "hook_name": cfg.hook_name,
        "hook_layer": hook_layer(cfg.hook_name or "") or 0,
        "hook_head_index": None,
        "activation_fn": act,
        "activation_fn_str": act,
        "activation_fn_kwargs": {"k": cfg.k} if cfg.arch == "topk" else {},
        "apply_b_dec_to_input": bool(cfg.apply_b_dec_to_input),
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "reshape_activations": "none",
        "prepend_bos": bool(cfg.metadata.get("prepend_bos", True)),
        "context_size": cfg.metadata.get("context_size", 128),
        "dataset_path": cfg.metadata.get("dataset_path", ""),
        "dataset_trust_remote_code": False,
        "sae_lens_training_version": None,
        "neuronpedia_id": None,
        "model_from_pretrained_kwargs": {},
    }
    if cfg.arch == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = False
    if cfg.transcoder:
        out["d_out"] = cfg.d_out
        out["hook_name_out"] = cfg.hook_name_out
        out["hook_layer_out"] = hook_layer(cfg.hook_name_out or "") or 0
        out["hook_head_index_out"] = None
    return out


def save_saelens(dictionary: SparseDictionary, path: str | Path, stats: dict[str, Any] | None = None) -> Path:
    """Write `dictionary` to the directory `path` (created if needed); returns the path.

    `stats` (training settings, metrics) goes to featurelens.json together with the featurelens config.
    """
    from safetensors.torch import save_file

    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(dictionary.cfg, dtype=dtype_name(dictionary.dtype))  # what the tensors really are
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in dictionary.named_parameters()}
    tensors = {"W_enc": tensors["W_enc"], "W_dec": tensors["W_dec"], "b_enc": tensors["b_enc"],
               "b_dec": tensors["b_dec"], **{k: v for k, v in tensors.items() if k in ("threshold", "W_skip")}}
    with atomic_dir(path, keep=DIR_KEEP) as tmp:
        atomic_save(tmp / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        write_json(tmp / CFG_FILE, saelens_config(cfg))
        meta = {"featurelens_format": FORMAT_VERSION, "kind": "dictionary", "config": cfg.to_dict()}
        if stats:
            meta["stats"] = stats
        write_json(tmp / META_FILE, meta)
    return path


def config_from_saelens(cfg: dict[str, Any], meta: dict[str, Any] | None) -> DictionaryConfig:
    """cfg.json (ours, SAELens 5.x flat, or 6.x with a metadata block) -> DictionaryConfig."""
    md = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}

    def get(key: str, default: Any = None) -> Any:
        return cfg.get(key, md.get(key, default))

    if meta and isinstance(meta.get("config"), dict):  # ours: featurelens.json has the full config
        ours = DictionaryConfig.from_dict(meta["config"])
        if (cfg.get("d_in"), cfg.get("d_sae")) != (ours.d_in, ours.d_sae):
            raise InputError(f"cfg.json says d_in={cfg.get('d_in')}, d_sae={cfg.get('d_sae')} but {META_FILE} says "
                             f"d_in={ours.d_in}, d_sae={ours.d_sae}")
        ours.hook_name = get("hook_name") or ours.hook_name  # cfg.json wins where a person may have edited it
        ours.model_name = get("model_name") or ours.model_name
        return ours

    arch_name = cfg.get("architecture") or ("topk" if get("activation_fn", get("activation_fn_str")) == "topk" else "standard")
    if arch_name not in _FROM_SAELENS:
        raise InputError(f"unsupported SAELens architecture {arch_name!r} (featurelens reads {', '.join(_FROM_SAELENS)})")
    arch, transcoder, skip = _FROM_SAELENS[arch_name]
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    norm = cfg.get("normalize_activations")
    if norm not in (None, "none", False):
        raise InputError(f"normalize_activations={norm!r} is not supported; fold the scaling into the weights first")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise InputError("rescale_acts_by_decoder_norm=true is not supported; fold the decoder norms first")
    hook_out = get("hook_name_out")
    apply_b = cfg.get("apply_b_dec_to_input", not transcoder)
    if arch == "topk" and hook_out and not transcoder:
        transcoder = True  # our TopK transcoder written as a SAELens "topk" (see the module docstring)
    return DictionaryConfig(
        d_in=int(cfg["d_in"]), d_sae=int(cfg["d_sae"]), arch=arch, k=int(k) if k is not None else None,
        transcoder=transcoder, d_out=int(cfg["d_out"]) if transcoder and cfg.get("d_out") else None, skip=skip,
        hook_name=get("hook_name") or get("hook_point") or "", hook_name_out=hook_out if transcoder else None,
        model_name=get("model_name") or "", apply_b_dec_to_input=bool(apply_b) and not transcoder,
        dtype=str(cfg.get("dtype", "float32")).replace("torch.", ""),
        metadata={key: get(key) for key in ("context_size", "prepend_bos", "dataset_path") if get(key) is not None},
    )


def check_and_load(dictionary: SparseDictionary, tensors: dict[str, torch.Tensor], source: Path) -> SparseDictionary:
    cfg = dictionary.cfg
    expected = {name: tuple(p.shape) for name, p in dictionary.named_parameters()}
    missing = [n for n in expected if n not in tensors]
    if "W_skip" in tensors and "W_skip" not in expected:  # read as plain, it would silently lose its linear path
        raise CorruptDictionaryError(f"{source}: holds W_skip (a skip transcoder) but its config says no skip "
                                     f"connection; fix the config (skip / a *_skip_transcoder architecture)")
    if missing:
        raise CorruptDictionaryError(f"{source}: missing tensor(s) {', '.join(missing)} "
                                     f"(a {saelens_architecture(cfg)} dictionary needs {', '.join(expected)})")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise CorruptDictionaryError(
                f"{source}: {name} has shape {list(tensors[name].shape)}, but the config (d_in={cfg.d_in}, "
                f"d_sae={cfg.d_sae}, d_out={cfg.d_out}) needs {list(shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise CorruptDictionaryError(f"{source}: {name} contains NaN or infinite values")
    with torch.no_grad():
        for name, p in dictionary.named_parameters():
            p.copy_(tensors[name].to(p.dtype))
    return dictionary


def override(cfg: DictionaryConfig, hook_name: str | None, hook_name_out: str | None, model_name: str | None) -> None:
    if hook_name is not None:
        cfg.hook_name = hook_name
    if hook_name_out is not None:
        if not cfg.transcoder:
            raise InputError("hook_name_out is for transcoders; this file holds an SAE")
        cfg.hook_name_out = hook_name_out
    if model_name is not None:
        cfg.model_name = model_name


def load_saelens(path: Path, meta: dict[str, Any] | None, device: Any, hook_name: str | None = None,
                 hook_name_out: str | None = None, model_name: str | None = None) -> SparseDictionary:
    """A dictionary directory in SAELens's layout (ours: with featurelens.json, given as `meta`)."""
    if not (path / CFG_FILE).is_file():
        raise MissingFileError(f"{path / CFG_FILE}: missing (a dictionary directory holds {CFG_FILE} and {WEIGHTS_FILE})")
    raw_cfg = read_json(path / CFG_FILE)
    try:
        cfg = config_from_saelens(raw_cfg, meta)
    except (KeyError, TypeError, ValueError) as e:
        msg = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise CorruptDictionaryError(f"{path / (META_FILE if meta else CFG_FILE)}: {msg}") from None
    override(cfg, hook_name, hook_name_out, model_name)
    tensors = read_safetensors(path / WEIGHTS_FILE)
    dictionary = check_and_load(SparseDictionary(cfg), tensors, path / WEIGHTS_FILE)
    dictionary.stats = (meta or {}).get("stats", {})
    dictionary.source = path
    return dictionary.to(device)
