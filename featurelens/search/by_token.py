"""Search by output token: the features whose decoder direction pushes a token's logit up (the logit lens)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..dictionaries.logit_lens import logit_lens_weights
from ..engine.errors import InputError
from .by_text import checked_model_and_dictionary
from .concept import EmptyQueryError


@dataclass
class PromoteHit:
    feature: int
    logit: float  # how much the feature's decoder direction raises the token's logit (direct path, final norm)
    zscore: float  # the same, in standard deviations of the feature's effect over the whole vocabulary
    label: str | None

    def __str__(self) -> str:
        return f"#{self.feature} {self.logit:+.3g} (z {self.zscore:.1f}) {self.label or ''}"


def token_id(model: Any, token: str | int) -> int:
    if isinstance(token, bool):
        raise TypeError("a token is a string or a token id")
    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise InputError(f"token id {token} is out of range (vocabulary of {model.cfg.d_vocab:,})")
        return token
    if not isinstance(token, str) or token == "":
        raise EmptyQueryError("empty token: give the output token, e.g. \" Paris\" (with its leading space)")
    ids = model.encode(token, prepend_bos=False)
    if len(ids) != 1:
        pieces = model.to_str_tokens(token, prepend_bos=False)
        raise InputError(f"{token!r} is {len(ids)} tokens ({pieces}); give a single token, e.g. {pieces[0]!r}")
    return ids[0]


def search_promotes(analysis: Any, token: str | int, k: int = 10) -> list[PromoteHit]:
    """The features whose logit lens pushes `token` up most (features that never fired are left out).

    >>> fl.open_analysis("~/sae-l6").search_promotes(" Paris", k=5)
    """
    if isinstance(token, str) and token == "":
        raise EmptyQueryError("empty token: give the output token, e.g. \" Paris\" (with its leading space)")
    model, dictionary = checked_model_and_dictionary(analysis)
    tid = token_id(model, token)
    W = logit_lens_weights(model, dictionary)
    if W is None:
        raise InputError("this dictionary does not write to the residual stream, so it has no logit lens")
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
