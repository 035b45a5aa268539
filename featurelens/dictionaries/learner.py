"""Dictionaries being trained (how: `train_config.TrainConfig`): `Learner` (one SAE or transcoder) and `CLTLearner` (a
cross-layer transcoder). `loop.run_training` drives any of them; the step's maths is in `losses`.

The recipe, per dictionary:

* Inputs (and a transcoder's targets) are scaled by a constant so their mean norm is sqrt(d); the constant is
  folded into the weights at save time, so a saved dictionary reads raw activations.
* Init, from the first batch (a skip transcoder's from the first `init_tokens` rows): decoder rows random unit
  vectors, encoder = decoder transpose (shapes permitting), b_dec = the geometric median (an SAE's input) or the
  mean (a transcoder's output). A skip transcoder's W_skip and b_dec start as the least-squares affine map from
  input to output (`fit_affine`) and by default stay there (skip_lr_scale 0), and its encoder starts at
  skip_encoder_scale times the decoder's transpose: the features learn what the MLP does beyond its best linear
  map, without first adding noise to it.
* Sparsity coefficients ramp up linearly over the first `sparsity_warmup` fraction of training; the loss, AuxK,
  decoder-norm upkeep and learning-rate schedule are in `losses`.
* Options for transcoders of heavy-tailed MLP outputs: loss="normalized_mse" weighs each token's error by its own
  target norm (see `losses.reconstruction_loss`); reuse=R serves every token's activations R times from an
  in-memory bfloat16 shuffle buffer (`batches.reuse_batches`), so R times fewer forward passes feed the same number
  of steps.

A learner offers what `run_training` needs: `name`, `ema`, `initialized`, `init_rows()` / `initialize(batches)`,
`train_step(batch, lr, sparsity_scale) -> rows`, `state()` / `restore(state)` and `signature()` (shapes a checkpoint
must match), and `export()` (the dictionary as saved).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import torch

from .. import distributed as dist
from ..engine.errors import InputError
from .autograd import SelectedEncode, cross_layer_decode, gathered_dot
from .batches import PROBE
from .clt import CLTConfig, CrossLayerTranscoder
from .losses import (
    TrainEncoding, adam_for, choose_select_dtype, dead_latent_aux, decode_for_training, default_dead_tokens,
    encode_for_training, fired_anywhere, fit_affine, init_sparse_offsets, mean_over_ranks, project_decoder_grad,
    reconstruction_loss, renormalize_rows, skip_init_rows, start_skip, update_batchtopk_threshold, update_ema,
)
from .median import geometric_median
from .sae import DictionaryConfig, SparseDictionary
from .train_config import TrainConfig


class Learner:
    """One dictionary being trained: its parameters (in normalized units), optimizer and counters.

    What `run_training` needs of a learner (this class, `CLTLearner`): `name`, `ema`, `initialized`,
    `init_rows()` / `initialize(batches)`, `train_step(batch, lr, sparsity_scale) -> rows`, `state()` /
    `restore(state)` and `signature()` (shapes a checkpoint must match).
    """

    def __init__(self, name: str, cfg: DictionaryConfig, tcfg: TrainConfig, device: str | torch.device | None = None):
        self.name, self.tcfg = name, tcfg
        self.sae = SparseDictionary(cfg, device=device)
        self.hook_in, self.hook_out = cfg.hook_name, cfg.hook_name_out or cfg.hook_name
        self.scale_in = self.scale_out = 1.0
        self.initialized = False
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=device)
        self.bt_threshold: float | None = None
        self.rows_all = 0  # rows of the current step's batch over all ranks (this rank's in one process)
        self.ema: dict[str, float] = {}
        sae = self.sae
        if sae.threshold is not None:
            sae.threshold.data.fill_(tcfg.jumprelu_init_threshold)
        offsets = [sae.b_enc] + ([sae.threshold] if cfg.arch == "jumprelu" else [])
        skips = [sae.W_skip] if sae.W_skip is not None else []
        weights = [p for p in sae.parameters()
                   if all(p is not q for q in offsets + skips) and p is not sae.threshold]
        self.opt = adam_for(weights, offsets, tcfg, skips)
        self.dead_tokens = default_dead_tokens(tcfg)
        self.aux_k = tcfg.aux_k or max(1, cfg.d_in // 2)
        self.select_dtype = choose_select_dtype(tcfg, cfg.arch, sae.device)

    def signature(self) -> dict[str, Any]:
        return {"d_in": self.sae.d_in, "d_out": self.sae.d_out}

    def init_rows(self) -> int:
        """Rows `initialize` wants before the first step: init_tokens for a least-squares skip, else 0 (the first
        batch initializes the rest)."""
        return skip_init_rows(self.sae.W_skip is not None, self.tcfg)

    def initialize(self, batches: list[Mapping[str, torch.Tensor]]) -> None:
        """Scales, b_dec and the skip's least-squares start from the first rows (`run_training` hands it
        `init_rows()` of them before the first step)."""
        pairs = [_pair(b, self) for b in batches]
        dev = dict(device=self.sae.device, dtype=self.sae.dtype)
        self._initialize(torch.cat([x for x, _ in pairs]).to(**dev), torch.cat([y for _, y in pairs]).to(**dev))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor, y: torch.Tensor) -> None:
        sae = self.sae
        if self.tcfg.normalize:
            self.scale_in = float(sae.d_in**0.5 / x.norm(dim=1).mean().clamp_min(1e-12))
            self.scale_out = float(sae.d_out**0.5 / y.norm(dim=1).mean().clamp_min(1e-12)) if sae.cfg.transcoder else self.scale_in
        y = y * self.scale_out
        sae.b_dec.copy_(y.mean(0) if sae.cfg.transcoder else geometric_median(y))
        if sae.W_skip is not None:
            start_skip(sae.W_skip, sae.b_dec, sae.W_enc, x * self.scale_in, y, self.tcfg)
        if sae.cfg.arch in ("relu", "jumprelu") and self.tcfg.init_l0:
            init_sparse_offsets(sae.cfg.arch, sae.pre_activation(x * self.scale_in), sae.b_enc, sae.threshold,
                                self.tcfg.init_l0)
        self.initialized = True

    def train_step(self, batch: Mapping[str, torch.Tensor], lr: float, sparsity_scale: float) -> int:
        """One step on this rank's part of the batch; returns the rows of the whole batch (all ranks)."""
        x, y = _pair(batch, self)
        probe = None
        if self.tcfg.response_coefficient > 0:
            if PROBE + self.hook_in not in batch:
                raise InputError(f"response_coefficient > 0 needs response probes in the batches "
                                 f"(batches.with_mlp_probes); this batch has none for {self.hook_in}")
            probe = (batch[PROBE + self.hook_in], batch[PROBE + self.hook_out])
        self.step(x, y, lr, sparsity_scale, probe)
        return self.rows_all

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, sparsity_scale: float,
             probe: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
        """One optimisation step on rows x -> y; `probe` (dx, dy): perturbations of x and the MLP's responses,
        which the transcoder's own response (its selected features held) is trained to match."""
        sae, cfg, tcfg = self.sae, self.sae.cfg, self.tcfg
        x, y = x.to(device=sae.device, dtype=sae.dtype), y.to(device=sae.device, dtype=sae.dtype)
        if not self.initialized:
            self._initialize(x, y)
        x, y = x * self.scale_in, y * self.scale_out
        for group in self.opt.param_groups:
            group["lr"] = lr * group["lr_scale"]
        b_dec_in = sae.b_dec if cfg.apply_b_dec_to_input else None
        enc = encode_for_training(cfg.arch, cfg.k, x, b_dec_in, sae.W_enc, sae.b_enc, sae.threshold, tcfg,
                                  self.select_dtype)
        recon = decode_for_training(enc, sae.W_dec) + sae.b_dec
        if sae.W_skip is not None:
            recon = recon + x @ sae.W_skip.T
        err = recon - y
        err2 = err.pow(2).sum(-1)
        mse = err2.mean()
        loss = reconstruction_loss(err2, y.pow(2).sum(-1), tcfg.loss) + sparsity_scale * enc.sparsity
        response = x.new_zeros(())
        if probe is not None:
            response = self._response_loss(enc, probe, x.shape[1])
            loss = loss + tcfg.response_coefficient * response * y.pow(2).sum(-1).mean().detach()

        dead = self.since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        aux = x.new_zeros(())
        if n_dead and tcfg.aux_coefficient > 0:
            aux = dead_latent_aux(x, b_dec_in, sae.W_enc, sae.b_enc, sae.W_dec, enc.pre, dead, self.aux_k, err)
            loss = loss + tcfg.aux_coefficient * aux

        rows = x.shape[0]
        rows_all = self.rows_all = int(dist.total(rows))
        self.opt.zero_grad(set_to_none=True)
        # each rank's loss is a mean over its rows: weighted by its share, the ranks' gradients sum to the whole
        # batch's (and in one process the weight is 1)
        (loss * (rows / rows_all)).backward()
        dist.sum_grads(optimized(self.opt))
        with torch.no_grad():
            project_decoder_grad(sae.W_dec)
            self.opt.step()
            renormalize_rows(sae.W_dec)
            if cfg.arch == "jumprelu":
                sae.threshold.clamp_(min=1e-6)
            self.since_fired += rows_all
            self.since_fired[fired_anywhere(enc.fired.to(torch.long), sae.d_sae)] = 0
            if cfg.arch == "batchtopk":
                self.bt_threshold = update_batchtopk_threshold(self.bt_threshold, enc, tcfg.batchtopk_threshold_rate)
            var = (y - y.mean(0)).pow(2).sum()
            stats = {"loss": float(loss), "mse": float(mse), "fvu": float(err2.sum() / var.clamp_min(1e-12)),
                     "l0": float(enc.l0), "dead": n_dead / sae.d_sae, "aux": float(aux)}
            if probe is not None:
                stats["response_fvu"] = float(response)
        update_ema(self.ema, mean_over_ranks(stats, rows, rows_all))
        return stats

    def _response_loss(self, enc: TrainEncoding, probe: tuple[torch.Tensor, torch.Tensor], d_in: int) -> torch.Tensor:
        """The transcoder's linear response to dx with this batch's selected features held (what an attribution
        graph uses) against the MLP's dy: the mean over rows of the squared error over |dy|^2."""
        sae = self.sae
        dx = probe[0].to(device=sae.device, dtype=sae.dtype).reshape(-1, d_in) * self.scale_in
        dy = probe[1].to(device=sae.device, dtype=sae.dtype).reshape(len(dx), -1) * self.scale_out
        if enc.idx is None:  # dense activations: the active ones pass dx's encoding on
            d_acts = dx @ sae.W_enc
        else:
            with torch.no_grad():
                d_vals = gathered_dot(enc.idx, dx, sae.W_enc.T)
            d_acts = SelectedEncode.apply(dx, None, sae.W_enc, torch.zeros_like(sae.b_enc), enc.idx, d_vals)
        response = decode_for_training(dataclasses.replace(enc, acts=d_acts * enc.active), sae.W_dec)
        if sae.W_skip is not None:
            response = response + dx @ sae.W_skip.T
        # each row's error relative to its own response: a few tokens with massive MLP outputs (and responses)
        # would otherwise be all the loss sees (floored at a tenth of the mean, as reconstruction_loss does)
        dy2 = dy.pow(2).sum(-1)
        return ((response - dy).pow(2).sum(-1) / dy2.clamp_min(0.1 * dy2.mean().clamp_min(1e-12))).mean()

    def export(self) -> SparseDictionary:
        """The dictionary as saved: batchtopk's threshold set, scaling folded, decoder rows unit-norm."""
        sae = copy.deepcopy(self.sae).to("cpu")
        with torch.no_grad():
            if sae.cfg.arch == "batchtopk":
                sae.threshold.fill_(self.bt_threshold if self.bt_threshold is not None else 0.0)
            sae.fold_activation_scale(self.scale_in, self.scale_out)
            sae.fold_decoder_norms()
        for p in sae.parameters():
            p.requires_grad_(False)
        return sae.eval()

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "config": self.sae.cfg.to_dict(), "params": self.sae.state_dict(),
                "optimizer": self.opt.state_dict(), "scale_in": self.scale_in, "scale_out": self.scale_out,
                "initialized": self.initialized, "since_fired": self.since_fired.clone(),
                "bt_threshold": self.bt_threshold, "ema": dict(self.ema)}

    def restore(self, st: Mapping[str, Any]) -> None:
        self.sae.load_state_dict(st["params"])
        self.opt.load_state_dict(st["optimizer"])
        self.scale_in, self.scale_out = float(st["scale_in"]), float(st["scale_out"])
        self.initialized = bool(st["initialized"])
        self.since_fired = st["since_fired"].to(self.sae.device).clone()
        self.bt_threshold = st["bt_threshold"]
        self.ema = dict(st["ema"])


def optimized(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters an optimizer updates: what the ranks keep identical (gradients summed, starts broadcast)."""
    return [p for g in opt.param_groups for p in g["params"]]


def _pair(batch: Mapping[str, torch.Tensor], learner: Learner) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = batch[learner.hook_in], batch[learner.hook_out]
    except KeyError as e:
        raise KeyError(f"the activation batch has no {e.args[0]!r} (it has {', '.join(batch)})") from None
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.shape[0] != y.shape[0]:
        raise InputError(f"input and output batches differ in length: {x.shape[0]} vs {y.shape[0]}")
    return x, y


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
        self.rows_all = 0  # as in Learner
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
        return self.rows_all

    def encode_all(self, xs: list[torch.Tensor]) -> tuple[list[TrainEncoding], torch.Tensor]:
        """Every source layer's training encoding of its normalized rows xs[i] [B, d], and their summed sparsity
        term."""
        clt, cfg = self.clt, self.clt.cfg
        encs, sparsity = [], xs[0].new_zeros(())
        for i in range(len(cfg.layers)):
            thr = clt.threshold[i] if clt.threshold is not None else None
            enc = encode_for_training(cfg.arch, cfg.k, xs[i], None, clt.W_enc[i], clt.b_enc[i], thr, self.tcfg,
                                      self.select_dtype)
            encs.append(enc)
            sparsity = sparsity + enc.sparsity
        return encs, sparsity

    def loss(self, xs: list[torch.Tensor], ys: list[torch.Tensor], sparsity_scale: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[TrainEncoding], torch.Tensor, int]:
        """The step's loss on normalized rows xs, ys (one [B, d] per layer), with autograd reaching the parameters:
        (loss, mse, per-token squared errors [B, n], targets [B, n, d_out], encodings, AuxK term, dead latents)."""
        clt, cfg, tcfg = self.clt, self.clt.cfg, self.tcfg
        n = len(cfg.layers)
        encs, sparsity = self.encode_all(xs)
        # every source layer decoded into its slice of one [B, n, d_out] output (`cross_layer_decode`)
        y_hat = cross_layer_decode([e.acts for e in encs], [e.idx for e in encs], list(clt.W_dec),
                                   cfg.d_out) + clt.b_dec  # type: ignore[arg-type]
        if clt.W_skip is not None:
            y_hat = y_hat + torch.stack([x @ W.T for x, W in zip(xs, clt.W_skip)], dim=1)
        Y = torch.stack(ys, dim=1)
        err = y_hat - Y
        err2 = err.pow(2).sum(-1)  # [B, n]
        y2 = Y.pow(2).sum(-1)
        loss = sum(reconstruction_loss(err2[:, i], y2[:, i], tcfg.loss) for i in range(n))
        mse = err2.mean(0).sum()
        loss = loss + sparsity_scale * sparsity

        aux_total, n_dead = xs[0].new_zeros(()), 0
        if tcfg.aux_coefficient > 0:
            for i in range(n):
                dead = self.since_fired[i] >= self.dead_tokens
                nd = int(dead.sum())
                n_dead += nd
                if nd:
                    err_after = err[:, i:].reshape(len(err), -1)  # what layer i's features could still explain
                    aux_total = aux_total + dead_latent_aux(xs[i], None, clt.W_enc[i], clt.b_enc[i], clt.W_dec[i],
                                                            encs[i].pre, dead, self.aux_k, err_after, blocks=n - i)
            loss = loss + tcfg.aux_coefficient * aux_total
        return loss, mse, err2, Y, encs, aux_total, n_dead  # type: ignore[return-value]

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
        loss, mse, err2, Y, encs, aux_total, n_dead = self.loss(xs, ys, sparsity_scale)

        rows_all = self.rows_all = int(dist.total(B))
        self.opt.zero_grad(set_to_none=True)
        (loss * (B / rows_all)).backward()  # type: ignore[operator]  # weighted as in Learner.step
        dist.sum_grads(optimized(self.opt))
        with torch.no_grad():
            for W in clt.W_dec:
                project_decoder_grad(W)
            self.opt.step()
            for W in clt.W_dec:
                renormalize_rows(W)
            if cfg.arch == "jumprelu":
                for t in clt.threshold:  # type: ignore[union-attr]
                    t.clamp_(min=1e-6)
            self.since_fired += rows_all
            for i, enc in enumerate(encs):
                self.since_fired[i, fired_anywhere(enc.fired.to(torch.long), cfg.d_sae)] = 0
                if cfg.arch == "batchtopk":
                    self.bt_threshold[i] = update_batchtopk_threshold(self.bt_threshold[i], enc,
                                                                      tcfg.batchtopk_threshold_rate)
            var = float((Y - Y.mean(0)).pow(2).sum())
            l0s = [float(e.l0) for e in encs]
            stats = {"loss": float(loss), "mse": float(mse),
                     "fvu": float(err2.sum()) / max(var, 1e-12),
                     "l0": sum(l0s) / n, "l0_total": sum(l0s), "dead": n_dead / (n * cfg.d_sae),
                     "aux": float(aux_total)}
        update_ema(self.ema, mean_over_ranks(stats, B, rows_all))
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
