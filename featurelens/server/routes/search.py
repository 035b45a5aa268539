"""Searching features: by meaning (optionally checked by steering), by a text, by an output token."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from ..responses import json_response
from ..schemas import MAX_K, TextSearchRequest
from ..state import State

router = APIRouter(tags=["search"])


@router.get("/api/search/concept", summary="Features by meaning (labels and top snippets), checked by steering")
def search_concept(state: State,
                   q: str = Query(min_length=1, max_length=500, description="what the features are about"),
                   dictionaries: str = Query("", max_length=4000, description="comma-separated dictionary ids"),
                   k: int = Query(10, ge=1, le=MAX_K),
                   method: Literal["auto", "peaks", "fused", "embedding", "lexical"] = "auto",
                   steerable: bool = Query(True, description="steer the best `pool` matches on neutral prompts in "
                                           "match order; the first that raises the concept's words 4x or "
                                           "more (median prompt) leads (false: the match ranking alone, "
                                           "without loading the model)"),
                   pool: int = Query(10, ge=1, le=50)) -> JSONResponse:
    from ...interventions import rerank_analyses_by_steering
    from ...search import concept_search

    rt = state.runtime
    ids = state.dictionary_ids(dictionaries)
    found: list[tuple[str, Any]] = []
    for did in ids:
        with state.db_lock:
            a = rt.analysis(did)
            found += [(did, h) for h in concept_search(a.store, q, k=max(k, pool) if steerable else k,
                                                       method=method)]
    if steerable:
        with rt.forward_lock:
            analyses = {did: rt.analysis_with_model(did) for did in dict.fromkeys(did for did, _ in found)}
            with state.db_lock:
                max_act = {did: a.store.column("max_act") for did, a in analyses.items()}
            id_of = {id(a): did for did, a in analyses.items()}
            ranked = rerank_analyses_by_steering(q, [(analyses[did], h) for did, h in found],
                                                 max_activations=[float(max_act[did][h.feature]) for did, h in found])
        found = [(id_of[id(a)], h) for a, h in ranked]
    hits = [{"dictionary": did, "feature": h.feature, "score": h.score, "label": h.label,
             "label_score": h.label_score, "label_score_method": h.label_score_method,
             "label_clear": h.label_clear, "max_tokens": h.max_tokens[:5], "snippets": h.snippets[:3],
             "method": h.method, "match_score": h.match_score, "steer_ratio": h.steer_ratio,
             "steer_strength": h.steer_strength, "steer_promotes": h.steer_promotes, "steer_words": h.steer_words} for did, h in found]
    hits.sort(key=lambda h: -h["score"])
    return json_response({"query": q, "hits": hits[:k] if len(ids) > 1 or steerable else hits})


@router.post("/api/search/text", summary="Features that fire on a text, per token (BOS ignored)")
def search_text(state: State, body: TextSearchRequest) -> JSONResponse:
    from ...search import search_text as run

    rt = state.runtime
    out = []
    for did in state.dictionary_ids(body.dictionaries):
        with rt.forward_lock:
            a = rt.analysis_with_model(did)
            with state.db_lock:
                r = run(a, body.text, k=body.k, per_token=body.per_token)
        out.append({"dictionary": did, "tokens": r.tokens,
                    "overall": [{"feature": h.feature, "max_act": h.max_act, "relative": h.relative,
                                 "token_index": h.token_index, "label": h.label, "acts": h.acts}
                                for h in r.overall],
                    "per_token": [[{"feature": f, "act": v, "relative": rel, "label": lab}
                                   for f, v, rel, lab in row] for row in r.per_token]})
    return json_response({"text": body.text, "results": out})


@router.get("/api/search/token", summary="Features whose logit lens promotes a token")
def search_token(state: State,
                 token: str = Query(min_length=1, max_length=100, description='a single token, e.g. " Paris"'),
                 dictionaries: str = Query("", max_length=4000),
                 k: int = Query(10, ge=1, le=MAX_K)) -> JSONResponse:
    from ...search import search_promotes

    rt = state.runtime
    hits = []
    for did in state.dictionary_ids(dictionaries):
        with rt.forward_lock:
            a = rt.analysis_with_model(did)
            with state.db_lock:
                for h in search_promotes(a, token, k=k):
                    hits.append({"dictionary": did, "feature": h.feature, "logit": h.logit, "zscore": h.zscore,
                                 "label": h.label})
    hits.sort(key=lambda h: -h["logit"])
    return json_response({"token": token, "hits": hits})
