"""Streaming per-feature statistics over batches of feature activations, all vectorized per batch.

For a batch of activations f [B, T, d_sae] (B contexts of T tokens), `Accumulator.update` keeps, for every
feature at once:

- firing counts, activation sums and the histogram of nonzero activations (fixed log-spaced bins; one
  bincount over the batch's nonzeros);
- the top-K contexts: the batch's per-context maximum [B, d] is concatenated with the running top-K [d, K] and
  one stable sort picks the new top-K (ties to the earlier context); only entries that are new pull their window
  of activations (one gather);
- a uniform random sample of R firing tokens (reservoir by random keys: each firing gets a key u ~ U(0, 1), a
  feature keeps the R largest keys it has seen: a uniform sample without replacement), from which examples across
  activation quantiles are drawn at the end;
- co-firing counts C[f, g] = number of tokens where both fire (C[f, f]: tokens where f fires), from the pairs of
  features active on the same token, added with one index_add; when a batch has more pairs than a budget, a random
  subset of its tokens is counted (C's diagonal counts the same tokens, so P(g | f) stays unbiased).

Everything is a tensor in `state_dict()`, saved and restored for resuming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from ..engine.errors import InputError


@dataclass
class AccumulatorConfig:
    d_sae: int
    n_top: int = 24  # top contexts kept per feature
    n_sample: int = 64  # firing tokens sampled uniformly per feature (quantile examples come from these)
    before: int = 24  # window: tokens before the max token
    after: int = 8  # and after it
    hist_lo: float = -3.0  # log10 of the first bin's lower edge (smaller activations land in bin 0)
    hist_per_decade: int = 10
    hist_bins: int = 80  # up to 10 ** (lo + bins / per_decade) = 1e5
    cofire: bool = True
    cofire_pairs: int = 2_000_000  # most (token, feature, feature) triples counted per batch
    threads: int | None = 1  # torch threads for the update (its many small ops run faster on one; None: leave)

    @property
    def window(self) -> int:
        return self.before + 1 + self.after

    def hist_edges(self) -> list[float]:
        return [10 ** (self.hist_lo + i / self.hist_per_decade) for i in range(self.hist_bins + 1)]


class Accumulator:
    def __init__(self, cfg: AccumulatorConfig, seed: int = 0):
        self.cfg = cfg
        d, K, R, W = cfg.d_sae, cfg.n_top, cfg.n_sample, cfg.window
        self.seed = seed
        self.n_tokens = torch.zeros((), dtype=torch.int64)
        self.n_batches = torch.zeros((), dtype=torch.int64)
        self.n_fire = torch.zeros(d, dtype=torch.int64)
        self.sum_act = torch.zeros(d, dtype=torch.float64)
        self.hist = torch.zeros(d, cfg.hist_bins, dtype=torch.int64)
        self.top_val = torch.zeros(d, K)
        self.top_ctx = torch.full((d, K), -1, dtype=torch.int64)
        self.top_pos = torch.zeros(d, K, dtype=torch.int64)
        self.top_win = torch.zeros(d, K, W, dtype=torch.float16)
        self.smp_key = torch.full((d, R), -1.0)
        self.smp_val = torch.zeros(d, R)
        self.smp_ctx = torch.full((d, R), -1, dtype=torch.int64)
        self.smp_pos = torch.zeros(d, R, dtype=torch.int64)
        self.smp_win = torch.zeros(d, R, W, dtype=torch.float16)
        self.cofire = torch.zeros(d, d, dtype=torch.int32) if cfg.cofire else None
        self.cofire_tokens = torch.zeros((), dtype=torch.int64)

    # ----------------------------------------------------------------- the per-batch update
    @torch.no_grad()
    def update(self, acts: torch.Tensor, valid: torch.Tensor, ctx_offset: int, batch_index: int | None = None) -> None:
        """acts [B, T, d] (non-negative; modified in place), valid [B, T] bool (False: BOS, padding), the global
        index of the batch's first context. batch_index: the batch's place in the whole stream (default: the
        batches seen so far), which seeds its random sample keys, so that accumulators fed different batches of
        one stream (the ranks of a distributed analysis) `merge` into what one would have made of all of them."""
        before = torch.get_num_threads()
        if self.cfg.threads is not None and self.cfg.threads != before:
            torch.set_num_threads(self.cfg.threads)
        try:
            self._update(acts, valid, ctx_offset, int(self.n_batches) if batch_index is None else batch_index)
        finally:
            if torch.get_num_threads() != before:
                torch.set_num_threads(before)

    def _update(self, acts: torch.Tensor, valid: torch.Tensor, ctx_offset: int, batch_index: int) -> None:
        cfg = self.cfg
        B, T, d = acts.shape
        if d != cfg.d_sae:
            raise InputError(f"activations have {d} features, the accumulator {cfg.d_sae}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_index)
        acts.masked_fill_(~valid[..., None], 0.0)
        flat = acts.view(B * T, d)
        self.n_tokens += int(valid.sum())
        self.n_batches += 1

        nz = (flat > 0).nonzero()  # [nnz, 2], sorted by token
        tok, feat = nz[:, 0], nz[:, 1]
        vals = flat[tok, feat]
        self.n_fire += torch.bincount(feat, minlength=d)
        self.sum_act.index_add_(0, feat, vals.double())
        b = ((vals.log10() - cfg.hist_lo) * cfg.hist_per_decade).floor_().clamp_(0, cfg.hist_bins - 1).long()
        self.hist += torch.bincount(feat * cfg.hist_bins + b, minlength=d * cfg.hist_bins).view(d, cfg.hist_bins)

        # top-K contexts by the feature's maximum in the context
        cmax, cpos = acts.max(dim=1)  # [B, d]
        self._merge("top", cmax.T, ctx_offset + torch.arange(B).expand(d, B), cpos.T,
                    lambda fi, ci: self._windows(acts, ci, cpos[ci, fi], fi), key=None)

        # uniform sample of firing tokens (random keys, keep the R largest per feature)
        if len(feat):
            self._sample(acts, tok, feat, vals, ctx_offset, gen)

        if self.cofire is not None and len(feat):
            self._cofire(tok, feat, B * T, gen)

    def _windows(self, acts: torch.Tensor, b: torch.Tensor, p: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        T = acts.shape[1]
        t = p[:, None] + torch.arange(-cfg.before, cfg.after + 1)
        ok = (t >= 0) & (t < T)
        w = acts[b[:, None], t.clamp(0, T - 1), f[:, None]] * ok
        return w.clamp_(max=65504.0).half()

    def _merge(self, which: str, cand_val: torch.Tensor, cand_ctx: torch.Tensor, cand_pos: torch.Tensor, windows,
               key: torch.Tensor | None) -> None:
        """Merge candidates [d, C] into the running [d, K] lists `which` ("top": ranked by value; "smp": by key).
        `windows(fi, ci)` returns the activation windows of candidates (feature fi, candidate column ci)."""
        val = getattr(self, f"{which}_val")
        ctx = getattr(self, f"{which}_ctx")
        pos = getattr(self, f"{which}_pos")
        win = getattr(self, f"{which}_win")
        K = val.shape[1]
        if which == "top":
            # ranked by value, ties (repeated text) by the earlier context: a total order, so the top-K is the same
            # whichever way the stream was cut into batches or dealt to ranks
            score = torch.cat([val, cand_val], 1)
            by_ctx = torch.cat([ctx, cand_ctx], 1).argsort(dim=1, stable=True)
            sel = by_ctx.gather(1, score.gather(1, by_ctx).argsort(dim=1, descending=True, stable=True))[:, :K]
            best = score.gather(1, sel)
        else:
            score = torch.cat([self.smp_key, key], 1)  # type: ignore[list-item]
            best, sel = score.topk(K, dim=1)
        is_new = sel >= K
        old = sel.clamp(max=K - 1)
        newi = (sel - K).clamp(min=0)
        new_val = torch.where(is_new, cand_val.gather(1, newi), val.gather(1, old))
        new_ctx = torch.where(is_new, cand_ctx.gather(1, newi), ctx.gather(1, old))
        new_pos = torch.where(is_new, cand_pos.gather(1, newi), pos.gather(1, old))
        filled = (best > 0) if which == "top" else (best >= 0)
        new_ctx = torch.where(filled, new_ctx, -1)
        if bool(is_new.any()):
            new_win = win.gather(1, old[..., None].expand(-1, -1, win.shape[2]))
            fi, si = (is_new & filled).nonzero(as_tuple=True)
            if len(fi):
                new_win[fi, si] = windows(fi, newi[fi, si])
            setattr(self, f"{which}_win", new_win)
        setattr(self, f"{which}_val", new_val)
        setattr(self, f"{which}_ctx", new_ctx)
        setattr(self, f"{which}_pos", new_pos)
        if which == "smp":
            self.smp_key = best

    def _sample(self, acts: torch.Tensor, tok: torch.Tensor, feat: torch.Tensor, vals: torch.Tensor, ctx_offset: int,
                gen: torch.Generator) -> None:
        d, R = self.cfg.d_sae, self.cfg.n_sample
        T = acts.shape[1]
        u = torch.rand(len(feat), generator=gen)
        order = (feat.double() + u.double()).argsort()  # by feature, then by key
        fs = feat[order]
        ends = torch.bincount(fs, minlength=d).cumsum(0)
        from_end = ends[fs] - 1 - torch.arange(len(fs))  # 0 = largest key of its feature in this batch
        keep = from_end < R
        o, rk = order[keep], from_end[keep]
        fo = feat[o]
        ckey = torch.full((d, R), -1.0)
        ckey[fo, rk] = u[o]
        cval = torch.zeros(d, R)
        cval[fo, rk] = vals[o]
        ctok = torch.zeros(d, R, dtype=torch.int64)
        ctok[fo, rk] = tok[o]
        cb, cp = ctok // T, ctok % T

        def windows(fi: torch.Tensor, ci: torch.Tensor) -> torch.Tensor:
            return self._windows(acts, cb[fi, ci], cp[fi, ci], fi)

        self._merge("smp", cval, ctx_offset + cb, cp, windows, key=ckey)

    def _cofire(self, tok: torch.Tensor, feat: torch.Tensor, n_tok: int, gen: torch.Generator) -> None:
        d = self.cfg.d_sae
        c = torch.bincount(tok, minlength=n_tok)
        cost = c * c
        if int(cost.sum()) > self.cfg.cofire_pairs:  # count a random subset of tokens
            perm = torch.randperm(n_tok, generator=gen)
            chosen = perm[cost[perm].cumsum(0) <= self.cfg.cofire_pairs]
            keep_tok = torch.zeros(n_tok, dtype=torch.bool)
            keep_tok[chosen] = True
            m = keep_tok[tok]
            tok, feat = tok[m], feat[m]
            c = torch.where(keep_tok, c, 0)
        self.cofire_tokens += int((c > 0).sum())
        if not len(tok):
            return
        start = c.cumsum(0) - c  # first entry of each token
        ct = c[tok]  # per entry: how many features its token has
        total = int(ct.sum())
        left = torch.arange(len(tok)).repeat_interleave(ct)
        base = (ct.cumsum(0) - ct).repeat_interleave(ct)
        right = start[tok].repeat_interleave(ct) + (torch.arange(total) - base)
        keys = feat[left] * d + feat[right]
        self.cofire.view(-1).index_add_(0, keys, torch.ones(total, dtype=torch.int32))  # type: ignore[union-attr]

    # ----------------------------------------------------------------- merging
    _SUMS = ("n_tokens", "n_batches", "n_fire", "sum_act", "hist", "cofire_tokens")

    @torch.no_grad()
    def merge(self, other: "Accumulator") -> None:
        """Add what `other` saw (other batches of the same stream, same config and seed): counts, sums, histograms
        and co-firing add up; the top-K and sample lists are merged as `update` merges a batch's candidates, so the
        result is what one accumulator fed all the batches holds (sums of floats up to their order)."""
        if other.cfg != self.cfg or other.seed != self.seed:
            raise InputError("only accumulators with the same config and seed merge")
        for k in self._SUMS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        if self.cofire is not None:
            self.cofire += other.cofire  # type: ignore[operator]
        self.merge_lists(other)

    _LISTS = ("top_val", "top_ctx", "top_pos", "top_win", "smp_key", "smp_val", "smp_ctx", "smp_pos", "smp_win")

    @torch.no_grad()
    def merge_lists(self, other: "Accumulator") -> None:
        """Merge only `other`'s top-K and sample lists into these (see `merge`)."""
        for which in ("top", "smp"):
            win = getattr(other, f"{which}_win")
            self._merge(which, getattr(other, f"{which}_val"), getattr(other, f"{which}_ctx"),
                        getattr(other, f"{which}_pos"), lambda fi, ci, win=win: win[fi, ci],
                        key=other.smp_key if which == "smp" else None)

    # ----------------------------------------------------------------- saving and restoring
    _FIELDS = ("n_tokens", "n_batches", "n_fire", "sum_act", "hist", "top_val", "top_ctx", "top_pos", "top_win",
               "smp_key", "smp_val", "smp_ctx", "smp_pos", "smp_win", "cofire_tokens")

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {k: getattr(self, k).contiguous() for k in self._FIELDS}
        if self.cofire is not None:  # sparse: most pairs of features never meet
            flat = self.cofire.view(-1)
            nzi = flat.nonzero().squeeze(1)
            out["cofire_idx"] = nzi
            out["cofire_val"] = flat[nzi]
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self._FIELDS:
            cur = getattr(self, k)
            v = state[k]
            if v.shape != cur.shape:
                raise InputError(f"saved state {k} has shape {tuple(v.shape)}, expected {tuple(cur.shape)}")
            setattr(self, k, v.to(cur.dtype).clone())
        if self.cofire is not None:
            self.cofire.zero_()
            if "cofire_idx" in state:
                self.cofire.view(-1)[state["cofire_idx"].long()] = state["cofire_val"].to(torch.int32)

    # ----------------------------------------------------------------- summaries
    def density(self) -> torch.Tensor:
        return self.n_fire.double() / max(int(self.n_tokens), 1)

    def mean_act(self) -> torch.Tensor:
        return self.sum_act / self.n_fire.clamp(min=1).double()

    def quantile_examples(self, f: int, n_bins: int = 4, per_bin: int = 5) -> list[tuple[int, int]]:
        """(bin, sample slot) pairs: the sample sorted by activation, split into n_bins equal groups (bin 0 the
        lowest quantile), up to per_bin evenly spaced picks from each."""
        ok = (self.smp_ctx[f] >= 0).nonzero().squeeze(1)
        if not len(ok):
            return []
        order = ok[self.smp_val[f, ok].argsort()]
        n = len(order)
        out = []
        for b in range(n_bins):
            lo, hi = (b * n) // n_bins, ((b + 1) * n) // n_bins
            if hi <= lo:
                continue
            k = min(per_bin, hi - lo)
            picks = sorted({lo + int(math.floor((j + 0.5) * (hi - lo) / k)) for j in range(k)}, reverse=True)
            out.extend((b, int(order[p])) for p in picks)
        return out
