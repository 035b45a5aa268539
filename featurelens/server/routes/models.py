"""What the data directory holds: the overview and its models."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from .. import catalog
from ..responses import json_response
from ..state import State

router = APIRouter(tags=["data"])


@router.get("/api/overview", summary="Models, dictionaries (with metrics) and saved graphs")
def overview(state: State) -> JSONResponse:
    dicts = state.list_dictionaries()
    return json_response({"data_dir": str(state.data), "models": catalog.list_models(state.data, dicts),
                          "dictionaries": dicts, "graphs": catalog.list_graphs(state.data, state.db)})


@router.get("/api/models", summary="Models: embedded, converted, and named by dictionaries")
def models(state: State) -> JSONResponse:
    return json_response(catalog.list_models(state.data, state.list_dictionaries()))
