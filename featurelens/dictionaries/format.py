"""Dictionaries on disk, in SAELens's layout, so SAELens reads ours and we read theirs.

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

Read side, besides our own files: SAELens 5.x (flat) and 6.x ("metadata" block) cfg.json; Gemma Scope's
``params.npz`` and Gemma Scope 2's ``params.safetensors`` (+ config.json) JumpReLU SAEs and transcoders; the hook
comes from config.json, else from the path (.../gemma-scope-2b-pt-res/layer_12/..., .../resid_post/layer_6_...),
else from the caller (hook_name=...).

A dictionary directory is saved whole (`featurelens.io.atomic_dir`: written into a temporary directory beside it,
fsynced, then swapped in), so a crash leaves the old dictionary or the new one, never new weights beside an old
cfg.json. What else lives in the directory (checkpoints/, analysis/, ...) is carried over into the new one.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from ..dtypes import dtype_name
from ..engine.hooks import hook_layer
from ..io import atomic_dir, atomic_save, atomic_write_json
from ..models.gguf import CorruptFileError
from .sae import DictionaryConfig, SparseDictionary, TranscoderSet
from ..engine.errors import InputError, MissingFileError

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
META_FILE = "featurelens.json"
NPZ_FILE = "params.npz"  # Gemma Scope
GS2_FILE = "params.safetensors"  # Gemma Scope 2 (lower-case tensor names, optional config.json beside it)
FORMAT_VERSION = 1

_TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_FROM_SAELENS = {  # SAELens name -> (arch, transcoder, skip); the last three are featurelens-only names
    "standard": ("relu", False, False), "topk": ("topk", False, False), "jumprelu": ("jumprelu", False, False),
    "transcoder": ("relu", True, False), "skip_transcoder": ("relu", True, True),
    "jumprelu_transcoder": ("jumprelu", True, False), "jumprelu_skip_transcoder": ("jumprelu", True, True),
    "topk_transcoder": ("topk", True, False), "topk_skip_transcoder": ("topk", True, True),
}


class CorruptDictionaryError(CorruptFileError):
    """A dictionary file that cannot be read or does not match its config; the message names the file."""


# ----------------------------------------------------------------------------------------------- writing
# What of an old directory survives a save over it: every entry the new dictionary does not write itself (training
# checkpoints, the analysis, whatever the user keeps there). An analysis is never served for other weights: its
# dictionary fingerprint is checked when it is opened, and `train --overwrite` removes it.
DIR_KEEP = ("*",)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    atomic_write_json(path, obj, default=str)


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


def save_dictionary(dictionary: SparseDictionary, path: str | Path, stats: dict[str, Any] | None = None) -> Path:
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
        _write_json(tmp / CFG_FILE, saelens_config(cfg))
        meta = {"featurelens_format": FORMAT_VERSION, "kind": "dictionary", "config": cfg.to_dict()}
        if stats:
            meta["stats"] = stats
        _write_json(tmp / META_FILE, meta)
    return path


# ----------------------------------------------------------------------------------------------- reading
def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptDictionaryError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CorruptDictionaryError(f"{path}: cannot be read ({e})") from None
    if not isinstance(obj, dict):
        raise CorruptDictionaryError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    if not path.is_file():
        raise MissingFileError(f"{path}: missing (a dictionary needs {WEIGHTS_FILE} beside {CFG_FILE})")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CorruptDictionaryError(f"{path}: not a readable safetensors file ({e})") from None


def _read_gemma_scope(path: Path) -> dict[str, torch.Tensor]:
    """params.npz (Gemma Scope) or params.safetensors (Gemma Scope 2) -> our tensor names and layouts."""
    if path.suffix == ".npz":
        import numpy as np

        try:
            with np.load(path) as data:
                raw = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
        except Exception as e:
            raise CorruptDictionaryError(f"{path}: not a readable .npz file ({e})") from None
    else:
        raw = _read_safetensors(path)
    names = {"w_enc": "W_enc", "w_dec": "W_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
             "w_skip": "W_skip"}
    out = {names.get(k.lower(), k): v.float() for k, v in raw.items()}
    if "affine_skip_connection" in out:  # Gemma Scope 2 stores the skip as [d_in, d_out]
        out["W_skip"] = out.pop("affine_skip_connection").T.contiguous()
    return out


def _config_from_saelens(cfg: dict[str, Any], meta: dict[str, Any] | None) -> DictionaryConfig:
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


def _check_and_load(dictionary: SparseDictionary, tensors: dict[str, torch.Tensor], source: Path) -> SparseDictionary:
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


def load_dictionary(path: str | Path, *, device: str | torch.device = "cpu", hook_name: str | None = None,
                    hook_name_out: str | None = None, model_name: str | None = None) -> Any:
    """Read a dictionary directory (ours or SAELens's), a Gemma Scope params.npz, or a transcoder set.

    Returns a `SparseDictionary`, or a `TranscoderSet` for a directory written by `train_transcoders`.
    `hook_name` / `hook_name_out` / `model_name` override what the files say (Gemma Scope files say nothing).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingFileError(f"{path}: no such dictionary (expected a directory with {CFG_FILE} and {WEIGHTS_FILE})")
    if path.is_file():
        if path.name.endswith(".npz") or path.name == GS2_FILE:
            return _load_gemma_scope(path, device, hook_name, hook_name_out, model_name)
        if path.name in (CFG_FILE, WEIGHTS_FILE, META_FILE, "config.yaml"):
            path = path.parent
        else:
            raise InputError(f"{path}: not a dictionary (pass its directory, or a Gemma Scope params.npz)")
    meta = _read_json(path / META_FILE) if (path / META_FILE).is_file() else None
    if meta is not None and meta.get("kind") == "transcoder_set":
        return _load_transcoder_set(path, meta, device)
    from .clt import clt_config_json, load_clt  # cross-layer transcoders; circuit-tracer's layout (config.yaml)

    if clt_config_json(path) is not None:
        return load_clt(path, device=device)
    if (path / "config.yaml").is_file() and not (path / CFG_FILE).is_file():
        from .circuit_tracer_format import load_circuit_tracer

        return load_circuit_tracer(path, device=device, model_name=model_name)
    if not (path / CFG_FILE).is_file():
        from .circuit_tracer_format import gemma_scope_clt_files, load_gemma_scope_clt

        if gemma_scope_clt_files(path) is not None:
            return load_gemma_scope_clt(path, device=device, model_name=model_name)
    if not (path / CFG_FILE).is_file():
        for name in (NPZ_FILE, GS2_FILE):
            if (path / name).is_file():
                return _load_gemma_scope(path / name, device, hook_name, hook_name_out, model_name)
        raise MissingFileError(f"{path / CFG_FILE}: missing (a dictionary directory holds {CFG_FILE} and {WEIGHTS_FILE})")
    raw_cfg = _read_json(path / CFG_FILE)
    try:
        cfg = _config_from_saelens(raw_cfg, meta)
    except (KeyError, TypeError, ValueError) as e:
        msg = f"missing key {e.args[0]!r}" if isinstance(e, KeyError) else str(e)
        raise CorruptDictionaryError(f"{path / (META_FILE if meta else CFG_FILE)}: {msg}") from None
    _override(cfg, hook_name, hook_name_out, model_name)
    tensors = _read_safetensors(path / WEIGHTS_FILE)
    dictionary = _check_and_load(SparseDictionary(cfg), tensors, path / WEIGHTS_FILE)
    dictionary.stats = (meta or {}).get("stats", {})
    dictionary.source = path
    return dictionary.to(device)


def _override(cfg: DictionaryConfig, hook_name: str | None, hook_name_out: str | None, model_name: str | None) -> None:
    if hook_name is not None:
        cfg.hook_name = hook_name
    if hook_name_out is not None:
        if not cfg.transcoder:
            raise InputError("hook_name_out is for transcoders; this file holds an SAE")
        cfg.hook_name_out = hook_name_out
    if model_name is not None:
        cfg.model_name = model_name


def _load_gemma_scope(path: Path, device: Any, hook_name: str | None, hook_name_out: str | None,
                      model_name: str | None) -> SparseDictionary:
    tensors = _read_gemma_scope(path)
    if "W_enc" not in tensors or "W_dec" not in tensors:
        raise CorruptDictionaryError(f"{path}: missing W_enc / W_dec (found {', '.join(sorted(tensors)) or 'nothing'})")
    hf_cfg = _read_json(path.parent / "config.json") if (path.parent / "config.json").is_file() else {}
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
    dictionary = _check_and_load(SparseDictionary(cfg), tensors, path)
    dictionary.stats, dictionary.source = {}, path
    return dictionary.to(device)


# ----------------------------------------------------------------------------------------------- transcoder sets
def save_transcoder_set(tset: TranscoderSet, path: str | Path, stats: dict[str, Any] | None = None) -> Path:
    """Each layer's transcoder in <path>/layer_<L>/ (a dictionary directory SAELens reads), and an index."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(path, keep=(*DIR_KEEP, "layer_*/*")) as tmp:  # every layer and the index, as one
        for layer, tc in tset.items():
            save_dictionary(tc, tmp / f"layer_{layer}", (stats or {}).get(str(layer)))
        index = {"featurelens_format": FORMAT_VERSION, "kind": "transcoder_set",
                 "layers": {str(layer): f"layer_{layer}" for layer in tset.layers},
                 "n_layers_model": getattr(tset, "n_layers_model", None)}
        _write_json(tmp / META_FILE, index)
    return path


def _load_transcoder_set(path: Path, meta: dict[str, Any], device: Any) -> TranscoderSet:
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CorruptDictionaryError(f"{path / META_FILE}: a transcoder set needs a non-empty 'layers' mapping")
    loaded = {}
    for layer, sub in layers.items():
        if not (path / sub).is_dir():
            raise MissingFileError(f"{path / sub}: missing: {path / META_FILE} lists layer {layer} there")
        tc = load_dictionary(path / sub, device=device)
        if not isinstance(tc, SparseDictionary):
            raise CorruptDictionaryError(f"{path / sub}: expected one transcoder")
        loaded[int(layer)] = tc
    widths = {(tc.d_in, tc.d_out) for tc in loaded.values()}
    if len(widths) > 1:
        raise CorruptDictionaryError(f"{path}: the layers' transcoders disagree on d_in / d_out ({sorted(widths)})")
    return TranscoderSet(loaded, n_layers_model=meta.get("n_layers_model"))
