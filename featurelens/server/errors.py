"""How errors become responses: JSON `{"detail": message}` always.

featurelens's own errors (`FeaturelensError` and its subclasses, raised on purpose for bad input or missing files)
say what is wrong: 404 for what is not there (an unknown id, a missing file, a feature index out of range), 422 for
a graph or request that breaks the format's rules, 409 for a stored file that cannot be used as it is (a damaged
analysis or dictionary: the request is fine, the data directory needs repair, and the message says how), 400 for
other bad input. Anything else is a bug of the server or the library: 500 with a generic message, and the
traceback in the server's log.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ..errors import FeaturelensError
from ..models.gguf import CorruptFileError
from ..store import StoreError
from ..attribution.schema import GraphFormatError
from .responses import clean

logger = logging.getLogger("featurelens.server")

INTERNAL_ERROR = "internal server error: this is a bug in featurelens; the server's log has the details"


def status_for(e: FeaturelensError) -> int:
    # featurelens's error classes also derive from the built-in class that says what went wrong
    if isinstance(e, GraphFormatError):
        return 422
    if isinstance(e, (StoreError, CorruptFileError)) and not isinstance(e, LookupError):
        return 409
    if isinstance(e, PermissionError):
        return 403
    if isinstance(e, (LookupError, FileNotFoundError)):
        return 404
    return 400


def message_of(e: FeaturelensError) -> str:
    # str() of a KeyError is the repr of its argument: quoted
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


async def _featurelens_error(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, FeaturelensError)
    return JSONResponse({"detail": message_of(e)}, status_code=status_for(e))


async def _invalid_request(request: Request, e: Exception) -> JSONResponse:
    assert isinstance(e, RequestValidationError)
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return JSONResponse({"detail": "; ".join(parts) or "invalid request", "errors": clean(
        [{"loc": list(err.get("loc", ())), "msg": err.get("msg"), "type": err.get("type")} for err in e.errors()])},
        status_code=422)


class InternalErrors:
    """ASGI middleware: an exception no handler took becomes a 500 with a generic message, logged with its traceback.

    Outermost of the app's own middleware, so it also answers for the others. A response already started (a stream)
    cannot change its status: the exception goes on to the ASGI server, which logs it and closes the connection."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except Exception:
            if started:  # the ASGI server logs it and closes the connection
                raise
            logger.exception("internal error answering %s %s", scope.get("method"), scope.get("path"))
            await JSONResponse({"detail": INTERNAL_ERROR}, status_code=500)(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FeaturelensError, _featurelens_error)
    app.add_exception_handler(RequestValidationError, _invalid_request)


def install_internal_errors(app: FastAPI) -> None:
    """Call after every other middleware is added: the last added is the outermost."""
    app.add_middleware(InternalErrors)
