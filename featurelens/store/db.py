"""`FeatureStore`: one SQLite file per analyzed dictionary.

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

The database runs in WAL mode; writers group their rows into one transaction per batch, so a crash loses at
most the batch in flight and never leaves half a batch behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from ..engine.errors import FeaturelensError, InputError

SCHEMA_VERSION = 1
UNCLEAR_BELOW = 0.75  # a label scoring under this (AUROC, see featurelens.analysis.scoring) is shown as unclear


def is_clear(score: float | None) -> bool | None:
    """Whether a label with this score is trusted: True/False, None when it has no score."""
    return None if score is None else bool(score >= UNCLEAR_BELOW)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS features (
    idx INTEGER PRIMARY KEY,
    n_fires INTEGER NOT NULL,
    density REAL NOT NULL,
    max_act REAL NOT NULL,
    mean_act REAL NOT NULL,
    hist BLOB,
    logit_up TEXT,
    logit_down TEXT,
    logit_mean REAL,
    logit_std REAL,
    similar TEXT,
    cofire TEXT
);
CREATE TABLE IF NOT EXISTS examples (
    feature INTEGER NOT NULL,
    kind TEXT NOT NULL,
    rank INTEGER NOT NULL,
    bin INTEGER NOT NULL,
    ctx INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    start INTEGER NOT NULL,
    act REAL NOT NULL,
    tokens BLOB NOT NULL,
    acts BLOB NOT NULL,
    PRIMARY KEY (feature, kind, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (id INTEGER PRIMARY KEY, str TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    feature INTEGER NOT NULL,
    provenance TEXT NOT NULL,
    label TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (feature, provenance)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS label_scores (
    feature INTEGER NOT NULL,
    provenance TEXT NOT NULL,
    method TEXT NOT NULL,
    score REAL NOT NULL,
    n_pos INTEGER NOT NULL,
    n_neg INTEGER NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (feature, provenance, method)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS embeddings (
    feature INTEGER NOT NULL,
    model TEXT NOT NULL,
    text_sha TEXT NOT NULL,
    dim INTEGER NOT NULL,
    vecs BLOB NOT NULL,
    PRIMARY KEY (feature, model)
) WITHOUT ROWID;
"""

USER = "user"  # provenance of labels a person wrote
EFFECT_PREFIX = "steer-"  # label-score methods that score what a label says its feature does, not where it fires


class StoreError(FeaturelensError, ValueError):
    """The analysis database is missing, from another schema, or unreadable."""


class StoreReplacedError(StoreError):
    """The database file was replaced (deleted, or another file renamed over it) since this store opened it."""


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class FeatureStore:
    """Read and write one analysis database. Cheap to open; use as a context manager or call close().

    A long-lived store (the server's) asks `changed()` before use and reopens when true; a write to a file that was
    replaced under it raises StoreReplacedError instead of landing in a deleted file.
    """

    def __init__(self, path: str | Path, *, create: bool = False, readonly: bool = False):
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise StoreError(f"{self.path}: no analysis database here")
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.readonly = readonly
        uri = f"file:{self.path}?mode=ro" if readonly else f"file:{self.path}"
        try:
            before = _file_id(self.path)
            self.conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False)
            self._file = _file_id(self.path)
            if before is not None and self._file != before:  # replaced while connecting: which file we hold is unknown
                self.conn.close()
                raise sqlite3.DatabaseError("the file was replaced while it was being opened; open it again")
            if not readonly:
                self.conn.execute("PRAGMA journal_mode=WAL")
                self.conn.execute("PRAGMA synchronous=NORMAL")
            if create:
                self.conn.executescript(_SCHEMA)
                if self.get("schema_version") is None:
                    self.set("schema_version", SCHEMA_VERSION)
            version = self.get("schema_version")
            if version == SCHEMA_VERSION and not readonly and not create:
                self.conn.executescript(_SCHEMA)  # tables added since the store was made start empty (additive)
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a readable analysis database ({e})") from None
        if version != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: analysis schema {version}, this featurelens reads {SCHEMA_VERSION}; "
                             f"run `featurelens analyze --overwrite` to rebuild it")
        self._data_version = self._version()

    def _version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def changed(self) -> bool:
        """Whether another connection committed to the database, or the file was replaced, since this store opened
        it (a rebuild by `featurelens analyze`, a label from the command line): what was read from it may be old."""
        if self.conn is None:
            return True
        return _file_id(self.path) != self._file or self._version() != self._data_version

    # ----------------------------------------------------------------- plumbing
    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None  # type: ignore[assignment]

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def checkpoint(self) -> None:
        """Fold the WAL into the main file (before the file is moved or copied)."""
        self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside land together or not at all."""
        self.conn.execute("BEGIN IMMEDIATE")
        if not self.readonly and _file_id(self.path) != self._file:
            # holding the write lock: the file at our path is not the one we have open (a rebuild renamed another
            # over it); writing would go to a deleted file and be lost
            self.conn.execute("ROLLBACK")
            raise StoreReplacedError(f"{self.path} was replaced since it was opened (rebuilt by `featurelens "
                                     f"analyze`?); open it again and repeat the change")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ----------------------------------------------------------------- meta
    def get(self, key: str, default: Any = None) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, key: str, value: Any) -> None:
        self.conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self) -> dict[str, Any]:
        return {k: json.loads(v) for k, v in self.conn.execute("SELECT key, value FROM meta")}

    # ----------------------------------------------------------------- features
    def write_features(self, rows: Iterable[dict[str, Any]]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO features (idx, n_fires, density, max_act, mean_act, hist, logit_up, logit_down, "
            "logit_mean, logit_std, similar, cofire) VALUES (:idx, :n_fires, :density, :max_act, :mean_act, :hist, "
            ":logit_up, :logit_down, :logit_mean, :logit_std, :similar, :cofire)",
            [_encode_feature(r) for r in rows])

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
            "INSERT OR REPLACE INTO examples (feature, kind, rank, bin, ctx, pos, start, act, tokens, acts) "
            "VALUES (:feature, :kind, :rank, :bin, :ctx, :pos, :start, :act, :tokens, :acts)",
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
        self.conn.executemany("INSERT OR REPLACE INTO tokens (id, str) VALUES (?, ?)", list(items))

    def token_strings(self, ids: Iterable[int] | None = None) -> dict[int, str]:
        if ids is None:
            return dict(self.conn.execute("SELECT id, str FROM tokens"))
        ids = sorted({int(i) for i in ids})
        out: dict[int, str] = {}
        for k in range(0, len(ids), 900):
            part = ids[k:k + 900]
            q = f"SELECT id, str FROM tokens WHERE id IN ({','.join('?' * len(part))})"
            out.update(self.conn.execute(q, part))
        return out

    # ----------------------------------------------------------------- labels
    def set_label(self, idx: int, label: str | None, provenance: str = USER) -> None:
        """Write (or with label None, remove) the label of `idx` from `provenance`."""
        with self.transaction() as c:
            if label is None:
                c.execute("DELETE FROM labels WHERE feature = ? AND provenance = ?", (int(idx), provenance))
            else:
                c.execute("INSERT OR REPLACE INTO labels (feature, provenance, label, created) VALUES (?, ?, ?, ?)",
                          (int(idx), provenance, label, time.time()))
            if self._has_scores():
                c.execute("DELETE FROM label_scores WHERE feature = ? AND provenance = ?", (int(idx), provenance))

    def write_labels(self, rows: Iterable[tuple[int, str, str]]) -> None:
        """(feature, provenance, label) rows; call inside a transaction."""
        now = time.time()
        rows = [(int(f), p, l) for f, p, l in rows]
        self.conn.executemany("INSERT OR REPLACE INTO labels (feature, provenance, label, created) VALUES (?, ?, ?, ?)",
                              [(f, p, l, now) for f, p, l in rows])
        if self._has_scores():
            self.conn.executemany("DELETE FROM label_scores WHERE feature = ? AND provenance = ?",
                                  [(f, p) for f, p, _ in rows])

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
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'label_scores'"
                                 ).fetchone() is not None

    def write_label_scores(self, rows: Iterable[tuple[int, str, str, float, int, int]]) -> None:
        """(feature, provenance, method, score, n_pos, n_neg) rows; call inside a transaction."""
        now = time.time()
        self.conn.executemany(
            "INSERT OR REPLACE INTO label_scores (feature, provenance, method, score, n_pos, n_neg, created) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)", [(int(f), p, m, float(s), int(a), int(b), now) for f, p, m, s, a, b in rows])

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
            "INSERT OR REPLACE INTO embeddings (feature, model, text_sha, dim, vecs) VALUES (?, ?, ?, ?, ?)",
            [(int(f), model, sha, int(np.shape(v)[-1]), np.asarray(v, dtype=np.float32).tobytes())
             for f, sha, v in rows])

    def embeddings(self, model: str) -> dict[int, tuple[str, np.ndarray]]:
        """feature -> (sha1 of the texts embedded, vectors [n, dim]) stored for an embedding model."""
        rows = self.conn.execute("SELECT feature, text_sha, dim, vecs FROM embeddings WHERE model = ?", (model,))
        return {f: (sha, np.frombuffer(v, dtype=np.float32).reshape(-1, dim)) for f, sha, dim, v in rows}


# ----------------------------------------------------------------------------------------------- row codecs
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


def publish(src: str | Path, final: str | Path, n_features: int) -> None:
    """Make the finished database `src` the analysis at `final`, keeping the user's labels of features below
    `n_features` from the old one, and remove `src`.

    Over a readable database the new contents are copied in place, in one transaction: a server reading or writing
    it all along sees the old analysis or the new one, and a label it saves meanwhile is in the result (before the
    copy: kept; after: written into the new contents). A file that is replaced instead of rewritten would leave such
    a server writing into a deleted file. Only a first build, or an unreadable old file, is moved into place.
    """
    from ..io import atomic_replace, crash_point

    src, final = Path(src), Path(final)
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
