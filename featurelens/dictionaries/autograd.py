"""Custom autograd functions for training sparse dictionaries fast on a CPU.

TopK-style dictionaries touch k of d_sae latents per token, but a plain PyTorch implementation pays for all of
them three more times: a dense decoder matmul, and dense gradient matmuls for the encoder and decoder. Here a
step costs one dense matmul (the encoder's forward pass, which must see every latent to pick the top k) and
sparse work proportional to batch * k * d for the rest:

* `SelectedEncode`: pre-activations of the selected latents, whose backward writes only their encoder columns.
* `SparseDecode`:   sum_j vals[b, j] * W_dec[idx[b, j]] (an embedding bag) with a sampled-matmul backward.
* `CrossLayerDecode`: the same for every source layer of a cross-layer transcoder at once, summed into one
  [B, n_layers, d_out] output, block by block (one source layer's decoder to one output layer) so that each block
  stays in cache.

The encoder's dense pass only *chooses* latents. Where bfloat16 matmuls are fast
(`featurelens.device.bf16_matmul_is_fast`) training makes that choice in bfloat16 (about 4x faster here) and then
computes the chosen latents' values exactly in float32 (`gathered_dot`), so only near-ties at the k-th place can
differ from an exact top-k.

Also the JumpReLU straight-through estimators (Rajamanoharan et al. 2024): the threshold gets a gradient
from a rectangle kernel of width `bandwidth` around it; the input does not.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F


def _scatter_matrix(idx: torch.Tensor, vals: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Sparse [n_latents, batch] matrix with vals[b, j] at (idx[b, j], b)."""
    batch, k = idx.shape
    rows = torch.arange(batch, device=idx.device).repeat_interleave(k)
    ind = torch.stack([idx.reshape(-1), rows])
    return torch.sparse_coo_tensor(ind, vals.reshape(-1), (n_latents, batch), check_invariants=False)


def gathered_dot(idx: torch.Tensor, a: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """out[b, j] = a[b] . W[idx[b, j]]  for a [B, d], W [n, d]: a sampled matmul, never the dense [B, n]."""
    batch, k = idx.shape
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
        crow = torch.arange(0, batch * k + 1, k, device=idx.device)
        with warnings.catch_warnings():  # "sparse CSR support is in beta": this use is covered by our tests
            warnings.simplefilter("ignore")
            pattern = torch.sparse_csr_tensor(crow, idx.reshape(-1), torch.zeros(batch * k, dtype=a.dtype),
                                              (batch, W.shape[0]), check_invariants=False)
        return torch.sparse.sampled_addmm(pattern, a, W.T, beta=0.0).values().view(batch, k)
    return torch.einsum("bkd,bd->bk", W[idx], a)


class SelectedEncode(torch.autograd.Function):
    """values[b, j] = ((x - b_dec) @ W_enc + b_enc)[b, idx[b, j]], computed by the caller without autograd.

    Passing `values` in saves recomputing them; the backward fills only the selected encoder columns
    (W_enc is stored latent-major, so its transpose is contiguous and each column a contiguous row).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, b_dec: torch.Tensor | None, W_enc: torch.Tensor, b_enc: torch.Tensor,
                idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        x_in = x - b_dec if b_dec is not None else x
        ctx.save_for_backward(x_in, W_enc, idx)
        ctx.has_b_dec = b_dec is not None
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x_in, W_enc, idx = ctx.saved_tensors
        n = W_enc.shape[1]
        grad_b_enc = torch.zeros(n, dtype=grad.dtype, device=grad.device).index_add_(0, idx.reshape(-1), grad.reshape(-1))
        grad_W_enc = None
        if ctx.needs_input_grad[2]:
            grad_W_enc = torch.sparse.mm(_scatter_matrix(idx, grad, n), x_in).T  # strides match W_enc's
        grad_b_dec = -(W_enc @ grad_b_enc) if ctx.has_b_dec and ctx.needs_input_grad[1] else None
        return None, grad_b_dec, grad_W_enc, grad_b_enc, None, None


class SparseDecode(torch.autograd.Function):
    """out[b] = sum_j vals[b, j] * W_dec[idx[b, j]]; with blocks > 1, W_dec's rows are `blocks` outputs side by side
    (a cross-layer transcoder's source layer) and the decode runs block by block, as in `CrossLayerDecode`."""

    @staticmethod
    def forward(ctx: Any, vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, blocks: int) -> torch.Tensor:
        ctx.blocks = blocks
        if blocks == 1:
            ctx.save_for_backward(vals, idx, W_dec)
            return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")
        Wt = _target_major(W_dec, blocks)
        ctx.save_for_backward(vals, idx, Wt)
        out = vals.new_empty(len(idx), blocks, Wt.shape[2])
        for j in range(blocks):
            out[:, j] = F.embedding_bag(idx, Wt[j], per_sample_weights=vals, mode="sum")
        return out.view(len(idx), -1)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        vals, idx, W = ctx.saved_tensors
        need_vals, need_W = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        if ctx.blocks > 1:
            grad_t = grad_out.view(len(idx), ctx.blocks, -1).transpose(0, 1).contiguous()
            grad_vals, grad_W = _block_grads(vals, idx, W, grad_t, need_vals, need_W)
            return grad_vals, None, grad_W, None
        grad_out = grad_out.contiguous()
        grad_vals = gathered_dot(idx, grad_out, W) if need_vals else None
        grad_W = torch.sparse.mm(_scatter_matrix(idx, vals, W.shape[0]), grad_out) if need_W else None
        return grad_vals, None, grad_W, None


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, W_dec: torch.Tensor, blocks: int = 1) -> torch.Tensor:
    return SparseDecode.apply(vals, idx, W_dec, blocks)


def _target_major(W: torch.Tensor, blocks: int) -> torch.Tensor:
    """[d_sae, blocks * d_out] -> a contiguous [blocks, d_sae, d_out]: each block one output's decoder."""
    return W.view(W.shape[0], blocks, -1).transpose(0, 1).contiguous()


def _block_grads(vals: torch.Tensor, idx: torch.Tensor, Wt: torch.Tensor, grad_t: torch.Tensor, need_vals: bool,
                 need_W: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of a block-by-block sparse decode (`_target_major` blocks Wt [m, d_sae, d_out]) from each block's
    output gradient grad_t [m, B, d_out]: (vals' [B, k], the decoder's in its stored layout [d_sae, m * d_out])."""
    m, d_sae, d_out = Wt.shape
    B, k = idx.shape
    grad_vals = sum(gathered_dot(idx, grad_t[j], Wt[j]) for j in range(m)) if need_vals else None
    grad_W = None
    if need_W:
        # grad Wt[j, f] = sum over the tokens b that selected f of vals[b, f] * grad_t[j, b]: the forward's
        # bag-of-rows kernel over the output gradient, with the tokens grouped by latent (one bag per (j, f))
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=d_sae)
        starts = torch.cumsum(counts, 0) - counts
        shift = torch.arange(m, device=idx.device)[:, None]
        tokens = ((order // k)[None] + shift * B).reshape(-1)
        offsets = (starts[None] + shift * flat.numel()).reshape(-1)
        weights = vals.reshape(-1)[order].repeat(m)
        grad_blocks = F.embedding_bag(tokens, grad_t.reshape(m * B, d_out), offsets, per_sample_weights=weights,
                                      mode="sum")  # [m * d_sae, d_out]
        grad_W = grad_blocks.view(m, d_sae, d_out).transpose(0, 1).reshape(d_sae, m * d_out)
    return grad_vals, grad_W


class CrossLayerDecode(torch.autograd.Function):
    """out[b, L] = sum over source layers i <= L of  acts_i[b] @ W_i[:, L - i]  for a cross-layer transcoder's n
    source layers, into one [B, n, d_out] tensor.

    Layer i's decoder W_i [d_sae, (n - i) * d_out] writes to the outputs i..n-1, a triangle of blocks. The sparse
    kernels work block by block on a target-major copy of it, Wt_i [n - i, d_sae, d_out]: one block (d_sae x d_out,
    2.6 MB for Gemma 3 270M at width 1024) stays in cache while every token's selected rows are read from it, where
    a gather of whole feature-major rows ((n - i) * d_out wide) streams the full decoder from memory for each token,
    about 2x slower forward and 3x slower for the decoder's gradient on the 2-core machine
    (`benchmarks/clt_train.py`). Every output receives each of its sources' blocks once (no per-pair autograd
    slices, which zero-filled a [B, n - i, d_out] gradient for every pair).
    """

    @staticmethod
    def forward(ctx: Any, n: int, d_out: int, *args: torch.Tensor | None) -> torch.Tensor:
        acts, idxs, Ws = args[:n], args[n:2 * n], args[2 * n:]
        B = acts[0].shape[0]
        # sparse sources: target-major blocks; dense sources: their whole decode, [B, n - i, d_out]
        blocks = [_target_major(W, n - i) if ix is not None else (a @ W).view(B, n - i, d_out)
                  for i, (a, ix, W) in enumerate(zip(acts, idxs, Ws))]
        out = acts[0].new_empty(B, n, d_out)
        for L in range(n):
            acc = out.new_zeros(B, d_out)
            for i in range(L + 1):
                acc.add_(F.embedding_bag(idxs[i], blocks[i][L - i], per_sample_weights=acts[i], mode="sum")
                         if idxs[i] is not None else blocks[i][:, L - i])
            out[:, L].copy_(acc)
        ctx.n = n
        ctx.sparse = [ix is not None for ix in idxs]
        empty = acts[0].new_empty(0)
        ctx.save_for_backward(*acts, *[ix if ix is not None else empty for ix in idxs],
                              *[blocks[i] if ctx.sparse[i] else Ws[i] for i in range(n)])
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        n = ctx.n
        saved = ctx.saved_tensors
        acts, idxs, Ws = saved[:n], saved[n:2 * n], saved[2 * n:]  # Ws[i]: target-major blocks where sparse
        B = grad_out.shape[0]
        grad_t = grad_out.transpose(0, 1).contiguous()  # [n, B, d_out]: each output's gradient one block
        grad_acts: list[torch.Tensor | None] = [None] * n
        grad_Ws: list[torch.Tensor | None] = [None] * n
        for i in range(n):
            need_acts, need_W = ctx.needs_input_grad[2 + i], ctx.needs_input_grad[2 + 2 * n + i]
            if not ctx.sparse[i]:
                g = grad_out[:, i:].reshape(B, -1)
                grad_acts[i] = g @ Ws[i].T if need_acts else None
                grad_Ws[i] = acts[i].T @ g if need_W else None
                continue
            grad_acts[i], grad_Ws[i] = _block_grads(acts[i], idxs[i], Ws[i], grad_t[i:], need_acts, need_W)
        return (None, None, *grad_acts, *([None] * n), *grad_Ws)


def cross_layer_decode(acts: list[torch.Tensor], idxs: list[torch.Tensor | None], W_dec: list[torch.Tensor],
                       d_out: int) -> torch.Tensor:
    """A cross-layer transcoder's decode of every source layer, summed per output layer: [B, n, d_out] (see
    `CrossLayerDecode`); acts[i] are layer i's selected values (idxs[i] their latents) or dense features (idxs[i]
    None)."""
    return CrossLayerDecode.apply(len(acts), d_out, *acts, *idxs, *W_dec)


# ----------------------------------------------------------------------------------------------- JumpReLU
def _rectangle(z: torch.Tensor) -> torch.Tensor:
    return ((z > -0.5) & (z < 0.5)).to(z.dtype)


class JumpReLU(torch.autograd.Function):
    """pre * (pre > threshold); d/d threshold = -(threshold / bandwidth) * rect((pre - threshold) / bandwidth)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_pre = grad * (pre > threshold)
        grad_thr = (-(threshold / bw) * _rectangle((pre - threshold) / bw) * grad).reshape(-1, pre.shape[-1]).sum(0)
        return grad_pre, grad_thr, None


class Step(torch.autograd.Function):
    """1[pre > threshold] (for an L0 penalty); d/d threshold = -(1 / bandwidth) * rect((pre - threshold) / bandwidth)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        grad_thr = (-(1.0 / bw) * _rectangle((pre - threshold) / bw) * grad).reshape(-1, pre.shape[-1]).sum(0)
        return None, grad_thr, None
