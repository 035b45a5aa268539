"""The geometric median, which initializes a dictionary's decoder bias (robust to outlier activations)."""

from __future__ import annotations

import torch


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 30, tol: float = 1e-5) -> torch.Tensor:
    """The point minimizing the sum of distances to the rows of x (Weiszfeld's algorithm)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_new = (w[:, None] * x).sum(0) / w.sum()
        moved = (y_new - y).norm()
        y = y_new
        if moved <= tol * max(float(y.norm()), 1.0):
            break
    return y
