"""Splicing a dictionary into a model (SAELens's `add_sae(use_error_term=...)`): read at its input hook(s), write at
its output hook(s). The one splice of featurelens: evaluation (`metrics`, `replacement`: replace activations by their
reconstruction), interventions (clamp or ablate features while keeping everything the dictionary does not explain),
the web app's feature clamps, and attribution's checks and interventions (`check_graph`, `feature_intervention`).

It takes an SAE or a single transcoder (`SparseDictionary`), or a model's transcoders (`Transcoders`: a per-layer
`TranscoderSet` or a `CrossLayerTranscoder`, whose features read layer l's input and write to every output layer
they reach):

- ``keep_error=False``: the activation at `hook_name_out` becomes the dictionary's output,
  ``decode(edit(encode(x)))`` (with the skip connection of a transcoder that has one).
- ``keep_error=True``: it becomes ``y + decode(edit(f)) - decode(f)``, i.e. the reconstruction with the edit plus
  the reconstruction error ``y - decode(f)``, which equals ``y + (edit(f) - f) @ W_dec`` for the linear decoders
  sparse dictionaries have (the bias and the skip connection cancel). Without an edit nothing changes.
- ``errors={L: e_L}`` (transcoders): frozen error terms: output layer L becomes ``decode(edit(f)) + e_L``, e.g. the
  error recorded on a clean prompt, so that without an edit the model computes what it computed then.

x is the activation at `hook_name` (the input), y the one at `hook_name_out` (the output; y = x for an SAE). For a
transcoder the input is captured when the forward pass reaches `hook_name` and used at `hook_name_out`.

Transcoders only: `outputs` limits the output layers written (default every one reached; e.g. [L] for "layer L
alone"); `features={l: f_l}` holds layer l's features at given values instead of encoding the live input (only
the skip connection then reads it; with keep_error=True the edit's change is taken from them); `edit` is one edit
for every layer or {layer: edit}.

`where` limits the positions written: None (all), a bool tensor [b, p] (e.g. "not BOS"), or a function
``(act [b, p, n], hook) -> None | False | mask [b, p, 1]`` deciding per call (None: all positions, False: none).

>>> hooks = splice_hooks(sae, keep_error=False)                        # evaluate: the model sees the reconstruction
>>> def clamp(f): f[..., 1234] = 20.0; return f
>>> hooks = splice_hooks(sae, keep_error=True, edit=clamp)             # feature 1234 held at 20, error kept
>>> logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

import torch

from ..engine.errors import InputError
from .protocol import Transcoders, decode_contributions

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


def splice_hooks(dictionary: Any, *, keep_error: bool, edit: "FeatureEdit | Mapping[int, FeatureEdit] | None" = None,
                 where: Where = None, outputs: "list[int] | None" = None,
                 errors: "Mapping[int, torch.Tensor] | None" = None,
                 features: "Mapping[int, torch.Tensor] | None" = None) -> list[tuple[str, Any]]:
    """Forward hooks splicing `dictionary` into the model (see the module docstring); pass them to
    `model.run_with_hooks(..., fwd_hooks=...)` or `model.hooks(...)`.

    dictionary: a `Transcoders` (per-layer set or cross-layer transcoder), or anything with `encode`, `decode`,
    `W_dec` [d_sae, d_out] and a `cfg` naming `hook_name` (and `hook_name_out` for a transcoder). edit: changes the
    feature activations [b, p, d_sae] (it may work in place).
    """
    if isinstance(dictionary, Transcoders):
        return _transcoder_hooks(dictionary, keep_error, edit, where, outputs, errors, features)
    if outputs is not None or errors is not None or features is not None or isinstance(edit, Mapping):
        raise InputError("outputs, errors, features and per-layer edits are for a model's transcoders (a transcoder "
                         "set or a cross-layer transcoder), not for one dictionary")
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


def _transcoder_hooks(tc: Transcoders, keep_error: bool, edit: Any, where: Where, outputs: "list[int] | None",
                      errors: "Mapping[int, torch.Tensor] | None",
                      features: "Mapping[int, torch.Tensor] | None") -> list[tuple[str, Any]]:
    """`splice_hooks` for a model's transcoders: each source layer's input hook encodes (and edits) its features,
    each output hook writes what reached it. Three ways to write output layer L:

    * live, no error (keep_error=False): sum of the sources' decoder contributions + b_dec_out(L) + skip(x_L);
    * error kept (keep_error=True): y_L + the contributions of the edits only (edit(f) - f);
    * frozen errors (errors given): b_dec_out(L) + errors[L] + contributions + skip(x_L).
    """
    if keep_error and errors is not None:
        raise InputError("keep_error=True keeps the live error; errors=... replaces it by frozen ones: pass one")
    targets = set(tc.all_output_layers() if outputs is None else outputs)
    edits = edit if isinstance(edit, Mapping) else ({l: edit for l in tc.layers} if edit is not None else {})
    frozen = errors is not None
    pending: dict[int, torch.Tensor] = {}  # output layer -> what reached it in this pass (live modes)
    acts: dict[int, torch.Tensor] = {}  # source layer -> its (edited) features in this pass (frozen errors)
    inputs: dict[int, torch.Tensor] = {}  # layer -> its input in this pass (for the skip)

    def add(L: int, part: torch.Tensor) -> None:
        pending[L] = pending[L] + part if L in pending else part

    def grab_for(l: int) -> Any:
        wanted = [(j, L) for j, L in enumerate(tc.output_layers(l)) if L in targets]

        def grab(act: torch.Tensor, hook: Any) -> None:
            x = _flat(act)
            if _mask(where, x, hook) is False:
                return
            if keep_error and l not in edits:
                return  # nothing changes what this layer writes
            inputs[l] = x
            f = features[l] if features is not None and l in features else tc.encode_layer(l, x)
            if frozen:
                f = f.to(x.dtype)
                acts[l] = edits[l](f.clone()) if l in edits else f
                return
            W = tc.decoder(l)[:, [j for j, _ in wanted]]  # only the output layers being written
            if keep_error:
                f = edits[l](f.clone()) - f  # zero except the edited features
            elif l in edits:
                f = edits[l](f)
            for (_, L), part in zip(wanted, decode_contributions(f, W)):
                add(L, part)
            if not keep_error and l in targets:
                skip = tc.skip_out(l, x)
                if skip is not None:
                    add(l, skip)
        return grab

    def put_for(L: int) -> Any:
        def put(act: torch.Tensor, hook: Any) -> torch.Tensor:
            y = _flat(act)
            mask = _mask(where, y, hook)
            part = pending.pop(L, None)
            if mask is False:
                return act
            if frozen:
                new = tc.b_dec_out(L).to(y.dtype) + errors[L].to(y.dtype)  # type: ignore[index]
                for src in tc.layers:
                    outs = tc.output_layers(src)
                    if L in outs and src in acts:
                        new = new + acts[src] @ tc.decoder(src)[:, outs.index(L), :].to(y.dtype)
                skip = tc.skip_out(L, inputs[L]) if L in inputs else None
                if skip is not None:
                    new = new + skip.to(y.dtype)
                new = new.expand_as(y) if new.dim() < y.dim() else new
            elif keep_error:
                if part is None:
                    return act
                new = y + part.to(device=y.device, dtype=y.dtype)
            else:
                new = (part + tc.b_dec_out(L)).to(device=y.device, dtype=y.dtype)
            if mask is not None:
                new = torch.where(mask.bool(), new, y) if mask.dtype == torch.bool else y + mask * (new - y)
            return new.reshape(act.shape)
        return put

    sources = [l for l in tc.layers if any(L in targets for L in tc.output_layers(l))]
    return [(tc.input_hook(l), grab_for(l)) for l in sources] + [(tc.output_hook(L), put_for(L)) for L in sorted(targets)]
