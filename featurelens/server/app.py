"""The featurelens web app: a JSON API over the data directory (the same API the browser pages use) and the pages.

>>> from featurelens.server import create_app
>>> app = create_app("~/.cache/featurelens")          # then: uvicorn.run(app, host="127.0.0.1", port=8765)

or from the shell: `featurelens serve` (http://127.0.0.1:8765/; the OpenAPI description is at /openapi.json and
browsable at /docs). Every heavy endpoint is a plain `def`, so FastAPI runs it in a worker thread and the server
keeps answering while a model runs; forward passes are serialized by one lock (see runtime.py).

The routes are in `routes/` (one `APIRouter` per area); what they share is one `AppState` (state.py); errors become
responses as errors.py says.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from ..version import __version__
from .errors import install_error_handlers, install_internal_errors
from .instance import clean_on_start
from .jobs import JobManager
from .routes import ROUTERS
from .routes.meta import WEB_DIR
from .runtime import Runtime
from .security import Limits, install_security
from .state import AppState
from .token import install_token_check


def create_app(data_dir: str | Path, *, model_loader: Callable[[str], Any] | None = None,
               token: str | None = None, host: str | None = None, limits: Limits | None = None,
               device: str | None = None, db: str | None = None) -> FastAPI:
    """The FastAPI app serving `data_dir`.

    model_loader: name -> HookedTransformer (default `fl.load_model`); models load on first use, once.
    device: where the default loader puts models and where dictionaries are loaded (default cpu).
    token: when set, every request must carry it (header `Authorization: Bearer <token>`, header
    `X-Featurelens-Token`, or query `?token=`); `featurelens serve` sets one whenever it binds beyond loopback.
    host: the address the server is bound to (loopback: only loopback Host names are answered); limits: body size,
    stored uploads, jobs at once (default `Limits.from_env()`). See security.py.
    db: a PostgreSQL database (postgresql://user@host/db) whose analyses are served beside the data directory's,
    listed as "@pg.<name>"; checked here, so a wrong URL or a server that is down stops the start with a message.

    >>> from fastapi.testclient import TestClient
    >>> client = TestClient(create_app("~/.cache/featurelens"))
    >>> client.get("/api/dictionaries").json()
    """
    data = Path(data_dir).expanduser()
    data.mkdir(parents=True, exist_ok=True)
    clean_on_start(data)
    if db is not None:
        from ..store.backends import check_reachable

        check_reachable(db)
    state = AppState(data=data, runtime=Runtime(data, model_loader, device=device, db=db),
                     jobs=JobManager(data / "server" / "jobs"), db=db)

    # FastAPI's /docs and /redoc pages load their scripts from the web; the app's own #/api page reads /openapi.json
    app = FastAPI(title="featurelens", version=__version__, docs_url=None, redoc_url=None,
                  description="Local Neuronpedia: dictionaries, feature dashboards, search, steering and attribution "
                              "graphs over the featurelens data directory. Errors are JSON {\"detail\": message}.")
    app.state.featurelens = state
    app.state.runtime, app.state.jobs = state.runtime, state.jobs

    for router in ROUTERS:
        app.include_router(router)
    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    install_error_handlers(app)
    # Middleware: every check made before a request reaches its route is installed here (the last added runs first).
    if token:
        install_token_check(app, token)
    app.state.limits = limits = limits or Limits.from_env()  # the upload route caps the database's uploads too
    install_security(app, data, host=host, limits=limits, jobs=state.jobs)
    install_internal_errors(app)  # last: the outermost, it answers 500 for an exception anything above let through
    return app
