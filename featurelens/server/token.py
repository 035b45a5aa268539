"""The access token `featurelens serve` sets whenever it binds beyond loopback: every request must carry it."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

TOKEN_COOKIE = "featurelens_token"


def install_token_check(app: FastAPI, token: str) -> None:
    """Refuse (401) every request without `token`: header `Authorization: Bearer <token>`, header
    `X-Featurelens-Token`, query `?token=`, or the cookie set when the page was opened with `?token=`."""

    @app.middleware("http")
    async def _require_token(request: Request, call_next: Any) -> Any:
        given = request.query_params.get("token")
        auth = request.headers.get("authorization", "")
        candidates = [request.headers.get("x-featurelens-token"), given, request.cookies.get(TOKEN_COOKIE),
                      auth[7:].strip() if auth.lower().startswith("bearer ") else None]
        if not any(c and hmac.compare_digest(c.encode(), token.encode()) for c in candidates):
            return JSONResponse({"detail": "this server needs its access token: open the URL `featurelens "
                                           "serve` printed (it ends in ?token=...), or send the header "
                                           "Authorization: Bearer <token>"}, status_code=401)
        response = await call_next(request)
        if given:  # the page's own requests (scripts, styles) then carry it as a cookie
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response
