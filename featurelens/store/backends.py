"""Where a `FeatureStore` keeps its tables: a SQLite file (the embedded default) or a schema of a PostgreSQL
database (one database shared by a team holds many analyses).

Everything SQL that differs between the two lives here: connecting, the column types of the schema, placeholders
(the store writes SQLite's ``?`` and ``:name``; PostgreSQL gets ``%s`` and ``%(name)s``), transactions, asking
whether a table exists, and noticing that another connection changed the data. Upserts are written once, as
``INSERT ... ON CONFLICT``, which both understand.

A PostgreSQL analysis is named by a URL with the analysis after ``#``: ``postgresql://user@host/db#my-sae``. Each
analysis is its own schema (``fl_<name>``) with the same tables as a SQLite file, so every query of the store is the
same text on both backends, an analysis is dropped or listed as a unit, and two analyses never contend for the same
rows or indexes (keying every table by an analysis id instead would put that id into every primary key and query).
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..engine.errors import FeaturelensError, InputError

PG_SCHEMES = ("postgresql://", "postgres://")
SCHEMA_PREFIX = "fl_"
MAX_NAME = 63 - len(SCHEMA_PREFIX)  # PostgreSQL's identifiers are at most 63 bytes
NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,%d}$" % MAX_NAME)


class StoreError(FeaturelensError, ValueError):
    """The analysis database is missing, from another schema, or unreadable."""


class AnalysisNotFoundError(StoreError, LookupError):
    """No analysis by that name in the PostgreSQL database."""


class StoreConnectionError(StoreError):
    """The PostgreSQL server named by a store URL could not be reached or refused the connection."""


def is_postgres_url(target: Any) -> bool:
    return isinstance(target, str) and target.startswith(PG_SCHEMES)


@dataclass(frozen=True)
class PgLocation:
    """One analysis in a PostgreSQL database: the connection URL (without the analysis) and the analysis name."""

    url: str
    name: str

    @property
    def schema(self) -> str:
        return SCHEMA_PREFIX + self.name

    def __str__(self) -> str:
        return f"{redact(self.url)}#{self.name}"


def redact(url: str) -> str:
    """The URL with its password hidden, for messages."""
    url = re.sub(r"^(\w+://[^:/@]*):[^@/]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url)


def check_url(url: str) -> str:
    """A PostgreSQL URL libpq accepts, or an InputError saying what is wrong with it."""
    if not is_postgres_url(url):
        raise InputError(f"{url!r} is not a PostgreSQL URL (postgresql://[user[:password]@][host][:port]/database)")
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:
        raise InputError("PostgreSQL support needs psycopg: pip install 'featurelens[postgres]'") from None
    try:
        params = conninfo_to_dict(url)
    except Exception as e:  # psycopg.ProgrammingError: libpq's own words say what is wrong
        raise InputError(f"malformed PostgreSQL URL {redact(url)!r}: {str(e).strip()}") from None
    ports = str(params.get("port") or "")
    if ports and not all(p.isdigit() and 0 < int(p) < 65536 for p in ports.split(",")):
        raise InputError(f"malformed PostgreSQL URL {redact(url)!r}: the port {ports!r} is not a number in 1-65535")
    return url


def pg_location(target: str, name: str | None = None) -> PgLocation:
    """The analysis a URL names: `name`, else the part after '#'."""
    url, _, frag = target.partition("#")
    name = name or frag
    if not name:
        raise InputError(f"{redact(url)}: say which analysis in the database: append '#<name>' to the URL")
    if not NAME_RE.match(name):
        raise InputError(f"{name!r} is not a valid analysis name (letters, digits, "
                          f"'.', '_', '-'; at most {MAX_NAME})")
    return PgLocation(check_url(url), name)


def pg_connect(url: str) -> Any:
    """A psycopg connection in autocommit mode (the store opens its transactions itself)."""
    check_url(url)
    import psycopg

    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as e:
        msg = " ".join(str(e).split())
        raise StoreConnectionError(f"cannot connect to the PostgreSQL server at {redact(url)}: {msg}") from None


def check_reachable(url: str) -> None:
    """Connect once and let go: a StoreConnectionError (or InputError) now, instead of at the end of a long job.
    `url` may end in '#<analysis name>', which is checked too."""
    base, _, name = url.partition("#")
    if name:
        pg_location(url)
    pg_connect(base).close()


class _Cursor:
    """Rows of a query, read as a list (psycopg fetches them all anyway), with the DB-API calls the store uses."""

    def __init__(self, rows: list[tuple], description: Any):
        self._rows = rows
        self._i = 0
        self.description = description

    def __iter__(self) -> Iterator[tuple]:
        while self._i < len(self._rows):
            self._i += 1
            yield self._rows[self._i - 1]

    def fetchone(self) -> tuple | None:
        if self._i >= len(self._rows):
            return None
        self._i += 1
        return self._rows[self._i - 1]

    def fetchall(self) -> list[tuple]:
        out, self._i = self._rows[self._i:], len(self._rows)
        return out


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


def to_pyformat(sql: str) -> str:
    """SQLite's placeholders as psycopg's; the store's SQL has no literal '?', '%' or ':name'."""
    return _NAMED.sub(r"%(\1)s", sql.replace("?", "%s"))


class Backend:
    """What a FeatureStore needs from its database; `conn` has SQLite's execute/executemany (and placeholders)."""

    kind: str
    types: dict[str, str]
    lock: threading.RLock

    def transaction(self) -> contextlib.AbstractContextManager: ...
    def encode_token(self, s: str) -> Any: ...
    def decode_token(self, v: Any) -> str: ...
    def has_table(self, name: str) -> bool: ...
    def stamp(self) -> Any: ...
    def close(self) -> None: ...


class SQLiteBackend(Backend):
    kind = "sqlite"
    types = {"blob": "BLOB", "real": "REAL", "bigint": "INTEGER", "norowid": " WITHOUT ROWID", "token_text": "TEXT"}

    @staticmethod
    def encode_token(s: str) -> Any:
        return s

    @staticmethod
    def decode_token(v: Any) -> str:
        return v

    def __init__(self, path: Path, readonly: bool):
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self.conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False)
        self.lock = threading.RLock()
        if not readonly:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")

    def script(self, sql: str) -> None:
        # one statement at a time: executescript would commit the transaction it is called in
        for stmt in sql.split(";"):
            if stmt.strip():
                self.conn.execute(stmt)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")  # takes the write lock now: no upgrade deadlock between two writers
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 (name,)).fetchone() is not None

    def stamp(self) -> Any:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


class _PgConn:
    """A psycopg connection with the sqlite3 calls the store (and its callers) make, placeholders translated."""

    def __init__(self, raw: Any, lock: threading.RLock):
        self.raw = raw
        self.lock = lock

    def execute(self, sql: str, args: Sequence[Any] | dict[str, Any] = ()) -> _Cursor:
        with self.lock:
            cur = self.raw.execute(to_pyformat(sql), args if args else None)
            rows = cur.fetchall() if cur.description is not None else []
            return _Cursor([tuple(r) for r in rows], cur.description)

    def executemany(self, sql: str, rows: Sequence[Any]) -> None:
        rows = list(rows)
        if rows:
            with self.lock, self.raw.cursor() as cur:
                cur.executemany(to_pyformat(sql), rows)

    def close(self) -> None:
        self.raw.close()


class PostgresBackend(Backend):
    kind = "postgresql"
    types = {"blob": "BYTEA", "real": "DOUBLE PRECISION", "bigint": "BIGINT", "norowid": "",
             "token_text": "BYTEA"}

    @staticmethod
    def encode_token(s: str) -> Any:
        return s.encode("utf-8", "surrogatepass")  # a token may be a NUL byte, which text columns refuse

    @staticmethod
    def decode_token(v: Any) -> str:
        return bytes(v).decode("utf-8", "surrogatepass")

    def __init__(self, loc: PgLocation, readonly: bool = False):
        self.loc = loc
        self.lock = threading.RLock()  # one transaction at a time on the shared connection (the server's threads)
        raw = pg_connect(loc.url)
        # the schema's tables, unqualified, are the analysis's: every query reads the same as on SQLite
        raw.execute("SELECT set_config('search_path', %s, false)", (_quote(loc.schema),))
        if readonly:  # as SQLite's mode=ro: a write is refused by the server, not merely not attempted
            raw.execute("SET default_transaction_read_only = on")
        self.conn = _PgConn(raw, self.lock)

    def schema_exists(self) -> bool:
        return self.conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = ?", (self.loc.schema,)).fetchone() \
            is not None

    def create_schema(self) -> None:
        self.conn.execute(f"CREATE SCHEMA IF NOT EXISTS {_quote(self.loc.schema)}")

    def script(self, sql: str) -> None:
        with self.lock:
            self.conn.raw.execute(sql)  # no parameters: several statements in one call

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self.lock, self.conn.raw.transaction():
            yield

    def advisory_lock(self, what: str) -> None:
        """Hold a lock on `what` in this analysis until the transaction ends (migrations, publishing)."""
        self.conn.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (f"featurelens:{self.loc.schema}:{what}",))

    def has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT 1 FROM pg_tables WHERE schemaname = ? AND tablename = ?",
                                 (self.loc.schema, name)).fetchone() is not None

    def stamp(self) -> Any:
        """Changes when the analysis is rebuilt (published again) or dropped and made anew."""
        try:
            row = self.conn.execute("SELECT n.oid, m.value FROM pg_namespace n LEFT JOIN meta m ON m.key = "
                                    "'completed' WHERE n.nspname = ?", (self.loc.schema,)).fetchone()
        except Exception:  # the schema was dropped: the tables are gone
            return None
        return row

    def close(self) -> None:
        self.conn.close()


def _quote(ident: str) -> str:
    return '"' + ident.replace('"', '""') + '"'


def list_pg_analyses(url: str) -> dict[str, dict[str, Any]]:
    """name -> the meta (key -> JSON text) of every analysis in a PostgreSQL database: its schemas with a meta
    table, read over one connection."""
    conn = pg_connect(url)
    out: dict[str, dict[str, Any]] = {}
    try:
        schemas = [r[0] for r in conn.execute(
            "SELECT schemaname FROM pg_tables WHERE tablename = 'meta' AND starts_with(schemaname, %s) "
            "ORDER BY schemaname", (SCHEMA_PREFIX,))]
        for schema in schemas:
            name = schema[len(SCHEMA_PREFIX):]
            if NAME_RE.match(name):
                rows = conn.execute(f"SELECT key, value FROM {_quote(schema)}.meta WHERE key IN "
                                    f"('dictionary', 'status', 'model')").fetchall()
                out[name] = dict(rows)
    finally:
        conn.close()
    return out


def sqlite_file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
