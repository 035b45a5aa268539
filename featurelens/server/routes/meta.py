"""The page and the server's status."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse

from ...version import __version__
from ..responses import json_response
from ..state import State

WEB_DIR = Path(__file__).resolve().parent.parent.parent / "web"

router = APIRouter()


@router.get("/", include_in_schema=False)
def index() -> FileResponse:
    return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/api/health", tags=["meta"], summary="Server status")
def health(state: State) -> JSONResponse:
    return json_response({"ok": True, "version": __version__, "data_dir": str(state.data)})
