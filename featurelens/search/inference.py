"""Search by running the model: features that fire on a text, and features that push a token up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .concept import EmptyQueryError


@dataclass
class TextHit:
    feature: int
    max_act: float  # its largest activation on the text
    relative: float  # max_act / the feature's maximum over the analyzed corpus
    token_index: int  # where that maximum is
    label: str | None
    acts: list[float] = field(default_factory=list)  # per token

    def __str__(self) -> str:
        return f"#{self.feature} {self.max_act:.3g} ({self.relative:.0%} of its max) {self.label or ''}"


@dataclass
class TextSearchResult:
    text: str
    tokens: list[str]
    overall: list[TextHit]  # ranked by `relative`
    per_token: list[list[tuple[int, float, float, str | None]]]  # per token: (feature, act, relative, label)

    def __repr__(self) -> str:
        top = ", ".join(f"#{h.feature}" for h in self.overall[:5])
        return f"TextSearchResult({len(self.tokens)} tokens, top features {top})"


@dataclass
class PromoteHit:
    feature: int
    logit: float  # how much the feature's decoder direction raises the token's logit (direct path, final norm)
    zscore: float  # the same, in standard deviations of the feature's effect over the whole vocabulary
    label: str | None

    def __str__(self) -> str:
        return f"#{self.feature} {self.logit:+.3g} (z {self.zscore:.1f}) {self.label or ''}"


def _compatible(analysis: Any) -> tuple[Any, Any]:
    from ..analysis.run import check_compatible, dictionary_fingerprint

    model, sae = analysis.model, analysis.dictionary
    check_compatible(model, sae)
    if dictionary_fingerprint(sae) != analysis.meta.get("dictionary_fingerprint"):
        raise ValueError(f"the dictionary's weights changed since it was analyzed ({analysis.dir}); run "
                         f"`featurelens analyze --overwrite` again")
    return model, sae


def search_text(analysis: Any, text: str, k: int = 10, per_token: int = 5) -> TextSearchResult:
    from ..analysis.run import _hook_stop, _valid_mask

    if not isinstance(text, str) or not text.strip():
        raise EmptyQueryError("empty text: give the sentence whose features you want to see")
    model, sae = _compatible(analysis)
    hook = sae.cfg.hook_name
    with torch.inference_mode():
        tokens = model.to_tokens(text)
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=_hook_stop(hook, model.cfg.n_layers))
        f = sae.encode(cache[hook][0]).float().cpu().clone()  # [T, d]
        f[~_valid_mask(tokens[0].cpu(), model)] = 0.0
    f = f.clone()  # a normal tensor, not an inference one
    ref = torch.from_numpy(np.nan_to_num(analysis.store.column("max_act"), nan=0.0)).float()
    if len(ref) < f.shape[1]:
        ref = torch.cat([ref, torch.zeros(f.shape[1] - len(ref))])
    rel = torch.where(ref > 0, f / ref.clamp(min=1e-12), (f > 0).float())  # never fired in the corpus: 1 if it does here
    labels = analysis.labels()
    strs = model.to_str_tokens(tokens[0])
    best_rel, best_pos = rel.max(0)
    n = int((best_rel > 0).sum())
    order = best_rel.argsort(descending=True)[: min(k, n)]
    overall = [TextHit(feature=int(i), max_act=float(f[best_pos[i], i]), relative=float(best_rel[i]),
                       token_index=int(best_pos[i]), label=labels.get(int(i)), acts=f[:, i].tolist())
               for i in order]
    rows = []
    for t in range(f.shape[0]):
        # Ranked like `overall`, by the share of each feature's own maximum: raw activations would put Gemma's dense,
        # huge-norm features (firing on half of all tokens) first at every position.
        r, i = rel[t].topk(min(per_token, f.shape[1]))
        rows.append([(int(ii), float(f[t, ii]), float(rr), labels.get(int(ii))) for rr, ii in zip(r, i) if rr > 0])
    return TextSearchResult(text=text, tokens=strs, overall=overall, per_token=rows)


def token_id(model: Any, token: str | int) -> int:
    if isinstance(token, bool):
        raise TypeError("a token is a string or a token id")
    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise ValueError(f"token id {token} is out of range (vocabulary of {model.cfg.d_vocab:,})")
        return token
    if not isinstance(token, str) or token == "":
        raise EmptyQueryError("empty token: give the output token, e.g. \" Paris\" (with its leading space)")
    ids = model.encode(token, prepend_bos=False)
    if len(ids) != 1:
        pieces = model.to_str_tokens(token, prepend_bos=False)
        raise ValueError(f"{token!r} is {len(ids)} tokens ({pieces}); give a single token, e.g. {pieces[0]!r}")
    return ids[0]


def search_promotes(analysis: Any, token: str | int, k: int = 10) -> list[PromoteHit]:
    from ..analysis.run import logit_lens_weights

    if isinstance(token, str) and token == "":
        raise EmptyQueryError("empty token: give the output token, e.g. \" Paris\" (with its leading space)")
    model, sae = _compatible(analysis)
    tid = token_id(model, token)
    W = logit_lens_weights(model, sae)
    if W is None:
        raise ValueError("this dictionary does not write to the residual stream, so it has no logit lens")
    vals = (W @ model.W_U[:, tid].detach().float().cpu()).numpy()
    mean = np.nan_to_num(analysis.store.column("logit_mean"), nan=0.0)
    std = np.nan_to_num(analysis.store.column("logit_std"), nan=1.0)
    fires = np.nan_to_num(analysis.store.column("n_fires"), nan=0.0)
    d = len(vals)
    mean, std, fires = (np.resize(a, d) if len(a) != d else a for a in (mean, std, fires))
    scores = np.where(fires > 0, vals, -np.inf)  # features that never fire promote nothing
    order = np.argsort(-scores, kind="stable")[:k]
    labels = analysis.labels()
    return [PromoteHit(feature=int(i), logit=float(vals[i]), zscore=float((vals[i] - mean[i]) / max(std[i], 1e-12)),
                       label=labels.get(int(i))) for i in order if np.isfinite(scores[i])]
