"""Cross-layer transcoders (CLT): features that read one layer's MLP input and write to that MLP's output and every
later one's (Anthropic, "Circuit Tracing", 2025).

Layer l's features read x_l = blocks.l.ln2.hook_normalized; the reconstruction of blocks.L.hook_mlp_out is

    y_hat_L = sum over source layers l <= L of  f_l @ W_dec[l][:, L - l, :]  +  b_dec[L]  (+ x_L @ W_skip[L].T)
    f_l     = act(x_l @ W_enc[l] + b_enc[l])                                  [..., d_sae], act as in sae.py

Shapes (per source layer l, model layer numbers as keys): W_enc [d_in, d_sae], b_enc [d_sae], threshold [d_sae]
(jumprelu / batchtopk), W_dec [d_sae, n_out(l), d_out] with n_out(l) = number of CLT layers >= l, b_dec [d_out]
per output layer, W_skip [d_out, d_in] (optional, from a layer's own input to its own output).

A feature's decoder is all of what it writes: training keeps the concatenation over its output layers at unit
norm. Training runs from the same single activation stream as per-layer transcoders (every layer's MLP input and
output from one forward pass), with the same sparse encode / decode kernels, learner pieces and run loop
(`learner.CLTLearner`, `loop.run_training`): progress bar, checkpoints, Ctrl-C, resume. `train.train_clt` trains
one, `formats.clt` saves and loads it.

>>> import featurelens as fl
>>> model = fl.load_model("gemma-3-270m")
>>> clt = fl.train_clt(model, layers="all", arch="batchtopk", k=16, width=2048, tokens=2_000_000, out="~/clt")
>>> clt = fl.load_dictionary("~/clt")
>>> clt.reconstruct({l: x_l for l, x_l in mlp_inputs.items()})[5]      # layer 5's MLP output estimate
>>> fl.evaluate_dictionary(model, clt)["all"].ce_loss_recovered        # all layers replaced at once
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..engine.errors import InputError
from .protocol import TRANSCODER_IN, TRANSCODER_OUT, Transcoders, decode_contributions
from .sae import ConfigBase, DictionaryConfig, LayerError, SparseDictionary, sparse_activation


class CLTLayerError(LayerError):
    """A layer the cross-layer transcoder does not have (or a model lacks); the message names it."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass
class CLTConfig(ConfigBase):
    """Shape and kind of a cross-layer transcoder; what its cfg.json says."""

    layers: list[int]  # source (= output) layers, ascending
    d_in: int
    d_sae: int  # features per layer
    arch: str = "batchtopk"
    k: int | None = None  # topk / batchtopk: latents per token and layer
    d_out: int | None = None  # default d_in
    skip: bool = False  # an affine skip W_skip from each layer's input to its own output
    hook_in: str = TRANSCODER_IN  # templates, "{}" = layer
    hook_out: str = TRANSCODER_OUT
    model_name: str = ""
    n_layers_model: int | None = None
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers = list(self.layers) if isinstance(self.layers, (list, tuple)) else None
        if not layers or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in layers):
            raise InputError(f"a cross-layer transcoder needs a list of layer numbers >= 0, got {self.layers!r}")
        if sorted(set(layers)) != layers:
            raise InputError(f"layers must be ascending and distinct, got {layers}")
        self.layers = layers
        if self.n_layers_model is not None and layers[-1] >= self.n_layers_model:
            bad = [x for x in layers if x >= self.n_layers_model]
            raise CLTLayerError(f"layers {bad} do not exist: the model has {self.n_layers_model} layers "
                                f"(0..{self.n_layers_model - 1})")
        if self.d_out is None:
            self.d_out = self.d_in
        for t in (self.hook_in, self.hook_out):
            if "{}" not in t:
                raise InputError(f"hook templates need '{{}}' where the layer goes, got {t!r}")
        self.layer_config(layers[0])  # the per-layer checks (architecture, k, widths) live in DictionaryConfig

    def layer_config(self, layer: int) -> DictionaryConfig:
        """Layer `layer`'s encoder as a DictionaryConfig (its own output only): for checks and shared code."""
        return DictionaryConfig(d_in=self.d_in, d_sae=self.d_sae, arch=self.arch, k=self.k, transcoder=True,
                                d_out=self.d_out, skip=self.skip, hook_name=self.hook_in.format(layer),
                                hook_name_out=self.hook_out.format(layer), model_name=self.model_name,
                                dtype=self.dtype)


class CrossLayerTranscoder(nn.Module, Transcoders):
    """A cross-layer transcoder (see the module docstring for the maths and shapes).

    It implements the replacement protocol (`protocol.Transcoders`), as `TranscoderSet` does: `layers`, `d_sae`,
    `input_hook(l)`, `output_hook(l)`, `encode_layer(l, x)`, `decoder(l)` [d_sae, n_out, d_out], `output_layers(l)`,
    `skip_out(l, x)`, `b_dec_out(l)`, `reconstruct({l: x_l}) -> {L: y_hat_L}`.

    >>> clt = CrossLayerTranscoder(CLTConfig(layers=[0, 1, 2], d_in=640, d_sae=2048, arch="topk", k=16))
    >>> f0 = clt.encode_layer(0, x0)                  # [..., 2048]
    >>> clt.decoder(0).shape                          # what layer 0's features write to layers 0, 1, 2
    torch.Size([2048, 3, 640])
    """

    def __init__(self, cfg: CLTConfig, device: str | torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        kw = {"dtype": cfg.torch_dtype, "device": device}
        n, d_in, d_out, d_sae = len(cfg.layers), cfg.d_in, cfg.d_out, cfg.d_sae
        W_enc, W_dec = [], []
        for i in range(n):
            dec = torch.randn(d_sae, (n - i) * d_out, **kw)
            dec /= dec.norm(dim=1, keepdim=True)
            # encoder: the transpose of what a feature writes to its own layer (as an SAE's init), where shapes allow
            enc = dec[:, :d_out].T * (n - i) ** 0.5 if d_in == d_out else torch.randn(d_in, d_sae, **kw) / d_in**0.5
            W_enc.append(nn.Parameter(enc.T.contiguous().T))  # latent-major storage, as in SparseDictionary
            W_dec.append(nn.Parameter(dec))  # stored flat [d_sae, n_out * d_out]: one row per feature
        self.W_enc = nn.ParameterList(W_enc)
        self.b_enc = nn.ParameterList([nn.Parameter(torch.zeros(d_sae, **kw)) for _ in range(n)])
        self.threshold = (nn.ParameterList([nn.Parameter(torch.zeros(d_sae, **kw)) for _ in range(n)])
                          if cfg.has_threshold else None)
        self.W_dec = nn.ParameterList(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(n, d_out, **kw))
        self.W_skip = (nn.ParameterList([nn.Parameter(torch.zeros(d_out, d_in, **kw)) for _ in range(n)])
                       if cfg.skip else None)

    # ----------------------------------------------------------------- the replacement protocol
    @property
    def layers(self) -> list[int]:
        return list(self.cfg.layers)

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_out(self) -> int:
        return self.cfg.d_out  # type: ignore[return-value]

    @property
    def n_layers_model(self) -> int | None:
        return self.cfg.n_layers_model

    @property
    def model_name(self) -> str:
        return self.cfg.model_name or ""

    def describe(self) -> str:
        return f"CrossLayerTranscoder ({len(self.layers)} layers)"

    @property
    def device(self) -> torch.device:
        return self.b_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.b_dec.dtype

    def index(self, layer: int) -> int:
        """Position of model layer `layer` among this CLT's layers (CLTLayerError naming the layers it has)."""
        try:
            return self.cfg.layers.index(int(layer))
        except (ValueError, TypeError):
            raise CLTLayerError(f"this cross-layer transcoder has no layer {layer!r}; its layers are "
                                f"{self.cfg.layers}") from None

    def __contains__(self, layer: object) -> bool:
        return layer in self.cfg.layers

    def input_hook(self, layer: int) -> str:
        self.index(layer)
        return self.cfg.hook_in.format(layer)

    def output_hook(self, layer: int) -> str:
        self.index(layer)
        return self.cfg.hook_out.format(layer)

    def output_layers(self, layer: int) -> list[int]:
        return self.cfg.layers[self.index(layer):]

    def pre_activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        i = self.index(layer)
        if x.shape[-1] != self.d_in:
            raise InputError(f"layer {layer}: expected MLP inputs with last dimension d_in={self.d_in}, got shape "
                             f"{tuple(x.shape)}")
        return x.to(self.dtype) @ self.W_enc[i] + self.b_enc[i]

    def encoder(self, layer: int) -> torch.Tensor:
        """[d_in, d_sae]: pre-activation = x @ encoder(layer) + b_enc."""
        return self.W_enc[self.index(layer)]

    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of layer `layer` from its MLP input x [..., d_in]."""
        i = self.index(layer)
        thr = self.threshold[i] if self.threshold is not None else None
        return sparse_activation(self.cfg.arch, self.pre_activation(layer, x), self.cfg.k, thr)

    def decoder(self, layer: int) -> torch.Tensor:
        """[d_sae, n_out, d_out]: what each feature of `layer` writes to each of `output_layers(layer)`."""
        W = self.W_dec[self.index(layer)]
        return W.view(self.d_sae, -1, self.d_out)

    def skip_out(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        if self.W_skip is None:
            return None
        return x.to(self.dtype) @ self.W_skip[self.index(layer)].T

    def b_dec_out(self, layer: int) -> torch.Tensor:
        return self.b_dec[self.index(layer)]

    @torch.no_grad()
    def layer_features(self, layer: int) -> SparseDictionary:
        """Layer `layer`'s features as one transcoder-shaped dictionary, for analysis, dashboards, search and steering.

        It encodes exactly as the CLT does (same encoder, bias, threshold, k). Its W_dec [d_sae, d_out] is each
        feature's decoder summed over every layer it writes to: what the feature adds to the residual stream in all,
        the direction whose logit lens and similarity to other features mean something. So it is not a
        reconstruction of layer `layer`'s MLP output (b_dec is zero, no skip): steering with it adds the feature's
        whole write at its own layer, where the CLT spreads it over its output layers.

        >>> view = clt.layer_features(6)
        >>> torch.equal(view.encode(x6), clt.encode_layer(6, x6))
        True
        """
        i = self.index(layer)
        cfg = dataclasses.replace(self.cfg.layer_config(layer), skip=False, metadata={
            "cross_layer_transcoder_layer": int(layer), "decoder": "summed over its output layers"})
        view = SparseDictionary(cfg, device=self.device)
        view.W_enc.copy_(self.W_enc[i])
        view.b_enc.copy_(self.b_enc[i])
        if self.threshold is not None and view.threshold is not None:
            view.threshold.copy_(self.threshold[i])
        view.W_dec.copy_(self.decoder(layer).sum(1))
        view.b_dec.zero_()
        src = getattr(self, "source", None)  # loaded from a directory: the view is <dir>/layer_L (load_dictionary)
        if src is not None:
            view.source = Path(src) / f"layer_{layer}"
        return view.requires_grad_(False)

    def encode(self, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return {layer: self.encode_layer(layer, x) for layer, x in inputs.items()}

    def decode(self, features: Mapping[int, torch.Tensor],
               inputs: Mapping[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """{L: y_hat_L} for every layer L whose sources (all CLT layers <= L) are in `features`; a CLT with a skip
        needs the inputs too."""
        out: dict[int, torch.Tensor] = {}
        for layer, f in features.items():
            for L, part in zip(self.output_layers(layer), decode_contributions(f, self.decoder(layer))):
                out[L] = out[L] + part if L in out else part
        result = {}
        for L in self.cfg.layers:
            sources = [l for l in self.cfg.layers if l <= L]
            if not all(l in features for l in sources):
                continue
            y = out[L] + self.b_dec_out(L)
            if self.W_skip is not None:
                if inputs is None or L not in inputs:
                    raise InputError(f"this cross-layer transcoder has a skip connection: decoding layer {L} needs "
                                     f"its input too")
                y = y + self.skip_out(L, inputs[L])  # type: ignore[operator]
            result[L] = y
        return result

    def reconstruct(self, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{L: MLP output estimate [..., d_out]} from {l: MLP input [..., d_in]} for every CLT layer l."""
        missing = [l for l in self.cfg.layers if l not in inputs]
        if missing:
            raise CLTLayerError(f"reconstruct needs the MLP input of every layer of the cross-layer transcoder; "
                                f"layers {missing} are missing")
        extra = [l for l in inputs if l not in self.cfg.layers]
        if extra:
            raise CLTLayerError(f"layers {extra} are not in this cross-layer transcoder (it has {self.cfg.layers})")
        return self.decode(self.encode(inputs), inputs)

    def forward(self, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        return self.reconstruct(inputs)

    def __repr__(self) -> str:
        c = self.cfg
        k = f", k={c.k}" if c.k is not None else ""
        skip = "+skip" if c.skip else ""
        return (f"CrossLayerTranscoder({c.arch}{skip}, layers {c.layers[0]}..{c.layers[-1]} ({len(c.layers)}), "
                f"d_in={c.d_in}, d_sae={c.d_sae} per layer{k}, {c.hook_in.format('L')} -> {c.hook_out.format('L')})")

    # ----------------------------------------------------------------- reparametrizations (function unchanged)
    @torch.no_grad()
    def fold_activation_scale(self, scale_in: Sequence[float], scale_out: Sequence[float]) -> "CrossLayerTranscoder":
        """Turn a CLT trained on (scale_in[l] * x_l -> scale_out[L] * y_L) into one on raw activations."""
        n = len(self.cfg.layers)
        for i in range(n):
            self.W_enc[i].mul_(float(scale_in[i]))
            dec = self.W_dec[i].view(self.d_sae, n - i, self.d_out)
            dec.div_(torch.tensor([float(s) for s in scale_out[i:]], dtype=dec.dtype, device=dec.device)[None, :, None])
            if self.W_skip is not None:
                self.W_skip[i].mul_(float(scale_in[i]) / float(scale_out[i]))
        self.b_dec.div_(torch.tensor([float(s) for s in scale_out], dtype=self.dtype, device=self.device)[:, None])
        return self

    @torch.no_grad()
    def fold_decoder_norms(self) -> "CrossLayerTranscoder":
        """Rescale so each feature's whole decoder (all its output layers) has unit norm. TopK selection compares
        pre-activations, so a topk CLT whose norms differ within a layer is refused (its output would change)."""
        for i in range(len(self.cfg.layers)):
            norms = self.W_dec[i].norm(dim=1).clamp_min(1e-12)
            if self.cfg.arch == "topk" and not torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4):
                raise ValueError("cannot fold unequal decoder norms into a topk cross-layer transcoder without "
                                 "changing its output")
            self.W_dec[i].div_(norms[:, None])
            self.W_enc[i].mul_(norms[None, :])
            self.b_enc[i].mul_(norms)
            if self.threshold is not None:
                self.threshold[i].mul_(norms)
        return self
