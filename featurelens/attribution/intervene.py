"""Interventions on transcoder features at prompt positions: set, scale or ablate, and see what the model says.

The model runs as the replacement model of the prompt: every transcoder layer's MLP output is its transcoder's
output plus the error recorded on the clean prompt (so that without an edit nothing changes). Then

* `freeze_attention=True` holds every attention pattern at its clean value (attention only moves what it moved);
* `direct_only=False` recomputes every later feature from its (changed) input, so an edit propagates through
  downstream features; `direct_only=True` holds all other features and all norm scales at their clean values,
  leaving only the edit's direct effects (with frozen attention this is exactly what the graph's edges predict).

Generation continues the edited prompt with the edit kept on the prompt positions (through the KV cache); new
positions run the real model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..dictionaries.sae import check_feature_index
from ..dictionaries.splice import splice_hooks
from ..engine.errors import InputError
from .attribute import prompt_tokens
from .replacement import Recording, check_transcoders, record

MODES = ("set", "scale", "add")


@dataclass
class InterventionResult:
    """Logits and most likely next tokens with and without the intervention (last prompt position)."""

    logits: torch.Tensor  # [P, V] with the intervention
    original_logits: torch.Tensor  # [P, V] clean
    top_tokens: list[tuple[str, int, float]]  # (token, id, probability)
    original_top_tokens: list[tuple[str, int, float]]
    generation: str | None = None
    original_generation: str | None = None
    edits: list[tuple[int, int, int, float, float]] = field(default_factory=list)  # (layer, pos, feature, old, new)

    def logit_change(self, token: int) -> float:
        return float(self.logits[-1, token] - self.original_logits[-1, token])

    def __repr__(self) -> str:
        fmt = lambda tops: ", ".join(f"{s!r} {p:.3f}" for s, _, p in tops[:5])  # noqa: E731
        return f"InterventionResult(before: {fmt(self.original_top_tokens)}; after: {fmt(self.top_tokens)})"


def parse_edits(model: Any, rep: Any, n_pos: int, interventions: Sequence[Sequence[Any]]) -> dict[int, list[tuple]]:
    """[(layer, pos, feature, value)] -> {layer: [(pos, feature, value)]}, checked against model and transcoders."""
    if not interventions:
        raise InputError("no interventions given: pass [(layer, position, feature, value), ...]")
    edits: dict[int, list[tuple]] = {}
    for item in interventions:
        if len(item) != 4:
            raise InputError(f"an intervention is (layer, position, feature, value), got {item!r}")
        layer, pos, feat, value = item
        if int(layer) not in rep.layers:
            raise InputError(f"layer {layer} has no transcoder; the transcoders cover layers {rep.layers}")
        layer = int(layer)
        pos = int(pos)
        if pos < 0:
            pos += n_pos
        if not 0 <= pos < n_pos:
            raise InputError(f"position {item[1]} is outside the prompt's {n_pos} tokens")
        feat = check_feature_index(feat, rep.decoder(layer).shape[0], where=f"layer {layer}")
        edits.setdefault(layer, []).append((pos, feat, float(value)))
    return edits


def _edit(acts: torch.Tensor, edits: list[tuple], mode: str) -> torch.Tensor:
    """acts [P, S] (or [1, P, S]) with the edits applied, out of place."""
    a = acts.clone()
    view = a[0] if a.dim() == 3 else a
    for pos, feat, value in edits:
        old = view[pos, feat]
        view[pos, feat] = value if mode == "set" else (old * value if mode == "scale" else old + value)
    return a


def intervention_hooks(model: Any, rep: Any, rec: Recording, edits: dict[int, list[tuple]], *, mode: str = "set",
                       freeze_attention: bool = True, direct_only: bool = False, freeze_norms: bool = False,
                       hold: dict[int, torch.Tensor] | None = None) -> list[tuple[str, Callable]]:
    """Forward hooks running the replacement model of `rec` with `edits`; they act on the prompt's own forward
    pass (position count P, nothing cached before) and let any other call (generation steps) through.

    freeze_norms (with freeze_attention): every norm scale, and the output of each layer without a transcoder, held
    at its recorded value: the local replacement model the graph describes, with its transcoders live.
    hold: {layer: bool mask [P, S]} of features held at their recorded activations (e.g. active features a graph
    left out, whose effects it does not describe)."""
    n, P = model.cfg.n_layers, rec.n_pos
    spliced = set(rep.all_output_layers())

    def prompt_pass(x: torch.Tensor, hook: Any, dim: int = 1) -> bool:
        return hook.past == 0 and x.shape[dim] == P and x.shape[0] == 1

    def frozen(x: torch.Tensor, hook: Any) -> torch.Tensor | None:
        dim = 2 if hook.name.endswith("hook_pattern") else 1
        return rec.frozen[hook.name].to(x.dtype) if prompt_pass(x, hook, dim) else None

    def recorded_out(x: torch.Tensor, hook: Any) -> torch.Tensor | None:  # a layer without a transcoder
        return rec.mlp_out[hook.layer()][None].to(x.dtype) if prompt_pass(x, hook) else None

    hooks: list[tuple[str, Callable]] = []
    if freeze_attention:
        hooks += [(nm, frozen) for nm in rec.frozen if nm.endswith("hook_pattern")]
    norms_held = freeze_attention and (direct_only or freeze_norms)
    if norms_held:
        hooks += [(nm, frozen) for nm in rec.frozen if nm.endswith("hook_scale")]
    # the transcoders spliced in with the clean prompt's errors held, features live (or held too: direct_only)
    def edit_for(layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def edit(a: torch.Tensor) -> torch.Tensor:
            if hold is not None and layer in hold:
                a = torch.where(hold[layer].to(a.device), rec.acts[layer].to(a.dtype), a)
            return _edit(a, edits[layer], mode) if layer in edits else a
        return edit

    hooks += splice_hooks(rep, keep_error=False, errors=rec.errors, features=rec.acts if direct_only else None,
                          edit={layer: edit_for(layer) for layer in set(edits) | set(hold or {})},
                          where=lambda x, hook: None if prompt_pass(x, hook) else False)
    if direct_only or norms_held:
        hooks += [(f"blocks.{l}.hook_mlp_out", recorded_out) for l in range(n) if l not in spliced]
    return hooks


def _top(model: Any, logits: torch.Tensor, k: int) -> list[tuple[str, int, float]]:
    probs = torch.softmax(logits.double(), -1)
    p, i = probs.topk(k)
    tok = model.tokenizer
    return [(tok.decode([t]) if tok is not None else f"<{t}>", t, float(q)) for t, q in zip(i.tolist(), p.tolist())]


@torch.no_grad()
def feature_intervention(
    model: Any,
    transcoders: Any,
    prompt: Any,
    interventions: Sequence[Sequence[Any]],
    *,
    freeze_attention: bool = True,
    direct_only: bool = False,
    mode: str = "set",
    top_k: int = 10,
    max_new_tokens: int = 0,
) -> InterventionResult:
    """Set (mode="set"), multiply ("scale") or shift ("add") features at prompt positions and compare the outputs.

    >>> r = fl.feature_intervention(model, tc, "The capital of France is", [(12, 5, 3071, 0.0)])   # ablate
    >>> r.top_tokens[:3], r.original_top_tokens[:3]
    >>> fl.feature_intervention(model, tc, prompt, [(12, 5, 3071, 2.0)], mode="scale", max_new_tokens=10).generation
    """
    if mode not in MODES:
        raise InputError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    rep = check_transcoders(model, transcoders)
    tokens = prompt_tokens(model, prompt)
    rec = record(model, rep, tokens)
    edits = parse_edits(model, rep, rec.n_pos, interventions)
    hooks = intervention_hooks(model, rep, rec, edits, mode=mode, freeze_attention=freeze_attention,
                               direct_only=direct_only)
    logits = model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]
    applied = []
    for layer, items in edits.items():
        new = _edit(rec.acts[layer], items, mode)
        applied += [(layer, p, f, float(rec.acts[layer][p, f]), float(new[p, f])) for p, f, _ in items]
    result = InterventionResult(
        logits=logits, original_logits=rec.logits, top_tokens=_top(model, logits[-1], top_k),
        original_top_tokens=_top(model, rec.logits[-1], top_k), edits=applied,
    )
    if max_new_tokens > 0:
        clean = model.generate(tokens[None], max_new_tokens=max_new_tokens, temperature=0.0, return_new_only=True)
        with model.hooks(hooks):
            edited = model.generate(tokens[None], max_new_tokens=max_new_tokens, temperature=0.0, return_new_only=True)
        tok = model.tokenizer
        dec = (lambda t: tok.decode(t[0].tolist())) if tok is not None else (lambda t: str(t[0].tolist()))  # noqa: E731
        result.generation, result.original_generation = dec(edited), dec(clean)
    return result
