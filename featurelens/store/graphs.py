"""Attribution graphs kept in a PostgreSQL database (`featurelens serve --db`, `featurelens graph-push`).

A graph file's set and slug (<data dir>/graphs/<set>/<slug>.json) become the key of one row of
``featurelens_graphs.graphs``: the graph JSON as the exact bytes given (BYTEA: what is pushed is what is served, so
circuit-tracer's and Neuronpedia's readers see the file unchanged), the graph's metadata (its entry of
graph-metadata.json, JSON text) and when it was saved. The schema is not ``fl_<name>``, so no analysis name can
collide with it, and it is brought up to date by ordered migrations under an advisory lock, as an analysis's is.

Two writers of the same (set, slug) never leave a duplicate or half a row (the key is the primary key; each save is
one statement). Two policies, chosen by the caller:

- ``add_graph`` (the web app's uploads and graph jobs) never replaces: it inserts under the first free slug
  ``<slug>``, ``<slug>-2``, ... (``INSERT ... ON CONFLICT DO NOTHING``), so two people saving the same name at once
  both keep their graph, as in a graph set on disk.
- ``put_graph`` (``featurelens graph-push``, a saved subgraph) replaces: ``INSERT ... ON CONFLICT DO UPDATE``, the
  later save wins whole (bytes and metadata together, never one from each).
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from ..engine.errors import InputError
from .backends import StoreError, _quote, pg_connect

SCHEMA = "featurelens_graphs"
NAME_RE = re.compile(r"^[A-Za-z0-9._+=-]{1,200}$")  # a set or a slug: one segment of a graph id
MAX_SUFFIX = 10000  # `<slug>-N` tried before giving up (a set that full is a runaway client)

# Ordered steps, as the analyses' MIGRATIONS: step N brings the schema from version N-1 to N.
MIGRATIONS: list[str] = ["""
CREATE TABLE IF NOT EXISTS graphs (
    set_name TEXT NOT NULL,
    slug TEXT NOT NULL,
    data BYTEA NOT NULL,
    metadata TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (set_name, slug)
);
"""]
SCHEMA_VERSION = len(MIGRATIONS)


class GraphNotFoundError(StoreError, LookupError):
    """No graph of that set and slug in the database."""


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise InputError(f"{name!r} is not a valid graph {what} (letters, digits, '.', '_', '-', '+', '='; "
                         f"at most 200)")
    return name


def _connect(url: str) -> Any:
    """A connection whose unqualified tables are the graphs schema's, migrated to this featurelens's version."""
    conn = pg_connect(url)
    try:
        with conn.transaction():
            # two processes meeting a new database at once create the schema once
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"featurelens:{SCHEMA}:migrate",))
            conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(SCHEMA)}")
            conn.execute("SELECT set_config('search_path', %s, false)", (_quote(SCHEMA),))
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = int(row[0]) if row and row[0] is not None else 0
            if version > SCHEMA_VERSION:
                raise StoreError(f"the graphs in this database are at schema {version}; this featurelens reads "
                                 f"{SCHEMA_VERSION}: upgrade featurelens")
            for step in range(version, SCHEMA_VERSION):
                conn.execute(MIGRATIONS[step])
            if version < SCHEMA_VERSION:
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION,))
    except BaseException:
        conn.close()
        raise
    return conn


def _metadata(data: bytes) -> dict[str, Any]:
    try:
        g = json.loads(data)
    except ValueError as e:
        raise InputError(f"the graph is not valid JSON ({e})") from None
    meta = g.get("metadata") if isinstance(g, dict) else None
    if not isinstance(meta, dict):
        raise InputError("the graph has no 'metadata' object (circuit-tracer's graph JSON)")
    return meta


def put_graph(url: str, set_name: str, slug: str, data: bytes) -> None:
    """Store the graph JSON `data` (bytes kept exactly) as (set_name, slug), replacing one of that key: the later
    save wins. Its listed metadata is the graph's own, with this slug."""
    check_name(set_name, "set")
    check_name(slug, "slug")
    meta = json.dumps(dict(_metadata(data), slug=slug))
    conn = _connect(url)
    try:
        conn.execute("INSERT INTO graphs (set_name, slug, data, metadata, created) VALUES (%s, %s, %s, %s, %s) "
                     "ON CONFLICT (set_name, slug) DO UPDATE SET data = excluded.data, "
                     "metadata = excluded.metadata, created = excluded.created",
                     (set_name, slug, bytes(data), meta, time.time()))
    finally:
        conn.close()


def add_graph(url: str, set_name: str, graph: dict[str, Any], slug: str) -> str:
    """Store `graph` (a graph JSON object) under the first free slug of `slug`, `slug-2`, ... in the set; never
    replaces a graph. Sets `graph["metadata"]["slug"]` to the slug taken and returns it."""
    check_name(set_name, "set")
    check_name(slug, "slug")
    conn = _connect(url)
    try:
        for i in range(1, MAX_SUFFIX + 1):
            s = slug if i == 1 else f"{slug}-{i}"
            graph["metadata"]["slug"] = s
            row = conn.execute("INSERT INTO graphs (set_name, slug, data, metadata, created) "
                               "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (set_name, slug) DO NOTHING RETURNING slug",
                               (set_name, s, json.dumps(graph).encode("utf-8"), json.dumps(graph["metadata"]),
                                time.time())).fetchone()
            if row is not None:
                return s
    finally:
        conn.close()
    raise StoreError(f"set {set_name!r} already holds {slug!r} and {MAX_SUFFIX - 1} numbered variants of it")


def read_graph(url: str, set_name: str, slug: str) -> bytes:
    """The stored bytes of a graph; GraphNotFoundError when there is none."""
    conn = _connect(url)
    try:
        row = conn.execute("SELECT data FROM graphs WHERE set_name = %s AND slug = %s", (set_name, slug)).fetchone()
    finally:
        conn.close()
    if row is None:
        raise GraphNotFoundError(f"no graph {slug!r} in set {set_name!r} of the database")
    return bytes(row[0])


def list_graphs(url: str) -> list[dict[str, Any]]:
    """Every stored graph as {"set", "slug", "metadata", "created", "size"}, by set then slug."""
    conn = _connect(url)
    try:
        rows = conn.execute("SELECT set_name, slug, metadata, created, octet_length(data) FROM graphs "
                            "ORDER BY set_name, slug").fetchall()
    finally:
        conn.close()
    out = []
    for set_name, slug, meta, created, size in rows:
        try:
            m = json.loads(meta)
        except ValueError:
            m = {}
        out.append({"set": set_name, "slug": slug, "metadata": m if isinstance(m, dict) else {},
                    "created": float(created), "size": int(size)})
    return out


def count_graphs(url: str, set_name: str) -> int:
    """How many graphs the set holds."""
    conn = _connect(url)
    try:
        return int(conn.execute("SELECT count(*) FROM graphs WHERE set_name = %s", (set_name,)).fetchone()[0])
    finally:
        conn.close()


def delete_graph(url: str, set_name: str, slug: str) -> bool:
    """Remove a graph; whether there was one."""
    conn = _connect(url)
    try:
        row = conn.execute("DELETE FROM graphs WHERE set_name = %s AND slug = %s RETURNING slug",
                           (set_name, slug)).fetchone()
    finally:
        conn.close()
    return row is not None


__all__ = ["GraphNotFoundError", "SCHEMA", "add_graph", "check_name", "count_graphs", "delete_graph", "list_graphs",
           "put_graph", "read_graph"]
