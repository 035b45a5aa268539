"""Splicing a dictionary into a model: read at `hook_name`, write at `hook_name_out`.

One mechanism serves evaluation (replace an activation by its reconstruction), interventions (clamp or ablate
features while keeping everything the dictionary does not explain) and replacement models:

- ``keep_error=False``: the activation at `hook_name_out` becomes the dictionary's output,
  ``decode(edit(encode(x)))`` (with the skip connection of a transcoder that has one).
- ``keep_error=True``: it becomes ``y + decode(edit(f)) - decode(f)``, i.e. the reconstruction with the edit plus
  the reconstruction error ``y - decode(f)``, which equals ``y + (edit(f) - f) @ W_dec`` for the linear decoders
  sparse dictionaries have (the bias and the skip connection cancel). Without an edit nothing changes.

x is the activation at `hook_name` (the input), y the one at `hook_name_out` (the output; y = x for an SAE). For a
transcoder the input is captured when the forward pass reaches `hook_name` and used at `hook_name_out`.

`where` limits the positions written: None (all), a bool tensor [b, p] (e.g. "not BOS"), or a function
``(act [b, p, n], hook) -> None | False | mask [b, p, 1]`` deciding per call (None: all positions, False: none).

>>> hooks = splice_hooks(sae, keep_error=False)                        # evaluate: the model sees the reconstruction
>>> def clamp(f): f[..., 1234] = 20.0; return f
>>> hooks = splice_hooks(sae, keep_error=True, edit=clamp)             # feature 1234 held at 20, error kept
>>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
"""

from __future__ import annotations

from typing import Any, Callable, Union

import torch

from ..engine.errors import InputError

FeatureEdit = Callable[[torch.Tensor], torch.Tensor]  # feature activations [b, p, d_sae] -> edited, same shape
Where = Union[None, torch.Tensor, Callable[[torch.Tensor, Any], Any]]


def _flat(act: torch.Tensor) -> torch.Tensor:
    """[b, p, ...] -> [b, p, n]: attn.hook_z [b, p, h, d] is read as [b, p, h*d], as dictionaries read it."""
    return act.reshape(act.shape[0], act.shape[1], -1)


def _mask(where: Where, x: torch.Tensor, hook: Any) -> Any:
    if where is None:
        return None
    if isinstance(where, torch.Tensor):
        return where.to(x.device)[:, :, None]
    return where(x, hook)


def _decode(dictionary: Any, f: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if getattr(dictionary, "W_skip", None) is not None:  # a transcoder's skip connection reads its input
        return dictionary.decode(f, x)
    return dictionary.decode(f)


def splice_hooks(dictionary: Any, *, keep_error: bool, edit: FeatureEdit | None = None,
                 where: Where = None) -> list[tuple[str, Any]]:
    """Forward hooks splicing `dictionary` into the model (see the module docstring); pass them to
    `model.run_with_hooks(..., fwd_hooks=...)` or `model.hooks(...)`.

    dictionary: anything with `encode`, `decode`, `W_dec` [d_sae, d_out] and a `cfg` naming `hook_name` (and
    `hook_name_out` for a transcoder). edit: changes the feature activations [b, p, d_sae] (it may work in place).
    """
    cfg = getattr(dictionary, "cfg", None)
    read = getattr(cfg, "hook_name", None)
    if not read:
        raise InputError("this dictionary's cfg names no hook_name, so it is unknown where it acts")
    write = getattr(cfg, "hook_name_out", None) or read
    pending: dict[str, torch.Tensor] = {}

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        W = dictionary.W_dec
        x = x.to(device=W.device, dtype=W.dtype)
        return x, dictionary.encode(x)

    def capture(act: torch.Tensor, hook: Any) -> None:
        pending["x"] = _flat(act)

    def put(act: torch.Tensor, hook: Any) -> torch.Tensor:
        y = _flat(act)
        x = y if read == write else pending.pop("x", None)
        if x is None:
            raise RuntimeError(f"the dictionary's input hook {read} did not run before its output hook {write}")
        mask = _mask(where, y, hook)
        if mask is False or (keep_error and edit is None):
            return act
        x, f = encode(x)
        W = dictionary.W_dec
        if keep_error:
            delta_f = edit(f.clone()) - f  # [b, p, d_sae], zero except the edited features
            cols = delta_f.flatten(0, -2).ne(0).any(0).nonzero().squeeze(1)
            if W.shape[1] != y.shape[-1]:
                raise InputError(f"the dictionary writes {W.shape[1]}-wide vectors, but {write} is {y.shape[-1]} wide")
            new = y + (delta_f[..., cols] @ W[cols].detach()).to(device=y.device, dtype=y.dtype)
        else:
            f = edit(f) if edit is not None else f
            new = _decode(dictionary, f, x).to(device=y.device, dtype=y.dtype)
            if new.shape != y.shape:
                raise InputError(f"the dictionary writes {new.shape[-1]}-wide vectors, but {write} is {y.shape[-1]} "
                                 f"wide")
        if mask is not None:
            new = torch.where(mask.bool(), new, y) if mask.dtype == torch.bool else y + mask * (new - y)
        return new.reshape(act.shape)

    return ([] if read == write else [(read, capture)]) + [(write, put)]
