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

Transcoders are used through a small "replacement protocol" (`input_hook`, `output_hook`, `encode_layer`,
`decoder`, `output_layers`, `skip_out`, `b_dec_out`, `reconstruct`); `as_replacement` adapts a per-layer
`TranscoderSet` to it and passes through any object that already speaks it (a cross-layer transcoder).

Shapes: P = prompt positions, D = d_model, S = d_sae (per source layer), O = number of output layers of a layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..engine.errors import FeaturelensError, InputError

PROTOCOL = ("input_hook", "output_hook", "encode_layer", "decoder", "output_layers", "skip_out", "b_dec_out")


class TranscoderMismatchError(FeaturelensError, ValueError):
    """Transcoders that do not fit the model (another model, layers or hooks it lacks, other widths)."""


class TranscoderSetAdapter:
    """The replacement protocol for a per-layer `TranscoderSet` (or a {layer: transcoder} dict).

    >>> rep = as_replacement(transcoders)
    >>> rep.layers, rep.output_layers(3)       # ([0, 1, ...], [3])
    """

    def __init__(self, transcoders: Any):
        items = transcoders.items() if hasattr(transcoders, "items") else None
        if items is None:
            raise TypeError(f"expected a TranscoderSet, a dict of per-layer transcoders or a cross-layer transcoder, "
                            f"got {type(transcoders).__name__}")
        self.by_layer = {int(layer): tc for layer, tc in items}
        if not self.by_layer:
            raise InputError("the transcoder set is empty")
        self.source = transcoders
        for layer, tc in self.by_layer.items():
            if not getattr(tc.cfg, "transcoder", False):
                raise TranscoderMismatchError(f"layer {layer}: this dictionary is an SAE, not a transcoder "
                                              f"(it reconstructs its own input {tc.cfg.hook_name!r})")

    @property
    def layers(self) -> list[int]:
        return sorted(self.by_layer)

    def d_sae(self, layer: int) -> int:
        return self.by_layer[layer].cfg.d_sae

    def input_hook(self, layer: int) -> str:
        return self.by_layer[layer].cfg.hook_name or f"blocks.{layer}.ln2.hook_normalized"

    def output_hook(self, layer: int) -> str:
        return self.by_layer[layer].cfg.hook_name_out or f"blocks.{layer}.hook_mlp_out"

    def output_layers(self, layer: int) -> list[int]:
        return [layer]

    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.by_layer[layer].encode(x)

    def pre_activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self.by_layer[layer].pre_activation(x)

    def encoder(self, layer: int) -> torch.Tensor:
        """[D, S]: pre-activation = x @ W_enc + b_enc (transcoders never subtract b_dec from their input)."""
        return self.by_layer[layer].W_enc

    def decoder(self, layer: int) -> torch.Tensor:
        """[S, O, D]: what each feature writes to each of its output layers."""
        return self.by_layer[layer].W_dec[:, None, :]

    def skip_out(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        tc = self.by_layer[layer]
        w = getattr(tc, "W_skip", None)
        return None if w is None else x.to(w.dtype) @ w.T

    def b_dec_out(self, layer: int) -> torch.Tensor:
        return self.by_layer[layer].b_dec

    def reconstruct(self, inputs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {layer: self.by_layer[layer](x) for layer, x in inputs.items() if layer in self.by_layer}

    def model_name(self) -> str:
        return next(iter(self.by_layer.values())).cfg.model_name or ""

    def describe(self) -> str:
        first = next(iter(self.by_layer.values()))
        skip = "+skip" if getattr(first, "W_skip", None) is not None else ""
        return f"per-layer transcoders{skip} ({len(self.by_layer)} layers, width {first.cfg.d_sae})"


class ProtocolAdapter:
    """Pass-through for an object that already speaks the protocol (e.g. `CrossLayerTranscoder`), filling in the
    few conveniences attribution uses (`encoder`, `pre_activation`, `d_sae(layer)`) from what it has."""

    def __init__(self, obj: Any):
        self.obj = obj
        self.source = obj
        missing = [m for m in PROTOCOL if not hasattr(obj, m)]
        if missing:
            raise TypeError(f"{type(obj).__name__} lacks the replacement protocol's {', '.join(missing)}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.obj, name)

    @property
    def layers(self) -> list[int]:
        return sorted(int(x) for x in self.obj.layers)

    def d_sae(self, layer: int) -> int:
        d = self.obj.d_sae
        return int(d(layer) if callable(d) else (d[layer] if isinstance(d, (list, tuple, dict)) else d))

    def encoder(self, layer: int) -> torch.Tensor:
        if hasattr(self.obj, "encoder"):
            return self.obj.encoder(layer)
        W = self.obj.W_enc
        if isinstance(W, torch.Tensor) and W.dim() == 2:
            return W
        return W[self.obj.index(layer) if hasattr(self.obj, "index") else layer]

    def pre_activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.obj, "pre_activation"):
            return self.obj.pre_activation(layer, x)
        b = self.obj.b_enc
        if not (isinstance(b, torch.Tensor) and b.dim() == 1):
            b = b[self.obj.index(layer) if hasattr(self.obj, "index") else layer]
        return x.to(self.encoder(layer).dtype) @ self.encoder(layer) + b

    def model_name(self) -> str:
        cfg = getattr(self.obj, "cfg", None)
        return getattr(cfg, "model_name", "") or getattr(self.obj, "model_name", "") or ""

    def describe(self) -> str:
        return f"{type(self.obj).__name__} ({len(self.layers)} layers)"


def as_replacement(transcoders: Any) -> Any:
    """Any supported transcoder object -> an object with the replacement protocol."""
    from ..dictionaries.sae import TranscoderSet

    if isinstance(transcoders, (TranscoderSetAdapter, ProtocolAdapter)):
        return transcoders
    if isinstance(transcoders, (TranscoderSet, dict)):
        return TranscoderSetAdapter(transcoders)
    if all(hasattr(transcoders, m) for m in PROTOCOL):
        return ProtocolAdapter(transcoders)
    return TranscoderSetAdapter(transcoders)


def check_fits(model: Any, rep: Any) -> None:
    """Raise TranscoderMismatchError unless every transcoder reads and writes hooks this model has, at its width."""
    want = rep.model_name()
    have = getattr(model, "name", "") or ""
    if want and have:
        from ..dictionaries.compat import same_model

        if not same_model(want, have):
            raise TranscoderMismatchError(f"these transcoders were trained on {want!r}, but the model is {have!r}")
    n = model.cfg.n_layers
    D = model.cfg.d_model
    for layer in rep.layers:
        if not 0 <= layer < n:
            raise TranscoderMismatchError(f"the transcoders have a layer {layer}, but {have or 'the model'} has "
                                          f"layers 0..{n - 1}")
        for hook in (rep.input_hook(layer), rep.output_hook(layer)):
            if hook not in model.hook_names:
                raise TranscoderMismatchError(f"layer {layer}'s transcoder uses hook {hook!r}, which the model lacks")
        if rep.output_hook(layer) != f"blocks.{layer}.hook_mlp_out":
            raise TranscoderMismatchError(f"layer {layer}'s transcoder writes {rep.output_hook(layer)!r}; attribution "
                                          f"replaces MLP outputs, blocks.{layer}.hook_mlp_out")
        if rep.encoder(layer).shape[0] != D or rep.decoder(layer).shape[-1] != D:
            raise TranscoderMismatchError(f"layer {layer}'s transcoder maps {rep.encoder(layer).shape[0]} -> "
                                          f"{rep.decoder(layer).shape[-1]} dimensions; the model's d_model is {D}")
        for out in rep.output_layers(layer):
            if not layer <= out < n:
                raise TranscoderMismatchError(f"layer {layer}'s features write to layer {out}, outside {layer}..{n - 1}")


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
