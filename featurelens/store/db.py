"""`FeatureStore`: one analyzed dictionary, in a SQLite file (the default) or in its own schema of a shared
PostgreSQL database (`backends` holds what differs between the two; every method here is written once).

Tables (all keyed by the feature index):

    meta        key -> JSON value: which dictionary, model, corpus and settings produced it; progress; timings
    features    per feature: firing count, density, max / mean activation, histogram of nonzero activations
                (int32 counts over the log-spaced edges in meta["hist"]), logit lens (top up / down token ids and
                values, mean and std over the vocabulary), most similar features by decoder cosine, top co-firing
    examples    per feature: its top activating contexts (kind "top", rank 0 = strongest) and examples sampled
                across activation quantiles (kind "quantile", bin 0 = lowest); each holds a window of token ids
                (int32) and the feature's activation on every token of it (float16), and where it sits in the corpus
    tokens      token id -> its text, for every token shown anywhere (so reading needs no tokenizer)
    labels      (feature, provenance) -> label: "auto:v3" from the built-in explainer, "user" for edits,
                whatever name another explainer gives; the current label is the user's, else the newest
    label_scores (feature, provenance, method) -> how well that label predicts where the feature fires (AUROC
                of telling its activating contexts from others, see `featurelens.analysis.scoring`), or, for a
                method starting with EFFECT_PREFIX, what steering the feature does to the words the label says it
                promotes (`fl.score_label_effects`); rewriting a label deletes its scores, so a stored score always
                belongs to the label text beside it
    embeddings  (feature, embedding model) -> float32 vectors [n, dim] of the feature's search texts (its label,
                then its top snippets) and the sha1 of those texts (a changed label makes them stale: re-embedded)

A SQLite database runs in WAL mode; writers group their rows into one transaction per batch, so a crash loses at
most the batch in flight and never leaves half a batch behind. Every write is a row-level upsert (INSERT ... ON
CONFLICT) or delete inside such a transaction, never a read-modify-write: on PostgreSQL, several processes (label
edits from the web app, explainers, a rebuild being published) write one analysis at once without losing an update.

Schema changes are ordered `MIGRATIONS`, applied when a store is opened for writing; `schema_version` records how
far a store is.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from ..engine.errors import InputError
from .backends import (AnalysisNotFoundError, PgLocation, PostgresBackend, SQLiteBackend, StoreError, is_postgres_url,
                       pg_location, sqlite_file_id)

UNCLEAR_BELOW = 0.75  # a label scoring under this (AUROC, see featurelens.analysis.scoring) is shown as unclear


def is_clear(score: float | None) -> bool | None:
    """Whether a label with this score is trusted: True/False, None when it has no score."""
    return None if score is None else bool(score >= UNCLEAR_BELOW)


# Ordered migration steps: step N brings a store at version N-1 to N, in one transaction, and `schema_version`
# records N. Column types are the backend's ({blob}, {real}, {bigint}; {norowid} is SQLite's WITHOUT ROWID;
# {token_text} holds token strings, which may contain NUL: TEXT in SQLite, UTF-8 BYTEA in PostgreSQL).
# Step 1 is the first schema; written with IF NOT EXISTS, it also completes a SQLite file made before
# `schema_version` existed (such a file says schema 1 in meta and may lack the later tables).
MIGRATIONS: list[str] = ["""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    idx INTEGER PRIMARY KEY,
    n_fires {bigint} NOT NULL,
    density {real} NOT NULL,
    max_act {real} NOT NULL,
    mean_act {real} NOT NULL,
    hist {blob},
    logit_up TEXT,
    logit_down TEXT,
    logit_mean {real},
    logit_std {real},
    "similar" TEXT,
    cofire TEXT
);
CREATE TABLE IF NOT EXISTS examples (
    feature INTEGER NOT NULL,
    kind TEXT NOT NULL,
    rank INTEGER NOT NULL,
    bin INTEGER NOT NULL,
    ctx {bigint} NOT NULL,
    pos INTEGER NOT NULL,
    start INTEGER NOT NULL,
    act {real} NOT NULL,
    tokens {blob} NOT NULL,
    acts {blob} NOT NULL,
    PRIMARY KEY (feature, kind, rank)
){norowid};
CREATE TABLE IF NOT EXISTS tokens (id INTEGER PRIMARY KEY, str {token_text} NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    feature INTEGER NOT NULL,
    provenance TEXT NOT NULL,
    label TEXT NOT NULL,
    created {real} NOT NULL,
    PRIMARY KEY (feature, provenance)
){norowid};
CREATE TABLE IF NOT EXISTS label_scores (
    feature INTEGER NOT NULL,
    provenance TEXT NOT NULL,
    method TEXT NOT NULL,
    score {real} NOT NULL,
    n_pos INTEGER NOT NULL,
    n_neg INTEGER NOT NULL,
    created {real} NOT NULL,
    PRIMARY KEY (feature, provenance, method)
){norowid};
CREATE TABLE IF NOT EXISTS embeddings (
    feature INTEGER NOT NULL,
    model TEXT NOT NULL,
    text_sha TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vecs {blob} NOT NULL,
    PRIMARY KEY (feature, model)
){norowid};
"""]
SCHEMA_VERSION = len(MIGRATIONS)
TABLES = ("meta", "features", "examples", "tokens", "labels", "label_scores", "embeddings")  # in lock order
_KEYS = {"meta": ("key",), "features": ("idx",), "examples": ("feature", "kind", "rank"), "tokens": ("id",),
         "labels": ("feature", "provenance"), "label_scores": ("feature", "provenance", "method"),
         "embeddings": ("feature", "model")}

USER = "user"  # provenance of labels a person wrote
FEATURE_COLUMNS = ("idx", "n_fires", "density", "max_act", "mean_act", "hist", "logit_up", "logit_down", "logit_mean",
                   "logit_std", "similar", "cofire")
EXAMPLE_COLUMNS = ("feature", "kind", "rank", "bin", "ctx", "pos", "start", "act", "tokens", "acts")
LABEL_COLUMNS = ("feature", "provenance", "label", "created")
EFFECT_PREFIX = "steer-"  # label-score methods that score what a label says its feature does, not where it fires


def _upsert(table: str, cols: Sequence[str], named: bool = False) -> str:
    """INSERT that replaces the row with the same key (both backends understand ON CONFLICT ... DO UPDATE)."""
    key = _KEYS[table]
    vals = ", ".join(f":{c}" for c in cols) if named else ", ".join("?" * len(cols))
    sets = ", ".join(f'"{c}" = excluded."{c}"' for c in cols if c not in key)
    return (f"INSERT INTO {table} ({', '.join(f'{chr(34)}{c}{chr(34)}' for c in cols)}) VALUES ({vals}) "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {sets}")


class StoreReplacedError(StoreError):
    """The database file was replaced (deleted, or another file renamed over it) since this store opened it."""


def store_target(target: str | Path | PgLocation) -> Path | PgLocation:
    """A SQLite path or a PostgreSQL analysis (a `PgLocation`, or a URL ending in '#<analysis name>')."""
    if isinstance(target, PgLocation):
        return target
    if is_postgres_url(target):
        return pg_location(str(target))
    if isinstance(target, str) and "://" in target:
        raise InputError(f"{target!r}: a store is a file path or a postgresql:// URL")
    return Path(target)


class FeatureStore:
    """Read and write one analysis: a SQLite file, or a schema of a PostgreSQL database (see `backends`). Cheap to
    open; use as a context manager or call close().

    A long-lived store (the server's) asks `changed()` before use and reopens when true; a write to a file that was
    replaced under it raises StoreReplacedError instead of landing in a deleted file.
    """

    def __init__(self, path: str | Path | PgLocation, *, create: bool = False, readonly: bool = False):
        target = store_target(path)
        self.readonly = readonly
        self._file: tuple[int, int] | None = None
        if isinstance(target, PgLocation):
            self.path: Any = target
            self._b: SQLiteBackend | PostgresBackend = self._open_postgres(target, create)
        else:
            self.path = target
            self._b = self._open_sqlite(target, create)
        self.conn: Any = self._b.conn
        self.backend = self._b.kind
        try:
            version = self._migrate()
        except (sqlite3.DatabaseError, self._pg_errors()) as e:
            self._b.close()
            raise StoreError(f"{self.path}: not a readable analysis database ({' '.join(str(e).split())})") from None
        if version != SCHEMA_VERSION:
            self._b.close()
            raise StoreError(f"{self.path}: analysis schema {version}, this featurelens reads {SCHEMA_VERSION}; "
                             f"run `featurelens analyze --overwrite` to rebuild it")
        self._data_version = self._b.stamp()

    @staticmethod
    def _pg_errors() -> type[Exception]:
        try:
            import psycopg
        except ImportError:
            return sqlite3.DatabaseError
        return psycopg.Error

    def _open_sqlite(self, path: Path, create: bool) -> SQLiteBackend:
        if not create and not path.is_file():
            raise StoreError(f"{path}: no analysis database here")
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            before = sqlite_file_id(path)
            b = SQLiteBackend(path, self.readonly)
            self._file = sqlite_file_id(path)
            if before is not None and self._file != before:  # replaced while connecting: which file we hold is unknown
                b.close()
                raise sqlite3.DatabaseError("the file was replaced while it was being opened; open it again")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{path}: not a readable analysis database ({e})") from None
        return b

    def _open_postgres(self, loc: PgLocation, create: bool) -> PostgresBackend:
        b = PostgresBackend(loc, self.readonly)
        if not create and not b.schema_exists():
            b.close()
            raise AnalysisNotFoundError(f"{loc}: no analysis named {loc.name!r} in this database")
        return b

    def _migrate(self) -> int | None:
        """Apply the migration steps this store lacks (not when read-only); its schema version after."""
        b = self._b
        if self.readonly:
            return self._stored_version()
        with b.transaction():
            if isinstance(b, PostgresBackend):
                b.advisory_lock("migrate")  # two processes opening a new analysis at once migrate it once
                b.create_schema()
            if b.has_table("schema_version"):
                version = self._stored_version() or 0
            else:  # new, or a SQLite file from before migrations: step 1 (IF NOT EXISTS) completes it
                legacy = self.get("schema_version") if b.has_table("meta") else None
                if legacy not in (None, 1):
                    return legacy
                version = 0
                b.script("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            if version > SCHEMA_VERSION:
                return version
            for step in range(version, SCHEMA_VERSION):
                b.script(MIGRATIONS[step].format(**b.types))
            if version < SCHEMA_VERSION:
                self.conn.execute("DELETE FROM schema_version")
                self.conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            if self.get("schema_version") is None:
                self.set("schema_version", SCHEMA_VERSION)  # what featurelens before migrations checks
        return SCHEMA_VERSION

    def _stored_version(self) -> int | None:
        if self._b.has_table("schema_version"):
            row = self.conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            if row and row[0] is not None:
                return int(row[0])
        if not self._b.has_table("meta"):
            return None
        v = self.get("schema_version")  # a SQLite file from before the schema_version table
        return int(v) if isinstance(v, int) else v

    def changed(self) -> bool:
        """Whether another connection committed to the database, or the file was replaced, since this store opened
        it (a rebuild by `featurelens analyze`, a label from the command line): what was read from it may be old.
        On PostgreSQL: whether the analysis was published again (or dropped) since."""
        if self.conn is None:
            return True
        if self._file is not None and sqlite_file_id(self.path) != self._file:
            return True
        return self._b.stamp() != self._data_version

    # ----------------------------------------------------------------- plumbing
    def close(self) -> None:
        if self.conn is not None:
            self._b.close()
            self.conn = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def checkpoint(self) -> None:
        """Fold the WAL into the main file (before the file is moved or copied); nothing to do on PostgreSQL."""
        if self.backend == "sqlite":
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Any]:
        """All writes inside land together or not at all."""
        with self._b.transaction():
            if self._file is not None and not self.readonly and sqlite_file_id(self.path) != self._file:
                # holding the write lock: the file at our path is not the one we have open (a rebuild renamed
                # another over it); writing would go to a deleted file and be lost
                raise StoreReplacedError(f"{self.path} was replaced since it was opened (rebuilt by `featurelens "
                                         f"analyze`?); open it again and repeat the change")
            yield self.conn

    # ----------------------------------------------------------------- meta
    def get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value: Any) -> None:
        self.conn.execute(_upsert("meta", ("key", "value")), (key, json.dumps(value)))

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    # ----------------------------------------------------------------- features
    def write_features(self, rows: Iterable[dict[str, Any]]) -> None:
        self.conn.executemany(_upsert("features", FEATURE_COLUMNS, named=True), [_encode_feature(r) for r in rows])

    def feature(self, idx: int) -> dict[str, Any] | None:
        cur = self.conn.execute("SELECT * FROM features WHERE idx = ?", (int(idx),))
        row = cur.fetchone()
        if row is None:
            return None
        return _decode_feature(dict(zip([c[0] for c in cur.description], row)))

    def n_features(self) -> int:
        return int(self.conn.execute("SELECT COUNT(*) FROM features").fetchone()[0])

    def column(self, name: str) -> np.ndarray:
        """One scalar column of every feature, indexed by feature (NaN where missing)."""
        if name not in ("n_fires", "density", "max_act", "mean_act", "logit_mean", "logit_std"):
            raise InputError(f"not a scalar feature column: {name!r}")
        rows = self.conn.execute(f"SELECT idx, {name} FROM features").fetchall()
        n = max((r[0] for r in rows), default=-1) + 1
        out = np.full(n, np.nan)
        for i, v in rows:
            out[i] = np.nan if v is None else v
        return out

    def logit_lists(self) -> Iterator[tuple[int, list, list]]:
        for idx, up, down in self.conn.execute("SELECT idx, logit_up, logit_down FROM features ORDER BY idx"):
            yield idx, json.loads(up) if up else [], json.loads(down) if down else []

    # ----------------------------------------------------------------- examples
    def write_examples(self, rows: Iterable[dict[str, Any]]) -> None:
        self.conn.executemany(
            _upsert("examples", EXAMPLE_COLUMNS, named=True),
            [{**r, "tokens": np.asarray(r["tokens"], dtype=np.int32).tobytes(),
              "acts": np.asarray(r["acts"], dtype=np.float16).tobytes()} for r in rows])

    def examples(self, idx: int, kind: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        sql = "SELECT feature, kind, rank, bin, ctx, pos, start, act, tokens, acts FROM examples WHERE feature = ?"
        args: list[Any] = [int(idx)]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY kind DESC, rank"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        return [_decode_example(r) for r in self.conn.execute(sql, args)]

    def top_examples_all(self, limit: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        """(feature, its first `limit` top examples) for every feature, in feature order."""
        cur = self.conn.execute(
            "SELECT feature, kind, rank, bin, ctx, pos, start, act, tokens, acts FROM examples "
            "WHERE kind = 'top' AND rank < ? ORDER BY feature, rank", (int(limit),))
        current, batch = None, []
        for r in cur:
            if r[0] != current and batch:
                yield current, batch  # type: ignore[misc]
                batch = []
            current = r[0]
            batch.append(_decode_example(r))
        if batch:
            yield current, batch  # type: ignore[misc]

    def examples_by_feature(self, kind: str) -> dict[int, list[dict[str, Any]]]:
        """feature -> all its examples of `kind` ("top" or "quantile"), in rank order, from one scan."""
        out: dict[int, list[dict[str, Any]]] = {}
        cur = self.conn.execute("SELECT feature, kind, rank, bin, ctx, pos, start, act, tokens, acts FROM examples "
                                "WHERE kind = ? ORDER BY feature, rank", (kind,))
        for r in cur:
            out.setdefault(r[0], []).append(_decode_example(r))
        return out

    # ----------------------------------------------------------------- tokens
    def write_tokens(self, items: Iterable[tuple[int, str]]) -> None:
        enc = self._b.encode_token
        self.conn.executemany(_upsert("tokens", ("id", "str")), [(int(i), enc(t)) for i, t in items])

    def token_strings(self, ids: Iterable[int] | None = None) -> dict[int, str]:
        dec = self._b.decode_token
        if ids is None:
            return {i: dec(t) for i, t in self.conn.execute("SELECT id, str FROM tokens")}
        ids = sorted({int(i) for i in ids})
        out: dict[int, str] = {}
        for k in range(0, len(ids), 900):
            part = ids[k:k + 900]
            q = f"SELECT id, str FROM tokens WHERE id IN ({','.join('?' * len(part))})"
            out.update((i, dec(t)) for i, t in self.conn.execute(q, part))
        return out

    # ----------------------------------------------------------------- labels
    def set_label(self, idx: int, label: str | None, provenance: str = USER) -> None:
        """Write (or with label None, remove) the label of `idx` from `provenance`."""
        with self.transaction() as c:
            if label is None:
                c.execute("DELETE FROM labels WHERE feature = ? AND provenance = ?", (int(idx), provenance))
            else:
                c.execute(_upsert("labels", LABEL_COLUMNS), (int(idx), provenance, _clean(label), time.time()))
            if self._has_scores():
                c.execute("DELETE FROM label_scores WHERE feature = ? AND provenance = ?", (int(idx), provenance))

    def write_labels(self, rows: Iterable[tuple[int, str, str]]) -> None:
        """(feature, provenance, label) rows; call inside a transaction."""
        now = time.time()
        # in key order: two writers taking the same rows take them in the same order (no deadlock on PostgreSQL)
        rows = sorted({(int(f), p): _clean(l) for f, p, l in rows}.items())
        self.conn.executemany(_upsert("labels", LABEL_COLUMNS), [(f, p, l, now) for (f, p), l in rows])
        if self._has_scores():
            self.conn.executemany("DELETE FROM label_scores WHERE feature = ? AND provenance = ?",
                                  [k for k, _ in rows])

    def labels(self, idx: int) -> list[dict[str, Any]]:
        """Every label of a feature, the current one first, each with its score ("score", "score_method": None
        when it has none; see `label_scores`)."""
        rows = self.conn.execute("SELECT provenance, label, created FROM labels WHERE feature = ?", (int(idx),))
        scores = self.label_scores(idx)
        out = [{"provenance": p, "label": l, "created": t, "score": scores.get(p, {}).get("score"),
                "score_method": scores.get(p, {}).get("method")} for p, l, t in rows]
        out.sort(key=lambda r: (r["provenance"] != USER, -r["created"]))
        return out

    def current_labels(self) -> dict[int, tuple[str, str]]:
        """feature -> (label, provenance) of its current label."""
        best: dict[int, tuple[str, str, float]] = {}
        for f, p, l, t in self.conn.execute("SELECT feature, provenance, label, created FROM labels"):
            cur = best.get(f)
            rank = (p == USER, t)
            if cur is None or rank > (cur[1] == USER, cur[2]):
                best[f] = (l, p, t)
        return {f: (l, p) for f, (l, p, _) in best.items()}

    def user_labels(self) -> list[tuple[int, str, float]]:
        return list(self.conn.execute("SELECT feature, label, created FROM labels WHERE provenance = ?", (USER,)))

    # ----------------------------------------------------------------- label scores
    def _has_scores(self) -> bool:
        """False only for a store from before label scores, opened read-only (its table was never made)."""
        return self._b.has_table("label_scores")

    def write_label_scores(self, rows: Iterable[tuple[int, str, str, float, int, int]]) -> None:
        """(feature, provenance, method, score, n_pos, n_neg) rows; call inside a transaction."""
        now = time.time()
        self.conn.executemany(
            _upsert("label_scores", ("feature", "provenance", "method", "score", "n_pos", "n_neg", "created")),
            sorted((int(f), p, m, float(s), int(a), int(b), now) for f, p, m, s, a, b in rows))

    @staticmethod
    def _score_kind(effects: bool) -> str:
        """The SQL condition on `method` for where-it-fires scores (effects False) or what-it-does ones (True)."""
        return "method LIKE ?" if effects else "method NOT LIKE ?"  # EFFECT_PREFIX has no LIKE wildcard

    def label_scores(self, idx: int, effects: bool = False) -> dict[str, dict[str, Any]]:
        """provenance -> {"score", "method", "n_pos", "n_neg"} for the labels of `idx` that have a score: how well
        each predicts where the feature fires, or with `effects` what steering the feature does to the words it
        says the feature promotes."""
        if not self._has_scores():
            return {}
        rows = self.conn.execute("SELECT provenance, method, score, n_pos, n_neg, created FROM label_scores "
                                 f"WHERE feature = ? AND {self._score_kind(effects)} ORDER BY created",
                                 (int(idx), EFFECT_PREFIX + "%"))
        return {p: {"score": s, "method": m, "n_pos": a, "n_neg": b} for p, m, s, a, b, _ in rows}

    def current_label_scores(self, effects: bool = False) -> dict[int, tuple[float, str]]:
        """feature -> (score, method) of its current label, for the features whose current label has one (the
        where-it-fires score; with `effects`, the what-it-does one)."""
        if not self._has_scores():
            return {}
        scores: dict[tuple[int, str], tuple[float, str]] = {}
        for f, p, m, s in self.conn.execute("SELECT feature, provenance, method, score FROM label_scores "
                                            f"WHERE {self._score_kind(effects)} ORDER BY created",
                                            (EFFECT_PREFIX + "%",)):
            scores[(f, p)] = (s, m)
        return {f: scores[(f, p)] for f, (_, p) in self.current_labels().items() if (f, p) in scores}

    # ----------------------------------------------------------------- embeddings
    def write_embeddings(self, model: str, rows: Sequence[tuple[int, str, np.ndarray]]) -> None:
        """(feature, sha1 of its texts, vectors [n, dim]) rows; call inside a transaction."""
        self.conn.executemany(
            _upsert("embeddings", ("feature", "model", "text_sha", "dim", "vecs")),
            [(int(f), model, sha, int(np.shape(v)[-1]), np.asarray(v, dtype=np.float32).tobytes())
             for f, sha, v in rows])

    def embeddings(self, model: str) -> dict[int, tuple[str, np.ndarray]]:
        """feature -> (sha1 of the texts embedded, vectors [n, dim]) stored for an embedding model."""
        rows = self.conn.execute("SELECT feature, text_sha, dim, vecs FROM embeddings WHERE model = ?", (model,))
        return {f: (sha, np.frombuffer(v, dtype=np.float32).reshape(-1, dim)) for f, sha, dim, v in rows}


# ----------------------------------------------------------------------------------------------- row codecs
def _clean(label: str) -> str:
    """A label as stored: without NUL characters (meaningless in a label; PostgreSQL's text refuses them)."""
    return label.replace("\x00", "")


def _encode_feature(r: dict[str, Any]) -> dict[str, Any]:
    out = dict(r)
    out["hist"] = np.asarray(r["hist"], dtype=np.int32).tobytes() if r.get("hist") is not None else None
    for k in ("logit_up", "logit_down", "similar", "cofire"):
        out[k] = json.dumps(r[k]) if r.get(k) is not None else None
    out.setdefault("logit_mean", None)
    out.setdefault("logit_std", None)
    return out


def _decode_feature(r: dict[str, Any]) -> dict[str, Any]:
    r["hist"] = np.frombuffer(r["hist"], dtype=np.int32).copy() if r["hist"] is not None else None
    for k in ("logit_up", "logit_down", "similar", "cofire"):
        r[k] = json.loads(r[k]) if r[k] else []
    return r


def _decode_example(r: Sequence[Any]) -> dict[str, Any]:
    feature, kind, rank, bin_, ctx, pos, start, act, tokens, acts = r
    return {"feature": feature, "kind": kind, "rank": rank, "bin": bin_, "ctx": ctx, "pos": pos, "start": start,
            "act": act, "tokens": np.frombuffer(tokens, dtype=np.int32).tolist(),
            "acts": np.frombuffer(acts, dtype=np.float16).astype(np.float32).tolist()}


def publish(src: str | Path, final: str | Path | PgLocation, n_features: int) -> None:
    """Make the finished database `src` the analysis at `final` (a SQLite path or a PostgreSQL analysis), keeping
    the user's labels of features below `n_features` from the old one, and remove `src`.

    Over a readable database the new contents are copied in place, in one transaction: a server reading or writing
    it all along sees the old analysis or the new one, and a label it saves meanwhile is in the result (before the
    copy: kept; after: written into the new contents). A file that is replaced instead of rewritten would leave such
    a server writing into a deleted file. Only a first build, or an unreadable old file, is moved into place.
    """
    from ..io import atomic_replace, crash_point

    src = Path(src)
    final = store_target(final)
    if isinstance(final, PgLocation):
        _publish_postgres(src, final, n_features)
        src.unlink()
        return
    final = Path(final)
    live = None
    if final.is_file():
        try:
            live = FeatureStore(final)
        except StoreError:
            live = None  # from another schema or unreadable: nothing can be serving it
    if live is None:
        for suffix in ("-wal", "-shm"):  # a stale WAL would be replayed into the new file
            Path(str(final) + suffix).unlink(missing_ok=True)
        atomic_replace(src, final)
        return
    try:
        c = live.conn
        c.execute("ATTACH DATABASE ? AS fresh", (f"file:{src}?mode=ro",))
        try:
            tables = [r[0] for r in c.execute("SELECT name FROM fresh.sqlite_master WHERE type = 'table'")]
            with live.transaction():
                for t in tables:
                    cols = ", ".join(f'"{r[1]}"' for r in c.execute(f'PRAGMA fresh.table_info("{t}")'))
                    if t == "labels":
                        c.execute("DELETE FROM main.labels WHERE provenance != ? OR feature >= ?", (USER, n_features))
                        c.execute(f"INSERT OR IGNORE INTO main.labels ({cols}) SELECT {cols} FROM fresh.labels")
                    else:
                        c.execute(f'DELETE FROM main."{t}"')
                        c.execute(f'INSERT INTO main."{t}" ({cols}) SELECT {cols} FROM fresh."{t}"')
                crash_point("publish:before-commit")
        finally:
            c.execute("DETACH DATABASE fresh")
        try:
            c.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.DatabaseError:
            pass
    finally:
        live.close()
    src.unlink()


COPY_BATCH = 2000  # rows per round trip when copying into PostgreSQL


def _publish_postgres(src: Path, final: PgLocation, n_features: int) -> None:
    """Copy the finished SQLite build `src` into the PostgreSQL analysis `final` in one transaction, as `publish`
    does in place over a live SQLite file: readers see the old analysis or the new one, the user's labels are kept,
    and a label saved meanwhile lands before the copy (kept) or after it (in the new contents). Two publishes of one
    analysis take turns (an advisory lock); analyses in other schemas do not wait for each other."""
    from ..io import crash_point

    with FeatureStore(src, readonly=True) as fresh, FeatureStore(final, create=True) as live:
        with live.transaction():
            assert isinstance(live._b, PostgresBackend)
            live._b.advisory_lock("publish")
            for t in TABLES:
                if not fresh._b.has_table(t):
                    continue
                cols = [r[1] for r in fresh.conn.execute(f'PRAGMA table_info("{t}")')]
                names = ", ".join(f'"{c}"' for c in cols)
                insert = f"INSERT INTO {t} ({names}) VALUES ({', '.join('?' * len(cols))})"
                if t == "labels":
                    live.conn.execute("DELETE FROM labels WHERE provenance != ? OR feature >= ?", (USER, n_features))
                    insert += " ON CONFLICT DO NOTHING"  # the user's label stays the user's
                else:
                    live.conn.execute(f"DELETE FROM {t}")
                cur = fresh.conn.execute(f"SELECT {names} FROM {t} ORDER BY {', '.join(_KEYS[t])}")
                while rows := cur.fetchmany(COPY_BATCH):
                    if t == "tokens":
                        rows = [(i, live._b.encode_token(s)) for i, s in rows]
                    live.conn.executemany(insert, rows)
            crash_point("publish:before-commit")
