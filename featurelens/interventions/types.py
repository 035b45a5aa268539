"""The interventions: what to change during a forward pass (their compilation into hooks is in `compile`).

- `Steer(dictionary, feature, strength)` adds `strength x scale x W_dec[feature]` to the activation, where
  scale is the feature's typical maximum activation in mode="relative" (as Neuronpedia does) and 1 in
  mode="absolute". `Steer(vector, strength=...)` does the same with a plain direction, e.g. one made by
  `steering_vector` from two sets of prompts (a `SteeringVector`).
- `Clamp(dictionary, feature, value)` encodes the activation, sets the feature's activation to `value`
  and adds back the change in the reconstruction only: x' = x + (value - f) W_dec[feature], which equals
  decode(f') + (x - decode(f)) for the linear decoders sparse dictionaries have. The reconstruction error
  is kept, so nothing but that feature moves.
- `Ablate(dictionary, feature)` is `Clamp(dictionary, feature, 0.0)`.

Each has `.hooks(model) -> [(hook name, fn)]`, which `fl.steer`, `fl.intervention_hooks` and
`model.generate(..., interventions=[...])` use.

A dictionary is anything with `W_dec` [d_sae, d_in], `encode(x)`, `decode(f)` and a `cfg` naming
`hook_name`, `model_name` and `d_sae` (featurelens' own `SparseDictionary`, or a look-alike).
"""

from __future__ import annotations

import contextlib
import numbers
import operator
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ..analysis.results import open_analysis
from ..dictionaries.compat import dictionary_hooks
from ..dictionaries.sae import check_feature_index
from ..engine.errors import InputError
from ..engine.hooks import full_hook_name
from .compile import POSITION_MODES, add_hook, check_target, feature_edit_hooks


def _number(value: Any, what: str) -> float:
    """A real number (int, float, numpy or 0-d tensor), else a clear TypeError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if out != out or out in (float("inf"), float("-inf")):
        raise InputError(f"{what} must be finite, got {value!r}")
    return out


def _check_positions(positions: Any) -> str | tuple[int, ...]:
    if isinstance(positions, str):
        if positions not in POSITION_MODES:
            raise InputError(f"positions must be one of {POSITION_MODES} or a list of token positions, "
                             f"got {positions!r}")
        return positions
    try:
        out = tuple(operator.index(p) for p in positions)
    except TypeError:
        raise TypeError(f"positions must be one of {POSITION_MODES} or a list of integer token positions, "
                        f"got {positions!r}") from None
    if not out or min(out) < 0:
        raise InputError(f"token positions must be non-negative and at least one, got {list(out)}")
    return out


def _dict_cfg(dictionary: Any) -> Any:
    missing = [a for a in ("W_dec", "encode", "decode", "cfg") if not hasattr(dictionary, a)]
    if missing:
        raise TypeError(f"expected a sparse dictionary (with W_dec, encode, decode and cfg), got "
                        f"{type(dictionary).__name__} without {', '.join(missing)}")
    return dictionary.cfg


def _d_sae(dictionary: Any) -> int:
    d_sae = getattr(_dict_cfg(dictionary), "d_sae", None)
    return int(d_sae) if d_sae is not None else int(dictionary.W_dec.shape[0])


def _feature_index(dictionary: Any, feature: Any) -> int:
    return check_feature_index(feature, _d_sae(dictionary), getattr(dictionary.cfg, "hook_name", ""))


_MAX_ACT_CACHE: "weakref.WeakKeyDictionary[Any, torch.Tensor]" = weakref.WeakKeyDictionary()


def feature_max_activation(dictionary: Any, feature: int) -> float | None:
    """The feature's typical maximum activation when it is known, else None.

    Looked up, in order, as `dictionary.max_activations[feature]` (a [d_sae] tensor),
    `dictionary.stats["max_activation"][feature]`, or the max activation that `fl.analyze` recorded for
    the feature (the dictionary's analysis store). Non-positive values count as unknown.
    """
    table = getattr(dictionary, "max_activations", None)
    if table is None:
        stats = getattr(dictionary, "stats", None)
        if isinstance(stats, Mapping):
            table = stats.get("max_activation")
    if table is None:
        table = _analysed_max_activations(dictionary)
    if table is None:
        return None
    table = torch.as_tensor(table)
    if feature >= table.numel():
        return None
    value = float(table[feature])
    return value if value > 0 else None  # NaN (a feature the analysis never saw) fails this too


def _analysed_max_activations(dictionary: Any) -> torch.Tensor | None:
    """Max activation per feature from the dictionary's finished analysis, cached per dictionary object."""
    try:
        cached = _MAX_ACT_CACHE.get(dictionary)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None:
        return cached
    try:
        with open_analysis(dictionary) as analysis:
            table = torch.as_tensor(analysis.store.column("max_act"), dtype=torch.float32)
    except (OSError, ValueError, TypeError, KeyError):  # not analyzed (NotAnalyzedError is an OSError)
        return None
    with contextlib.suppress(TypeError):
        _MAX_ACT_CACHE[dictionary] = table
    return table


class Intervention:
    """Base: where it writes (`hook_name`), at which `positions`, and what it does there (`hooks`)."""

    hook_name: str
    positions: str | tuple[int, ...]
    model_name: str | None = None  # the model the direction belongs to, when known

    @property
    def read_hook(self) -> str:
        """Where the intervention reads the activation it needs (its write hook, except for transcoders)."""
        return self.hook_name

    @property
    def width(self) -> int:
        """The width of what it writes at `hook_name` (attention heads flattened)."""
        raise NotImplementedError

    def hooks(self, model: Any) -> list[tuple[str, Any]]:
        """The forward hooks that carry it out on `model` (checked to fit it), for `model.hooks(...)`."""
        check_target(model, self, dict.fromkeys([self.read_hook, self.hook_name]), self.width, self.model_name)
        return self._compile()

    def _compile(self) -> list[tuple[str, Any]]:
        raise NotImplementedError


@dataclass
class SteeringVector:
    """A direction in one hook's activation space, e.g. from `steering_vector`. Use with `Steer(vec, strength=...)`."""

    vector: torch.Tensor  # [d]
    hook_name: str
    model_name: str | None = None
    note: str = ""

    def __repr__(self) -> str:
        return (f"SteeringVector({self.hook_name}, d={self.vector.numel()}, norm={float(self.vector.norm()):.3g}"
                f"{', ' + self.note if self.note else ''})")


# Relative strength 1 (the feature's typical maximum activation) is the default because it was the fluency limit
# measured by benchmarks/steering_strength.py over word features of the demo's SAEs: strength 1 kept the median
# perplexity of steered continuations at 10.3 (9.1 unsteered), 1.5 doubled it (18.5), 2 made it 43.
DEFAULT_STRENGTH = 1.0


class Steer(Intervention):
    """Add `strength` times a feature's decoder direction (or a plain vector) where the dictionary writes.

    mode="relative" (default) scales the direction by the feature's typical maximum activation when it is
    known (`feature_max_activation`: stored on the dictionary or recorded by `fl.analyze`), so strength 1
    adds about what the feature adds when it fires hardest; pass `max_activation=` to supply it yourself.
    When it is unknown the strength is used as an absolute coefficient and a warning says so (`self.note`
    keeps the explanation). mode="absolute" adds strength x W_dec[feature] as stored (unit-norm rows for
    dictionaries trained here). For a plain vector (tensor or `SteeringVector`) strength multiplies the
    vector as given; a bare tensor needs `hook=`. A transcoder's features are added at its output hook.

    positions: "all" (default), "prompt" (the prompt's forward pass and any plain forward pass),
    "generated" (the one-token steps of `generate`; the first new token is still predicted from the
    prompt, so it is unchanged), or a list of token positions. `steer_bos=False` leaves BOS tokens alone within
    them (as Neuronpedia does by default). The default steers BOS too: on benchmarks/concepts.py, leaving it
    alone lowered the share of concepts whose next-token mass rose 3x at strength 1 (see docs/benchmarks.md).
    """

    def __init__(self, source: Any, feature: Any = None, strength: Any = DEFAULT_STRENGTH, mode: str = "relative",
                 positions: Any = "all", *, hook: str | tuple | None = None, max_activation: float | None = None,
                 steer_bos: bool = True):
        if mode not in ("relative", "absolute"):
            raise InputError(f"mode must be 'relative' or 'absolute', got {mode!r}")
        self.strength = _number(strength, "steering strength")
        self.positions = _check_positions(positions)
        self.steer_bos = bool(steer_bos)
        self.note = ""
        if isinstance(source, (torch.Tensor, SteeringVector)):
            if feature is not None:
                raise TypeError("a steering vector has no feature index: use Steer(vector, strength=...)")
            if isinstance(source, SteeringVector):
                vector, self.hook_name, self.model_name = source.vector, source.hook_name, source.model_name
                if hook is not None and hook_name_of(hook) != source.hook_name:
                    raise InputError(f"this steering vector belongs to {source.hook_name}, not {hook_name_of(hook)}")
            else:
                if hook is None:
                    raise InputError("a bare tensor needs hook=, e.g. Steer(vec, strength=4.0, "
                                     "hook='blocks.6.hook_resid_post')")
                vector, self.hook_name = source, hook_name_of(hook)
            if vector.dim() != 1:
                raise InputError(f"a steering vector must be 1-d, got shape {tuple(vector.shape)}")
            self.dictionary, self.feature = None, None
            self.direction = vector.detach()
            self.scale, self.mode = 1.0, "absolute"
            return

        cfg = _dict_cfg(source)
        self.dictionary = source
        self.feature = _feature_index(source, feature)
        _, self.hook_name = dictionary_hooks(source)
        if hook is not None and hook_name_of(hook) != self.hook_name:
            raise InputError(f"this dictionary writes to {self.hook_name}; it cannot steer {hook_name_of(hook)}")
        self.model_name = getattr(cfg, "model_name", None) or None
        self.direction = source.W_dec[self.feature].detach()
        self.scale, self.mode = 1.0, "absolute"
        if mode == "relative":
            top = _number(max_activation, "max_activation") if max_activation is not None else \
                feature_max_activation(source, self.feature)
            if top is not None:
                self.scale, self.mode = top, "relative"
            else:
                self.note = (f"feature {self.feature} has no known maximum activation (the dictionary stores no "
                             f"feature statistics and has no finished analysis), so strength {self.strength:g} is "
                             f"used as an absolute coefficient on its decoder direction")
                warnings.warn(self.note + "; run fl.analyze on the dictionary or pass max_activation= for relative "
                              "strengths", stacklevel=2)

    @property
    def coefficient(self) -> float:
        """What multiplies the direction: strength x (max activation in relative mode, else 1)."""
        return self.strength * self.scale

    @property
    def width(self) -> int:
        return int(self.direction.numel())

    def _compile(self) -> list[tuple[str, Any]]:
        return [add_hook(self.hook_name, self.direction, self.coefficient, self.positions, self.steer_bos)]

    def __repr__(self) -> str:
        what = "vector" if self.feature is None else f"feature {self.feature}"
        scale = f" x max act {self.scale:.3g}" if self.mode == "relative" else ""
        return (f"Steer({what} @ {self.hook_name}, strength={self.strength:+g}{scale}, mode={self.mode}, "
                f"positions={self.positions!r}{'' if self.steer_bos else ', steer_bos=False'})")


class Clamp(Intervention):
    """Hold a feature's activation at `value` through the dictionary, keeping its reconstruction error.

    The activation becomes x + (value - f(x)) W_dec[feature] = decode(f') + (x - decode(f)). For a transcoder
    f is read at its input hook and the change is written at its output hook. positions as for `Steer`.
    With a JumpReLU, TopK or ReLU dictionary a feature that does not fire has activation 0, so clamping it to a
    positive value also switches it on.

    `Clamp(dictionary, {feature: value, ...})` holds several features from one encoding. (A list of single
    clamps applies them one after another: each encodes the activation the previous one left, which differs when
    the features' encoder directions overlap.)
    """

    def __init__(self, dictionary: Any, feature: Any, value: Any = None, positions: Any = "all"):
        cfg = _dict_cfg(dictionary)
        self.dictionary = dictionary
        if isinstance(feature, Mapping):
            if value is not None:
                raise TypeError("give Clamp(dictionary, feature, value) or Clamp(dictionary, {feature: value, ...})")
            if not feature:
                raise InputError("Clamp needs at least one feature")
            items = list(feature.items())
        else:
            items = [(feature, value)]
        self.values = {_feature_index(dictionary, f): _number(v, "clamp value") for f, v in items}
        self.positions = _check_positions(positions)
        self._read_hook, self.hook_name = dictionary_hooks(dictionary)
        self.model_name = getattr(cfg, "model_name", None) or None

    @property
    def feature(self) -> int | None:
        """The clamped feature (None when there are several: see `values`)."""
        return next(iter(self.values)) if len(self.values) == 1 else None

    @property
    def value(self) -> float | None:
        return next(iter(self.values.values())) if len(self.values) == 1 else None

    @property
    def read_hook(self) -> str:
        return self._read_hook

    @property
    def width(self) -> int:
        return int(self.dictionary.W_dec.shape[1])

    def _compile(self) -> list[tuple[str, Any]]:
        return feature_edit_hooks(self.dictionary, self.values, self.positions)

    def _what(self) -> str:
        if len(self.values) == 1:
            return f"feature {self.feature}"
        return "features " + ", ".join(str(f) for f in self.values)

    def __repr__(self) -> str:
        vals = f"value={self.value:g}" if len(self.values) == 1 else \
            "values={" + ", ".join(f"{f}: {v:g}" for f, v in self.values.items()) + "}"
        return f"Clamp({self._what()} @ {self.hook_name}, {vals}, positions={self.positions!r})"


class Ablate(Clamp):
    """Clamp features to zero: remove what they contribute, leave everything else as it was.
    `feature` is one index or a list of them (ablated together, from one encoding)."""

    def __init__(self, dictionary: Any, feature: Any, positions: Any = "all"):
        many = isinstance(feature, (list, tuple, set, range))
        super().__init__(dictionary, {f: 0.0 for f in feature} if many else feature, None if many else 0.0, positions)

    def __repr__(self) -> str:
        return f"Ablate({self._what()} @ {self.hook_name}, positions={self.positions!r})"


def hook_name_of(hook: str | tuple) -> str:
    return full_hook_name(*hook) if isinstance(hook, tuple) else hook
