"""Steering: add feature directions, clamp or ablate features, during forward passes and generation.

Three interventions, all applied by a hook at the dictionary's hook point:

- `Steer(dictionary, feature, strength)` adds `strength x scale x W_dec[feature]` to the activation, where
  scale is the feature's typical maximum activation in mode="relative" (as Neuronpedia does) and 1 in
  mode="absolute". `Steer(vector, strength=...)` does the same with a plain direction, e.g. one made by
  `steering_vector` from two sets of prompts.
- `Clamp(dictionary, feature, value)` encodes the activation, sets the feature's activation to `value`
  and adds back the change in the reconstruction only: x' = x + (value - f) W_dec[feature], which equals
  decode(f') + (x - decode(f)) for the linear decoders sparse dictionaries have. The reconstruction error
  is kept, so nothing but that feature moves.
- `Ablate(dictionary, feature)` is `Clamp(dictionary, feature, 0.0)`.

Any number of them at once, at the prompt positions, the generated positions, or both:

>>> with model.steer(sae, {1234: 8.0}):
...     model.generate("I think the weather today is", max_new_tokens=20, seed=0)
>>> model.generate(prompt, interventions=[fl.Clamp(sae, 1234, 20.0), fl.Ablate(sae, 77)])
>>> fl.compare_generations(model, prompt, [fl.Steer(sae, 1234, 8.0)], max_new_tokens=30, seed=0)

A dictionary is anything with `W_dec` [d_sae, d_in], `encode(x)`, `decode(f)` and a `cfg` naming
`hook_name`, `model_name` and `d_sae` (featurelens' own `SparseDictionary`, or a look-alike).
"""

from __future__ import annotations

import contextlib
import numbers
import operator
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch

from ..dictionaries.sae import FeatureIndexError, check_feature_index  # noqa: F401  (re-exported)
from ..engine.hooks import HookPoint, UnknownHookError, full_hook_name

if TYPE_CHECKING:
    from ..engine.hooked import HookedTransformer

POSITION_MODES = ("all", "prompt", "generated")


# --------------------------------------------------------------------------- validation helpers
def _number(value: Any, what: str) -> float:
    """A real number (int, float, numpy or 0-d tensor), else a clear TypeError."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{what} must be a number, got {value!r} ({type(value).__name__})")
    out = float(value)
    if out != out or out in (float("inf"), float("-inf")):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return out


def _check_positions(positions: Any) -> str | tuple[int, ...]:
    if isinstance(positions, str):
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES} or a list of token positions, got {positions!r}")
        return positions
    try:
        out = tuple(operator.index(p) for p in positions)
    except TypeError:
        raise TypeError(f"positions must be one of {POSITION_MODES} or a list of integer token positions, "
                        f"got {positions!r}") from None
    if not out or min(out) < 0:
        raise ValueError(f"token positions must be non-negative and at least one, got {list(out)}")
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
        from ..analysis import open_dictionary

        with open_dictionary(dictionary) as analysis:
            table = torch.as_tensor(analysis.store.column("max_act"), dtype=torch.float32)
    except (ImportError, OSError, ValueError, TypeError, KeyError):  # not analyzed (NotAnalyzedError is an OSError)
        return None
    with contextlib.suppress(TypeError):
        _MAX_ACT_CACHE[dictionary] = table
    return table


# --------------------------------------------------------------------------- interventions
class Intervention:
    """Base: where it writes (`hook_name`), at which `positions`, and what it does there."""

    hook_name: str
    positions: str | tuple[int, ...]
    model_name: str | None = None  # the model the direction belongs to, when known

    @property
    def read_hook(self) -> str:
        """Where the intervention reads the activation it needs (its write hook, except for transcoders)."""
        return self.hook_name


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
    prompt, so it is unchanged), or a list of token positions.
    """

    def __init__(self, source: Any, feature: Any = None, strength: Any = 1.0, mode: str = "relative",
                 positions: Any = "all", *, hook: str | tuple | None = None, max_activation: float | None = None):
        if mode not in ("relative", "absolute"):
            raise ValueError(f"mode must be 'relative' or 'absolute', got {mode!r}")
        self.strength = _number(strength, "steering strength")
        self.positions = _check_positions(positions)
        self.note = ""
        if isinstance(source, (torch.Tensor, SteeringVector)):
            if feature is not None:
                raise TypeError("a steering vector has no feature index: use Steer(vector, strength=...)")
            if isinstance(source, SteeringVector):
                vector, self.hook_name, self.model_name = source.vector, source.hook_name, source.model_name
                if hook is not None and _hook_str(hook) != source.hook_name:
                    raise ValueError(f"this steering vector belongs to {source.hook_name}, not {_hook_str(hook)}")
            else:
                if hook is None:
                    raise ValueError("a bare tensor needs hook=, e.g. Steer(vec, strength=4.0, hook='blocks.6.hook_resid_post')")
                vector, self.hook_name = source, _hook_str(hook)
            if vector.dim() != 1:
                raise ValueError(f"a steering vector must be 1-d, got shape {tuple(vector.shape)}")
            self.dictionary, self.feature = None, None
            self.direction = vector.detach()
            self.scale, self.mode = 1.0, "absolute"
            return

        cfg = _dict_cfg(source)
        self.dictionary = source
        self.feature = _feature_index(source, feature)
        _, self.hook_name = _dict_hooks(source)
        if hook is not None and _hook_str(hook) != self.hook_name:
            raise ValueError(f"this dictionary writes to {self.hook_name}; it cannot steer {_hook_str(hook)}")
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

    def __repr__(self) -> str:
        what = "vector" if self.feature is None else f"feature {self.feature}"
        scale = f" x max act {self.scale:.3g}" if self.mode == "relative" else ""
        return (f"Steer({what} @ {self.hook_name}, strength={self.strength:+g}{scale}, mode={self.mode}, "
                f"positions={self.positions!r})")


class Clamp(Intervention):
    """Hold a feature's activation at `value` through the dictionary, keeping its reconstruction error.

    The activation becomes x + (value - f(x)) W_dec[feature] = decode(f') + (x - decode(f)). For a transcoder
    f is read at its input hook and the change is written at its output hook. positions as for `Steer`.
    With a JumpReLU, TopK or ReLU dictionary a feature that does not fire has activation 0, so clamping it to a
    positive value also switches it on.
    """

    def __init__(self, dictionary: Any, feature: Any, value: Any, positions: Any = "all"):
        cfg = _dict_cfg(dictionary)
        self.dictionary = dictionary
        self.feature = _feature_index(dictionary, feature)
        self.value = _number(value, "clamp value")
        self.positions = _check_positions(positions)
        self._read_hook, self.hook_name = _dict_hooks(dictionary)
        self.model_name = getattr(cfg, "model_name", None) or None

    @property
    def read_hook(self) -> str:
        return self._read_hook

    @property
    def width(self) -> int:
        return int(self.dictionary.W_dec.shape[1])

    def __repr__(self) -> str:
        return f"Clamp(feature {self.feature} @ {self.hook_name}, value={self.value:g}, positions={self.positions!r})"


class Ablate(Clamp):
    """Clamp a feature to zero: remove what it contributes, leave everything else as it was."""

    def __init__(self, dictionary: Any, feature: Any, positions: Any = "all"):
        super().__init__(dictionary, feature, 0.0, positions)

    def __repr__(self) -> str:
        return f"Ablate(feature {self.feature} @ {self.hook_name}, positions={self.positions!r})"


def _hook_str(hook: str | tuple) -> str:
    return full_hook_name(*hook) if isinstance(hook, tuple) else hook


def _dict_hooks(dictionary: Any) -> tuple[str, str]:
    """(where the dictionary reads, where it writes): the same hook for an SAE, two for a transcoder."""
    read = getattr(dictionary.cfg, "hook_name", None)
    if not read:
        raise ValueError("this dictionary's cfg names no hook_name, so it is unknown where it acts")
    write = getattr(dictionary.cfg, "hook_name_out", None) or read
    return read, write


def _same_model(a: str, b: str) -> bool:
    """Model names match up to a path, a .gguf suffix, case and _ vs -."""
    def norm(s: str) -> str:
        return Path(str(s)).name.lower().removesuffix(".gguf").replace("_", "-")

    return norm(a) == norm(b)


# --------------------------------------------------------------------------- hooks
def _position_mask(positions: str | tuple[int, ...], x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None | bool:
    """None = every position of this call, False = none of them, else a [b, p, 1] mask."""
    generating = getattr(hook, "past", 0) > 0
    if positions == "all":
        return None
    if positions == "prompt":
        return False if generating else None
    if positions == "generated":
        return None if generating else False
    pos = getattr(hook, "positions", None)
    if pos is None:
        pos = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
    mask = torch.isin(pos, torch.tensor(positions, device=pos.device))
    return mask[..., None].to(x.dtype) if bool(mask.any()) else False


def _flat(act: torch.Tensor) -> torch.Tensor:
    """[b, p, ...] -> [b, p, n]: attn.hook_z [b, p, h, d] is read as [b, p, h*d], as dictionaries read it."""
    return act.reshape(act.shape[0], act.shape[1], -1)


def _check_width(what: Any, width: int, name: str, x: torch.Tensor) -> None:
    if width != x.shape[-1]:
        raise ValueError(f"{what!r} has width {width} but {name} activations have width {x.shape[-1]}: "
                         f"this dictionary or vector was made for another hook or model")


class _ClampGroup:
    """Clamps of one dictionary at the same positions, from one encoding; for transcoders, read then write."""

    def __init__(self, clamps: list[Clamp]):
        self.clamps = clamps
        self.dictionary = clamps[0].dictionary
        self.positions = clamps[0].positions
        self.feats = [c.feature for c in clamps]
        self.values = [c.value for c in clamps]
        self.pending: torch.Tensor | None = None  # transcoders: activations read at the input hook

    def read(self, act: torch.Tensor, hook: HookPoint) -> None:
        self.pending = self.activations(_flat(act))

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        W = self.dictionary.W_dec
        return self.dictionary.encode(x.to(device=W.device, dtype=W.dtype))[..., self.feats]  # [b, p, k]

    def write(self, x: torch.Tensor, mask: torch.Tensor | None, acts: torch.Tensor) -> torch.Tensor:
        W = self.dictionary.W_dec.detach()
        values = torch.tensor(self.values, device=W.device, dtype=W.dtype)
        delta = ((values - acts) @ W[self.feats]).to(device=x.device, dtype=x.dtype)  # [b, p, n]
        return x + (delta if mask is None else mask * delta)


def _make_hook(name: str, items: list[Intervention]) -> tuple[Any, list[tuple[str, Any]]]:
    """One hook function applying `items` in order at `name`, plus capture hooks for transcoder clamps."""
    ops: list[Steer | _ClampGroup] = []
    for it in items:  # consecutive clamps of one dictionary at the same positions share one encoding
        last = ops[-1] if ops else None
        if isinstance(it, Clamp) and isinstance(last, _ClampGroup) and last.dictionary is it.dictionary \
                and last.positions == it.positions:
            last.clamps.append(it)
            last.feats.append(it.feature)
            last.values.append(it.value)
        else:
            ops.append(_ClampGroup([it]) if isinstance(it, Clamp) else it)
    readers = [(op.clamps[0].read_hook, op.read) for op in ops
               if isinstance(op, _ClampGroup) and op.clamps[0].read_hook != name]

    def hook_fn(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = _flat(act)
        for op in ops:
            first = op.clamps[0] if isinstance(op, _ClampGroup) else op
            _check_width(first, first.width, name, x)
            mask = _position_mask(op.positions, x, hook)
            if isinstance(op, _ClampGroup):
                acts, op.pending = op.pending, None
                if mask is False:
                    continue
                if first.read_hook == name:
                    acts = op.activations(x)
                elif acts is None:
                    raise RuntimeError(f"{first!r}: the transcoder's input hook {first.read_hook} did not run first")
                x = op.write(x, mask, acts)
            elif mask is not False:
                add = op.coefficient * op.direction.to(device=x.device, dtype=x.dtype)
                x = x + (add if mask is None else mask * add)
        return x.reshape(act.shape)

    return hook_fn, readers


def intervention_hooks(model: "HookedTransformer", interventions: Sequence[Intervention]) -> list[tuple[str, Any]]:
    """Interventions -> `fwd_hooks` for `model.hooks`, `run_with_hooks` or `run_with_cache`.

    Checks that each one belongs to this model (its dictionary's model_name, and hooks that exist here). At
    one hook they apply in the order given; consecutive clamps/ablations of one dictionary share one encoding.

    >>> with model.hooks(fl.intervention_hooks(model, [fl.Ablate(sae, 77)])):
    ...     logits = model("The Eiffel Tower is in")
    """
    if isinstance(interventions, Intervention):
        interventions = [interventions]
    by_hook: dict[str, list[Intervention]] = {}
    for it in interventions:
        if not isinstance(it, Intervention):
            raise TypeError(f"expected Steer, Clamp or Ablate interventions, got {type(it).__name__}")
        for name in {it.hook_name, it.read_hook}:
            if name not in model.hook_names:
                raise UnknownHookError(name, model.hook_names)
        if it.model_name and model.name and not _same_model(it.model_name, model.name):
            raise ValueError(f"{it!r} was made for model {it.model_name!r}, but this model is {model.name!r}")
        by_hook.setdefault(it.hook_name, []).append(it)
    hooks: list[tuple[str, Any]] = []
    for name, items in by_hook.items():
        fn, readers = _make_hook(name, items)
        hooks += readers + [(name, fn)]
    return hooks


def as_interventions(source: Any, features: Any = None, *, mode: str = "relative", positions: Any = "all") -> list[Intervention]:
    """What `model.steer` accepts -> a list of interventions.

    (dictionary, {feature: strength, ...}), (steering vector, strength), or a list of interventions.
    """
    if features is None:
        items = [source] if isinstance(source, Intervention) else list(source)
        if not all(isinstance(i, Intervention) for i in items):
            raise TypeError("model.steer(...) takes (dictionary, {feature: strength}), (vector, strength) "
                            "or a list of Steer/Clamp/Ablate")
        return items
    if isinstance(source, (torch.Tensor, SteeringVector)):
        return [Steer(source, strength=features, positions=positions)]
    if not isinstance(features, Mapping):
        raise TypeError(f"features must map feature index -> strength, e.g. {{1234: 8.0}}, got {type(features).__name__}")
    return [Steer(source, f, s, mode=mode, positions=positions) for f, s in features.items()]


@contextlib.contextmanager
def steer(model: "HookedTransformer", source: Any, features: Any = None, *, mode: str = "relative",
          positions: Any = "all") -> Iterator["HookedTransformer"]:
    """Context manager behind `model.steer(...)`: interventions stay on for every forward pass and generation step."""
    with model.hooks(intervention_hooks(model, as_interventions(source, features, mode=mode, positions=positions))):
        yield model


# --------------------------------------------------------------------------- steering vectors
def steering_vector(model: "HookedTransformer", prompts_a: Sequence[str] | str, prompts_b: Sequence[str] | str,
                    hook: str | tuple, reduce: str = "mean") -> SteeringVector:
    """Difference of mean activations at `hook`: mean over prompts_a minus mean over prompts_b.

    reduce="mean" (default): each prompt's activation is its mean over token positions, leaving out the
    BOS token (whose activation is large and the same in every prompt); reduce="last": each prompt's last
    token. Every prompt weighs the same. Returns a `SteeringVector` for `Steer(vec, strength=...)`.

    >>> vec = fl.steering_vector(model, ["I love it", "What a joy"], ["I hate it", "What a pain"], ("resid_post", 6))
    >>> model.generate("I think", interventions=[fl.Steer(vec, strength=4.0)], seed=0)
    """
    if reduce not in ("mean", "last"):
        raise ValueError(f"reduce must be 'mean' or 'last', got {reduce!r}")
    name = _hook_str(hook)
    if name not in model.hook_names:
        raise UnknownHookError(name, model.hook_names)
    means, counts = [], []
    for prompts in (prompts_a, prompts_b):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        counts.append(len(prompts))
        if not prompts:
            raise ValueError("steering_vector needs at least one prompt on each side")
        rows = [model.encode(t) for t in prompts]
        tokens, _ = model._pad(rows, "right")  # right padding: causal attention never lets a real token see a pad
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=name, stop_at_layer=_stop_after(model, name))
        acts = cache[name].flatten(2).float()  # [b, p, n]
        per_prompt = []
        for i, r in enumerate(rows):
            start = 1 if (len(r) > 1 and model.cfg.bos_token_id is not None and r[0] == model.cfg.bos_token_id) else 0
            per_prompt.append(acts[i, len(r) - 1] if reduce == "last" else acts[i, start:len(r)].mean(0))
        means.append(torch.stack(per_prompt).mean(0))
    vec = (means[0] - means[1]).to(model.dtype)
    return SteeringVector(vec, name, model.name, note=f"mean of {counts[0]} - mean of {counts[1]} prompts, reduce={reduce}")


def _stop_after(model: "HookedTransformer", name: str) -> int | None:
    from ..engine.hooks import hook_layer

    layer = hook_layer(name)
    return layer + 1 if layer is not None else None  # n_layers is allowed: the final residual, no unembedding


# --------------------------------------------------------------------------- side-by-side generations
@dataclass
class GenerationComparison:
    """Default and steered continuations of one prompt under the same seed."""

    prompt: str
    default: str
    steered: str
    interventions: list[str] = field(default_factory=list)
    seed: int | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "default": self.default, "steered": self.steered,
                "interventions": self.interventions, "seed": self.seed, "notes": self.notes}

    def __str__(self) -> str:
        lines = [f"prompt: {self.prompt!r}   seed: {self.seed}", *(f"  {i}" for i in self.interventions),
                 f"default: {self.prompt}{self.default}", f"steered: {self.prompt}{self.steered}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def compare_generations(model: "HookedTransformer", prompt: str, interventions: Sequence[Intervention],
                        max_new_tokens: int = 30, seed: int | None = 0, temperature: float = 0.7,
                        top_p: float | None = None, top_k: int | None = None) -> GenerationComparison:
    """Generate from `prompt` without and with `interventions`, same seed and sampling: reproducible.

    >>> print(fl.compare_generations(model, "I think the weather today is", [fl.Steer(sae, 1234, 8.0)], seed=0))
    """
    interventions = as_interventions(interventions)
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
              return_new_only=True)
    default = model.generate(prompt, **kw)
    steered = model.generate(prompt, interventions=interventions, **kw)
    notes = [n for n in (getattr(i, "note", "") for i in interventions) if n]
    return GenerationComparison(prompt, default, steered, [repr(i) for i in interventions], seed, notes)
