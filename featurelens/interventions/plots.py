"""Heatmaps of patching results, written as PNG (matplotlib, headless) and JSON."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from ..engine.errors import InputError


def save_heatmap(
    values: Any,
    path: str | Path,
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    meta: dict[str, Any] | None = None,
    center: float = 0.0,
) -> dict[str, Path | None]:
    """Write `path`.json (values, labels, meta) and `path`.png; returns {"json": ..., "png": ...}.

    The colour scale is diverging and centred on `center` (e.g. the corrupt run's metric for raw patching
    values). The PNG needs matplotlib; without it only the JSON is written (with a warning) and "png" is None.

    >>> fl.save_heatmap(scores, "patch-resid_pre", row_labels=rows, col_labels=cols, title="resid_pre patching")
    """
    arr = torch.as_tensor(values).detach().float().cpu()
    if arr.dim() != 2:
        raise InputError(f"a heatmap needs a 2-d array, got shape {tuple(arr.shape)}")
    rows = list(row_labels) if row_labels is not None else [str(i) for i in range(arr.shape[0])]
    cols = list(col_labels) if col_labels is not None else [str(i) for i in range(arr.shape[1])]
    if len(rows) != arr.shape[0] or len(cols) != arr.shape[1]:
        raise InputError(f"{len(rows)} row and {len(cols)} column labels for a {tuple(arr.shape)} array")
    base = Path(path)
    if base.suffix in (".png", ".json"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    json_path = base.with_suffix(".json")
    json_path.write_text(json.dumps({"title": title, "rows": rows, "cols": cols, "xlabel": xlabel, "ylabel": ylabel,
                                     "values": arr.tolist(), **(meta or {})}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        warnings.warn("matplotlib is not installed, so no PNG was written (pip install matplotlib)", stacklevel=2)
        return {"json": json_path, "png": None}

    h, w = arr.shape
    fig, ax = plt.subplots(figsize=(min(2 + 0.9 * w, 24), min(1.5 + 0.35 * h, 24)))
    lim = float((arr - center).abs().max()) or 1.0
    im = ax.imshow(arr.numpy(), cmap="RdBu", vmin=center - lim, vmax=center + lim, aspect="auto")
    ax.set_xticks(range(w), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(h), rows, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if h * w <= 600:  # numbers in the cells while they stay readable
        for i in range(h):
            for j in range(w):
                v = float(arr[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if abs(v - center) > 0.6 * lim else "black")
    fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    png_path = base.with_suffix(".png")
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return {"json": json_path, "png": png_path}
