"""Training sparse dictionaries (SAEs and transcoders) on a stream of activation batches.

The recipe, per dictionary:

* Inputs (and a transcoder's targets) are scaled by a constant so their mean norm is sqrt(d); the constant is
  folded into the weights at save time, so a saved dictionary reads raw activations.
* Init, from the first batch (a skip transcoder's from the first `init_tokens` rows): decoder rows random unit
  vectors, encoder = decoder transpose (shapes permitting), b_dec = the geometric median (an SAE's input) or the
  mean (a transcoder's output). A skip transcoder's W_skip and b_dec start as the least-squares affine map from
  input to output (`fit_affine`) and by default stay there (skip_lr_scale 0), and its encoder starts at
  skip_encoder_scale times the decoder's transpose: the features learn what the MLP does beyond its best linear
  map, without first adding noise to it.
* Loss: squared error summed over dimensions, plus the architecture's sparsity term:
  relu: l1_coefficient * sum(f) (decoder rows are unit, so this is Anthropic's norm-weighted L1);
  jumprelu: l0_coefficient * L0 through a straight-through estimator; topk / batchtopk: none (k is the budget).
  Sparsity coefficients ramp up linearly over the first `sparsity_warmup` fraction of training.
* Dead latents (no activation in the last `dead_tokens` tokens) get an AuxK loss (Gao et al. 2024): the top
  aux_k dead latents' pre-activations (not ReLU'd, so negative ones get a gradient too) reconstruct the
  remaining error, weighted by aux_coefficient. Used for every architecture.
* Decoder rows stay unit-norm: the gradient's component along each row is removed, rows renormalized each step.
* Adam; learning rate: linear warm-up over `warmup` of the tokens, constant, linear decay to 0 over the last
  `decay`. Encoder offsets (b_enc, thresholds) use `offset_lr_scale` times the rate: they live in
  pre-activation units, O(1), where weights are O(1/sqrt(d)).
* BatchTopK: the top k * batch activations over the whole batch; a running average of the smallest kept one
  becomes the threshold used at inference.
* Options for transcoders of heavy-tailed MLP outputs: loss="normalized_mse" weighs each token's error by its own
  target norm (see `reconstruction_loss`); reuse=R serves every token's activations R times from an in-memory
  bfloat16 shuffle buffer (`reuse_batches`), so R times fewer forward passes feed the same number of steps.
* The step's pieces (selection, sparse encode / decode, AuxK, the loss, decoder-norm upkeep) are functions shared
  by `Learner` and the cross-layer transcoder's learner (`clt.CLTLearner`); `run_training` drives either.

Checkpoints (dictionaries, optimizer state, counters, RNG) are written atomically to <out>/checkpoints/ every
`checkpoint_every` steps (default: every ten minutes); the last two are kept. A run given `resume=True` continues
from the newest readable one. Ctrl-C finishes the current step and checkpoints it before stopping, so nothing is lost
(a second Ctrl-C stops at once, losing only the steps since the last checkpoint).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import re
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ..interrupt import deferred_interrupt
from ..io import atomic_save
from ..progress import OnProgress, ProgressBar
from ..device import bf16_matmul_is_fast
from .autograd import JumpReLU, SelectedEncode, Step, gathered_dot, sparse_decode
from .median import geometric_median
from .sae import ARCHITECTURES, DictionaryConfig, SparseDictionary
from ..engine.errors import InputError

# Measured on Gemma 3 270M blocks.6.hook_resid_post, width 8192 (see the notes in the report / README).
DEFAULT_LR = {"topk": 2e-3, "batchtopk": 2e-3, "relu": 1e-3, "jumprelu": 1e-3}
CHECKPOINT_FORMAT = 1
CHECKPOINT_SECONDS = 600  # default checkpoint interval: an interruption loses at most about this much training
Batches = Callable[[int], Iterable[Mapping[str, torch.Tensor]]]  # tokens already seen -> batches from there on


@dataclass
class TrainConfig:
    """How to train; everything a checkpoint must agree with to be resumed, plus knobs that may change."""

    arch: str = "topk"
    width: int = 8192
    k: int | None = None  # topk / batchtopk (default 32)
    tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float | None = None  # default: DEFAULT_LR[arch]
    warmup: float = 0.05  # fraction of tokens
    decay: float = 0.2  # fraction of tokens
    adam_betas: tuple[float, float] = (0.9, 0.999)
    offset_lr_scale: float = 10.0
    l1_coefficient: float = 0.5  # relu, in units of the normalized activations (mean norm sqrt(d))
    l0_coefficient: float = 0.05  # jumprelu, same units
    sparsity_warmup: float = 0.05
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.5  # used when init_l0 is 0
    init_l0: float = 64.0  # relu / jumprelu: initial biases / thresholds make latents fire on ~init_l0 per token
    batchtopk_threshold_rate: float = 0.01
    aux_coefficient: float = 1 / 32
    aux_k: int | None = None  # default d_in // 2
    dead_tokens: int | None = None  # default min(10M, max(tokens // 5, 10 batches))
    normalize: bool = True
    select_dtype: str = "auto"  # topk / batchtopk: dtype of the encoder pass that picks latents ("auto": bfloat16
    #                             where its matmuls are fast, else float32); chosen latents' values are float32
    skip: bool = False  # transcoders: linear skip connection
    loss: str = "mse"  # "mse", or "normalized_mse": each token's error relative to its target's norm (see
    #                    reconstruction_loss), so that heavy-tailed MLP outputs do not dominate
    reuse: int = 1  # serve each token's activations this many times (from an in-memory shuffle buffer): the forward
    #                 pass is the expensive part, so reuse > 1 trades fresh tokens for steps
    reuse_buffer_tokens: int = 65536  # rows held (as bfloat16) by that buffer
    init_tokens: int = 16384  # a skip transcoder's least-squares start (with its scales and b_dec) is fitted on this
    #                           many first rows, read before the first step and then trained on like any others
    skip_init: str = "least_squares"  # a skip's start: "least_squares" (fit_affine) or "zero" (the earlier recipe,
    #                                   kept for comparison: Adam from zero, which collapses all-layers replacement)
    skip_encoder_scale: float = 0.1  # a skip transcoder's encoder starts at this times the decoder's transpose: the
    #                                  untrained features then add little noise to the least-squares start
    skip_lr_scale: float = 0.0  # the skip's rate relative to lr; 0 keeps it at its least-squares start, which
    #                             holds up better when every layer is replaced at once (benchmarks/transcoders.py)
    checkpoint_every: int | None = None  # steps; default: every CHECKPOINT_SECONDS of training
    seed: int = 0

    # fields a resumed run must share with its checkpoint
    STRUCTURAL = ("arch", "width", "k", "normalize", "skip", "seed", "reuse", "reuse_buffer_tokens")

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise InputError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.k is None and self.arch in ("topk", "batchtopk"):
            self.k = 32
        if self.k is not None and self.arch not in ("topk", "batchtopk"):
            raise InputError(f"k applies to topk and batchtopk, not {self.arch} (its sparsity comes from "
                             f"{'l1_coefficient' if self.arch == 'relu' else 'l0_coefficient'})")
        _positive_int("width", self.width)
        _positive_int("tokens", self.tokens)
        _positive_int("batch_size", self.batch_size)
        if self.k is not None:
            _positive_int("k", self.k)
            if self.k > self.width:
                raise InputError(f"k={self.k} must not exceed the width {self.width}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.arch]
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("warmup", "decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"{name} is a fraction of the tokens in [0, 1), got {getattr(self, name)!r}")
        if self.checkpoint_every is not None:
            _positive_int("checkpoint_every", self.checkpoint_every)
        if self.select_dtype not in ("auto", "float32", "bfloat16"):
            raise InputError(f"select_dtype must be auto, float32 or bfloat16, got {self.select_dtype!r}")
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        _positive_int("reuse", self.reuse)
        _positive_int("reuse_buffer_tokens", self.reuse_buffer_tokens)
        _positive_int("init_tokens", self.init_tokens)
        if self.skip_init not in ("least_squares", "zero"):
            raise InputError(f"skip_init must be least_squares or zero, got {self.skip_init!r}")
        for name in ("skip_lr_scale", "skip_encoder_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InputError(f"{name} must be a number >= 0, got {v!r}")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InputError(f"{name} must be a positive integer, got {v!r}")


def lr_factor(progress: float, warmup: float, decay: float) -> float:
    """Multiplier on the base rate at `progress` (fraction of tokens done): warm-up, plateau, linear decay to 0."""
    f = min(1.0, progress / warmup) if warmup > 0 else 1.0
    if decay > 0 and progress > 1 - decay:
        f *= max(0.0, (1 - progress) / decay)
    return max(f, 1e-3 if progress < 1 else 0.0)


# ----------------------------------------------------------------------------------------------- shared step pieces
# One implementation of each piece of a training step, used by `Learner` (one dictionary) and by the cross-layer
# transcoder's learner (`clt.CLTLearner`, one encoder per layer): selection, sparse encode/decode, sparsity terms,
# AuxK for dead latents, the loss, decoder-norm upkeep.
def select_latents(pre: torch.Tensor, arch: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """topk / batchtopk training selection on pre-activations [B, d_sae]:
    (indices [B, kk], pre-activation values there, mask of kept entries or None when all are kept)."""
    if arch == "topk":
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return idx, vals, None
    # batchtopk: candidates = each row's top 4k (exact unless one token holds more than 4k of the batch's top)
    cand_v, cand_i = pre.topk(min(pre.shape[1], 4 * k), dim=-1, sorted=False)
    n_keep = min(k * pre.shape[0], cand_v.numel())
    cut = cand_v.reshape(-1).topk(n_keep, sorted=False).values.min()
    keep = (cand_v >= cut) & (cand_v > 0)
    width = max(1, int(keep.sum(1).max()))
    vals, pos = cand_v.masked_fill(~keep, float("-inf")).topk(width, dim=-1)
    mask = torch.isfinite(vals)
    return cand_i.gather(1, pos), vals.masked_fill(~mask, 0.0), mask


@dataclass
class TrainEncoding:
    """One encoder's features for a training batch of B tokens."""

    acts: torch.Tensor  # [B, kk] values of the selected latents (topk / batchtopk), or [B, d_sae] dense
    idx: torch.Tensor | None  # [B, kk] their latent ids; None when acts is dense
    pre: torch.Tensor  # [B, d_sae] pre-activations, detached (AuxK reads the dead latents' among them)
    active: torch.Tensor  # bool, acts.shape
    l0: torch.Tensor  # mean active latents per token
    fired: torch.Tensor  # ids of the latents that fired in this batch
    sparsity: torch.Tensor  # the architecture's penalty (0 for topk / batchtopk)


def encode_for_training(arch: str, k: int | None, x: torch.Tensor, b_dec_in: torch.Tensor | None,
                        W_enc: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor | None, tcfg: "TrainConfig",
                        select_dtype: torch.dtype | None) -> TrainEncoding:
    """Encode x [B, d_in] (normalized units) with autograd reaching only what the step needs: for topk / batchtopk
    a dense no-grad pass picks the latents and `SelectedEncode` gives the chosen ones their gradient."""
    sparsity = x.new_zeros(())
    if arch in ("topk", "batchtopk"):
        with torch.no_grad():
            x_in = x - b_dec_in if b_dec_in is not None else x
            if select_dtype is None:
                pre = x_in @ W_enc + b_enc
                idx, vals, mask = select_latents(pre, arch, k)  # type: ignore[arg-type]
            else:  # choose in low precision, then compute the chosen values exactly
                pre = torch.addmm(b_enc.to(select_dtype), x_in.to(select_dtype), W_enc.to(select_dtype))
                idx, _, mask = select_latents(pre, arch, k)  # type: ignore[arg-type]
                vals = gathered_dot(idx, x_in, W_enc.T) + b_enc[idx]
        acts = SelectedEncode.apply(x, b_dec_in, W_enc, b_enc, idx, vals).relu()
        if mask is not None:
            acts = acts * mask
        active = acts.detach() > 0
        return TrainEncoding(acts, idx, pre, active, active.sum(1).float().mean(), idx[active], sparsity)
    pre_g = ((x - b_dec_in) if b_dec_in is not None else x) @ W_enc + b_enc
    if arch == "relu":
        f = pre_g.relu()
        sparsity = tcfg.l1_coefficient * f.sum(-1).mean()
    else:
        f = JumpReLU.apply(pre_g, threshold, tcfg.jumprelu_bandwidth)
        sparsity = tcfg.l0_coefficient * Step.apply(pre_g, threshold, tcfg.jumprelu_bandwidth).sum(-1).mean()
    active = f.detach() > 0
    return TrainEncoding(f, None, pre_g.detach(), active, active.sum(1).float().mean(),
                         active.any(0).nonzero().squeeze(1), sparsity)


def decode_for_training(enc: TrainEncoding, W_dec: torch.Tensor) -> torch.Tensor:
    """enc's features times the decoder rows W_dec [d_sae, n] -> [B, n] (a sparse decode for selected latents)."""
    return sparse_decode(enc.acts, enc.idx, W_dec) if enc.idx is not None else enc.acts @ W_dec


def dead_latent_aux(x: torch.Tensor, b_dec_in: torch.Tensor | None, W_enc: torch.Tensor, b_enc: torch.Tensor,
                    W_dec: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, aux_k: int,
                    err: torch.Tensor) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the top aux_k dead latents' pre-activations reconstruct the error err [B, n]."""
    with torch.no_grad():  # the dead latents' top pre-activations (their values need not be exact)
        dead_idx = dead.nonzero().squeeze(1)
        aux_v, local = pre[:, dead_idx].topk(min(aux_k, len(dead_idx)), dim=-1, sorted=False)
        aux_v, aux_i = aux_v.to(x.dtype), dead_idx[local]
    # no ReLU here (as in Gao et al.): a dead latent's pre-activation is usually negative, and the gradient
    # must reach it to bring it back
    aux_acts = SelectedEncode.apply(x, b_dec_in, W_enc, b_enc, aux_i, aux_v)
    return (sparse_decode(aux_acts, aux_i, W_dec) + err.detach()).pow(2).sum(-1).mean()


LOSSES = ("mse", "normalized_mse")


def reconstruction_loss(err2: torch.Tensor, y2: torch.Tensor, kind: str) -> torch.Tensor:
    """The reconstruction term from per-token squared errors err2 [B] and squared target norms y2 [B].

    "mse": mean of err2 (Gemma's heavy-tailed MLP outputs let the top 1% of tokens dominate it).
    "normalized_mse": each token's error relative to its own target norm (floored at a tenth of the batch mean, so
    near-zero targets do not take over), rescaled by the batch mean so the loss keeps mse's units and learning rate.
    """
    if kind == "mse":
        return err2.mean()
    mean_y2 = y2.mean().clamp_min(1e-12)
    return (err2 / y2.clamp_min(0.1 * mean_y2)).mean() * mean_y2


@torch.no_grad()
def project_decoder_grad(W: torch.Tensor) -> None:
    """Remove the gradient's component along each (unit) decoder row, so a step moves rows along the sphere."""
    if W.grad is not None:
        W.grad -= (W.grad * W).sum(1, keepdim=True) * W


@torch.no_grad()
def renormalize_rows(W: torch.Tensor) -> None:
    W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def update_batchtopk_threshold(current: float | None, enc: TrainEncoding, rate: float) -> float | None:
    """Running average of the smallest kept activation: the threshold a batchtopk dictionary uses at inference."""
    if not enc.active.any():
        return current
    low = float(enc.acts.detach()[enc.active].min())
    return low if current is None else (1 - rate) * current + rate * low


def adam_for(weights: list[torch.Tensor], offsets: list[torch.Tensor], tcfg: "TrainConfig",
             skips: list[torch.Tensor] = ()) -> torch.optim.Adam:
    """Adam with encoder offsets (b_enc, JumpReLU thresholds) at offset_lr_scale times the rate and skip
    connections at skip_lr_scale times it."""
    groups = [{"params": weights, "lr_scale": 1.0}, {"params": offsets, "lr_scale": tcfg.offset_lr_scale}]
    if skips:
        groups.append({"params": list(skips), "lr_scale": tcfg.skip_lr_scale})
    return torch.optim.Adam(groups, lr=tcfg.lr, betas=tcfg.adam_betas)


@torch.no_grad()
def fit_affine(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """The least-squares affine map y ~ x @ W.T + b over rows x [n, d_in], y [n, d_out]: (W [d_out, d_in], b).

    A skip transcoder starts from it. Adam, started at zero, does not reach it in a few hundred steps; worse, it
    moves every direction of W at the same pace, so directions the data barely spans end up with large gains,
    and a replacement model that feeds such a layer slightly different inputs (its earlier layers replaced too)
    blows up. ridge (relative to the mean input variance) bounds the gain of those directions.
    """
    x64, y64 = x.double(), y.double()
    mx, my = x64.mean(0), y64.mean(0)
    xc = x64 - mx
    gram = xc.T @ xc
    gram.diagonal().add_(ridge * float(gram.diagonal().mean().clamp_min(1e-30)))
    W = torch.linalg.solve(gram, xc.T @ (y64 - my))  # [d_in, d_out]
    b = my - mx @ W
    return W.T.to(x.dtype).contiguous(), b.to(x.dtype)


def skip_init_rows(has_skip: bool, tcfg: "TrainConfig") -> int:
    """Rows a learner reads before its first step: init_tokens for a least-squares skip, else 0 (the first batch
    initializes everything else)."""
    return tcfg.init_tokens if has_skip and tcfg.skip_init == "least_squares" else 0


@torch.no_grad()
def start_skip(W_skip: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
               tcfg: "TrainConfig") -> None:
    """A skip transcoder's start, in place, from normalized rows x [n, d_in], y [n, d_out]: W_skip and b_dec at the
    least-squares affine map (unless skip_init is "zero"), the encoder scaled by skip_encoder_scale."""
    if tcfg.skip_init == "least_squares":
        W, b = fit_affine(x, y)
        W_skip.copy_(W)
        b_dec.copy_(b)
    W_enc.mul_(tcfg.skip_encoder_scale)


def default_dead_tokens(tcfg: "TrainConfig") -> int:
    return tcfg.dead_tokens or min(10_000_000, max(tcfg.tokens // 5, 10 * tcfg.batch_size))


def choose_select_dtype(tcfg: "TrainConfig", arch: str, device: torch.device) -> torch.dtype | None:
    low = tcfg.select_dtype == "bfloat16" or (tcfg.select_dtype == "auto" and bf16_matmul_is_fast(device.type))
    return torch.bfloat16 if low and arch in ("topk", "batchtopk") else None


def update_ema(ema: dict[str, float], stats: Mapping[str, float]) -> None:
    for key, v in stats.items():
        ema[key] = v if key not in ema else 0.9 * ema[key] + 0.1 * v


# ----------------------------------------------------------------------------------------------- one dictionary
class Learner:
    """One dictionary being trained: its parameters (in normalized units), optimizer and counters.

    What `run_training` needs of a learner (this class, `clt.CLTLearner`): `name`, `ema`, `initialized`,
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
        x, y = _pair(batch, self)
        self.step(x, y, lr, sparsity_scale)
        return x.shape[0]

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, sparsity_scale: float) -> dict[str, float]:
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

        dead = self.since_fired >= self.dead_tokens
        n_dead = int(dead.sum())
        aux = x.new_zeros(())
        if n_dead and tcfg.aux_coefficient > 0:
            aux = dead_latent_aux(x, b_dec_in, sae.W_enc, sae.b_enc, sae.W_dec, enc.pre, dead, self.aux_k, err)
            loss = loss + tcfg.aux_coefficient * aux

        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            project_decoder_grad(sae.W_dec)
            self.opt.step()
            renormalize_rows(sae.W_dec)
            if cfg.arch == "jumprelu":
                sae.threshold.clamp_(min=1e-6)
            self.since_fired += x.shape[0]
            self.since_fired[enc.fired.to(torch.long)] = 0
            if cfg.arch == "batchtopk":
                self.bt_threshold = update_batchtopk_threshold(self.bt_threshold, enc, tcfg.batchtopk_threshold_rate)
            var = (y - y.mean(0)).pow(2).sum()
            stats = {"loss": float(loss), "mse": float(mse), "fvu": float(err2.sum() / var.clamp_min(1e-12)),
                     "l0": float(enc.l0), "dead": n_dead / sae.d_sae, "aux": float(aux)}
        update_ema(self.ema, stats)
        return stats

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


@torch.no_grad()
def init_sparse_offsets(arch: str, pre: torch.Tensor, b_enc: torch.Tensor, threshold: torch.Tensor | None,
                        init_l0: float) -> None:
    """Start each latent firing on about init_l0 / d_sae of the tokens: a ReLU's bias (or a JumpReLU's threshold)
    at that quantile of its first-batch pre-activations [B, d_sae]. Otherwise most latents start silent (JumpReLU)
    or all start on (ReLU), and a short run spends its budget getting out of that."""
    d_sae = pre.shape[1]
    q = min(max(1.0 - init_l0 / d_sae, 0.0), 1.0)
    cut = pre.float().quantile(q, dim=0) if pre.shape[0] * pre.shape[1] < 2**24 else \
        pre.kthvalue(max(1, min(pre.shape[0], round(q * pre.shape[0]))), dim=0).values
    if arch == "relu":
        b_enc.sub_(cut)
    else:
        threshold.copy_(cut.clamp_min(1e-3))  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------- checkpoints
_CKPT_RE = re.compile(r"^step-(\d{8})\.pt$")


def _checkpoints(ckdir: Path) -> list[Path]:
    if not ckdir.is_dir():
        return []
    found = [p for p in ckdir.iterdir() if _CKPT_RE.match(p.name)]
    return sorted(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1)), reverse=True)  # type: ignore[union-attr]


def save_checkpoint(ckdir: Path, state: dict[str, Any], keep: int = 2) -> Path:
    ckdir.mkdir(parents=True, exist_ok=True)
    path = ckdir / f"step-{state['step']:08d}.pt"
    atomic_save(path, lambda tmp: torch.save(state, tmp))
    for old in _checkpoints(ckdir)[keep:]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(ckdir: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest checkpoint that reads back; a damaged newest one is reported and skipped."""
    for path in _checkpoints(ckdir):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("format") != CHECKPOINT_FORMAT:
                raise InputError(f"unknown checkpoint format {state.get('format')!r}")
            return state, path
        except Exception as e:  # a truncated or foreign file: fall back to the previous checkpoint
            warnings.warn(f"{path}: unreadable checkpoint ({e}); trying an older one", stacklevel=2)
    return None


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class RunResult:
    learners: list[Learner]
    steps: int
    tokens: int
    seconds: float
    resumed_from: int | None  # step


def run_training(learners: list[Learner], batches: Batches, tcfg: TrainConfig, out: Path | None,
                 resume: bool = False, progress: bool = True, desc: str = "training",
                 stop_after_steps: int | None = None, on_progress: OnProgress | None = None) -> RunResult:
    """Train `learners` together on one stream: `batches(tokens_seen)` yields {hook: [n, d]} with rows aligned.

    Checkpoints go to <out>/checkpoints (none when out is None). `stop_after_steps` ends the run early
    (as an interruption would), for tests and benchmarks. With tcfg.reuse > 1 the stream is served through
    `reuse_batches` (each row seen `reuse` times; tcfg.tokens counts rows trained on, repeats included).
    on_progress: called with a `ProgressEvent` (stage `desc`, tokens trained on) after every step.
    """
    if tcfg.reuse > 1:
        # a short run needs no more fresh rows than tokens / reuse: a bigger buffer would only cost forward passes
        buffer_tokens = min(tcfg.reuse_buffer_tokens, -(-tcfg.tokens // tcfg.reuse))
        batches = reuse_batches(batches, tcfg.reuse, buffer_tokens, tcfg.batch_size, tcfg.seed)

    ckdir = out / "checkpoints" if out is not None else None
    step, tokens_seen, resumed_from = 0, 0, None
    if resume and ckdir is not None:
        found = load_latest_checkpoint(ckdir)
        if found is not None:
            state, path = found
            _check_resumable(state, tcfg, learners, path)
            by_name = {st["name"]: st for st in state["learners"]}
            for lr_ in learners:
                lr_.restore(by_name[lr_.name])
            step, tokens_seen, resumed_from = int(state["step"]), int(state["tokens_seen"]), int(state["step"])
            torch.set_rng_state(state["rng"])
            if progress:
                print(f"resuming from {path.name}: step {step}, {tokens_seen:,} of {tcfg.tokens:,} tokens",
                      file=sys.stderr)

    def checkpoint() -> None:
        if ckdir is not None:
            save_checkpoint(ckdir, {"format": CHECKPOINT_FORMAT, "step": step, "tokens_seen": tokens_seen,
                                    "train_config": tcfg.to_dict(), "rng": torch.get_rng_state(),
                                    "learners": [lr_.state() for lr_ in learners]})

    t0, steps_run = time.perf_counter(), 0
    last_checkpoint = t0
    bar = ProgressBar(desc, tcfg.tokens, initial=min(tokens_seen, tcfg.tokens), unit="tok", unit_scale=True,
                      show=progress, on_progress=on_progress, smoothing=0.05)
    try:
        with deferred_interrupt() as stop:
            it = iter(batches(tokens_seen))
            wanted = [lr_ for lr_ in learners if not lr_.initialized and lr_.init_rows()]
            if wanted:  # a fresh run whose skips start at least squares: fit them on the first rows
                first = _first_rows(it, min(max(lr_.init_rows() for lr_ in wanted), tcfg.tokens))
                for lr_ in wanted:
                    lr_.initialize(first)
                it = itertools.chain(first, it)
            while tokens_seen < tcfg.tokens:
                if stop_after_steps is not None and steps_run >= stop_after_steps:
                    break
                try:
                    batch = next(it)
                except StopIteration:
                    warnings.warn(f"the activation stream ended after {tokens_seen:,} of {tcfg.tokens:,} tokens",
                                  stacklevel=2)
                    break
                left = tcfg.tokens - tokens_seen
                if any(len(v) > left for v in batch.values()):  # the last batch stops at the token budget
                    batch = {h: v[:left] for h, v in batch.items()}
                frac = tokens_seen / tcfg.tokens
                lr = tcfg.lr * lr_factor(frac, tcfg.warmup, tcfg.decay)  # type: ignore[operator]
                sparsity_scale = min(1.0, frac / tcfg.sparsity_warmup) if tcfg.sparsity_warmup > 0 else 1.0
                n = 0
                for learner in learners:
                    n = learner.train_step(batch, lr, sparsity_scale)
                step, tokens_seen, steps_run = step + 1, tokens_seen + n, steps_run + 1
                bar.update(n)
                if progress:
                    bar.set_postfix(_postfix(learners), refresh=False)
                due = (step % tcfg.checkpoint_every == 0 if tcfg.checkpoint_every
                       else time.perf_counter() - last_checkpoint >= CHECKPOINT_SECONDS)
                if due and tokens_seen < tcfg.tokens:
                    checkpoint()
                    last_checkpoint = time.perf_counter()
                if stop.requested and tokens_seen < tcfg.tokens:  # Ctrl-C: save this step, then stop
                    checkpoint()
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        bar.close()
        found = _checkpoints(ckdir) if ckdir is not None else []
        if found:
            print(f"\ninterrupted at step {step}; the last checkpoint is {found[0].name}: run again with resume=True "
                  f"(--resume) to continue from it", file=sys.stderr)
        raise
    finally:
        bar.close()
    return RunResult(learners, step, tokens_seen, time.perf_counter() - t0, resumed_from)


def _first_rows(it: Iterator[Mapping[str, torch.Tensor]], rows: int) -> list[Mapping[str, torch.Tensor]]:
    """The stream's first batches, at least `rows` rows (fewer if it ends), to be chained back in front."""
    first: list[Mapping[str, torch.Tensor]] = []
    n = 0
    while n < rows:
        batch = next(it, None)
        if batch is None:
            break
        first.append(batch)
        n += len(next(iter(batch.values())))
    return first


def _pair(batch: Mapping[str, torch.Tensor], learner: Learner) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        x, y = batch[learner.hook_in], batch[learner.hook_out]
    except KeyError as e:
        raise KeyError(f"the activation batch has no {e.args[0]!r} (it has {', '.join(batch)})") from None
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if x.shape[0] != y.shape[0]:
        raise InputError(f"input and output batches differ in length: {x.shape[0]} vs {y.shape[0]}")
    return x, y


def _postfix(learners: list[Learner]) -> dict[str, str]:
    mean = lambda key: sum(lr_.ema.get(key, float("nan")) for lr_ in learners) / len(learners)  # noqa: E731
    return {"L0": f"{mean('l0'):.1f}", "EV": f"{1 - mean('fvu'):.3f}", "dead": f"{mean('dead'):.1%}"}


def _check_resumable(state: dict[str, Any], tcfg: TrainConfig, learners: list[Learner], path: Path) -> None:
    saved = state.get("train_config", {})
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # a field newer than the checkpoint
    diffs = [f"{k}: checkpoint {saved.get(k, defaults[k])!r}, now {getattr(tcfg, k)!r}"
             for k in TrainConfig.STRUCTURAL if saved.get(k, defaults[k]) != getattr(tcfg, k)]
    names = {st["name"] for st in state["learners"]}
    missing = [lr_.name for lr_ in learners if lr_.name not in names]
    if missing:
        diffs.append(f"dictionaries {missing} are not in the checkpoint (it has {sorted(names)})")
    for st in state["learners"]:
        mine = next((lr_ for lr_ in learners if lr_.name == st["name"]), None)
        if mine is None:
            continue
        sig = mine.signature()
        saved_sig = {k: st["config"].get(k) for k in sig}
        if saved_sig != sig:
            diffs.append(f"{st['name']}: checkpoint " + ", ".join(f"{k}={v}" for k, v in saved_sig.items())
                         + ", now " + ", ".join(f"{k}={v}" for k, v in sig.items()))
    if diffs:
        raise InputError(f"cannot resume from {path}: the run differs from it ({'; '.join(diffs)}); "
                         "use the same settings, or start over with overwrite=True (--overwrite)")


def clear_checkpoints(out: Path) -> None:
    ckdir = out / "checkpoints"
    if ckdir.is_dir():
        shutil.rmtree(ckdir)


def iterate_tensors(x: torch.Tensor, batch_size: int, hook: str, y: torch.Tensor | None = None,
                    hook_out: str | None = None, seed: int = 0, epochs: int | None = None) -> Batches:
    """Batches from activations already in memory (shuffled each epoch): for cached activations and tests."""

    def gen(tokens_seen: int) -> Iterator[dict[str, torch.Tensor]]:
        n = x.shape[0]
        g = torch.Generator().manual_seed(seed)
        epoch, skip = 0, tokens_seen
        while epochs is None or epoch < epochs:
            perm = torch.randperm(n, generator=g)
            for s in range(0, n - batch_size + 1, batch_size):
                if skip >= batch_size:
                    skip -= batch_size
                    continue
                rows = perm[s:s + batch_size]
                batch = {hook: x[rows]}
                if y is not None and hook_out is not None:
                    batch[hook_out] = y[rows]
                yield batch
            epoch += 1

    return gen


def reuse_batches(batches: Batches, reuse: int, buffer_tokens: int, batch_size: int, seed: int = 0) -> Batches:
    """Serve every row of `batches` `reuse` times: fill a buffer of buffer_tokens rows (held as bfloat16, half the
    memory of float32; the activations' own precision is about that anyway), then yield it `reuse` times in fresh
    random orders, then refill. Resumable at any row like the stream it wraps: buffer b holds the inner stream's rows
    [b * buffer_tokens, (b + 1) * buffer_tokens) and its orders depend only on (seed, b).
    """
    per_buffer = max(batch_size, buffer_tokens // batch_size * batch_size)  # whole batches per pass

    def gen(tokens_seen: int) -> Iterator[dict[str, torch.Tensor]]:
        b, skip = divmod(tokens_seen, per_buffer * reuse)
        inner = iter(batches(b * per_buffer))
        while True:
            parts, n = [], 0
            for part in inner:
                parts.append({h: v.to(torch.bfloat16) if v.is_floating_point() else v for h, v in part.items()})
                n += len(next(iter(part.values())))
                if n >= per_buffer:
                    break
            if n == 0:
                return
            buf = {h: torch.cat([p[h] for p in parts]) for h in parts[0]}
            extra = {h: v[per_buffer:] for h, v in buf.items()} if n > per_buffer else None
            buf = {h: v[:per_buffer] for h, v in buf.items()}
            rows = min(n, per_buffer)
            g = torch.Generator().manual_seed(seed * 1_000_003 + b)
            order = torch.cat([torch.randperm(rows, generator=g) for _ in range(reuse)])
            for s in range(0, len(order), batch_size):
                if skip >= batch_size:
                    skip -= batch_size
                    continue
                sel = order[s + skip:s + batch_size]
                skip = 0
                yield {h: v[sel].float() if v.is_floating_point() else v[sel] for h, v in buf.items()}
            if extra is not None:  # rows past the buffer (the inner batches need not divide it) start the next one
                inner = _chain_first(extra, inner)
            b += 1

    return gen


def _chain_first(first: dict[str, torch.Tensor], rest: Iterator[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
    yield {h: v.float() if v.is_floating_point() else v for h, v in first.items()}
    yield from rest
