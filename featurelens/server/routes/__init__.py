"""The API's routes, one `APIRouter` per area; `create_app` includes them in this order."""

from __future__ import annotations

from . import attention, dictionaries, features, graphs, jobs, meta, models, search, steering

ROUTERS = [meta.router, models.router, dictionaries.router, features.router, search.router, steering.router,
           graphs.router, attention.router, jobs.router]

__all__ = ["ROUTERS"]
