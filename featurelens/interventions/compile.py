"""Interventions compiled into forward hooks: what `Steer`, `Clamp` and `Ablate` become when they run.

The intervention types (featurelens.interventions.types) hold what to do; here is how it is done at a hook point:

- `add_hook`: add coefficient x direction at the chosen positions (steering).
- `feature_edit_hooks`: splice the dictionary in with its error kept (`featurelens.dictionaries.splice`) and set
  some features' activations (clamping, ablation).
- `position_mask`: which positions of a call an intervention touches ("all", "prompt", "generated", or a list).
- `check_target`: the hook points exist in this model, their width matches, and the model is the one the
  intervention was made for.

`intervention_hooks(model, interventions)` compiles a list; the engine does the same for
``model.generate(..., interventions=[...])`` by calling each one's ``.hooks(model)``. At one hook point the
interventions apply in the order given, each to the activation the previous one left.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from ..dictionaries.compat import same_model
from ..dictionaries.splice import splice_hooks
from ..engine.errors import InputError
from ..engine.hooks import HookPoint, UnknownHookError

POSITION_MODES = ("all", "prompt", "generated")


def position_mask(positions: str | tuple[int, ...], x: torch.Tensor, hook: HookPoint) -> torch.Tensor | None | bool:
    """None = every position of this call, False = none of them, else a bool mask [b, p, 1].

    A call is a generation step when the KV cache already holds positions (`hook.past` > 0); explicit positions
    are the tokens' positions in the sequence (pad-aware, `hook.positions`), not indices into this call."""
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
    return mask[..., None] if bool(mask.any()) else False


def check_target(model: Any, what: Any, hooks: Iterable[str], width: int, model_name: str | None) -> None:
    """Raise when `what` cannot act on `model`: a hook it lacks, a width that differs, or another model's name.

    `width` is the width `what` writes at its last hook (attention heads flattened, as dictionaries read them)."""
    hooks = list(hooks)
    for name in hooks:
        if name not in model.hook_names:
            raise UnknownHookError(name, model.hook_names)
    if model_name and getattr(model, "name", "") and not same_model(model_name, model.name):
        raise InputError(f"{what!r} was made for model {model_name!r}, but this model is {model.name!r}")
    have = model.hook_spec(hooks[-1]).width
    if have != width:
        raise InputError(f"{what!r} has width {width} but {hooks[-1]} activations have width {have}: this "
                         f"dictionary or vector was made for another hook or model")


def add_hook(name: str, direction: torch.Tensor, coefficient: float,
             positions: str | tuple[int, ...], steer_bos: bool = True) -> tuple[str, Any]:
    """A hook adding `coefficient * direction` [n] to the activation at `name` ([b, p, ...], flattened to n);
    with `steer_bos` False, BOS tokens (the attention sink) are left as they are."""

    def add(act: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = act.reshape(act.shape[0], act.shape[1], -1)
        mask = position_mask(positions, x, hook)
        if mask is False:
            return act
        bos = getattr(hook, "bos", None)
        if not steer_bos and bos is not None:
            keep = ~bos[..., None]  # [b, p, 1]
            mask = keep if mask is None else mask & keep
        delta = coefficient * direction.to(device=x.device, dtype=x.dtype)
        return (x + (delta if mask is None else mask * delta)).reshape(act.shape)

    return name, add


def feature_edit_hooks(dictionary: Any, values: Mapping[int, float],
                       positions: str | tuple[int, ...]) -> list[tuple[str, Any]]:
    """Hooks holding features at values {feature: value} through `dictionary`, keeping its reconstruction error:
    x' = x + sum_i (value_i - f_i(x)) W_dec[i]. For a transcoder, f is read at its input hook and the change is
    written at its output hook."""
    feats = list(values)
    vals = torch.tensor([values[i] for i in feats], dtype=torch.float32)

    def edit(f: torch.Tensor) -> torch.Tensor:  # f [b, p, d_sae]
        f[..., feats] = vals.to(device=f.device, dtype=f.dtype)
        return f

    return splice_hooks(dictionary, keep_error=True, edit=edit,
                        where=lambda x, hook: position_mask(positions, x, hook))


def intervention_hooks(model: Any, interventions: Any) -> list[tuple[str, Any]]:
    """Interventions (one, or a list) -> `fwd_hooks` for `model.hooks`, `run_with_hooks` or `run_with_cache`.

    Each is checked against the model (its dictionary's model, hooks that exist here, widths that match).

    >>> with model.hooks(fl.intervention_hooks(model, [fl.Ablate(sae, 77)])):
    ...     logits = model("The Eiffel Tower is in")
    """
    items: Sequence[Any] = [interventions] if callable(getattr(interventions, "hooks", None)) else list(interventions)
    hooks: list[tuple[str, Any]] = []
    for it in items:
        if not callable(getattr(it, "hooks", None)):
            raise TypeError(f"expected Steer, Clamp or Ablate interventions (anything with .hooks(model)), got "
                            f"{type(it).__name__}")
        hooks += it.hooks(model)
    return hooks
