"""JSON responses: NaN-free numbers and the dashboard's named fields."""

from __future__ import annotations

import math
from typing import Any

from fastapi.responses import JSONResponse


def clean(v: Any) -> Any:
    """JSON-safe: NaN and infinities become null (JSON has no such numbers)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


def json_response(v: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(clean(v), status_code=status)


def check_len(model: Any, n_tokens: int) -> None:
    """Refuse a text longer than the model's context before any work starts (generation checks it only once
    its stream has begun, too late for a status code)."""
    from ..errors import InputError

    if n_tokens > model.cfg.n_ctx:
        raise InputError(f"{n_tokens} tokens is longer than the model's context of {model.cfg.n_ctx} tokens")


def dashboard_json(fd: Any, dictionary: str) -> dict[str, Any]:
    """A FeatureDashboard as JSON with named fields (tuples become objects)."""

    def ex(x: Any) -> dict[str, Any]:
        return {"tokens": x.tokens, "acts": x.acts, "index": x.index, "act": x.act, "bin": x.bin}

    return {
        "dictionary": dictionary, "feature": fd.index, "d_sae": fd.d_sae, "model": fd.model, "hook_name": fd.hook_name,
        "label": fd.label, "label_provenance": fd.label_provenance, "labels": fd.labels, "density": fd.density,
        "label_score": fd.label_score, "label_score_method": fd.label_score_method, "label_clear": fd.label_clear,
        "n_fires": fd.n_fires, "n_tokens": fd.n_tokens, "max_act": fd.max_act, "mean_act": fd.mean_act,
        "dead": fd.dead,
        "histogram": [{"lo": lo, "hi": hi, "count": c} for lo, hi, c in fd.histogram()],
        "logit_up": [{"token": t, "id": i, "value": v} for t, i, v in fd.logit_up],
        "logit_down": [{"token": t, "id": i, "value": v} for t, i, v in fd.logit_down],
        "similar": [{"feature": i, "cosine": c, "label": lab} for i, c, lab in fd.similar],
        "cofiring": [{"feature": i, "jaccard": j, "p": p, "n": n, "label": lab} for i, j, p, n, lab in fd.cofiring],
        "top_examples": [ex(x) for x in fd.top_examples],
        "quantile_examples": [ex(x) for x in fd.quantile_examples],
    }
