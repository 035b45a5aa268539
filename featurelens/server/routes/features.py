"""One feature: its dashboard, your label, its activations on your text."""

from __future__ import annotations

from fastapi import APIRouter, Path as PathParam
from fastapi.responses import JSONResponse

from ...store import is_clear
from ...attribution.schema import GraphFormatError
from ..responses import dashboard_json, json_response
from ..schemas import LabelRequest, TextRequest
from ..state import State

router = APIRouter(tags=["features"])


@router.get("/api/dictionaries/{dictionary}/features/{feature}",
            summary="Feature dashboard: label, snippets, quantiles, density, histogram, logit lens, neighbours")
def feature(state: State, dictionary: str = PathParam(max_length=400),
            feature: int = PathParam(ge=0, le=10**9)) -> JSONResponse:
    with state.db_lock:
        fd = state.runtime.analysis(dictionary).feature(feature)
    return json_response(dashboard_json(fd, dictionary))


@router.put("/api/dictionaries/{dictionary}/features/{feature}/label",
            summary="Set (or with null remove) your label of a feature")
def set_label(state: State, body: LabelRequest, dictionary: str = PathParam(max_length=400),
              feature: int = PathParam(ge=0, le=10**9)) -> JSONResponse:
    label = body.label
    if label is not None and not label.strip():
        raise GraphFormatError("label: a label has some text in it (send null to remove your label)")
    with state.db_lock:
        a = state.runtime.analysis(dictionary)
        a.set_label(feature, label)
        labels = a.store.labels(a.check_index(feature))
    cur = labels[0] if labels else None
    score = cur["score"] if cur else None
    return json_response({"feature": feature, "label": cur["label"] if cur else None,
                          "provenance": cur["provenance"] if cur else None, "label_score": score,
                          "label_score_method": cur["score_method"] if cur else None, "label_clear": is_clear(score),
                          "labels": labels})


@router.post("/api/dictionaries/{dictionary}/features/{feature}/activations",
             summary="Test your own text: the feature's activation on each token")
def activations(state: State, body: TextRequest, dictionary: str = PathParam(max_length=400),
                feature: int = PathParam(ge=0, le=10**9)) -> JSONResponse:
    from ...search import feature_activations

    with state.runtime.forward_lock:
        a = state.runtime.analysis_with_model(dictionary)
        with state.db_lock:
            acts = feature_activations(a, feature, body.text)
            top = float(a.store.feature(acts.feature)["max_act"] or 0.0)
    return json_response({"feature": acts.feature, "tokens": acts.tokens, "acts": acts.acts, "max": max(acts.acts),
                          "max_act_corpus": top, "bos_ignored": True})
