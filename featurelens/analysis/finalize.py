"""The finalize stage of an analysis: from the streamed statistics to every feature's dashboard rows.

Per chunk of `FINALIZE_CHUNK` features, in one SQLite transaction each (so an interrupted run resumes at the chunk):
density, histogram, top and quantile examples with their token windows (kept within the example's own document:
packed contexts join several), the logit lens, the most similar features by decoder cosine, and the top co-firing
features (Jaccard index of their firing tokens).
"""

from __future__ import annotations

import sys
import time
from typing import Any

import numpy as np
import torch

from ..dictionaries.logit_lens import LogitLens, logit_lens_weights
from ..progress import OnProgress, ProgressBar
from ..store import FeatureStore
from .accumulate import Accumulator
from .timings import AnalysisTimings

N_QUANTILE_BINS = 4
PER_QUANTILE_BIN = 5
N_LOGIT = 10
N_SIMILAR = 10
N_COFIRE = 10
FINALIZE_CHUNK = 1024


def finalize(model: Any, dictionary: Any, acc: Accumulator, contexts: torch.Tensor, store: FeatureStore,
             timings: AnalysisTimings, progress: bool, on_progress: OnProgress | None = None) -> None:
    """Per chunk of features, one transaction each: the dashboards' rows (see the module docstring)."""
    d = acc.cfg.d_sae
    start = int(store.get("finalized", 0))
    W_eff = logit_lens_weights(model, dictionary)
    lens_ctx = LogitLens.of(model) if W_eff is not None else None
    W_dec = dictionary.W_dec.detach().float().cpu()
    W_n = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    density = acc.density()
    mean_act = acc.mean_act()
    C = acc.cofire
    diag = C.diagonal().double() if C is not None else None
    ctx_np = contexts.numpy()
    T = ctx_np.shape[1]
    before, after = acc.cfg.before, acc.cfg.after
    known_tokens = set(store.token_strings().keys())
    sep_ids = [t for t in (model.cfg.bos_token_id, model.cfg.pad_token_id) if t is not None]
    # where documents join inside the packed contexts, found once rather than per example
    is_sep = np.isin(ctx_np, np.array(sep_ids, dtype=ctx_np.dtype)) if sep_ids else None
    tok = model.tokenizer
    bar = ProgressBar("dashboards", d, initial=start, unit="feat", show=progress, on_progress=on_progress)
    for f0 in range(start, d, FINALIZE_CHUNK):
        f1 = min(d, f0 + FINALIZE_CHUNK)
        # logit lens
        t0 = time.perf_counter()
        lens: dict[int, tuple[list, list, float, float]] = {}
        if lens_ctx is not None:
            for b0 in range(f0, f1, 128):
                b1 = min(f1, b0 + 128)
                (ui, uv), (di, dv), mean, std = lens_ctx.top(W_eff[b0:b1], N_LOGIT)
                for i in range(b1 - b0):
                    lens[b0 + i] = ([[int(t), round(float(v), 4)] for t, v in zip(ui[i], uv[i])],
                                    [[int(t), round(float(v), 4)] for t, v in zip(di[i], dv[i])],
                                    float(mean[i]), float(std[i]))
        t1 = time.perf_counter()
        # decoder similarity, co-firing
        S = W_n[f0:f1] @ W_n.T
        S[torch.arange(f1 - f0), torch.arange(f0, f1)] = -2.0
        sim = S.topk(min(N_SIMILAR, d - 1), dim=1) if d > 1 else None
        cof = None
        if C is not None:
            Cb = C[f0:f1].double()
            J = Cb / (diag[f0:f1, None] + diag[None, :] - Cb).clamp(min=1)
            J[torch.arange(f1 - f0), torch.arange(f0, f1)] = -1.0
            J[Cb < 2] = -1.0  # at least two shared tokens
            cof = J.topk(min(N_COFIRE, d), dim=1)
        t2 = time.perf_counter()
        # rows
        feats, examples, new_tokens = [], [], set()
        for f in range(f0, f1):
            up, down, lm, ls = lens.get(f, (None, None, None, None))
            row = {"idx": f, "n_fires": int(acc.n_fire[f]), "density": float(density[f]),
                   "max_act": float(acc.top_val[f, 0]), "mean_act": float(mean_act[f]), "hist": acc.hist[f].numpy(),
                   "logit_up": up, "logit_down": down, "logit_mean": lm, "logit_std": ls,
                   "similar": [[int(i), round(float(v), 4)] for i, v in zip(sim.indices[f - f0], sim.values[f - f0])]
                   if sim is not None else [],
                   "cofire": []}
            if cof is not None:
                for g, j in zip(cof.indices[f - f0].tolist(), cof.values[f - f0].tolist()):
                    if j <= 0:
                        break
                    both = int(C[f, g])
                    row["cofire"].append([g, round(j, 4), round(both / max(float(diag[f]), 1.0), 4), both])
            feats.append(row)
            if up:
                new_tokens.update(t for t, _ in up + down)
            for kind, items in (("top", [(0, k) for k in range(acc.cfg.n_top)]),
                                ("quantile", acc.quantile_examples(f, N_QUANTILE_BINS, PER_QUANTILE_BIN))):
                pre = "top" if kind == "top" else "smp"
                ctxs, poss, vals, wins = (getattr(acc, f"{pre}_{n}")[f] for n in ("ctx", "pos", "val", "win"))
                for rank, (bin_, k) in enumerate(items):
                    c = int(ctxs[k])
                    if c < 0:
                        continue
                    p = int(poss[k])
                    s, e = max(0, p - before), min(T, p + after + 1)
                    if is_sep is not None:  # keep to the example's own document: packed contexts join several
                        seg = is_sep[c, s:e]
                        left = np.flatnonzero(seg[: p - s])
                        right = np.flatnonzero(seg[p - s + 1:])
                        if len(left):
                            s += int(left[-1]) + 1
                        if len(right):
                            e = p + 1 + int(right[0])
                    w = wins[k].float().numpy()[s - (p - before): e - (p - before)]
                    toks = ctx_np[c, s:e]
                    new_tokens.update(toks.tolist())
                    examples.append({"feature": f, "kind": kind, "rank": rank, "bin": bin_, "ctx": c, "pos": p,
                                     "start": s, "act": float(vals[k]), "tokens": toks, "acts": w})
        fresh = [t for t in new_tokens if t not in known_tokens]
        tok_rows = [(t, tok.decode([t])) for t in fresh] if tok is not None else [(t, f"<{t}>") for t in fresh]
        known_tokens.update(fresh)
        with store.transaction():
            store.write_features(feats)
            store.write_examples(examples)
            store.write_tokens(tok_rows)
            store.set("finalized", f1)
        t3 = time.perf_counter()
        timings.logit_lens += t1 - t0
        timings.similarity += t2 - t1
        timings.writing += t3 - t2
        bar.update(f1 - f0)
    bar.close()
    with store.transaction():
        store.set("stats", {"n_tokens": int(acc.n_tokens), "n_batches": int(acc.n_batches),
                            "cofire_tokens": int(acc.cofire_tokens), "dead": int((acc.n_fire == 0).sum()),
                            "logit_lens": W_eff is not None, "cofire": C is not None})
