"""What every route shares: the data directory, the loaded models and analyses (`Runtime`), the background jobs and
the locks, in one `AppState` that routes receive as a FastAPI dependency (`state: State`)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from . import catalog
from .catalog import UnknownIdError
from ..attribution.schema import GraphFormatError, validate_upload
from .jobs import JobManager
from .runtime import Runtime
from .schemas import MAX_DICTS


@dataclass
class AppState:
    data: Path
    runtime: Runtime
    jobs: JobManager
    # one SQLite connection per analysis, shared by the worker threads
    db_lock: threading.RLock = field(default_factory=threading.RLock)
    # read-modify-write of a graph file (subgraphs)
    graph_lock: threading.Lock = field(default_factory=threading.Lock)
    # graph id -> (file's mtime, AttentionCircuits, transcoders id): the frozen models of recently asked graphs (routes/attention.py)
    circuits: dict[str, tuple[int, Any, str]] = field(default_factory=dict)
    db: str | None = None  # a PostgreSQL database whose analyses are served too (`featurelens serve --db`)

    def list_dictionaries(self) -> list[dict[str, Any]]:
        """The catalog: the data directory's dictionaries and analyses, and those in the PostgreSQL database."""
        return catalog.list_dictionaries(self.data, self.db)

    def find_dictionary(self, ident: str) -> dict[str, Any]:
        """The catalog entry of a dictionary id (404 for an id that names nothing)."""
        catalog.dictionary_dir(self.data, ident, self.db)  # raises a clear 404 for a bad id
        for d in self.list_dictionaries():
            if d["id"] == ident:
                return d
        raise UnknownIdError(f"no dictionary {ident!r}")

    def dictionary_ids(self, given: list[str] | str | None) -> list[str]:
        """The dictionaries a search runs over: those given (a list, or comma-separated), else every analyzed one."""
        if isinstance(given, str):
            given = [x for x in given.split(",") if x]
        if given:
            if len(given) > MAX_DICTS:
                raise GraphFormatError(f"at most {MAX_DICTS} dictionaries per search")
            for g in given:
                catalog.dictionary_dir(self.data, g, self.db)
            return list(dict.fromkeys(given))
        ids = [d["id"] for d in self.list_dictionaries() if d["analyzed"]]
        if not ids:
            from ..analysis import NotAnalyzedError

            raise NotAnalyzedError("no analyzed dictionary in the data directory: run `featurelens analyze` on one")
        return ids[:MAX_DICTS]

    def load_graph(self, gid: str) -> tuple[Path | None, dict[str, Any]]:
        """(file, checked graph JSON) of a graph id; the file is None for a graph in the PostgreSQL database."""
        key = catalog.pg_graph_key(gid)
        if key is not None:
            if self.db is None:
                raise UnknownIdError(f"no graph {gid!r}: this server has no database (featurelens serve --db)")
            from ..store.graphs import read_graph

            where, text = f"graph {gid!r}", read_graph(self.db, *key)
            f = None
        else:
            f = catalog.graph_file(self.data, gid)
            where, text = str(f), f.read_bytes()
        try:
            g = json.loads(text)
        except ValueError as e:
            raise GraphFormatError(f"{where} is not valid JSON ({e})") from None
        return f, validate_upload(g)

    def graph_transcoders(self, g: dict[str, Any]) -> str | None:
        """The dictionary id of the transcoders a graph was made with: recorded by the server when it computed the
        graph, else found from the transcoders' path that featurelens writes into the graph's metadata."""
        info = g["metadata"].get("info") if isinstance(g["metadata"].get("info"), dict) else {}
        fl_info = info.get("featurelens") if isinstance(info.get("featurelens"), dict) else {}
        t = fl_info.get("transcoders_id")
        if isinstance(t, str) and t:
            return t
        t = fl_info.get("transcoders")
        if isinstance(t, str) and t:
            return catalog.dictionary_id_of_path(self.data, t)
        return None

    def layer_analyses_or_none(self, tid: str | None) -> dict[int, Any]:
        """{layer: analysis} of a transcoder set's analyzed layers; empty when the set is unknown or gone."""
        if tid is None:
            return {}
        try:
            return self.runtime.layer_analyses(tid)
        except (UnknownIdError, FileNotFoundError):
            return {}


def get_state(request: Request) -> AppState:
    return request.app.state.featurelens


State = Annotated[AppState, Depends(get_state)]
