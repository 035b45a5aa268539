"""Attribution graphs in the PostgreSQL database (`featurelens.store.graphs`): bytes read back exactly, listing and
deleting, the migration made once, concurrent saves from two processes losing and duplicating nothing, the
`graph-push` command, and clear errors for bad names and URLs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import builders as web
from featurelens.cli import main
from featurelens.errors import InputError
from featurelens.store.graphs import (SCHEMA, GraphNotFoundError, add_graph, delete_graph, list_graphs, put_graph,
                                      read_graph)

REPO = Path(__file__).resolve().parents[2]


def _graph_bytes(slug: str = "synthetic", seed: int = 0) -> bytes:
    g = web.synthetic_graph(40, 80, seed=seed)
    g["metadata"]["slug"] = slug
    # spacing and key order a re-encoding would change: the stored bytes must be these
    return json.dumps(g, indent=1, ensure_ascii=True).encode("utf-8") + b"\n"


def test_put_read_list_delete_round_trip(postgres_db):
    data = _graph_bytes("one")
    put_graph(postgres_db, "team", "one", data)
    assert read_graph(postgres_db, "team", "one") == data
    [row] = list_graphs(postgres_db)
    assert (row["set"], row["slug"], row["size"]) == ("team", "one", len(data))
    assert row["metadata"]["prompt"] == json.loads(data)["metadata"]["prompt"] and row["created"] > 0
    newer = _graph_bytes("one", seed=1)
    put_graph(postgres_db, "team", "one", newer)  # the later save replaces, never a second row
    assert read_graph(postgres_db, "team", "one") == newer and len(list_graphs(postgres_db)) == 1
    assert delete_graph(postgres_db, "team", "one") and not delete_graph(postgres_db, "team", "one")
    with pytest.raises(GraphNotFoundError, match="no graph 'one' in set 'team'"):
        read_graph(postgres_db, "team", "one")
    import psycopg

    with psycopg.connect(postgres_db, autocommit=True) as conn:  # made once, by the migration
        assert conn.execute(f"SELECT version FROM {SCHEMA}.schema_version").fetchall() == [(1,)]


def test_add_graph_takes_a_free_slug_and_never_replaces(postgres_db):
    first, second = web.synthetic_graph(30, 40, seed=0), web.synthetic_graph(30, 40, seed=1)
    assert add_graph(postgres_db, "uploads", first, "name") == "name"
    assert add_graph(postgres_db, "uploads", second, "name") == "name-2"
    assert second["metadata"]["slug"] == "name-2"
    assert json.loads(read_graph(postgres_db, "uploads", "name")) == first
    assert json.loads(read_graph(postgres_db, "uploads", "name-2")) == second
    assert sorted(r["slug"] for r in list_graphs(postgres_db)) == ["name", "name-2"]


def test_bad_names_and_graphs_are_refused(postgres_db):
    with pytest.raises(InputError, match="not a valid graph slug"):
        put_graph(postgres_db, "team", "../up", _graph_bytes())
    with pytest.raises(InputError, match="not a valid graph set"):
        put_graph(postgres_db, "a/b", "x", _graph_bytes())
    with pytest.raises(InputError, match="not valid JSON"):
        put_graph(postgres_db, "team", "x", b"{not json")
    with pytest.raises(InputError, match="no 'metadata' object"):
        put_graph(postgres_db, "team", "x", b"[1, 2]")
    with pytest.raises(InputError, match="not a PostgreSQL URL"):
        list_graphs("mysql://somewhere/db")


SAVER = r"""
import json, sys
import builders as web
from featurelens.store.graphs import add_graph, put_graph
url, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
print("ready", flush=True)
sys.stdin.readline()
for i in range(n):
    g = web.synthetic_graph(20, 30, seed=i)
    add_graph(url, "uploads", g, "same-name")  # both processes upload one name: each keeps its own slug
    g["metadata"]["prompt"] = f"{who} {i}"
    put_graph(url, "shared", f"graph-{i}", json.dumps(g).encode())  # both push the same keys: one row each
    put_graph(url, who, f"graph-{i}", json.dumps(g).encode())  # and keys of their own
"""


def test_two_processes_saving_at_once_lose_and_duplicate_nothing(postgres_db):
    n = 12
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", SAVER, postgres_db, who, str(n)], env=env, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for who in ("alice", "bob")]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err
    rows = list_graphs(postgres_db)
    keys = [(r["set"], r["slug"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * n + n + 2 * n
    uploads = sorted(s for k, s in keys if k == "uploads")
    assert uploads == sorted(["same-name"] + [f"same-name-{i}" for i in range(2, 2 * n + 1)])
    for r in rows:
        g = json.loads(read_graph(postgres_db, r["set"], r["slug"]))
        if r["set"] == "uploads":  # each upload's file names the slug it got
            assert g["metadata"]["slug"] == r["slug"]
        elif r["set"] == "shared":  # whole: bytes and metadata from the same (later) save
            assert g["metadata"]["prompt"] == r["metadata"]["prompt"] in (f"alice {r['slug'][6:]}",
                                                                          f"bob {r['slug'][6:]}")
        elif r["set"] in ("alice", "bob"):
            assert g["metadata"]["prompt"] == f"{r['set']} {r['slug'][6:]}"


def test_graph_push_command(postgres_db, tmp_path, capsys):
    f = tmp_path / "my-graph.json"
    f.write_bytes(_graph_bytes("whatever"))
    assert main(["graph-push", str(f), "--db", postgres_db, "--graph-set", "lab"]) == 0
    assert "as @pg.lab~my-graph" in capsys.readouterr().out
    assert read_graph(postgres_db, "lab", "my-graph") == f.read_bytes()
    assert main(["graph-push", str(f), "--db", "postgresql://nobody@/x?host=/nonexistent-dir"]) != 0
    assert "cannot connect to the PostgreSQL server" in capsys.readouterr().err
    assert main(["graph-push", str(f), "--db", "localhost/db"]) != 0
    assert "not a PostgreSQL URL" in capsys.readouterr().err
    assert main(["graph-push", str(f)]) != 0
    assert "say which database: --db" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"metadata": {}}))
    assert main(["graph-push", str(bad), "--db", postgres_db]) != 0
    assert "is not a graph JSON" in capsys.readouterr().err
