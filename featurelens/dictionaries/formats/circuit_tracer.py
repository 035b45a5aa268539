"""circuit-tracer's on-disk layout for transcoders, written and read, so the very same dictionaries can be handed
to circuit-tracer (safety-research/circuit-tracer) and read back.

A directory with ``config.yaml``::

    model_kind: transcoder_set | cross_layer_transcoder
    model_name: ...              feature_input_hook: mlp.hook_in             feature_output_hook: hook_mlp_out
    activation: relu | topk | jumprelu       k: 32 (topk)
    transcoders: [<path of layer 0's file>, <layer 1's>, ...]      (transcoder sets; index = layer)

Per-layer transcoders: ``layer_<L>.safetensors`` with W_enc [d_sae, d_in] (the transpose of ours / SAELens's),
W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out], and where they apply ``activation_function.threshold``
[d_sae] (JumpReLU; our batchtopk at inference) and ``W_skip`` [d_out, d_in] (applied as x @ W_skip.T, as ours): the
keys circuit-tracer's loader hands to a strict `load_state_dict`, and nothing else. circuit-tracer 0.5 loads every
set-of-transcoders file as ReLU or JumpReLU (by whether a threshold is there); TopK is said in config.yaml alone
(``activation: topk``, ``k``), which its loader ignores and its caller applies: its `TopK(k)` module followed by a
ReLU is our TopK (ours ReLUs the k kept pre-activations). Our reader takes k from config.yaml, or from a scalar
``k`` tensor in the layer file (what earlier versions of this writer put there).

Cross-layer transcoders: ``W_enc_<i>.safetensors`` holding W_enc_<i> [d_sae, d_in], b_enc_<i>, b_dec_<i>
[d_out] and threshold_<i> (JumpReLU), and ``W_dec_<i>.safetensors`` holding W_dec_<i> [d_sae, n_layers - i,
d_out], for i = 0..n_layers-1. circuit-tracer's CLTs are ReLU or JumpReLU, have no k (a topk CLT cannot be written;
batchtopk, the default, can) and its loader reads no skip: a skip is stored as W_skip_<i> [d_in, d_out] (its CLT
class's orientation) for our reader, with a warning.

circuit-tracer wants layers 0..n-1 all present. Paths in `transcoders:` are written absolute; reading tries them,
then the same name beside config.yaml (a moved directory), and a directory without the list is read from its
layer_<L>.safetensors files (circuit-tracer's own cache layout). Gemma Scope ``params.npz`` paths are read as
Gemma Scope files.

>>> fl.save_circuit_tracer(tcs, "~/tc-ct", model_name="google/gemma-3-270m")
>>> back = fl.load_dictionary("~/tc-ct")      # detected by its config.yaml
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ...engine.errors import InputError, MissingFileError
from ..clt import CLTConfig, CrossLayerTranscoder
from ..sae import DictionaryConfig, SparseDictionary, TranscoderSet
from .clt import clt_from_tensors
from .common import CorruptDictionaryError, read_safetensors
from .gemma_scope import read_gemma_scope
from .saelens import check_and_load

CONFIG = "config.yaml"
_HOOK_ALIASES = {"mlp.hook_in": "ln2.hook_normalized", "mlp.hook_out": "hook_mlp_out"}


def _suffix(hook: str) -> str:
    """blocks.6.ln2.hook_normalized -> ln2.hook_normalized (circuit-tracer names a hook within a block)."""
    m = re.match(r"^blocks\.\d+\.(.+)$", hook)
    if not m:
        raise InputError(f"circuit-tracer's layout needs per-block hooks (blocks.L.*), got {hook!r}")
    return m.group(1)


def _ct_hook(hook: str) -> str:
    """Our per-layer hook -> the within-block name circuit-tracer's config uses. Our blocks.L.ln2.hook_normalized is
    the MLP's input after the norm's weight; in TransformerLens (which circuit-tracer runs) that is mlp.hook_in, while
    its ln2.hook_normalized comes before the weight."""
    suffix = _suffix(hook)
    return next((ct for ct, ours in _HOOK_ALIASES.items() if ours == suffix and ct.startswith("mlp.hook_in")), suffix)


def _template(suffix: str) -> str:
    return "blocks.{}." + _HOOK_ALIASES.get(suffix, suffix)


def _check_layers(layers: list[int], what: str) -> None:
    if layers != list(range(len(layers))):
        raise InputError(f"circuit-tracer needs a {what} for every layer from 0 up; this one has layers {layers}")


def save_circuit_tracer(transcoders: Any, path: str | Path, *, model_name: str | None = None) -> Path:
    """Write a `TranscoderSet` or `CrossLayerTranscoder` in circuit-tracer's layout (see the module docstring).

    model_name: the name circuit-tracer should load the model by (e.g. "google/gemma-3-270m"); default the
    dictionaries' own model name.
    """
    from safetensors.torch import save_file

    from ...io import atomic_save, atomic_write_text

    yaml = _yaml()
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    layers = transcoders.layers
    if isinstance(transcoders, CrossLayerTranscoder):
        _check_layers(layers, "cross-layer transcoder layer")
        cfg = transcoders.cfg
        if cfg.arch == "topk":
            raise InputError("circuit-tracer's cross-layer transcoders are ReLU or JumpReLU: a topk CLT cannot be "
                             "written exactly; train it with arch='batchtopk' (a threshold at inference)")
        if cfg.skip:
            warnings.warn("circuit-tracer's CLT loader does not read skip connections: W_skip_<i> is written for "
                          "featurelens, circuit-tracer will run this CLT without its skip", stacklevel=2)
        for i, l in enumerate(layers):
            enc = {f"W_enc_{i}": transcoders.W_enc[i].detach().T.contiguous().cpu(),
                   f"b_enc_{i}": transcoders.b_enc[i].detach().cpu().contiguous(),
                   f"b_dec_{i}": transcoders.b_dec[i].detach().cpu().contiguous()}
            if transcoders.threshold is not None:
                enc[f"threshold_{i}"] = transcoders.threshold[i].detach().cpu().contiguous()
            if transcoders.W_skip is not None:
                enc[f"W_skip_{i}"] = transcoders.W_skip[i].detach().T.contiguous().cpu()
            dec = {f"W_dec_{i}": transcoders.decoder(l).detach().cpu().contiguous()}
            atomic_save(path / f"W_enc_{i}.safetensors", lambda tmp, t=enc: save_file(t, str(tmp)))
            atomic_save(path / f"W_dec_{i}.safetensors", lambda tmp, t=dec: save_file(t, str(tmp)))
        config: dict[str, Any] = {"model_kind": "cross_layer_transcoder", "model_name": model_name or cfg.model_name,
                                  "feature_input_hook": _ct_hook(transcoders.input_hook(layers[0])),
                                  "feature_output_hook": _suffix(transcoders.output_hook(layers[0])),
                                  "activation": "relu" if cfg.arch == "relu" else "jumprelu"}
    elif isinstance(transcoders, TranscoderSet):
        _check_layers(layers, "transcoder")
        archs = {tc.cfg.arch for tc in transcoders}
        if len(archs) != 1 or len({tc.cfg.k for tc in transcoders}) != 1:
            raise InputError(f"circuit-tracer reads one activation for the whole set; these layers mix "
                             f"{sorted(archs)} / k values")
        arch, first = archs.pop(), transcoders[layers[0]]
        files = []
        for l in layers:
            tc = transcoders[l]
            t = {"W_enc": tc.W_enc.detach().T.contiguous().cpu(), "W_dec": tc.W_dec.detach().cpu().contiguous(),
                 "b_enc": tc.b_enc.detach().cpu().contiguous(), "b_dec": tc.b_dec.detach().cpu().contiguous()}
            if tc.threshold is not None:
                t["activation_function.threshold"] = tc.threshold.detach().cpu().contiguous()
            if tc.W_skip is not None:
                t["W_skip"] = tc.W_skip.detach().cpu().contiguous()
            f = path / f"layer_{l}.safetensors"
            atomic_save(f, lambda tmp, t=t: save_file(t, str(tmp)))
            files.append(str(f.resolve()))
        config = {"model_kind": "transcoder_set", "model_name": model_name or first.cfg.model_name,
                  "feature_input_hook": _ct_hook(first.hook_name), "feature_output_hook": _suffix(first.hook_name_out),
                  "activation": {"relu": "relu", "topk": "topk"}.get(arch, "jumprelu")}
        if arch == "topk":
            config["k"] = first.cfg.k
        config["transcoders"] = files
    else:
        raise InputError(f"save_circuit_tracer writes a TranscoderSet or a CrossLayerTranscoder, got "
                         f"{type(transcoders).__name__}")
    atomic_write_text(path / CONFIG, yaml.safe_dump(config, sort_keys=False))
    return path


def _yaml() -> Any:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML comes with transformers / huggingface_hub
        raise InputError("circuit-tracer's layout needs PyYAML: pip install pyyaml") from None
    return yaml


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = _yaml().safe_load((path / CONFIG).read_text())
    except Exception as e:
        raise CorruptDictionaryError(f"{path / CONFIG}: not readable YAML ({e})") from None
    if not isinstance(config, dict):
        raise CorruptDictionaryError(f"{path / CONFIG}: expected a mapping")
    for key in ("model_kind", "feature_input_hook", "feature_output_hook"):
        if key not in config:
            raise CorruptDictionaryError(f"{path / CONFIG}: missing {key!r}")
    return config


def _resolve(path: Path, entry: str, layer: int) -> Path:
    if str(entry).startswith("hf://"):
        raise InputError(f"{path / CONFIG}: layer {layer} is on the Hugging Face hub ({entry}); featurelens reads "
                         f"local files only: download it and list its local path")
    p = Path(entry).expanduser()
    for cand in (p, path / p, path / p.name):
        if cand.is_file():
            return cand
    raise MissingFileError(f"{path / CONFIG}: layer {layer}'s file {entry} is missing")


def load_circuit_tracer(path: str | Path, device: str | torch.device = "cpu",
                        model_name: str | None = None) -> "TranscoderSet | CrossLayerTranscoder":
    """Read a directory in circuit-tracer's layout (config.yaml + safetensors / Gemma Scope npz files)."""
    path = Path(path).expanduser()
    config = _read_config(path)
    kind = config["model_kind"]
    hook_in, hook_out = _template(config["feature_input_hook"]), _template(config["feature_output_hook"])
    name = model_name or str(config.get("model_name") or "")
    if kind == "transcoder_set":
        return _load_set(path, config, hook_in, hook_out, name, device)
    if kind == "cross_layer_transcoder":
        return _load_clt(path, config, hook_in, hook_out, name, device)
    raise CorruptDictionaryError(f"{path / CONFIG}: unknown model_kind {kind!r} (transcoder_set or "
                                 f"cross_layer_transcoder)")


def _load_set(path: Path, config: dict[str, Any], hook_in: str, hook_out: str, name: str,
              device: Any) -> TranscoderSet:
    if config.get("transcoders"):
        entries = {i: _resolve(path, e, i) for i, e in enumerate(config["transcoders"])}
    else:
        found = {int(m.group(1)): f for f in path.iterdir() if (m := re.match(r"^layer_(\d+)\.safetensors$", f.name))}
        if not found:
            raise MissingFileError(f"{path}: config.yaml lists no transcoders and there are no layer_<L>.safetensors")
        missing = [i for i in range(max(found) + 1) if i not in found]
        if missing:
            raise MissingFileError(f"{path}: layer {missing[0]}'s file layer_{missing[0]}.safetensors is missing "
                                   f"(found layers {sorted(found)})")
        entries = found
    activation = config.get("activation")
    loaded: dict[int, SparseDictionary] = {}
    for layer, f in sorted(entries.items()):
        if f.suffix == ".npz":  # a Gemma Scope file, in its own orientation
            t = read_gemma_scope(f)
        else:
            t = read_safetensors(f)
            for key in ("W_enc", "W_dec", "b_enc", "b_dec"):
                if key not in t:
                    raise CorruptDictionaryError(f"{f}: layer {layer}: missing {key}")
            t["W_enc"] = t["W_enc"].T.contiguous()  # circuit-tracer's [d_sae, d_in] -> ours [d_in, d_sae]
            if "activation_function.threshold" in t:
                t["threshold"] = t.pop("activation_function.threshold").reshape(-1)
        k_t = t.pop("k", None)
        k = int(config["k"]) if config.get("k") is not None else (int(k_t) if k_t is not None else None)
        if "threshold" in t:
            arch = "jumprelu"
        elif activation == "topk" or k is not None:
            arch = "topk"
            if k is None:
                raise CorruptDictionaryError(f"{path / CONFIG}: activation topk needs k")
        else:
            arch = "relu"
        d_in, d_sae = t["W_enc"].shape
        d_out = t["W_dec"].shape[1]
        if t["W_dec"].shape[0] != d_sae:
            raise CorruptDictionaryError(f"{f}: layer {layer}: W_dec has {t['W_dec'].shape[0]} rows but W_enc "
                                         f"{d_sae} features")
        cfg = DictionaryConfig(d_in=d_in, d_sae=d_sae, arch=arch, k=k if arch == "topk" else None, transcoder=True,
                               d_out=d_out, skip="W_skip" in t, hook_name=hook_in.format(layer),
                               hook_name_out=hook_out.format(layer), model_name=name, apply_b_dec_to_input=False)
        tc = check_and_load(SparseDictionary(cfg), t, f)
        for p in tc.parameters():
            p.requires_grad_(False)
        tc.stats, tc.source = {}, f
        loaded[layer] = tc.to(device).eval()
    widths = {(tc.d_in, tc.d_out) for tc in loaded.values()}
    if len(widths) > 1:
        raise CorruptDictionaryError(f"{path}: the layers' files disagree on d_model: " + ", ".join(
            f"layer {l}: d_in={tc.d_in}, d_out={tc.d_out}" for l, tc in loaded.items()))
    return TranscoderSet(loaded)


def _load_clt(path: Path, config: dict[str, Any], hook_in: str, hook_out: str, name: str,
              device: Any) -> CrossLayerTranscoder:
    found = sorted(int(m.group(1)) for f in path.iterdir() if (m := re.match(r"^W_enc_(\d+)\.safetensors$", f.name)))
    if not found:
        raise MissingFileError(f"{path}: a circuit-tracer cross-layer transcoder needs W_enc_<i>.safetensors files")
    n = max(found) + 1
    tensors: dict[str, torch.Tensor] = {}
    for i in range(n):
        for part in ("W_enc", "W_dec"):
            f = path / f"{part}_{i}.safetensors"
            if not f.is_file():
                raise MissingFileError(f"{f}: missing: layer {i} of this {n}-layer cross-layer transcoder")
            t = read_safetensors(f)
            if part == "W_enc":
                for key in (f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}"):
                    if key not in t:
                        raise CorruptDictionaryError(f"{f}: layer {i}: missing {key}")
                tensors[f"W_enc_{i}"] = t[f"W_enc_{i}"].T.contiguous()
                tensors[f"b_enc_{i}"], tensors[f"b_dec_{i}"] = t[f"b_enc_{i}"], t[f"b_dec_{i}"]
                if f"threshold_{i}" in t:
                    tensors[f"threshold_{i}"] = t[f"threshold_{i}"].reshape(-1)
                if f"W_skip_{i}" in t:
                    tensors[f"W_skip_{i}"] = t[f"W_skip_{i}"].T.contiguous()
            else:
                if f"W_dec_{i}" not in t:
                    raise CorruptDictionaryError(f"{f}: layer {i}: missing W_dec_{i}")
                tensors[f"W_dec_{i}"] = t[f"W_dec_{i}"]
    d_in, d_sae = tensors["W_enc_0"].shape
    d_out = tensors["b_dec_0"].shape[0]
    cfg = CLTConfig(layers=list(range(n)), d_in=d_in, d_sae=d_sae,
                    arch="jumprelu" if "threshold_0" in tensors else "relu", d_out=d_out, skip="W_skip_0" in tensors,
                    hook_in=hook_in, hook_out=hook_out, model_name=name)
    clt = clt_from_tensors(cfg, tensors, path, device)
    clt.stats, clt.source = {}, path
    return clt
