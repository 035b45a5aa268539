"""Search by running the model: the features that fire on a text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data import content_mask
from ..dictionaries.compat import check_fits, dictionary_fingerprint
from ..engine.errors import InputError
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


def checked_model_and_dictionary(analysis: Any) -> tuple[Any, Any]:
    """The analysis's model and dictionary, checked to fit each other and to be the dictionary that was analyzed."""
    model, dictionary = analysis.model, analysis.dictionary
    check_fits(model, dictionary)
    if dictionary_fingerprint(dictionary) != analysis.meta.get("dictionary_fingerprint"):
        raise InputError(f"the dictionary's weights changed since it was analyzed ({analysis.dir}); run "
                         f"`featurelens analyze --overwrite` again")
    return model, dictionary


def _encode_text(analysis: Any, text: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(model, tokens [1, T], feature activations [T, d_sae] on the CPU, zero at BOS and padding) of `text`."""
    if not isinstance(text, str) or not text.strip():
        raise EmptyQueryError("empty text: give the sentence whose features you want to see")
    model, dictionary = checked_model_and_dictionary(analysis)
    hook = dictionary.cfg.hook_name
    with torch.inference_mode():
        tokens = model.to_tokens(text)
        if tokens.shape[1] > model.cfg.n_ctx:
            raise InputError(f"{tokens.shape[1]} tokens is longer than the model's context of {model.cfg.n_ctx} "
                             f"tokens")
        _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=model.hook_spec(hook).stop_layer)
        W = dictionary.W_dec
        x = cache[hook][0].flatten(1).to(device=W.device, dtype=W.dtype)  # [T, d_in] (attention heads flattened)
        f = dictionary.encode(x).float().cpu().clone()  # [T, d_sae]
        f[~content_mask(tokens[0].cpu(), model)] = 0.0
    return model, tokens, f.clone()  # a normal tensor, not an inference one


@dataclass
class FeatureActivations:
    """One feature's activation at each token of a text (0 at BOS, which `analyze` also leaves out)."""

    feature: int
    tokens: list[str]
    acts: list[float]


def feature_activations(analysis: Any, feature: int, text: str) -> FeatureActivations:
    """The activations of `feature` (of the analysis's dictionary) on each token of `text`.

    >>> fl.open_analysis("~/sae-l6").feature_activations(123, "The Eiffel Tower is in Paris").acts
    """
    idx = analysis.check_index(feature)
    model, tokens, f = _encode_text(analysis, text)
    return FeatureActivations(feature=idx, tokens=model.to_str_tokens(tokens[0]), acts=f[:, idx].tolist())


def search_text(analysis: Any, text: str, k: int = 10, per_token: int = 5) -> TextSearchResult:
    """The features that fire on `text` (over the analysis's dictionary): ranked overall by the share of each
    feature's maximum over the analyzed corpus, and the top `per_token` at every token.

    >>> fl.open_analysis("~/sae-l6").search_text("The Eiffel Tower is in Paris").overall[:3]
    """
    model, tokens, f = _encode_text(analysis, text)
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
