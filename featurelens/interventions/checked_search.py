"""Steering-checked concept search: the first hit is a feature that, steered, makes the model say words of the
concept; the others follow in match order.

Matching a concept where a feature *fires* does not make it a good steering handle: a feature that detects film
words may, added to the residual stream, push the model toward what follows them instead. So the best matches of
a concept search are steered in match order on a few neutral prompts (`featurelens.search.steerable.PROBE_PROMPTS`)
at relative strength 1 until one raises the concept's words STEERS-fold; if none does, again at the next of
STRENGTHS. That match leads, the others keep their match order:

    score = leads + match score / the best match score

where a ratio is the median over the probe prompts of the next-token mass of the concept's words steered /
unsteered, and the concept's words are the query's own and those of the matches' labels, max tokens and snippets
close to it (`concept_words`). Only matches scoring at least
CLOSE_MATCH of the best are steered, so a generic feature that happens to raise the concept's words cannot lead.
Why one leader and not every match that steers first: on benchmarks/concepts.py's tuning concepts that kept
precision@5 at 0.53 (match order alone 0.54, every steering match first 0.48) with the top hit steering in 89% of
them (docs/benchmarks.md). Each steered hit keeps its ratio and the strength it was measured at
(`steer_strength`, the one a steering page should start at); hits after the leader are not steered (ratio None).
Each steered candidate costs one forward pass over the probe prompts, so the check usually stops after a few.

>>> lens = fl.open_analysis("~/sae-l6")
>>> hits = fl.steerable_search(lens, "movies and films", k=5)
>>> hits[0].steer_ratio, hits[0].steer_strength, hits[0].steer_words[:4]
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Sequence

import torch

from ..engine.errors import InputError
from ..search.by_text import checked_model_and_dictionary
from ..search.concept import SearchHit, concept_search
from ..search.steerable import PROBE_PROMPTS, concept_words, next_token_probs, raised_words, single_token_ids
from .types import Steer

# A match "steers" when it raises its concept's words this many times on the median probe prompt. Above the 3x that
# benchmarks/concepts.py counts on its own prompts: a margin, since an effect just over 3x on the probe prompts
# often fell short of it on others (tuning concepts, docs/benchmarks.md).
STEERS = 4.0
# Relative strengths tried in turn: 1 is the library's default; 1.5 is where perplexity roughly doubles
# (benchmarks/steering_strength.py), the limit of a fluent continuation.
STRENGTHS = (1.0, 1.5)
POOL = 10  # matches steered by default
# A match leads for steering only when its match score is at least this share of the best match's: a generic
# feature (one that fires on "things", "everything") that happens to raise the concept's words must not jump a
# ranking of features that are about the concept.
CLOSE_MATCH = 0.6


def steering_effects(model: Any, candidates: Sequence[tuple], token_ids: Sequence[int], strength: float = 1.0,
                     prompts: Sequence[str] = PROBE_PROMPTS, progress: bool = False,
                     clean: torch.Tensor | None = None) -> list[tuple[float, list[str]]]:
    """For each (dictionary, feature) or (dictionary, feature, max_activation): (the median over `prompts` of the
    next-token mass of `token_ids` steered at relative `strength` / unsteered, 1 without token_ids; the words
    steering raises most on average, `raised_words`). A median, not a ratio of means, so that one prompt where
    the words were already likely cannot carry the check. Without max_activation (or None), `Steer` looks the
    feature's up (the dictionary's statistics or its analysis). clean: the unsteered
    `next_token_probs(..., per_prompt=True)` on `prompts`, where the caller has it (else computed once here)."""
    from tqdm.auto import tqdm

    if clean is None:
        clean = next_token_probs(model, prompts, per_prompt=True)
    ids = list(token_ids)
    out = []
    for d, f, *top in tqdm(candidates, desc="steering candidates", unit="feature", disable=not progress,
                           leave=False):
        steer = Steer(d, f, strength, max_activation=top[0] if top else None)
        steered = next_token_probs(model, prompts, steer.hooks(model), per_prompt=True)  # [prompts, vocab]
        ratio = float((steered[:, ids].sum(1) / clean[:, ids].sum(1).clamp(min=1e-12)).quantile(0.5)) if ids else 1.0
        out.append((ratio, raised_words(model, steered.mean(0), clean.mean(0))))
    return out


def steering_ratios(model: Any, candidates: Sequence[tuple], token_ids: Sequence[int],
                    strength: float = 1.0, prompts: Sequence[str] = PROBE_PROMPTS,
                    progress: bool = False) -> list[float]:
    """The ratios of `steering_effects` alone."""
    return [r for r, _ in steering_effects(model, candidates, token_ids, strength, prompts, progress)]


def checked_score(match_share: float, leads: bool) -> float:
    """The checked ranking's score (module docstring): over 1 exactly for the hit that leads (a match share is in
    (0, 1])."""
    return float(leads) + max(match_share, 0.0)


def pick_leader(eligible: Sequence[int], ratio: Callable[[int, float], float],
                strengths: Sequence[float] = STRENGTHS, steers: float = STEERS,
                ) -> tuple[int | None, dict[int, tuple[float, float]]]:
    """The check's leader rule, apart from how a ratio is measured: each of `eligible` (candidates in match
    order) is steered at the first strength, then each at the next, and the first whose `ratio(i, strength)` is at
    least `steers` leads. Returns (the leader, or None where none steers; each steered candidate's best
    (ratio, strength)). One rule for the library and for benchmarks/concepts.py's replay of it.

    >>> pick_leader([0, 1], lambda i, s: 5.0 * i * s, strengths=(1.0, 1.5), steers=4.0)
    (1, {0: (0.0, 1.0), 1: (5.0, 1.0)})
    """
    best: dict[int, tuple[float, float]] = {}
    for strength in strengths:  # the first match that steers at the gentler strength leads
        for i in eligible:
            r = ratio(i, strength)
            if i not in best or r > best[i][0]:
                best[i] = (r, float(strength))
            if r >= steers:
                return i, best
    return None, best


def rerank_by_steering(model: Any, query: str, candidates: Sequence[tuple[Any, SearchHit]], k: int | None = None,
                       strengths: Sequence[float] = STRENGTHS, embedder: Any = None,
                       max_activations: Sequence[float | None] | None = None,
                       progress: bool = False) -> list[tuple[Any, SearchHit]]:
    """Concept-search candidates (dictionary, hit), possibly from several dictionaries of one model, re-ranked with
    the steering check leading (see the module docstring); best k first.

    strengths: relative strengths tried in turn until a candidate steers. max_activations: each candidate's
    typical max activation (the scale of relative strength), where the caller knows it (an analysis's
    `max_act`); else `Steer` looks it up. Each returned hit keeps its match score in `match_score`; the hits
    that were steered have `steer_ratio` (their best), `steer_strength` (where it steered, else where the ratio
    was best) and `steer_promotes` (the words steering at that strength raised most); every hit has
    `steer_words`; `score` is `checked_score`. Without the embedding model the concept's words are the query's
    own (`concept_words`); where no word of the concept is a single token, nothing is steered.
    """
    from tqdm.auto import tqdm

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
    matches = [h.match_score if h.match_score is not None else h.score for _, h in candidates]
    top_match = max(max(matches), 1e-12)
    shares = [m / top_match for m in matches]
    in_match_order = sorted(range(len(candidates)), key=lambda i: -shares[i])
    eligible = [i for i in in_match_order if shares[i] >= CLOSE_MATCH] if ids else []
    clean = next_token_probs(model, PROBE_PROMPTS, per_prompt=True) if eligible else None
    raised_at: dict[tuple[int, float], list[str]] = {}  # (candidate, strength) -> the words steering raised most
    bar = tqdm(total=len(eligible) * len(strengths), desc="steering candidates", unit="feature",
               disable=not progress, leave=False)

    def ratio(i: int, strength: float) -> float:
        (r, raised), = steering_effects(model, [(candidates[i][0], candidates[i][1].feature, tops[i])], ids,
                                        strength=strength, clean=clean)
        raised_at[i, strength] = raised
        bar.update(1)
        return r

    lead, best = pick_leader(eligible, ratio, strengths)
    bar.close()
    out = []
    for i, ((d, h), m) in enumerate(zip(candidates, matches)):
        r, strength = best.get(i, (None, None))
        raised = raised_at.get((i, strength), [])
        out.append((d, replace(h, score=checked_score(shares[i], i == lead), match_score=m, steer_ratio=r,
                               steer_strength=None if strength is None else float(strength), steer_words=words,
                               steer_promotes=raised)))
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
