"""Steering-checked concept search: of the features that match a concept, prefer those that, steered, make the
model say words of that concept.

Matching a concept where a feature *fires* does not make it a good steering handle: a feature that detects film
words may, added to the residual stream, push the model toward what follows them instead. So the best matches of
a concept search are each steered on a few neutral prompts (`featurelens.search.steerable.PROBE_PROMPTS`) at
relative strength 1, and again at the next of STRENGTHS while the concept's words have not risen STEERS-fold, and
ranked with the check leading:

    score = steers + (match score / the best match score + min(ln(ratio) / ln(RATIO_FULL), 1), clipped at 0) / 2

(steers: 1 when the best ratio is >= STEERS): first the matches that steer, then the others; within each, by how
well they match and how much they steer

where a ratio is the next-token mass of the concept's words steered / unsteered, and the concept's words are
found in the matches' own labels, max tokens and snippets (`concept_words`). Each hit keeps the strength at which
it steered (`steer_strength`), the one a steering page should start at. Each candidate costs one or two forward
passes over the probe prompts.

>>> lens = fl.open_analysis("~/sae-l6")
>>> hits = fl.steerable_search(lens, "movies and films", k=5)
>>> hits[0].steer_ratio, hits[0].steer_strength, hits[0].steer_words[:4]
"""

from __future__ import annotations

import math

from dataclasses import replace
from typing import Any, Sequence

from ..engine.errors import InputError
from ..search.by_text import checked_model_and_dictionary
from ..search.concept import SearchHit, concept_search
from ..search.steerable import PROBE_PROMPTS, concept_words, next_token_probs, raised_words, single_token_ids
from .types import Steer

STEERS = 3.0  # a match "steers" when it raises its concept's words this many times
# Relative strengths tried in turn: 1 is the library's default; 1.5 is where perplexity roughly doubles
# (benchmarks/steering_strength.py), the limit of a fluent continuation.
STRENGTHS = (1.0, 1.5)
POOL = 10  # matches steered by default
RATIO_FULL = 100.0  # a ratio from which steering counts in full within its group


def steering_effects(model: Any, candidates: Sequence[tuple], token_ids: Sequence[int], strength: float = 1.0,
                     prompts: Sequence[str] = PROBE_PROMPTS, progress: bool = False) -> list[tuple[float, list[str]]]:
    """For each (dictionary, feature) or (dictionary, feature, max_activation): (next-token mass of `token_ids`
    steered at relative `strength` / unsteered, averaged over prompts (1 without token_ids); the words steering
    raises most, `raised_words`). Without max_activation (or None), `Steer` looks the feature's up (the
    dictionary's statistics or its analysis). The unsteered distribution is computed once."""
    from tqdm.auto import tqdm

    clean = next_token_probs(model, prompts)
    ids = list(token_ids)
    out = []
    for d, f, *top in tqdm(candidates, desc="steering candidates", unit="feature", disable=not progress,
                           leave=False):
        steer = Steer(d, f, strength, max_activation=top[0] if top else None)
        steered = next_token_probs(model, prompts, steer.hooks(model))
        ratio = float(steered[ids].sum() / clean[ids].sum().clamp(min=1e-12)) if ids else 1.0
        out.append((ratio, raised_words(model, steered, clean)))
    return out


def steering_ratios(model: Any, candidates: Sequence[tuple], token_ids: Sequence[int],
                    strength: float = 1.0, prompts: Sequence[str] = PROBE_PROMPTS,
                    progress: bool = False) -> list[float]:
    """The ratios of `steering_effects` alone."""
    return [r for r, _ in steering_effects(model, candidates, token_ids, strength, prompts, progress)]


def combined_score(match_share: float, ratio: float) -> float:
    """The checked ranking's score (module docstring): >= 1 exactly for a hit that steers."""
    steering = min(max(math.log(max(ratio, 1e-12)) / math.log(RATIO_FULL), 0.0), 1.0)
    return float(ratio >= STEERS) + (max(match_share, 0.0) + steering) / 2


def rerank_by_steering(model: Any, query: str, candidates: Sequence[tuple[Any, SearchHit]], k: int | None = None,
                       strengths: Sequence[float] = STRENGTHS, embedder: Any = None,
                       max_activations: Sequence[float | None] | None = None,
                       progress: bool = False) -> list[tuple[Any, SearchHit]]:
    """Concept-search candidates (dictionary, hit), possibly from several dictionaries of one model, re-ranked with
    the steering check leading (see the module docstring); best k first.

    strengths: relative strengths tried in turn until a candidate steers. max_activations: each candidate's
    typical max activation (the scale of relative strength), where the caller knows it (an analysis's
    `max_act`); else `Steer` looks it up. Each returned hit keeps its match score in `match_score`, has
    `steer_ratio` (its best), `steer_strength` (where it steered, else where its ratio was best),
    `steer_promotes` (the words steering at that strength raised most) and `steer_words` filled in; `score` is
    `combined_score` of its share of the best match score and its ratio. Without the embedding model the
    concept's words are the query's own (`concept_words`).
    """
    from ..search.embed import get_embedder

    if not candidates:
        return []
    if not strengths or any(not isinstance(x, (int, float)) or x <= 0 for x in strengths):
        raise InputError(f"strengths must be positive numbers, got {strengths!r}")
    embedder = embedder or get_embedder()
    tops = list(max_activations) if max_activations is not None else [None] * len(candidates)
    if len(tops) != len(candidates):
        raise InputError(f"{len(tops)} max activations for {len(candidates)} candidates")
    words = concept_words(query, [h for _, h in candidates], embedder)
    ids = single_token_ids(model, words)
    best: list[tuple[float, float, list[str]]] = [(0.0, strengths[0], [])] * len(candidates)
    todo = list(range(len(candidates)))
    for strength in strengths:  # stronger only for the candidates that have not steered yet
        effects = steering_effects(model, [(candidates[i][0], candidates[i][1].feature, tops[i]) for i in todo], ids,
                                   strength=strength, progress=progress)
        for i, (r, raised) in zip(todo, effects):
            if r > best[i][0] or not best[i][2]:
                best[i] = (r, strength, raised)
        todo = [i for i in todo if best[i][0] < STEERS]
        if not todo or not ids:
            break
    matches = [h.match_score if h.match_score is not None else h.score for _, h in candidates]
    top_match = max(max(matches), 1e-12)
    out = []
    for (d, h), m, (r, strength, raised) in zip(candidates, matches, best):
        out.append((d, replace(h, score=combined_score(m / top_match, r), match_score=m, steer_ratio=r,
                               steer_strength=float(strength), steer_words=words, steer_promotes=raised)))
    out.sort(key=lambda dh: -dh[1].score)
    return out[:k] if k is not None else out


def rerank_analyses_by_steering(query: str, found: Sequence[tuple[Any, SearchHit]], k: int | None = None, *,
                                strengths: Sequence[float] = STRENGTHS, max_activations: Sequence[float | None] | None = None,
                                progress: bool = False) -> list[tuple[Any, SearchHit]]:
    """Concept-search hits (analysis, hit) from one or several analyzed dictionaries, re-ranked by steering them
    (`rerank_by_steering`); the hits of dictionaries of one model are steered and ranked together. Best k first.

    max_activations: each hit's feature's max activation over its analysis (default: read from each analysis).
    Every analysis needs its model and dictionary (loaded on first use, or attached by the caller).
    """
    if max_activations is None:  # relative strength means what it means on each analysis's pages
        columns: dict[int, Any] = {}
        for a, _ in found:
            if id(a) not in columns:
                columns[id(a)] = a.store.column("max_act")
        max_activations = [float(columns[id(a)][h.feature]) for a, h in found]
    tops = list(max_activations)
    if len(tops) != len(found):
        raise InputError(f"{len(tops)} max activations for {len(found)} hits")
    by_model: dict[str, tuple[Any, list[tuple[Any, SearchHit]], list[float | None]]] = {}
    owner: dict[int, Any] = {}  # id(dictionary) -> its analysis
    for (a, h), top in zip(found, tops):
        model, dictionary = checked_model_and_dictionary(a)
        owner[id(dictionary)] = a
        _, cands, group_tops = by_model.setdefault(a.model_name, (model, [], []))
        cands.append((dictionary, h))
        group_tops.append(top)
    out = [(owner[id(d)], h) for model, cands, group_tops in by_model.values()
           for d, h in rerank_by_steering(model, query, cands, strengths=strengths, max_activations=group_tops,
                                          progress=progress)]
    out.sort(key=lambda ah: -ah[1].score)
    return out[:k] if k is not None else out


def steerable_search(analysis: Any, query: str, k: int = 10, *, pool: int = POOL,
                     strengths: Sequence[float] = STRENGTHS, method: str = "auto",
                     progress: bool = False) -> list[SearchHit]:
    """Concept search over one analyzed dictionary, its best `pool` matches checked by steering them (at relative
    `strengths`, in turn) and re-ranked with the check leading; needs the analysis's model and dictionary.

    >>> fl.steerable_search(fl.open_analysis("~/sae-l6"), "movies and films", k=5)[0].steer_ratio
    """
    if isinstance(pool, bool) or not isinstance(pool, int) or pool <= 0:
        raise InputError(f"pool must be a positive integer, got {pool!r}")
    hits = concept_search(analysis.store, query, k=max(k, pool), method=method)
    ranked = rerank_analyses_by_steering(query, [(analysis, h) for h in hits], k=k, strengths=strengths,
                                         progress=progress)
    return [h for _, h in ranked]
