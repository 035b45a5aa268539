"""Does a dictionary fit a model? Identity checks shared by analysis, search and interventions.

- `resolve_dictionary`: a dictionary object or its directory -> (dictionary, directory).
- `dictionary_hooks`: where a dictionary reads and where it writes (one hook for an SAE, two for a transcoder).
- `same_model`: model names compared up to a path, a .gguf suffix, case and "_" vs "-".
- `check_compatible`: the dictionary was trained on this model and its hook has the dictionary's width here.
- `dictionary_fingerprint`: a hash of the weights that decide what each feature is.

>>> check_compatible(model, dictionary)        # DictionaryModelMismatchError when it cannot read this model
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..engine.errors import FeaturelensError, InputError


class DictionaryModelMismatchError(FeaturelensError, ValueError):
    """The dictionary was trained on another model (or reads a hook / width this model does not have)."""


def resolve_dictionary(dictionary: Any) -> tuple[Any, Path | None]:
    """A dictionary object or a path -> (dictionary, its directory or None). A set of transcoders is refused."""
    if isinstance(dictionary, (str, Path)):
        from .format import load_dictionary

        loaded = load_dictionary(dictionary)
        p = Path(dictionary).expanduser().resolve()
        if not hasattr(loaded, "encode"):  # a set of per-layer transcoders
            raise InputError(f"{p} holds several dictionaries ({type(loaded).__name__}); use one of them, e.g. "
                             f"{p / 'layer_0'}")
        return loaded, (p.parent if p.is_file() else p)
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


def check_compatible(model: Any, dictionary: Any) -> None:
    """Raise DictionaryModelMismatchError when `dictionary` cannot read `model`'s activations: trained on another
    model, or reading a hook this model lacks or whose width differs."""
    want = getattr(dictionary.cfg, "model_name", "") or ""
    have = getattr(model, "name", "") or ""
    hook = dictionary.cfg.hook_name
    if want and have and not same_model(want, have):
        raise DictionaryModelMismatchError(
            f"this dictionary was trained on {want!r} ({hook}), but the model given is {have!r}; load {want!r} "
            f"(fl.load_model({want!r})) or use a dictionary trained on {have!r}")
    out = getattr(dictionary.cfg, "hook_name_out", None)
    for verb, name, width in (("reads", hook, dictionary.cfg.d_in),
                              ("writes", out, getattr(dictionary.cfg, "d_out", None))):
        if not name or width is None:
            continue
        if name not in model.hook_names:
            raise DictionaryModelMismatchError(f"the dictionary {verb} {name!r}, which model {have!r} does not have")
        expect = model.hook_spec(name).width
        if expect != int(width):
            raise DictionaryModelMismatchError(
                f"the dictionary {verb} {int(width)}-dimensional activations at {name}, but {have!r} has {expect} "
                f"there: it was trained on another model")
