"""Steering: `steer` (a context manager), `steering_vector` (a direction from two sets of prompts) and
`compare_generations` (default and steered continuations side by side).

>>> with fl.steer(model, sae, {1234: 8.0}):
...     model.generate("I think the weather today is", max_new_tokens=20, seed=0)
>>> model.generate(prompt, interventions=[fl.Clamp(sae, 1234, 20.0), fl.Ablate(sae, 77)])
>>> fl.compare_generations(model, prompt, [fl.Steer(sae, 1234, 8.0)], max_new_tokens=30, seed=0)

The interventions themselves are in `featurelens.interventions.types`, their hooks in `...compile`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch

from ..engine.errors import InputError
from .compile import intervention_hooks
from .types import Intervention, Steer, SteeringVector, hook_name_of

if TYPE_CHECKING:
    from ..engine.hooked import HookedTransformer


def as_interventions(source: Any, features: Any = None, *, mode: str = "relative",
                     positions: Any = "all", steer_bos: bool = True) -> list[Intervention]:
    """What `steer` accepts -> a list of interventions.

    (dictionary, {feature: strength, ...}), (steering vector, strength), or a list of interventions.
    """
    if features is None:
        items = [source] if isinstance(source, Intervention) else list(source)
        if not all(isinstance(i, Intervention) for i in items):
            raise TypeError("fl.steer(model, ...) takes (dictionary, {feature: strength}), (vector, strength) "
                            "or a list of Steer/Clamp/Ablate")
        return items
    if isinstance(source, (torch.Tensor, SteeringVector)):
        return [Steer(source, strength=features, positions=positions, steer_bos=steer_bos)]
    if not isinstance(features, Mapping):
        raise TypeError(f"features must map feature index -> strength, e.g. {{1234: 8.0}}, got "
                        f"{type(features).__name__}")
    return [Steer(source, f, s, mode=mode, positions=positions, steer_bos=steer_bos) for f, s in features.items()]


@contextlib.contextmanager
def steer(model: "HookedTransformer", source: Any, features: Any = None, *, mode: str = "relative",
          positions: Any = "all", steer_bos: bool = True) -> Iterator["HookedTransformer"]:
    """Steer every forward pass and generation step inside the block.

    source: a dictionary with `features` {feature: strength} (strengths relative to each feature's typical maximum
    activation in mode="relative", plain coefficients on its decoder direction in mode="absolute"); a steering
    vector with `features` its strength; or a list of interventions (Steer, Clamp, Ablate) and no `features`.
    positions: "all", "prompt", "generated" or a list of token positions (see `Steer`); steer_bos=False leaves
    BOS tokens alone.

    >>> with fl.steer(model, sae, {1234: 8.0}):             # strength x decoder direction at the SAE's hook
    ...     model.generate("I think the weather today is", max_new_tokens=20, seed=0)
    >>> with fl.steer(model, [fl.Clamp(sae, 1234, 20.0), fl.Ablate(sae, 77)]): ...
    >>> with fl.steer(model, fl.steering_vector(model, happy, sad, ("resid_post", 6)), 4.0): ...
    """
    items = as_interventions(source, features, mode=mode, positions=positions, steer_bos=steer_bos)
    with model.hooks(intervention_hooks(model, items)):
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
        raise InputError(f"reduce must be 'mean' or 'last', got {reduce!r}")
    name = hook_name_of(hook)
    model.hook_spec(name)  # UnknownHookError, with the close matches
    means, counts = [], []
    for prompts in (prompts_a, prompts_b):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        counts.append(len(prompts))
        if not prompts:
            raise InputError("steering_vector needs at least one prompt on each side")
        rows = [model.encode(t) for t in prompts]
        tokens, _ = model.pad(rows, "right")  # right padding: causal attention never lets a real token see a pad
        with torch.inference_mode():
            _, cache = model.run_with_cache(tokens, names_filter=name, stop_at_layer=model.hook_spec(name).stop_layer)
        acts = cache[name].flatten(2).float()  # [b, p, n]
        per_prompt, bos = [], model.cfg.bos_token_id
        for i, r in enumerate(rows):
            start = 1 if (len(r) > 1 and bos is not None and r[0] == bos) else 0
            per_prompt.append(acts[i, len(r) - 1] if reduce == "last" else acts[i, start:len(r)].mean(0))
        means.append(torch.stack(per_prompt).mean(0))
    vec = (means[0] - means[1]).to(model.dtype)
    return SteeringVector(vec, name, model.name,
                          note=f"mean of {counts[0]} - mean of {counts[1]} prompts, reduce={reduce}")


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


# --------------------------------------------------------------------------- strength sweeps
@torch.inference_mode()
def continuation_perplexities(model: "HookedTransformer", prompts: Sequence[str],
                              continuations: Sequence[str]) -> list[float]:
    """Perplexity of each continuation after its prompt under `model` as it is (no steering): a fluency check for
    steered text. One batched forward pass; NaN for an empty continuation."""
    rows = [model.encode(p + c) for p, c in zip(prompts, continuations)]
    starts = [len(model.encode(p)) for p in prompts]
    tokens, _ = model.pad(rows, "right")
    logp = model(tokens).float().log_softmax(-1)  # [b, p, V]
    out = []
    for i, (r, s) in enumerate(zip(rows, starts)):
        if len(r) <= s:
            out.append(float("nan"))
            continue
        lp = logp[i, s - 1:len(r) - 1].gather(-1, torch.tensor(r[s:], device=logp.device)[:, None])[:, 0]
        out.append(float(torch.exp(-lp.mean())))
    return out


@dataclass
class SweepRow:
    """One strength of a sweep: the steered continuation and its perplexity under the unsteered model."""

    strength: float
    text: str
    perplexity: float


def sweep_strengths(model: "HookedTransformer", dictionary: Any, features: "int | Sequence[int] | Mapping[int, float]",
                    prompt: str, strengths: Sequence[float], *, mode: str = "relative", positions: Any = "all",
                    steer_bos: bool = True, max_new_tokens: int = 30, seed: int | None = 0, temperature: float = 0.7,
                    top_p: float | None = None) -> list[SweepRow]:
    """Steer `features` at each strength (0: the unsteered text) from the same seed: how the output moves and
    where it stops being fluent. With `features` a mapping {feature: strength}, each sweep value multiplies it.

    >>> for row in fl.sweep_strengths(model, sae, 1234, "I think the", [0, 0.5, 1, 2]):
    ...     print(f"{row.strength:4g}  ppl {row.perplexity:6.1f}  {row.text}")
    """
    if isinstance(features, Mapping):
        base = {int(f): float(v) for f, v in features.items()}
    else:
        base = {int(f): 1.0 for f in ([features] if isinstance(features, int) else features)}
    if not strengths or not base:
        raise InputError("give at least one feature and one strength to sweep")
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, return_new_only=True)
    texts = []
    for s in strengths:
        steers = [Steer(dictionary, f, b * s, mode=mode, positions=positions, steer_bos=steer_bos)
                  for f, b in base.items()] if s else []
        texts.append(model.generate(prompt, interventions=steers or None, **kw))
    ppl = continuation_perplexities(model, [prompt] * len(texts), texts)
    return [SweepRow(float(s), t, p) for s, t, p in zip(strengths, texts, ppl)]
