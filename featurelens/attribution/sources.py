"""The columns of an attribution graph's adjacency matrix: every active feature, every error (layer, position) and
every token embedding of a recorded prompt, with what contracts a gradient into them (used by `attribute` for
the graph's rows)."""

from __future__ import annotations

from typing import Any

import torch

from .replacement import Recording


class Sources:
    """The column space of A: every active feature, every error (layer, pos), every token embedding, and the
    tensors needed to contract a gradient into those columns."""

    @torch.no_grad()
    def __init__(self, model: Any, rep: Any, rec: Recording, skip_pos0: bool):
        n, P = model.cfg.n_layers, rec.n_pos
        self.n_layers, self.n_pos = n, P
        feats, acts = [], []
        first = 1 if skip_pos0 else 0
        for layer in rep.layers:
            a = rec.acts[layer][first:]
            pos, idx = a.nonzero(as_tuple=True)
            vals = a[pos, idx]
            order = torch.argsort(pos * a.shape[1] + idx)
            pos, idx, vals = pos[order] + first, idx[order], vals[order]
            feats.append(torch.stack([torch.full_like(pos, layer), pos, idx], 1))
            acts.append(vals)
        self.features = torch.cat(feats).cpu() if feats else torch.zeros(0, 3, dtype=torch.long)
        self.activations = torch.cat(acts).float().cpu() if acts else torch.zeros(0)
        self.n_active = F = int(self.features.shape[0])
        self.n_cols = F + n * P + P
        self.error_start, self.token_start = F, F + n * P

        dev, dtype = rec.resid0.device, rec.resid0.dtype
        # Per output layer l, per source layer: decoder vectors scaled by activations, padded by position:
        # vecs [P, k, D] and cols [P, k] (-1 = padding), so one batched matmul contracts a whole layer.
        self.contract: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {l: [] for l in range(n)}
        start = 0
        for layer, f in zip(rep.layers, feats):
            m = f.shape[0]
            cols = torch.arange(start, start + m, device=dev)
            start += m
            if m == 0:
                continue
            pos, idx = f[:, 1].to(dev), f[:, 2].to(dev)
            a = rec.acts[layer][pos, idx].to(dtype)
            counts = torch.bincount(pos, minlength=P)
            k = int(counts.max())
            slot = torch.arange(m, device=dev) - (torch.cumsum(counts, 0) - counts)[pos]  # rank within its position
            W = rep.decoder(layer)  # [S, O, D]
            for j, l in enumerate(rep.output_layers(layer)):
                vecs = torch.zeros(P, k, W.shape[-1], dtype=dtype, device=dev)
                vecs[pos, slot] = W[idx, j, :].to(dtype) * a[:, None]
                cmap = torch.full((P, k), -1, dtype=torch.long, device=dev)
                cmap[pos, slot] = cols
                self.contract[l].append((vecs, cmap))
        self.errors = {l: rec.errors[l].clone() for l in range(n)}
        if skip_pos0:
            for l in range(n):
                self.errors[l][0] = 0
        self.embed = rec.resid0

    @torch.no_grad()
    def rows(self, grads_out: dict[int, torch.Tensor], grad_start: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Gradients at the MLP outputs {l: [B, P, D]} and at the residual start [B, P, D] -> rows [B, n_cols]."""
        dev = self.embed.device
        out = torch.zeros(batch, self.n_cols + 1, dtype=torch.float32, device=dev)  # last column absorbs padding
        P = self.n_pos
        for l, g in grads_out.items():
            if g is None:
                continue
            e = g.shape[1]  # a prefix run has gradients at its first e positions only; the rest are zero
            e0 = self.error_start + l * P
            out[:, e0 : e0 + e] = torch.einsum("bpd,pd->bp", g, self.errors[l][:e]).float()
            for vecs, cmap in self.contract[l]:
                vals = torch.bmm(g.transpose(0, 1), vecs[:e].transpose(1, 2))  # [e, B, k]
                cols = torch.where(cmap[:e] < 0, self.n_cols, cmap[:e])  # [e, k]
                out.index_add_(1, cols.flatten(), vals.permute(1, 0, 2).reshape(batch, -1).float())
        if grad_start is not None:
            e = grad_start.shape[1]
            out[:, self.token_start : self.token_start + e] = torch.einsum(
                "bpd,pd->bp", grad_start, self.embed[:e]).float()
        return out[:, : self.n_cols]
