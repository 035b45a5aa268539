"""Steering: default and steered continuations side by side, whole or streamed token by token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from ...errors import FeaturelensError
from ..errors import INTERNAL_ERROR, logger, message_of
from ...attribution.schema import GraphFormatError
from ..responses import check_len, json_response
from ..schemas import SteerRequest
from ..state import AppState, State
from ..streaming import side_by_side, sse

router = APIRouter(tags=["steering"])


def _known(top: Any, feature: int) -> float | None:
    """The analysis's max activation of `feature`, None when unknown (then `Steer` looks it up itself)."""
    if top is None or not 0 <= feature < len(top) or not top[feature] > 0:
        return None
    return float(top[feature])


def _steer_setup(state: AppState, body: SteerRequest) -> tuple[Any, list[tuple[str, Any]], list[str]]:
    import warnings

    from ...dictionaries import SparseDictionary, TranscoderSet
    from ...interventions import Steer, intervention_hooks

    rt = state.runtime
    with rt.forward_lock:
        sae = rt.dictionary(body.dictionary)
        if not isinstance(sae, SparseDictionary):
            kind = "a set of transcoders" if isinstance(sae, TranscoderSet) else "a cross-layer transcoder"
            raise GraphFormatError(f"{body.dictionary!r} is {kind}; steer with one dictionary (an SAE or one "
                                   f"transcoder)")
        model = rt.model(getattr(sae.cfg, "model_name", "") or state.find_dictionary(body.dictionary)["model"])
        # relative strength means what it means on the feature's page and in the search's steering check: a share
        # of the max activation its analysis recorded (an analysis kept apart from its dictionary is found here)
        top = None
        if body.mode == "relative" and state.find_dictionary(body.dictionary).get("analyzed"):
            with state.db_lock:
                top = rt.analysis(body.dictionary).store.column("max_act")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            its = [Steer(sae, f.feature, f.strength, mode=body.mode, max_activation=_known(top, f.feature))
                   for f in body.features]
        hooks = intervention_hooks(model, its)
    return model, hooks, [repr(i) for i in its] + [i.note for i in its if i.note]


@router.post("/api/steer", summary="Default and steered continuations (complete)")
def steer(state: State, body: SteerRequest) -> JSONResponse:
    model, hooks, desc = _steer_setup(state, body)
    texts = {"default": "", "steered": ""}
    for side, delta, _ in side_by_side(model, state.runtime.forward_lock, body.prompt, hooks, body.max_new_tokens,
                                       body.temperature, body.top_p, body.seed):
        texts[side] += delta
    return json_response({"prompt": body.prompt, **texts, "interventions": desc, "seed": body.seed})


@router.post("/api/steer/stream",
             summary="Default and steered continuations, streamed token by token (server-sent events)",
             response_description="text/event-stream: `token` events {side, text, step}, then `done` (or `error`)")
def steer_stream(state: State, body: SteerRequest) -> StreamingResponse:
    model, hooks, desc = _steer_setup(state, body)
    with state.runtime.forward_lock:
        n = len(model.encode(body.prompt))
    check_len(model, n + body.max_new_tokens)

    def events() -> Any:
        yield sse("start", {"prompt": body.prompt, "interventions": desc, "seed": body.seed})
        try:
            for side, delta, step in side_by_side(model, state.runtime.forward_lock, body.prompt, hooks,
                                                  body.max_new_tokens, body.temperature, body.top_p, body.seed):
                yield sse("token", {"side": side, "text": delta, "step": step})
            yield sse("done", {})
        except FeaturelensError as e:  # the headers are sent: report in the stream
            yield sse("error", {"detail": message_of(e)})
        except Exception:  # noqa: BLE001  (a bug: logged, and the stream says so)
            logger.exception("internal error in a steering stream")
            yield sse("error", {"detail": INTERNAL_ERROR})

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
