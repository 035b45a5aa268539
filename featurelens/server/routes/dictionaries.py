"""Dictionaries: the list, with their metrics, and one."""

from __future__ import annotations

from fastapi import APIRouter, Path as PathParam
from fastapi.responses import JSONResponse

from ..responses import json_response
from ..state import State

router = APIRouter(tags=["data"])


@router.get("/api/dictionaries", summary="Dictionaries with L0, explained variance, CE loss recovered")
def dictionaries(state: State) -> JSONResponse:
    return json_response(state.list_dictionaries())


@router.get("/api/dictionaries/{dictionary}", summary="One dictionary")
def dictionary(state: State, dictionary: str = PathParam(max_length=400)) -> JSONResponse:
    return json_response(state.find_dictionary(dictionary))
