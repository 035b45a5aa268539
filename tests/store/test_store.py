"""The feature store, on both backends (`store_target`: a SQLite file, and a schema of the PostgreSQL server named
by $FEATURELENS_TEST_POSTGRES): every table read back as written, migrations, transactions, publishing a rebuild
over a live analysis, and concurrent writers losing nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from featurelens.errors import InputError
from featurelens.store import USER, FeatureStore, StoreConnectionError, StoreError, pg_location, publish
from featurelens.store.db import SCHEMA_VERSION

REPO = Path(__file__).resolve().parents[2]


def fill(store: FeatureStore, n: int = 6, seed: int = 0, tag: str = "") -> None:
    """`n` features with two top and one quantile example each, token strings and an automatic label each."""
    rng = np.random.default_rng(seed)
    with store.transaction():
        store.write_tokens((i, f" w{i}{tag}") for i in range(50))
        store.write_features({"idx": i, "n_fires": 10 * i, "density": i / 100, "max_act": float(i) + 0.5,
                              "mean_act": i / 2, "hist": [i, 1, 0], "logit_up": [[i, 1.5]],
                              "logit_down": [[i + 1, -1.0]],
                              "logit_mean": 0.1, "logit_std": 0.2, "similar": [[(i + 1) % n, 0.9]],
                              "cofire": [[(i + 1) % n, 3, 0.5, 0.25]]} for i in range(n))
        store.write_examples({"feature": i, "kind": kind, "rank": r, "bin": r, "ctx": 1000 * i + r, "pos": 3,
                              "start": 1, "act": float(3 - r), "tokens": rng.integers(0, 50, 5).tolist(),
                              "acts": [0.0, 0.5, 1.0, 0.25, 0.0]}
                             for i in range(n) for kind, k in (("top", 2), ("quantile", 1)) for r in range(k))
        store.write_labels((i, "auto:v2", f"auto {i}{tag}") for i in range(n))
        store.set("dictionary", {"d_sae": n, "hook_name": "blocks.0.hook_resid_post", "tag": tag})
        store.set("status", "complete")


def test_every_table_reads_back_as_written(store_target):
    with FeatureStore(store_target(), create=True) as st:
        fill(st)
        f = st.feature(2)
        assert (f["n_fires"], f["density"], f["max_act"], f["mean_act"]) == (20, 0.02, 2.5, 1.0)
        assert f["hist"].tolist() == [2, 1, 0] and f["hist"].dtype == np.int32
        assert f["logit_up"] == [[2, 1.5]] and f["similar"] == [[3, 0.9]] and f["cofire"] == [[3, 3, 0.5, 0.25]]
        assert st.feature(99) is None and st.n_features() == 6
        assert st.column("density").tolist() == [i / 100 for i in range(6)]
        with pytest.raises(InputError):
            st.column("similar")
        ex = st.examples(2)
        assert [(e["kind"], e["rank"]) for e in ex] == [("top", 0), ("top", 1), ("quantile", 0)]
        assert ex[0]["acts"] == [0.0, 0.5, 1.0, 0.25, 0.0] and len(ex[0]["tokens"]) == 5
        assert [e["rank"] for e in st.examples(2, kind="top", limit=1)] == [0]
        assert [(i, len(b)) for i, b in st.top_examples_all(1)] == [(i, 1) for i in range(6)]
        assert sorted(st.examples_by_feature("quantile")) == list(range(6))
        assert st.token_strings([3, 7, 999]) == {3: " w3", 7: " w7"} and len(st.token_strings()) == 50
        with st.transaction():  # byte-level tokens include NUL, which PostgreSQL's text columns refuse
            st.write_tokens([(60, "\x00"), (61, "é\x00ß")])
            st.write_labels([(0, "llm", "a label\x00 with a NUL")])
        assert st.token_strings([60, 61]) == {60: "\x00", 61: "é\x00ß"} and st.token_strings()[61] == "é\x00ß"
        assert st.labels(0)[0]["label"] == "a label with a NUL"
        assert [i for i, _, _ in st.logit_lists()] == list(range(6))
        assert st.get("dictionary")["d_sae"] == 6 and st.get("nothing", 5) == 5 and "status" in st.meta()

        st.set_label(1, "mine")
        assert st.labels(1)[0]["provenance"] == USER and st.current_labels()[1] == ("mine", USER)
        assert [f for f, _, _ in st.user_labels()] == [1]
        with st.transaction():
            st.write_label_scores([(1, USER, "lexical", 0.9, 5, 7), (2, "auto:v2", "lexical", 0.6, 5, 7)])
        assert st.label_scores(1)[USER] == {"score": 0.9, "method": "lexical", "n_pos": 5, "n_neg": 7}
        assert st.current_label_scores() == {1: (0.9, "lexical"), 2: (0.6, "lexical")}
        st.set_label(1, "mine, again")  # a rewritten label loses the score of its old text
        assert USER not in st.label_scores(1) and st.labels(1)[0]["label"] == "mine, again"
        st.set_label(1, None)
        assert st.current_labels()[1] == ("auto 1", "auto:v2")

        vecs = np.arange(6, dtype=np.float32).reshape(2, 3)
        with st.transaction():
            st.write_embeddings("m", [(4, "sha", vecs)])
        sha, back = st.embeddings("m")[4]
        assert sha == "sha" and np.array_equal(back, vecs) and st.embeddings("other") == {}


def test_a_transaction_lands_whole_or_not_at_all(store_target):
    with FeatureStore(store_target(), create=True) as st:
        fill(st)
        with pytest.raises(RuntimeError):
            with st.transaction():
                st.write_labels([(0, "x", "half"), (1, "x", "done")])
                raise RuntimeError("stop")
        assert all(l["provenance"] != "x" for i in range(6) for l in st.labels(i))


def test_migrations_run_once_and_a_newer_schema_is_refused(store_target):
    target = store_target()
    with pytest.raises(StoreError, match="no analysis"):
        FeatureStore(target)  # not made yet, and not asked to
    with FeatureStore(target, create=True) as st:
        fill(st)
        assert st.conn.execute("SELECT version FROM schema_version").fetchall() == [(SCHEMA_VERSION,)]
    with FeatureStore(target) as st:  # opened again: nothing re-applied, nothing lost
        assert st.conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1 and st.n_features() == 6
    with FeatureStore(target, readonly=True) as ro, pytest.raises(Exception, match="read-only|readonly"):
        ro.set_label(0, "refused")  # a read-only store refuses writes on both backends
    with FeatureStore(target) as st:  # as a newer featurelens would leave it
        st.conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    for readonly in (False, True):
        with pytest.raises(StoreError, match=f"schema {SCHEMA_VERSION + 1}"):
            FeatureStore(target, readonly=readonly)


def test_publish_replaces_the_analysis_and_keeps_the_users_labels(store_target, tmp_path):
    target = store_target()
    with FeatureStore(target, create=True) as live:
        fill(live, n=6, tag="old")
        live.set_label(1, "kept")
        live.set_label(5, "beyond the new width")
        stamp_changed = live.changed()
    assert not stamp_changed
    reader = FeatureStore(target)
    build = tmp_path / "build.sqlite"
    with FeatureStore(build, create=True) as st:
        fill(st, n=4, tag="new")
        st.set("completed", 123.0)
    publish(build, target, 4)
    assert not build.exists()
    assert reader.changed()  # a server holding the old analysis knows to reopen it
    reader.close()
    with FeatureStore(target) as st:
        assert st.n_features() == 4 and st.get("dictionary")["tag"] == "new"
        assert st.current_labels() == {0: ("auto 0new", "auto:v2"), 1: ("kept", USER), 2: ("auto 2new", "auto:v2"),
                                       3: ("auto 3new", "auto:v2")}
        assert st.token_strings([3]) == {3: " w3new"}


WRITER = """
import sys
from featurelens.store import FeatureStore
target, name, order, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
features = list(range(n))[::-1] if order == "down" else list(range(n))
with FeatureStore(target) as st:
    print("ready", flush=True)
    sys.stdin.readline()  # all start together
    for rnd in (1, 2):
        for k in range(0, n, 7):
            with st.transaction():
                st.write_labels((f, name, f"{name} {f} round {rnd}") for f in features[k:k + 7])
"""


def test_two_writers_and_a_label_editor_at_once_lose_nothing(store_target):
    """Two explainer processes write their labels in batches (twice over, in opposite orders) while a person edits
    labels one at a time: every row is there once, with its last value."""
    target = store_target()
    n = 60
    with FeatureStore(target, create=True) as st:
        fill(st, n=n)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(target), name, order, str(n)], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, order in (("exp-a", "up"), ("exp-b", "down"))]
    for w in writers:
        assert w.stdout.readline().strip() == "ready", w.stderr.read()
    for w in writers:
        w.stdin.write("go\n")
        w.stdin.flush()
    with FeatureStore(target) as st:
        for f in range(n):
            st.set_label(f, f"edited {f}")
            if f % 3 == 0:
                st.set_label(f, f"edited {f} twice")
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    with FeatureStore(target) as st:
        rows = st.conn.execute("SELECT feature, provenance, label FROM labels").fetchall()
        assert len(rows) == len({(f, p) for f, p, _ in rows}) == 4 * n  # auto, two explainers, the user: once each
        got = {(f, p): l for f, p, l in rows}
        for f in range(n):
            assert got[(f, "exp-a")] == f"exp-a {f} round 2" and got[(f, "exp-b")] == f"exp-b {f} round 2"
            assert got[(f, USER)] == (f"edited {f} twice" if f % 3 == 0 else f"edited {f}")
            assert st.current_labels()[f][1] == USER


def test_two_analyses_published_at_once_while_labels_are_edited(store_target, tmp_path):
    """Two rebuilds published into the same database at once (two analyses), while a person edits labels of the
    first throughout: both analyses are complete afterwards and every edit is kept."""
    first, second = store_target(), store_target()
    n = 300
    with FeatureStore(first, create=True) as st:
        fill(st, n=n, tag="old")
    errors: list[BaseException] = []
    done = threading.Event()

    def rebuild(target: str, tag: str, rounds: int) -> None:
        try:
            for r in range(rounds):
                build = tmp_path / f"{tag}-{r}.sqlite"
                with FeatureStore(build, create=True) as st:
                    fill(st, n=n, seed=r, tag=tag)
                publish(build, target, n)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    edited: list[int] = []

    def editor() -> None:
        try:
            with FeatureStore(first) as st:
                f = 0
                while not done.is_set() or f < 20:
                    st.set_label(f % n, f"edit {f}")
                    edited.append(f % n)
                    f += 1
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ed = threading.Thread(target=editor)
    ed.start()
    pubs = [threading.Thread(target=rebuild, args=(first, "A", 3)),
            threading.Thread(target=rebuild, args=(second, "B", 3))]
    for t in pubs:
        t.start()
    for t in pubs:
        t.join(300)
    done.set()
    ed.join(60)
    assert not errors, errors
    with FeatureStore(first) as a, FeatureStore(second) as b:
        assert a.get("dictionary")["tag"] == "A" and b.get("dictionary")["tag"] == "B"
        assert a.n_features() == b.n_features() == n
        users = {f: l for f, l, _ in a.user_labels()}
        assert set(users) == set(edited)  # no edit lost, before, during or after a publish
        last = {}
        for k, f in enumerate(edited):
            last[f] = f"edit {k}"
        assert users == last
        rows = a.conn.execute("SELECT feature, provenance FROM labels").fetchall()
        assert len(rows) == len(set(rows)) == n + len(users)


def test_bad_store_locations_say_what_is_wrong(tmp_path):
    with pytest.raises(InputError, match="malformed PostgreSQL URL"):
        FeatureStore("postgresql://user@host:notaport/db#a")
    with pytest.raises(InputError, match="append '#<name>'"):
        FeatureStore("postgresql://user@localhost/db")
    with pytest.raises(InputError, match="not a valid analysis name"):
        pg_location("postgresql://user@localhost/db#bad name")
    with pytest.raises(InputError, match="file path or a postgresql:// URL"):
        FeatureStore("mysql://user@localhost/db")
    with pytest.raises(StoreConnectionError, match=r"cannot connect to the PostgreSQL server at postgresql://u:\*"):
        FeatureStore("postgresql://u:secret@127.0.0.1:1/db?connect_timeout=3#a")
    for url in ("postgresql://u:secret@127.0.0.1:1/db#a",
                "postgresql://u@127.0.0.1:1/db?password=secret&sslmode=disable#a"):
        with pytest.raises(StoreConnectionError) as e:
            FeatureStore(url)
        assert "secret" not in str(e.value) and "***" in str(e.value)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a readable analysis database"):
        FeatureStore(tmp_path / "junk.sqlite")
