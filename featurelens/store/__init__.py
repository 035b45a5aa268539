"""Where analyses live, and the SQLite store that holds them.

An analyzed dictionary keeps its analysis in a directory:

- ``<dictionary dir>/analysis/`` when the dictionary is a directory we can write to (it travels with it);
- otherwise ``<data dir>/analysis/<name>-<hash>/`` (a read-only dictionary, or one held only in memory).

Inside: ``features.sqlite`` once an analysis is complete (see `FeatureStore`), and ``building/`` while one runs
(its partial database and ``state.safetensors``, the streaming state saved per chunk of batches). A finished
analysis is never written by a new run: ``--overwrite`` builds into ``building/`` and copies the result into the live
file in one transaction at the end (`publish`: a server with the file open keeps reading and writing the right one).
One analysis builds at a time in a directory (``build.lock``, see `featurelens.io.hold_lock`).

An analysis may instead live in a PostgreSQL database (``analyze(..., store="postgresql://...")``): it is still
built in a local ``building/`` directory (resumable as above) and then copied into its schema of the database in one
transaction (`publish`), so the shared database only ever holds finished analyses.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..paths import sub_dir
from .backends import (AnalysisNotFoundError, PgLocation, StoreConnectionError, is_postgres_url, list_pg_analyses,
                       pg_location)
from .db import (EFFECT_PREFIX, UNCLEAR_BELOW, USER, FeatureStore, StoreError, StoreReplacedError, is_clear, publish,
                 store_target)

DB_FILE = "features.sqlite"
BUILD_DIR = "building"
BUILD_LOCK = "build.lock"
ANALYSIS_SUBDIR = "analysis"


def _writable(d: Path) -> bool:
    return d.is_dir() and os.access(d, os.W_OK | os.X_OK)


def analysis_dir_for_path(path: str | Path) -> Path:
    """The analysis directory of a dictionary directory (see the module docstring)."""
    p = Path(path).expanduser().resolve()
    if p.is_file():
        p = p.parent
    local = p / ANALYSIS_SUBDIR
    # a folder not made yet under a writable one (a cross-layer transcoder's layer_L) is made with the analysis
    if local.is_dir() or _writable(p) or (not p.exists() and _writable(p.parent)):
        return local
    return data_analysis_dir(p.name, str(p))


def analysis_slug(name: str, key: str, max_len: int = 200) -> str:
    """A file- and schema-safe name for an analysis: `name` cleaned and cut to fit, then a hash of `key`."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "dictionary"
    return f"{slug[:max_len - 11]}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def data_analysis_dir(name: str, key: str) -> Path:
    return sub_dir(ANALYSIS_SUBDIR) / analysis_slug(name, key)


__all__ = ["ANALYSIS_SUBDIR", "BUILD_DIR", "BUILD_LOCK", "DB_FILE", "FeatureStore", "StoreError", "StoreReplacedError",
           "EFFECT_PREFIX", "UNCLEAR_BELOW", "USER", "is_clear", "publish", "store_target",
           "AnalysisNotFoundError", "PgLocation", "StoreConnectionError", "is_postgres_url", "list_pg_analyses",
           "pg_location",
           "analysis_dir_for_path", "analysis_slug",
           "data_analysis_dir"]
