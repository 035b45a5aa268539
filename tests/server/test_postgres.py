"""A team's shared PostgreSQL store end to end: `fl.analyze(..., store=URL)` writes the analysis into the database,
`create_app(..., db=URL)` (`featurelens serve --db URL`) lists and serves it (feature pages, label edits, search),
a rebuild keeps the labels people saved, and a wrong URL or a server that is down stops with a clear message."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

import builders as web
import featurelens as fl
from featurelens.errors import InputError
from featurelens.store import FeatureStore, PgLocation, StoreConnectionError


@pytest.fixture(scope="module")
def web_data(tmp_path_factory):
    return web.shared_data(tmp_path_factory)


def _contexts(model):
    ctx = web._contexts(model, web.sentences())
    return ctx[len(ctx) * 3 // 4:]


def test_analyze_into_postgres_and_serve_it(web_data, postgres_db, tmp_path):
    from fastapi.testclient import TestClient

    from featurelens.server import create_app

    data, model = web_data
    mine = tmp_path / "data"
    sae = mine / "dictionaries" / web.MODEL / "sae"
    shutil.copytree(data / "dictionaries" / web.MODEL / "sae", sae, ignore=shutil.ignore_patterns("analysis"))
    kw = dict(n_tokens=None, batch_size=8, embed=False, progress=False, n_top=4, n_sample=8, window=(4, 2))
    a = fl.analyze(model, sae, _contexts(model), store=postgres_db + "#team-sae", **kw)
    assert isinstance(a.dir, PgLocation) and a.dir.name == "team-sae" and a.store.backend == "postgresql"
    assert not (sae / "analysis" / "features.sqlite").exists()  # built locally, kept only in the database
    n, want = a.n_features, a.feature(3)
    a.close()

    with TestClient(create_app(mine, model_loader=lambda name: model, db=postgres_db)) as c:
        listed = {d["id"]: d for d in c.get("/api/dictionaries").json()}
        entry = listed["@pg.team-sae"]
        assert entry["analyzed"] and entry["d_sae"] == n and entry["path"] == str(sae)
        url = "/api/dictionaries/@pg.team-sae/features"
        page = c.get(f"{url}/3").json()
        assert page["label"] == want.label and page["density"] == pytest.approx(want.density)
        assert [e["tokens"] for e in page["top_examples"]] == [e.tokens for e in want.top_examples]
        r = c.put(f"{url}/3/label", json={"label": "a team member's label"})
        assert r.status_code == 200 and r.json()["provenance"] == "user", r.text
        assert c.get(f"{url}/{n + 5}").status_code == 404
        assert c.get("/api/dictionaries/@pg.nothing-here/features/0").status_code == 404
        word = next(w for l in fl.open_analysis(postgres_db + "#team-sae").labels().values() for w in l.split()
                    if w.isalpha() and len(w) > 2)
        r = c.get("/api/search/concept", params={"q": word, "method": "lexical", "k": 3, "steerable": "false",
                                                  "dictionaries": "@pg.team-sae"})
        assert r.status_code == 200 and r.json()["hits"], r.text
        assert all(h["dictionary"] == "@pg.team-sae" for h in r.json()["hits"])

    with FeatureStore(postgres_db + "#team-sae") as st:  # in the database, for everyone
        assert st.current_labels()[3] == ("a team member's label", "user")
    # a rebuild (another member, another machine) keeps what people labelled
    a = fl.analyze(model, sae, _contexts(model), store=postgres_db + "#team-sae", overwrite=True, **kw)
    assert a.label(3) == "a team member's label"
    a.close()
    # without '#name' the analysis is named after the dictionary's directory
    a = fl.analyze(model, sae, _contexts(model), store=postgres_db, out=tmp_path / "second", **kw)
    assert a.dir.name.startswith("sae-") and a.n_features == n
    a.close()


def test_bad_urls_and_servers_stop_with_a_clear_message(web_data, tmp_path):
    from featurelens.server import create_app

    data, model = web_data
    with pytest.raises(StoreConnectionError, match="cannot connect to the PostgreSQL server at postgresql://"):
        create_app(tmp_path / "d", db="postgresql://nobody@127.0.0.1:1/x")
    with pytest.raises(InputError, match="malformed PostgreSQL URL"):
        create_app(tmp_path / "d", db="postgresql://nobody@127.0.0.1:99999/x")
    with pytest.raises(InputError, match="store= takes a PostgreSQL URL"):
        fl.analyze(model, data / "dictionaries" / web.MODEL / "sae", _contexts(model), store="sqlite:///x.db",
                   progress=False)
    sae = data / "dictionaries" / web.MODEL / "sae"
    for argv in (["analyze", str(sae), "--store", "postgresql://nobody@127.0.0.1:1/x", "--out", str(tmp_path / "o")],
                 ["serve", "--db", "postgresql://x@h:port/db"]):
        r = subprocess.run([sys.executable, "-m", "featurelens", *argv], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "PostgreSQL" in r.stderr.strip().splitlines()[-1]
