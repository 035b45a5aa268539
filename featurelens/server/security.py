"""Who may talk to the server, and how much one client may ask of it.

`install_security(app, ...)` adds, in front of every endpoint:

- Host and Origin checks. A server bound to loopback answers only requests addressed to a loopback name
  (127.0.0.1, localhost, [::1], or the address it was bound to): a web page on another site that re-points its own
  domain to 127.0.0.1 (DNS rebinding) sends its own domain as Host and is refused. A request that carries an Origin
  (browsers send one with every POST, PUT and DELETE, and with cross-site reads) must come from the server's own
  origin, so another site open in the same browser cannot drive the API either.
- A cap on the request body (413), counted as the body arrives, so a client cannot make the server buffer an
  arbitrarily large upload.
- Caps on stored uploaded graphs and on graph jobs queued or running at once (429).

All answers are JSON {"detail": message} saying what the limit is and how to change it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException

_log = logging.getLogger("featurelens.server")
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
MIN_TOKEN_CHARS = 16


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one server accepts. Each can be set by an environment variable of the same name in capitals with the
    prefix FEATURELENS_ (FEATURELENS_MAX_BODY_BYTES=...), read when the app is made."""

    max_body_bytes: int = 64 * 2**20  # a 50,000-node graph upload is about 15 MB
    max_uploads: int = 1000  # graphs stored under graphs/uploads
    max_active_jobs: int = 4  # graph jobs queued or running at once

    @classmethod
    def from_env(cls) -> "Limits":
        kw = {}
        for f in dataclasses.fields(cls):
            v = os.environ.get(f"FEATURELENS_{f.name.upper()}")
            if v is not None:
                try:
                    kw[f.name] = int(v)
                except ValueError:
                    from ..errors import InputError

                    raise InputError(f"FEATURELENS_{f.name.upper()}={v!r} is not a whole number") from None
                if kw[f.name] <= 0:
                    from ..errors import InputError

                    raise InputError(f"FEATURELENS_{f.name.upper()} must be positive, got {v}")
        return cls(**kw)


def host_name(host_header: str) -> str:
    """The name in a Host header or an origin's netloc, without the port ("[::1]:8765" -> "::1")."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def allowed_hosts(bound: str) -> set[str]:
    return {*LOOPBACK_NAMES, host_name(bound) if not bound.startswith("[") else bound.strip("[]").lower(),
            bound.lower()}


def check_token(host: str, token: str | None) -> None:
    """Off loopback a token is required and must not be guessable: at least MIN_TOKEN_CHARS characters."""
    from ..errors import InputError

    if token is not None and len(token) < MIN_TOKEN_CHARS and not is_loopback(host):
        raise InputError(f"--token must be at least {MIN_TOKEN_CHARS} characters when serving beyond this machine "
                         f"(got {len(token)}); leave it out to have one made up")


def is_loopback(host: str) -> bool:
    import ipaddress

    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _deny(status: int, detail: str) -> tuple[int, bytes]:
    return status, json.dumps({"detail": detail}).encode()


class SecurityMiddleware:
    """Pure ASGI middleware (it sees the body as it streams in, which an @app.middleware("http") cannot)."""

    def __init__(self, app: Any, *, data: Path, host: str | None, limits: Limits, jobs: Any):
        self.app = app
        self.data = data
        self.host = host
        self.hosts = allowed_hosts(host) if host is not None and is_loopback(host) else None
        self.limits = limits
        self.jobs = jobs

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                       send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        denied = self._check(scope, headers)
        if denied is not None:
            _log.warning("refused %s %s: %s", scope.get("method"), scope.get("path"), denied[1].decode())
            await _answer(send, *denied)
            return
        limit = self.limits.max_body_bytes
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _answer(send, *self._too_large(int(length)))
            return
        seen = 0
        started = False

        async def counted_receive() -> dict[str, Any]:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(json.loads(self._too_large(seen)[1])["detail"])
            return msg

        async def tracking_send(msg: dict[str, Any]) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _answer(send, *self._too_large(seen))

    def _too_large(self, n: int) -> tuple[int, bytes]:
        return _deny(413, f"the request body is {n:,} bytes or more; this server accepts at most "
                          f"{self.limits.max_body_bytes:,} (set FEATURELENS_MAX_BODY_BYTES to change it)")

    def _check(self, scope: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes] | None:
        host = headers.get("host", "")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return _deny(421, f"this server answers requests addressed to {sorted(self.hosts)} only, not "
                              f"{host!r} (a page that points its own domain at this machine is refused)")
        origin = headers.get("origin")
        if origin is not None:
            parts = urlsplit(origin)
            if origin == "null" or parts.scheme not in ("http", "https") or parts.netloc.lower() != host.lower():
                return _deny(403, f"requests from the web origin {origin!r} are refused: only the server's own pages "
                                  f"({host}) may call its API")
        method, path = scope.get("method", "GET"), scope.get("path", "")
        if method == "POST" and path == "/api/graphs":
            d = self.data / "graphs" / "uploads"
            n = sum(1 for f in d.glob("*.json") if f.name != "graph-metadata.json") if d.is_dir() else 0
            if n >= self.limits.max_uploads:
                return _deny(429, f"{n} uploaded graphs are stored, the most this server keeps "
                                  f"({self.limits.max_uploads}; FEATURELENS_MAX_UPLOADS); delete some from {d}")
        if method == "POST" and path.startswith("/api/jobs/"):
            n = self.jobs.active()
            if n >= self.limits.max_active_jobs:
                return _deny(429, f"{n} jobs are queued or running, the most this server takes at once "
                                  f"({self.limits.max_active_jobs}; FEATURELENS_MAX_ACTIVE_JOBS); wait for one to end "
                                  f"or cancel one (DELETE /api/jobs/<id>)")
        return None


class _BodyTooLarge(HTTPException):
    """Raised from the body stream; an HTTPException, so FastAPI's body reading passes it on as it is (413)."""

    def __init__(self, detail: str):
        super().__init__(413, detail)


async def _answer(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def install_security(app: Any, data: Path, *, host: str | None, limits: Limits | None, jobs: Any) -> None:
    """Put SecurityMiddleware in front of `app` (outermost: it runs before the token check and every endpoint).

    host: the address the server is bound to; when it is a loopback address, only loopback Host names are
    answered. None (an app made for tests or embedding, not bound by `featurelens serve`) skips the Host check.
    """
    app.add_middleware(SecurityMiddleware, data=data, host=host, limits=limits or Limits.from_env(), jobs=jobs)

    # What was on disk changed under a request (an analysis of weights the dictionary no longer has, a database
    # rebuilt while a label was being saved): a conflict with the files, not a bad request.
    from fastapi.responses import JSONResponse

    from ..store import StoreReplacedError
    from .freshness import StaleAnalysisError

    async def _conflict(request: Any, e: Exception) -> Any:
        return JSONResponse({"detail": str(e)}, status_code=409)

    for cls in (StaleAnalysisError, StoreReplacedError):
        app.add_exception_handler(cls, _conflict)
