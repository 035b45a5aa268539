"""The maths of a training step, one implementation of each piece, shared by `learner.Learner` (one dictionary) and
`learner.CLTLearner` (a cross-layer transcoder, one encoder per layer):

* Loss: squared error summed over dimensions (or, with loss="normalized_mse", each token's error relative to its
  target's norm, `reconstruction_loss`), plus the architecture's sparsity term: relu: l1_coefficient * sum(f)
  (decoder rows are unit, so this is Anthropic's norm-weighted L1); jumprelu: l0_coefficient * L0 through a
  straight-through estimator; topk / batchtopk: none (k is the budget).
* Selection (`select_latents`): topk keeps each token's k largest pre-activations; batchtopk the k * batch largest
  over the whole batch, and a running average of the smallest kept one (`update_batchtopk_threshold`) becomes the
  threshold used at inference.
* Sparse encode / decode of the selected latents (`encode_for_training`, `decode_for_training`).
* Dead latents (no activation in the last `dead_tokens` tokens) get an AuxK loss (Gao et al. 2024,
  `dead_latent_aux`): the top aux_k dead latents' pre-activations (not ReLU'd, so negative ones get a gradient too)
  reconstruct the remaining error, weighted by aux_coefficient.
* Decoder rows stay unit-norm: the gradient's component along each row is removed (`project_decoder_grad`), rows
  renormalized each step (`renormalize_rows`).
* Starts: a skip's least-squares affine map (`fit_affine`, `start_skip`); ReLU biases / JumpReLU thresholds at the
  quantile that makes latents fire on about init_l0 per token (`init_sparse_offsets`).
* Adam (`adam_for`); learning rate schedule `lr_factor`: linear warm-up over `warmup` of the tokens, constant,
  linear decay to 0 over the last `decay`. Encoder offsets (b_enc, thresholds) use `offset_lr_scale` times the
  rate: they live in pre-activation units, O(1), where weights are O(1/sqrt(d)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from .. import distributed as dist
from ..device import bf16_matmul_is_fast
from .autograd import JumpReLU, SelectedEncode, Step, gathered_dot, sparse_decode
from .train_config import TrainConfig


def lr_factor(progress: float, warmup: float, decay: float) -> float:
    """Multiplier on the base rate at `progress` (fraction of tokens done): warm-up, plateau, linear decay to 0."""
    f = min(1.0, progress / warmup) if warmup > 0 else 1.0
    if decay > 0 and progress > 1 - decay:
        f *= max(0.0, (1 - progress) / decay)
    return max(f, 1e-3 if progress < 1 else 0.0)


def select_latents(pre: torch.Tensor, arch: str, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """topk / batchtopk training selection on pre-activations [B, d_sae]:
    (indices [B, kk], pre-activation values there, mask of kept entries or None when all are kept)."""
    if arch == "topk":
        vals, idx = pre.topk(k, dim=-1, sorted=False)
        return idx, vals, None
    # batchtopk: candidates = each row's top 4k (exact unless one token holds more than 4k of the batch's top)
    cand_v, cand_i = pre.topk(min(pre.shape[1], 4 * k), dim=-1, sorted=False)
    flat = cand_v.reshape(-1)
    n_keep = min(k * pre.shape[0], flat.numel())
    if dist.active():  # the batch is spread over the ranks: its cut is the k * (global batch)-th largest of all
        n_keep = min(k * int(dist.total(pre.shape[0])), int(dist.total(flat.numel())))
        flat = dist.gather_rows(flat.topk(min(n_keep, flat.numel()), sorted=False).values)
    cut = flat.topk(n_keep, sorted=False).values.min()
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
                    err: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the top aux_k dead latents' pre-activations reconstruct the error err [B, n].
    blocks: W_dec's rows hold that many outputs side by side (a cross-layer transcoder's layer; see sparse_decode)."""
    with torch.no_grad():  # the dead latents' top pre-activations (their values need not be exact)
        dead_idx = dead.nonzero().squeeze(1)
        aux_v, local = pre[:, dead_idx].topk(min(aux_k, len(dead_idx)), dim=-1, sorted=False)
        aux_v, aux_i = aux_v.to(x.dtype), dead_idx[local]
    # no ReLU here (as in Gao et al.): a dead latent's pre-activation is usually negative, and the gradient
    # must reach it to bring it back
    aux_acts = SelectedEncode.apply(x, b_dec_in, W_enc, b_enc, aux_i, aux_v)
    return (sparse_decode(aux_acts, aux_i, W_dec, blocks) + err.detach()).pow(2).sum(-1).mean()


def reconstruction_loss(err2: torch.Tensor, y2: torch.Tensor, kind: str) -> torch.Tensor:
    """The reconstruction term from per-token squared errors err2 [B] and squared target norms y2 [B].

    "mse": mean of err2 (Gemma's heavy-tailed MLP outputs let the top 1% of tokens dominate it).
    "normalized_mse": each token's error relative to its own target norm (floored at a tenth of the batch mean, so
    near-zero targets do not take over), rescaled by the batch mean so the loss keeps mse's units and learning rate.
    """
    if kind == "mse":
        return err2.mean()
    mean_y2 = (y2.mean() if not dist.active() else dist.all_sum(y2.sum().detach()) / dist.total(len(y2))).clamp_min(1e-12)
    return (err2 / y2.clamp_min(0.1 * mean_y2)).mean() * mean_y2


@torch.no_grad()
def project_decoder_grad(W: torch.Tensor) -> None:
    """Remove the gradient's component along each (unit) decoder row, so a step moves rows along the sphere."""
    if W.grad is not None:
        # row dot products as a batched matmul and the update in place: one pass over the gradient and the rows
        # instead of four temporaries (a CLT's decoder holds over 100M weights)
        dots = torch.bmm(W.grad.unsqueeze(1), W.unsqueeze(2)).view(-1, 1)
        W.grad.addcmul_(dots, W, value=-1.0)


@torch.no_grad()
def renormalize_rows(W: torch.Tensor) -> None:
    W /= W.norm(dim=1, keepdim=True).clamp_min(1e-12)


def update_batchtopk_threshold(current: float | None, enc: TrainEncoding, rate: float) -> float | None:
    """Running average of the smallest kept activation: the threshold a batchtopk dictionary uses at inference."""
    kept = enc.acts.detach()[enc.active]
    low_t = kept.min().reshape(1) if len(kept) else enc.acts.new_full((1,), float("inf"))
    low = float(dist.all_min(low_t)[0])  # over the whole batch, every rank's part of it
    if low == float("inf"):
        return current
    return low if current is None else (1 - rate) * current + rate * low


def fired_anywhere(fired: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The ids of the latents that fired on some rank's part of the batch (`fired`: this rank's ids)."""
    if not dist.active():
        return fired
    mask = torch.zeros(d_sae, dtype=torch.int32, device=fired.device)
    mask[fired] = 1
    return dist.all_sum(mask).nonzero().squeeze(1)


def mean_over_ranks(stats: dict[str, float], rows: int, rows_all: int) -> dict[str, float]:
    """A step's metrics averaged over the ranks, weighted by their rows (one collective; as is in one process)."""
    if not dist.active():
        return stats
    v = dist.all_sum(torch.tensor([stats[k] * rows for k in stats], dtype=torch.float64,
                                  device=dist.comm_device())) / rows_all
    return dict(zip(stats, v.tolist()))


def adam_for(weights: list[torch.Tensor], offsets: list[torch.Tensor], tcfg: "TrainConfig",
             skips: list[torch.Tensor] = ()) -> torch.optim.Adam:
    """Adam with encoder offsets (b_enc, JumpReLU thresholds) at offset_lr_scale times the rate and skip
    connections at skip_lr_scale times it."""
    groups = [{"params": weights, "lr_scale": 1.0}, {"params": offsets, "lr_scale": tcfg.offset_lr_scale}]
    if skips:
        groups.append({"params": list(skips), "lr_scale": tcfg.skip_lr_scale})
        if tcfg.skip_lr_scale == 0:
            # a skip kept at its least-squares start needs no gradient: its [d_out, d_in] gradient would cost as
            # much as the decoder's every step, and Adam passes over parameters without one
            for w in skips:
                w.requires_grad_(False)
    # fused: one kernel per step instead of a dozen per parameter (4x faster on 2 CPU cores), same update rule
    fused = all(w.is_cpu or w.is_cuda for g in groups for w in g["params"])
    return torch.optim.Adam(groups, lr=tcfg.lr, betas=tcfg.adam_betas, fused=fused or None)


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
