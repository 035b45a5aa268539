"""The local replacement model of one prompt: the model made linear in transcoder features, errors and embeddings.

One recorded pass of the real model gives, per layer, the transcoder input, the true MLP output, every norm scale
and every attention pattern. The *frozen replacement* re-runs the model with

* every norm scale and attention pattern replaced by its recorded (detached) value,
* each `hook_mlp_out` replaced by   decoder(feature activations, constants) + b_dec + skip(live input) + error,
  where error = true output - reconstruction is a constant, and the real MLP's own path is discarded,
* a layer without a transcoder contributing its whole (recorded) output as a constant error.

What is left between the embeddings and the logits is linear (attention mixes positions with fixed weights, norms
multiply by fixed scales, skips are linear maps), so the effect of any node on any later node is an exact product
of gradients and activations: the edges of an attribution graph.

Transcoders are used through the replacement protocol (`featurelens.dictionaries.protocol.Transcoders`), which
`TranscoderSet` and `CrossLayerTranscoder` implement; `check_transcoders` checks the argument is one and fits.

Shapes: P = prompt positions, D = d_model, S = d_sae (per source layer), O = number of output layers of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..dictionaries.compat import check_fits
from ..dictionaries.protocol import Transcoders
from ..dictionaries.sae import SparseDictionary
from ..engine.errors import InputError


def check_transcoders(model: Any, transcoders: Any) -> Transcoders:
    """`transcoders` itself, once it is known to be a model's transcoders (a `TranscoderSet` or a
    `CrossLayerTranscoder`) that fit `model` and write its MLP outputs; a clear error otherwise."""
    if not isinstance(transcoders, Transcoders):
        kind = ("a single dictionary (an SAE or one transcoder)" if isinstance(transcoders, SparseDictionary)
                else type(transcoders).__name__)
        raise InputError(f"attribution needs a transcoder set or a cross-layer transcoder, got {kind}")
    check_fits(model, transcoders, replaces_mlp=True)
    return transcoders


# --------------------------------------------------------------------------------------------- recording


@dataclass
class Recording:
    """What one real forward pass of a prompt leaves behind, for the frozen replacement model.

    Tensors are on the model's device in its dtype, batch dimension dropped ([P, ...]).
    """

    tokens: torch.Tensor  # [P] token ids
    logits: torch.Tensor  # [P, V] the real model's logits
    frozen: dict[str, torch.Tensor]  # hook name -> recorded value with its batch dim: norm scales, attention patterns
    resid0: torch.Tensor  # [P, D] the residual stream entering block 0 (embeddings, scaled, + positions)
    inputs: dict[int, torch.Tensor]  # layer -> [P, D] transcoder input
    mlp_out: dict[int, torch.Tensor]  # layer -> [P, D] true MLP output (every layer)
    final: torch.Tensor  # [P, D] ln_final output (the unembedding's input)
    acts: dict[int, torch.Tensor] = field(default_factory=dict)  # transcoder layer -> [P, S] feature activations
    skips: dict[int, torch.Tensor] = field(default_factory=dict)  # output layer -> [P, D] skip part at the recorded input
    errors: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [P, D] true - reconstruction

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    def prefix(self, end: int) -> "Recording":
        """The recording of the first `end` positions. The model is causal, so it is exactly what a pass over
        those tokens alone would record; a target at position p needs nothing after p."""
        if end >= self.n_pos:
            return self

        def cut(name: str, v: torch.Tensor) -> torch.Tensor:
            return v[:, :, :end, :end] if name.endswith("hook_pattern") else v[:, :end]

        return Recording(
            tokens=self.tokens[:end], logits=self.logits[:end], frozen={k: cut(k, v) for k, v in self.frozen.items()},
            resid0=self.resid0[:end], inputs={k: v[:end] for k, v in self.inputs.items()},
            mlp_out={k: v[:end] for k, v in self.mlp_out.items()}, final=self.final[:end],
            acts={k: v[:end] for k, v in self.acts.items()}, skips={k: v[:end] for k, v in self.skips.items()},
            errors={k: v[:end] for k, v in self.errors.items()},
        )


def _frozen_names(model: Any) -> list[str]:
    return [n for n in model.hook_names if n.endswith(".hook_scale") or n.endswith("attn.hook_pattern")]


def decoder_terms(rep: Any, acts: dict[int, torch.Tensor], n_layers: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    """Per output layer, sum of what every source layer's features write there: {l: [P, D]}."""
    out: dict[int, torch.Tensor] = {}
    for src, a in acts.items():
        W = rep.decoder(src)  # [S, O, D]
        for j, l in enumerate(rep.output_layers(src)):
            term = a.to(dtype) @ W[:, j, :].to(dtype)
            out[l] = out[l] + term if l in out else term
    return out


def bias_terms(rep: Any, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    outs = sorted({l for src in rep.layers for l in rep.output_layers(src)})
    return {l: rep.b_dec_out(l).to(dtype) for l in outs}


def skip_terms(rep: Any, inputs: dict[int, torch.Tensor], dtype: torch.dtype) -> dict[int, torch.Tensor]:
    out = {}
    for l, x in inputs.items():
        s = rep.skip_out(l, x) if l in rep.layers else None
        if s is not None:
            out[l] = s.to(dtype)
    return out


@torch.no_grad()
def record(model: Any, rep: Any, tokens: torch.Tensor) -> Recording:
    """Run the real model once on tokens [P] and keep what the frozen replacement needs."""
    n, dtype = model.cfg.n_layers, model.dtype
    in_hooks = {rep.input_hook(layer): layer for layer in rep.layers}
    names = set(_frozen_names(model)) | set(in_hooks) | {f"blocks.{l}.hook_mlp_out" for l in range(n)}
    names |= {"blocks.0.hook_resid_pre", "ln_final.hook_normalized"}
    store: dict[str, torch.Tensor] = {}

    def save(x: torch.Tensor, hook: Any) -> None:
        store[hook.name] = x.detach().clone()

    logits = model.run_with_hooks(tokens[None], fwd_hooks=[(nm, save) for nm in names])
    rec = Recording(
        tokens=tokens, logits=logits[0].detach(),
        frozen={nm: store[nm] for nm in _frozen_names(model)},
        resid0=store["blocks.0.hook_resid_pre"][0],
        inputs={layer: store[h][0] for h, layer in in_hooks.items()},
        mlp_out={l: store[f"blocks.{l}.hook_mlp_out"][0] for l in range(n)},
        final=store["ln_final.hook_normalized"][0],
    )
    rec.acts = {layer: rep.encode_layer(layer, rec.inputs[layer]).to(dtype) for layer in rep.layers}
    rec.skips = skip_terms(rep, rec.inputs, dtype)
    dec = decoder_terms(rep, rec.acts, n, dtype)
    bias = bias_terms(rep, dtype)
    for l in range(n):
        recon = dec.get(l, 0) + bias.get(l, 0) + rec.skips.get(l, 0)
        rec.errors[l] = rec.mlp_out[l] - recon
    return rec


# --------------------------------------------------------------------------------------------- frozen forward


@dataclass
class FrozenRun:
    logits: torch.Tensor | None  # [b, P, V] (None when the run stopped before the unembedding)
    inputs: dict[int, torch.Tensor]  # layer -> [b, P, D] transcoder input, live (in the autograd graph)
    outputs: dict[int, torch.Tensor]  # layer -> [b, P, D] what replaced hook_mlp_out, live
    resid0: torch.Tensor  # [b, P, D] the leaf the residual stream starts from
    final: torch.Tensor  # [b, P, D] ln_final output, live


def frozen_forward(
    model: Any, rep: Any, rec: Recording, *,
    acts: dict[int, torch.Tensor] | None = None,
    errors: dict[int, torch.Tensor] | None = None,
    resid0: torch.Tensor | None = None,
    grad: bool = False,
    logits: bool = True,
) -> FrozenRun:
    """Run the frozen replacement model (batch 1). With the recorded acts, errors and resid0 it reproduces the real
    model's logits; changing any of them moves every later activation linearly.

    acts / errors override the recorded ones per layer (missing layers keep theirs); resid0 [P, D] replaces the
    embeddings. grad=True makes resid0 a leaf that requires grad, so gradients reach every node. logits=False
    stops at the unembedding's input (`final`), sparing the [P, vocab] logits; `logits` is then None.
    """
    dtype, n = model.dtype, model.cfg.n_layers
    acts = {**rec.acts, **(acts or {})}
    errs = {**rec.errors, **(errors or {})}
    dec = decoder_terms(rep, acts, n, dtype)
    bias = bias_terms(rep, dtype)
    skip_layers = set(rec.skips)
    # Everything an MLP output holds except the live skip: a constant per layer.
    const = {l: (dec.get(l, 0) + bias.get(l, 0) + errs[l]).detach() for l in range(n)}
    start = (rec.resid0 if resid0 is None else resid0).detach().clone()[None]
    if grad:
        start.requires_grad_(True)
    live_in: dict[int, torch.Tensor] = {}
    outs: dict[int, torch.Tensor] = {}
    final: list[torch.Tensor] = []
    in_hooks = {rep.input_hook(layer): layer for layer in rep.layers}

    def frozen(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return rec.frozen[hook.name].to(x.dtype)

    def start_hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return start.to(x.dtype)

    def capture_in(x: torch.Tensor, hook: Any) -> None:
        live_in[in_hooks[hook.name]] = x

    def replace_out(x: torch.Tensor, hook: Any) -> torch.Tensor:
        l = hook.layer()
        out = const[l][None].expand_as(x)
        if l in skip_layers:
            out = out + rep.skip_out(l, live_in[l]).to(x.dtype)
        if grad and not out.requires_grad:  # a layer with no live path still needs a gradient to read
            out = out.clone().requires_grad_(True)
        outs[l] = out
        return out

    def capture_final(x: torch.Tensor, hook: Any) -> None:
        final.append(x)
        if not logits:
            raise _Stop

    hooks: list[tuple[str, Callable]] = [(nm, frozen) for nm in rec.frozen]
    hooks += value_hooks(model)
    hooks += [("blocks.0.hook_resid_pre", start_hook), ("ln_final.hook_normalized", capture_final)]
    hooks += [(h, capture_in) for h in in_hooks]
    hooks += [(f"blocks.{l}.hook_mlp_out", replace_out) for l in range(n)]
    out = None
    with torch.set_grad_enabled(grad):
        try:
            out = model.run_with_hooks(rec.tokens[None], fwd_hooks=hooks)
        except _Stop:
            pass
    return FrozenRun(logits=out, inputs=live_in, outputs=outs, resid0=start, final=final[0])


class _Stop(Exception):
    """Raised from the unembedding input's hook to end a forward pass that needs nothing after it."""


def value_hooks(model: Any) -> list[tuple[str, Callable]]:
    """Hooks that recompute each attention layer's values from its (live) input with W_V alone.

    The engine projects q, k and v with one fused matrix; with the patterns frozen only v carries gradients, but
    a backward pass through the fused projection still multiplies by all of it. Recomputing v from the captured
    input keeps the backward pass to W_V (several times smaller for models with few key/value heads). The values
    are unchanged, so nothing else is.
    """
    W_V, b_V = getattr(model, "W_V", None), getattr(model, "b_V", None)
    if W_V is None or b_V is None:
        return []
    L, kv, D, d = W_V.shape
    W = W_V.permute(0, 2, 1, 3).reshape(L, D, kv * d).detach()  # v = x @ W[l] + b[l]
    b = b_V.reshape(L, kv * d).detach()
    x_in: dict[int, torch.Tensor] = {}

    def capture(x: torch.Tensor, hook: Any) -> None:
        x_in[hook.layer()] = x

    def value(v: torch.Tensor, hook: Any) -> torch.Tensor:
        l = hook.layer()
        return (x_in[l] @ W[l].to(v.dtype) + b[l].to(v.dtype)).view_as(v)

    n = model.cfg.n_layers
    return [(f"blocks.{l}.ln1.hook_normalized", capture) for l in range(n)] + \
        [(f"blocks.{l}.attn.hook_v", value) for l in range(n)]


def demeaned_unembedding(model: Any, token_ids: torch.Tensor) -> torch.Tensor:
    """[n, D]: each token's unembedding vector minus the vocabulary mean (so a target is a demeaned logit)."""
    W_U = model.W_U  # [D, V]
    return (W_U[:, token_ids] - W_U.mean(dim=1, keepdim=True)).T.contiguous()
