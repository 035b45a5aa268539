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
(`training.py`): progress bar, checkpoints, Ctrl-C, resume.

>>> import featurelens as fl
>>> model = fl.load_model("gemma-3-270m")
>>> clt = fl.train_clt(model, layers="all", arch="batchtopk", k=16, width=2048, tokens=2_000_000, out="~/clt")
>>> clt = fl.load_dictionary("~/clt")
>>> clt.reconstruct({l: x_l for l, x_l in mlp_inputs.items()})[5]      # layer 5's MLP output estimate
>>> fl.evaluate_dictionary(model, clt)["all"].ce_loss_recovered        # all layers replaced at once
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.errors import InputError
from ..progress import OnProgress
from .sae import ConfigBase, DictionaryConfig, LayerError, sparse_activation
from .training import (
    TrainConfig, adam_for, choose_select_dtype, clear_checkpoints, dead_latent_aux, decode_for_training,
    default_dead_tokens, encode_for_training, init_sparse_offsets, project_decoder_grad, reconstruction_loss,
    renormalize_rows, run_training, skip_init_rows, start_skip, update_batchtopk_threshold, update_ema,
)

TRANSCODER_IN = "blocks.{}.ln2.hook_normalized"
TRANSCODER_OUT = "blocks.{}.hook_mlp_out"
CLT_KIND = "cross_layer_transcoder"
CLT_WEIGHTS = "clt_weights.safetensors"


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



class CrossLayerTranscoder(nn.Module):
    """A cross-layer transcoder (see the module docstring for the maths and shapes).

    It has the "replacement" interface `TranscoderSet` has: `layers`, `d_sae`, `input_hook(l)`, `output_hook(l)`,
    `encode_layer(l, x)`, `decoder(l)` [d_sae, n_out, d_out], `output_layers(l)`, `skip_out(l, x)`, `b_dec_out(l)`,
    `reconstruct({l: x_l}) -> {L: y_hat_L}`.

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


def decode_contributions(f: torch.Tensor, W: torch.Tensor) -> list[torch.Tensor]:
    """Features f [..., d_sae] times a decoder W [d_sae, n_out, d_out] -> n_out tensors [..., d_out].

    A sparse decode: only each row's non-zero features are read (an embedding bag over at most the row's
    non-zero count), so a CLT costs in proportion to L0, not to the width.
    """
    lead, d_sae = f.shape[:-1], f.shape[-1]
    n_out, d_out = W.shape[1], W.shape[2]
    flat = f.reshape(-1, d_sae).to(W.dtype)
    nnz = int((flat != 0).sum(1).max()) if flat.numel() else 0
    if nnz == 0 or nnz * 4 > d_sae:  # dense enough that a matmul is cheaper
        out = flat @ W.reshape(d_sae, n_out * d_out)
    else:
        vals, idx = flat.abs().topk(nnz, dim=-1, sorted=False)
        vals = flat.gather(1, idx)
        out = F.embedding_bag(idx, W.reshape(d_sae, n_out * d_out), per_sample_weights=vals, mode="sum")
    out = out.view(*lead, n_out, d_out)
    return [out[..., j, :] for j in range(n_out)]


# ----------------------------------------------------------------------------------------------- training
class CLTLearner:
    """A cross-layer transcoder being trained, in normalized units (each layer's input and output scaled to unit
    mean square, folded back by `export`). Implements the learner interface `run_training` drives."""

    def __init__(self, name: str, cfg: CLTConfig, tcfg: TrainConfig, device: str | torch.device | None = None):
        self.name, self.tcfg = name, tcfg
        self.clt = CrossLayerTranscoder(cfg, device=device)
        n = len(cfg.layers)
        self.hooks_in = [cfg.hook_in.format(l) for l in cfg.layers]
        self.hooks_out = [cfg.hook_out.format(l) for l in cfg.layers]
        self.scale_in, self.scale_out = [1.0] * n, [1.0] * n
        self.initialized = False
        self.since_fired = torch.zeros(n, cfg.d_sae, dtype=torch.long, device=device)
        self.bt_threshold: list[float | None] = [None] * n
        self.ema: dict[str, float] = {}
        clt = self.clt
        if clt.threshold is not None:
            for t in clt.threshold:
                t.data.fill_(tcfg.jumprelu_init_threshold)
        offsets = list(clt.b_enc) + (list(clt.threshold) if cfg.arch == "jumprelu" else [])
        weights = list(clt.W_enc) + list(clt.W_dec) + [clt.b_dec]
        self.opt = adam_for(weights, offsets, tcfg, list(clt.W_skip) if clt.W_skip is not None else [])
        self.dead_tokens = default_dead_tokens(tcfg)
        self.aux_k = tcfg.aux_k or max(1, cfg.d_out // 2)  # type: ignore[operator]
        self.select_dtype = choose_select_dtype(tcfg, cfg.arch, clt.device)

    def signature(self) -> dict[str, Any]:
        c = self.clt.cfg
        return {"d_in": c.d_in, "d_out": c.d_out, "d_sae": c.d_sae, "layers": list(c.layers)}

    @torch.no_grad()
    def _initialize(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        clt, cfg = self.clt, self.clt.cfg
        for i in range(len(xs)):
            if self.tcfg.normalize:
                self.scale_in[i] = float(cfg.d_in**0.5 / xs[i].norm(dim=1).mean().clamp_min(1e-12))
                self.scale_out[i] = float(cfg.d_out**0.5 / ys[i].norm(dim=1).mean().clamp_min(1e-12))
            clt.b_dec[i].copy_((ys[i] * self.scale_out[i]).mean(0))
            if clt.W_skip is not None:
                start_skip(clt.W_skip[i], clt.b_dec[i], clt.W_enc[i], xs[i] * self.scale_in[i],
                           ys[i] * self.scale_out[i], self.tcfg)
            if cfg.arch in ("relu", "jumprelu") and self.tcfg.init_l0:
                thr = clt.threshold[i] if clt.threshold is not None else None
                init_sparse_offsets(cfg.arch, (xs[i] * self.scale_in[i]) @ clt.W_enc[i] + clt.b_enc[i], clt.b_enc[i],
                                    thr, self.tcfg.init_l0)
        self.initialized = True

    def init_rows(self) -> int:
        return skip_init_rows(self.clt.W_skip is not None, self.tcfg)

    def initialize(self, batches: list[Mapping[str, torch.Tensor]]) -> None:
        """Scales, b_dec and the skips' least-squares start from the first rows (see `run_training`)."""
        dev = dict(device=self.clt.device, dtype=self.clt.dtype)
        cat = lambda h: torch.cat([b[h].reshape(len(b[h]), -1) for b in batches]).to(**dev)  # noqa: E731
        self._initialize([cat(h) for h in self.hooks_in], [cat(h) for h in self.hooks_out])

    def train_step(self, batch: Mapping[str, torch.Tensor], lr: float, sparsity_scale: float) -> int:
        missing = [h for h in self.hooks_in + self.hooks_out if h not in batch]
        if missing:
            raise KeyError(f"the activation batch has no {missing[0]!r} (it has {', '.join(batch)})")
        xs = [batch[h].reshape(len(batch[h]), -1) for h in self.hooks_in]
        ys = [batch[h].reshape(len(batch[h]), -1) for h in self.hooks_out]
        self.step(xs, ys, lr, sparsity_scale)
        return xs[0].shape[0]

    def step(self, xs: list[torch.Tensor], ys: list[torch.Tensor], lr: float, sparsity_scale: float) -> dict[str, float]:
        clt, cfg, tcfg = self.clt, self.clt.cfg, self.tcfg
        n = len(cfg.layers)
        xs = [x.to(device=clt.device, dtype=clt.dtype) for x in xs]
        ys = [y.to(device=clt.device, dtype=clt.dtype) for y in ys]
        if not self.initialized:
            self._initialize(xs, ys)
        xs = [x * s for x, s in zip(xs, self.scale_in)]
        ys = [y * s for y, s in zip(ys, self.scale_out)]
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        B = xs[0].shape[0]
        outs: list[torch.Tensor] = [clt.b_dec[j].expand(B, -1) for j in range(n)]
        encs, sparsity = [], xs[0].new_zeros(())
        for i in range(n):
            thr = clt.threshold[i] if clt.threshold is not None else None
            enc = encode_for_training(cfg.arch, cfg.k, xs[i], None, clt.W_enc[i], clt.b_enc[i], thr, tcfg,
                                      self.select_dtype)
            encs.append(enc)
            sparsity = sparsity + enc.sparsity
            dec = decode_for_training(enc, clt.W_dec[i]).view(B, n - i, cfg.d_out)  # type: ignore[arg-type]
            for j in range(n - i):
                outs[i + j] = outs[i + j] + dec[:, j]
            if clt.W_skip is not None:
                outs[i] = outs[i] + xs[i] @ clt.W_skip[i].T
        errs = [o - y for o, y in zip(outs, ys)]
        err2 = [e.pow(2).sum(-1) for e in errs]  # per layer [B]
        loss = sum(reconstruction_loss(e2, y.pow(2).sum(-1), tcfg.loss) for e2, y in zip(err2, ys))
        mse = sum(e2.mean() for e2 in err2)
        loss = loss + sparsity_scale * sparsity

        aux_total, n_dead = xs[0].new_zeros(()), 0
        if tcfg.aux_coefficient > 0:
            for i in range(n):
                dead = self.since_fired[i] >= self.dead_tokens
                nd = int(dead.sum())
                n_dead += nd
                if nd:
                    err_cat = torch.cat(errs[i:], dim=1)  # what layer i's features could still explain
                    aux_total = aux_total + dead_latent_aux(xs[i], None, clt.W_enc[i], clt.b_enc[i], clt.W_dec[i],
                                                            encs[i].pre, dead, self.aux_k, err_cat)
            loss = loss + tcfg.aux_coefficient * aux_total

        self.opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        with torch.no_grad():
            for W in clt.W_dec:
                project_decoder_grad(W)
            self.opt.step()
            for W in clt.W_dec:
                renormalize_rows(W)
            if cfg.arch == "jumprelu":
                for t in clt.threshold:  # type: ignore[union-attr]
                    t.clamp_(min=1e-6)
            self.since_fired += B
            for i, enc in enumerate(encs):
                self.since_fired[i, enc.fired.to(torch.long)] = 0
                if cfg.arch == "batchtopk":
                    self.bt_threshold[i] = update_batchtopk_threshold(self.bt_threshold[i], enc,
                                                                      tcfg.batchtopk_threshold_rate)
            var = sum(float((y - y.mean(0)).pow(2).sum()) for y in ys)
            l0s = [float(e.l0) for e in encs]
            stats = {"loss": float(loss), "mse": float(mse),  # type: ignore[arg-type]
                     "fvu": float(sum(float(e.sum()) for e in err2) / max(var, 1e-12)),
                     "l0": sum(l0s) / n, "l0_total": sum(l0s), "dead": n_dead / (n * cfg.d_sae),
                     "aux": float(aux_total)}
        update_ema(self.ema, stats)
        return stats

    def export(self) -> CrossLayerTranscoder:
        """The CLT as saved: batchtopk's thresholds set, scaling folded, decoder norms folded (except topk, whose
        per-layer output scales make them unequal: there the decoders keep their norms, the output is exact)."""
        clt = copy.deepcopy(self.clt).to("cpu")
        with torch.no_grad():
            if clt.cfg.arch == "batchtopk":
                for t, v in zip(clt.threshold, self.bt_threshold):  # type: ignore[arg-type]
                    t.fill_(v if v is not None else 0.0)
            clt.fold_activation_scale(self.scale_in, self.scale_out)
            if clt.cfg.arch != "topk":
                clt.fold_decoder_norms()
        for p in clt.parameters():
            p.requires_grad_(False)
        return clt.eval()

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.clt.cfg.to_dict(), "params": self.clt.state_dict(),
                "optimizer": self.opt.state_dict(), "scale_in": list(self.scale_in), "scale_out": list(self.scale_out),
                "initialized": self.initialized, "since_fired": self.since_fired.clone(),
                "bt_threshold": list(self.bt_threshold), "ema": dict(self.ema)}

    def restore(self, st: Mapping[str, Any]) -> None:
        self.clt.load_state_dict(st["params"])
        self.opt.load_state_dict(st["optimizer"])
        self.scale_in, self.scale_out = [float(s) for s in st["scale_in"]], [float(s) for s in st["scale_out"]]
        self.initialized = bool(st["initialized"])
        self.since_fired = st["since_fired"].to(self.clt.device).clone()
        self.bt_threshold = list(st["bt_threshold"])
        self.ema = dict(st["ema"])


def train_clt(model: Any, layers: "str | int | Sequence[int]" = "all", *, arch: str = "batchtopk",
              k: int | None = None, width: int = 2048, tokens: int = 1_000_000, out: str | Path | None = None,
              lr: float | None = None, batch_size: int = 4096, skip: bool = False, source: Any = "nlp-corpus",
              ctx_len: int = 128, resume: bool = False, overwrite: bool = False, progress: bool = True, seed: int = 0,
              checkpoint_every: int | None = None, contexts: torch.Tensor | None = None,
              on_progress: OnProgress | None = None, **options: Any) -> CrossLayerTranscoder:
    """Train a cross-layer transcoder over `layers` (each layer's MLP input -> its MLP output and all later ones).

    width: features per layer. arch: "batchtopk" (default: at inference a threshold, i.e. a JumpReLU that
    circuit-tracer loads as it is), "topk", "jumprelu" or "relu"; k: latents per token and layer. skip: an affine
    skip per layer. Further `options` are `TrainConfig` fields (loss="normalized_mse", reuse=4, warmup, decay, ...).
    Saved to `out` (cfg.json + clt_weights.safetensors + featurelens.json); `resume=True` continues a checkpointed run.

    >>> clt = fl.train_clt(model, layers="all", k=16, width=2048, tokens=2_000_000, out="~/clt")
    """
    from .batches import chunk_for, model_batches
    from .train import _check_hook, _default_out, _parse_layers, _prepare_out, _train_options

    wanted = _parse_layers(layers, model.cfg.n_layers)
    tcfg = _train_options(arch, k, width, tokens, lr, batch_size, seed, checkpoint_every, {**options, "skip": skip})
    out = Path(out).expanduser() if out is not None else _default_out(model, f"clt-{arch}-{width}")
    _prepare_out(out, resume, overwrite)
    hooks, width_of = [], {}
    for layer in wanted:
        for h in (TRANSCODER_IN.format(layer), TRANSCODER_OUT.format(layer)):
            width_of[h] = _check_hook(model, h)  # the width of h's per-token vectors
            hooks.append(h)
    d_in, d_out = width_of[hooks[0]], width_of[hooks[1]]
    torch.manual_seed(seed)
    cfg = CLTConfig(layers=wanted, d_in=d_in, d_sae=width, arch=arch, k=tcfg.k, d_out=d_out, skip=skip,
                    model_name=getattr(model, "name", ""), n_layers_model=model.cfg.n_layers,
                    metadata={"context_size": ctx_len, "dataset_path": str(source), "prepend_bos": True})
    learner = CLTLearner("clt", cfg, tcfg, device=model.device)
    if contexts is None:
        from ..data import load_contexts

        contexts = load_contexts(model, source, ctx_len, "train", progress=progress)
    row_width = len(wanted) * (d_in + d_out)
    batches = model_batches(model, hooks, contexts, tcfg.batch_size, seed,
                            chunk_contexts=chunk_for(tokens, contexts, row_width))
    res = run_training([learner], batches, tcfg, out, resume=resume, progress=progress,  # type: ignore[list-item]
                       desc=f"{arch} CLT x{len(wanted)} layers", on_progress=on_progress)
    clt = learner.export()
    stats = {"train_config": tcfg.to_dict(), "tokens_trained": res.tokens, "steps": res.steps, "source": str(source),
             "context_size": ctx_len, "model": getattr(model, "name", ""), "scale_in": learner.scale_in,
             "scale_out": learner.scale_out, "final_train_metrics": {k_: round(v, 6) for k_, v in learner.ema.items()},
             "train_seconds_last_session": round(res.seconds, 1), "resumed_from_step": res.resumed_from}
    save_clt(clt, out, stats)
    clear_checkpoints(out)
    clt.stats, clt.source = stats, out
    return clt


# ----------------------------------------------------------------------------------------------- our layout on disk
def _tensors(clt: CrossLayerTranscoder) -> dict[str, torch.Tensor]:
    """Weights keyed by model layer: W_enc_L [d_in, d_sae], b_enc_L, threshold_L, W_dec_L [d_sae, n_out, d_out],
    b_dec_L [d_out], W_skip_L [d_out, d_in]."""
    out: dict[str, torch.Tensor] = {}
    for i, l in enumerate(clt.layers):
        out[f"W_enc_{l}"] = clt.W_enc[i].detach().cpu().contiguous()
        out[f"b_enc_{l}"] = clt.b_enc[i].detach().cpu().contiguous()
        if clt.threshold is not None:
            out[f"threshold_{l}"] = clt.threshold[i].detach().cpu().contiguous()
        out[f"W_dec_{l}"] = clt.decoder(l).detach().cpu().contiguous()
        out[f"b_dec_{l}"] = clt.b_dec[i].detach().cpu().contiguous()
        if clt.W_skip is not None:
            out[f"W_skip_{l}"] = clt.W_skip[i].detach().cpu().contiguous()
    return out


def save_clt(clt: CrossLayerTranscoder, path: str | Path, stats: dict[str, Any] | None = None) -> Path:
    """Write `clt` to the directory `path`: cfg.json (its config), clt_weights.safetensors, featurelens.json.
    Every file is written atomically, weights first."""
    from safetensors.torch import save_file

    from ..io import atomic_save, atomic_write_json

    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    cfg = dataclasses.replace(clt.cfg, dtype=str(clt.dtype).replace("torch.", ""))
    tensors = _tensors(clt)
    atomic_save(path / CLT_WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write_json(path / "cfg.json", {"architecture": CLT_KIND, **cfg.to_dict()}, default=str)
    meta = {"featurelens_format": 1, "kind": CLT_KIND, "config": cfg.to_dict()}
    if stats:
        meta["stats"] = stats
    atomic_write_json(path / "featurelens.json", meta, default=str)
    return path


def clt_from_tensors(cfg: CLTConfig, tensors: Mapping[str, torch.Tensor], source: Path | str,
                     device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """A CLT from weights named as in `_tensors`, checking every name and shape; errors name the file and layer."""
    from .format import CorruptDictionaryError

    clt = CrossLayerTranscoder(cfg)
    want = {name: tuple(t.shape) for name, t in _tensors(clt).items()}
    for name, shape in want.items():
        layer = name.rsplit("_", 1)[1]
        if name not in tensors:
            raise CorruptDictionaryError(f"{source}: layer {layer} is missing ({name} not found; a {cfg.arch} "
                                         f"cross-layer transcoder over layers {cfg.layers} needs it)")
        if tuple(tensors[name].shape) != shape:
            raise CorruptDictionaryError(f"{source}: layer {layer}: {name} has shape {list(tensors[name].shape)}, but "
                                         f"the config (d_in={cfg.d_in}, d_sae={cfg.d_sae}, d_out={cfg.d_out}) needs "
                                         f"{list(shape)}")
        if not torch.isfinite(tensors[name]).all():
            raise CorruptDictionaryError(f"{source}: layer {layer}: {name} contains NaN or infinite values")
    unexpected = sorted(k for k in tensors if k not in want and k.split("_")[0] in ("W", "threshold"))
    skipish = [k for k in unexpected if k.startswith("W_skip")]
    if skipish:
        raise CorruptDictionaryError(f"{source}: holds {skipish[0]} but its config says skip=false: a skip "
                                     f"transcoder read as a plain one would drop its skip path")
    with torch.no_grad():
        for i, l in enumerate(cfg.layers):
            clt.W_enc[i].copy_(tensors[f"W_enc_{l}"])
            clt.b_enc[i].copy_(tensors[f"b_enc_{l}"])
            if clt.threshold is not None:
                clt.threshold[i].copy_(tensors[f"threshold_{l}"])
            clt.W_dec[i].copy_(tensors[f"W_dec_{l}"].reshape(cfg.d_sae, -1))
            clt.b_dec[i].copy_(tensors[f"b_dec_{l}"])
            if clt.W_skip is not None:
                clt.W_skip[i].copy_(tensors[f"W_skip_{l}"])
    for p in clt.parameters():
        p.requires_grad_(False)
    return clt.to(device).eval()


def load_clt(path: str | Path, device: str | torch.device = "cpu") -> CrossLayerTranscoder:
    """Read a CLT directory written by `save_clt` (`load_dictionary` calls this for such directories)."""
    from .format import CorruptDictionaryError, _read_json, _read_safetensors

    path = Path(path).expanduser()
    meta = _read_json(path / "featurelens.json") if (path / "featurelens.json").is_file() else None
    raw = meta.get("config") if meta and isinstance(meta.get("config"), dict) else None
    where = path / "featurelens.json"
    if raw is None:
        raw, where = _read_json(path / "cfg.json"), path / "cfg.json"
    try:
        cfg = CLTConfig.from_dict(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise CorruptDictionaryError(f"{where}: not a valid cross-layer transcoder config ({e})") from None
    clt = clt_from_tensors(cfg, _read_safetensors(path / CLT_WEIGHTS), path / CLT_WEIGHTS, device)
    clt.stats, clt.source = (meta or {}).get("stats", {}), path
    return clt


def check_fits_model(transcoders: Any, model: Any) -> None:
    """Raise InputError (naming the layer) unless every layer's hooks exist in `model` and have its widths."""
    from ..engine.hooks import UnknownHookError

    n_layers = model.cfg.n_layers
    for layer in transcoders.layers:
        if layer >= n_layers:
            raise CLTLayerError(f"the transcoders have layer {layer}, but {getattr(model, 'name', 'the model')} has "
                                f"{n_layers} layers (0..{n_layers - 1})")
        for hook in (transcoders.input_hook(layer), transcoders.output_hook(layer)):
            if hook not in model.hook_names:
                raise UnknownHookError(hook, model.hook_names)
        d_model = model.cfg.d_model
        W = transcoders.decoder(layer)
        d_in = transcoders.d_in if isinstance(transcoders, CrossLayerTranscoder) else transcoders[layer].d_in
        if W.shape[-1] != d_model or d_in != d_model:
            raise InputError(f"layer {layer}: the transcoders read width {d_in} and write width {W.shape[-1]}, but "
                             f"{getattr(model, 'name', 'the model')} has d_model={d_model}")


def clt_config_json(path: Path) -> dict[str, Any] | None:
    """The config of the CLT directory `path`, or None when it is not one (for `load_dictionary`'s detection)."""
    for name in ("featurelens.json", "cfg.json"):
        f = path / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                return None
            if isinstance(d, dict) and (d.get("kind") == CLT_KIND or d.get("architecture") == CLT_KIND):
                return d
    return None
