"""Does a dictionary fit a model? Identity checks shared by analysis, search and interventions.

- `resolve_dictionary`: a dictionary object or its directory -> (dictionary, directory).
- `dictionary_hooks`: where a dictionary reads and where it writes (one hook for an SAE, two for a transcoder).
- `same_model`: model names compared up to a path, a .gguf suffix, case and "_" vs "-".
- `check_fits`: the one fit check: the dictionary (an SAE, a transcoder, a transcoder set or a cross-layer
  transcoder) was trained on this model, and its layers, hooks and widths exist here.
- `dictionary_fingerprint`: a hash of the weights that decide what each feature is.

>>> check_fits(model, dictionary)        # DictionaryModelMismatchError naming what does not fit
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..engine.errors import InputError
from .protocol import Transcoders


class DictionaryModelMismatchError(InputError):
    """The dictionary does not fit the model: trained on another model, or reading or writing a hook, layer or width
    this model does not have. The one error `check_fits` raises, for SAEs, transcoders and transcoder sets alike."""


def resolve_dictionary(dictionary: Any) -> tuple[Any, Path | None]:
    """A dictionary object or a path -> (dictionary, its directory or None). A set of transcoders is refused."""
    if isinstance(dictionary, (str, Path)):
        from .formats import load_dictionary

        loaded = load_dictionary(dictionary)
        p = Path(dictionary).expanduser().resolve()
        if isinstance(loaded, Transcoders):  # a transcoder set or a cross-layer transcoder
            raise InputError(f"{p} holds several dictionaries ({type(loaded).__name__}); use one of them, e.g. "
                             f"{p / 'layer_0'}")
        return loaded, (p.parent if p.is_file() else p)
    if isinstance(dictionary, Transcoders):
        raise InputError(f"expected one dictionary (an SAE or one transcoder), got a {type(dictionary).__name__}; a "
                         f"transcoder set's layer L is tset[L]")
    for attr in ("encode", "W_dec", "cfg"):
        if not hasattr(dictionary, attr):
            raise TypeError(f"expected a dictionary (with encode, W_dec and cfg) or its directory, got "
                            f"{type(dictionary).__name__}")
    src = getattr(dictionary, "source", None)
    return dictionary, (Path(src).expanduser().resolve() if src is not None else None)


def dictionary_hooks(dictionary: Any) -> tuple[str, str]:
    """(where the dictionary reads, where it writes): the same hook for an SAE, two for a transcoder."""
    read = getattr(dictionary.cfg, "hook_name", None)
    if not read:
        raise InputError("this dictionary's cfg names no hook_name, so it is unknown where it acts")
    write = getattr(dictionary.cfg, "hook_name_out", None) or read
    return read, write


def dictionary_fingerprint(dictionary: Any) -> str:
    """sha1 of the weights that decide what a feature is (encoder, decoder, biases, threshold)."""
    h = hashlib.sha1()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        t = getattr(dictionary, name, None)
        if t is None:
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def same_model(a: str, b: str) -> bool:
    """Model names match up to a path, a .gguf suffix, case and _ vs - ("models/Gemma_3-270M.gguf" = "gemma-3-270m")."""
    def norm(s: str) -> str:
        return Path(str(s)).name.lower().removesuffix(".gguf").replace("_", "-")

    return norm(a) == norm(b)


def check_fits(model: Any, dictionary: Any, *, replaces_mlp: bool = False) -> None:
    """Raise DictionaryModelMismatchError unless `dictionary` can run on `model`: trained on this model (when both
    name one), every hook it reads or writes present here with the dictionary's width, and for transcoders
    (`Transcoders`: a per-layer set or a cross-layer transcoder) every layer, and every layer it writes to, inside
    the model. The message names the layer, hook or width that does not fit.

    replaces_mlp: the transcoders must write each layer's MLP output (blocks.L.hook_mlp_out), as the replacement
    model of attribution needs.
    """
    have = getattr(model, "name", "") or ""
    if isinstance(dictionary, Transcoders):
        want, what = dictionary.model_name, "these transcoders were"
    else:
        want, what = getattr(dictionary.cfg, "model_name", "") or "", "this dictionary was"
    if want and have and not same_model(want, have):
        where = "" if isinstance(dictionary, Transcoders) else f" ({dictionary.cfg.hook_name})"
        raise DictionaryModelMismatchError(
            f"{what} trained on {want!r}{where}, but the model given is {have!r}; load {want!r} "
            f"(fl.load_model({want!r})) or use a dictionary trained on {have!r}")
    if not isinstance(dictionary, Transcoders):
        cfg = dictionary.cfg
        for verb, name, width in (("reads", cfg.hook_name, cfg.d_in),
                                  ("writes", getattr(cfg, "hook_name_out", None), getattr(cfg, "d_out", None))):
            if name and width is not None:
                _check_hook(model, "the dictionary", verb, name, int(width))
        return
    n = model.cfg.n_layers
    model_desc = have or "the model"
    for layer in dictionary.layers:
        if not 0 <= layer < n:
            raise DictionaryModelMismatchError(f"the transcoders have layer {layer}, but {model_desc} has {n} layers "
                                               f"(0..{n - 1})")
    for layer in dictionary.layers:
        d_in, d_out = dictionary.encoder(layer).shape[0], dictionary.decoder(layer).shape[-1]
        who = f"layer {layer}'s transcoder"
        _check_hook(model, who, "reads", dictionary.input_hook(layer), d_in, layer)
        _check_hook(model, who, "writes", dictionary.output_hook(layer), d_out, layer)
        if replaces_mlp and dictionary.output_hook(layer) != f"blocks.{layer}.hook_mlp_out":
            raise DictionaryModelMismatchError(
                f"{who} writes {dictionary.output_hook(layer)!r}; attribution replaces MLP outputs, "
                f"blocks.{layer}.hook_mlp_out")
        for out in dictionary.output_layers(layer):
            if not layer <= out < n:
                raise DictionaryModelMismatchError(f"layer {layer}'s features write to layer {out}, outside "
                                                   f"{layer}..{n - 1}")


def _check_hook(model: Any, who: str, verb: str, name: str, width: int, layer: int | None = None) -> None:
    have = getattr(model, "name", "") or ""
    if name not in model.hook_names:
        raise DictionaryModelMismatchError(f"{who} {verb} {name!r}, which model {have!r} does not have")
    expect = model.hook_spec(name).width
    if expect != width:
        if layer is not None:  # a transcoder of a model: the residual width is what differs
            raise DictionaryModelMismatchError(
                f"layer {layer}: the transcoder {verb} width {width} at {name}, but {have or 'the model'} has "
                f"d_model={expect} there: it was trained on another model")
        raise DictionaryModelMismatchError(
            f"{who} {verb} {width}-dimensional activations at {name}, but {have!r} has {expect} "
            f"there: it was trained on another model")
