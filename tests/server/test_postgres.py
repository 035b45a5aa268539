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


def test_serve_db_keeps_uploaded_and_computed_graphs_in_the_database(web_data, postgres_db):
    """With `serve --db`, an upload and a graph job land in the database (no file under graphs/), are listed beside
    the data directory's graphs as "@pg.<set>~<slug>" and open; a saved subgraph is written back there; a pushed
    graph is served byte for byte as the JSON it was; bad ids are 404, a stored non-graph 422."""
    import json

    from fastapi.testclient import TestClient

    from featurelens.server import create_app
    from featurelens.store.graphs import put_graph, read_graph

    data, model = web_data
    files_before = sorted(p.relative_to(data) for p in (data / "graphs").rglob("*.json"))
    g = web.synthetic_graph(60, 120)
    g["metadata"]["slug"] = "team-upload"
    with TestClient(create_app(data, model_loader=lambda name: model, db=postgres_db)) as c:
        ups = [c.post("/api/graphs", json=g) for _ in range(2)]
        assert [u.status_code for u in ups] == [201, 201], ups[0].text
        assert [u.json()["id"] for u in ups] == ["@pg.uploads~team-upload", "@pg.uploads~team-upload-2"]
        listed = {x["id"]: x for x in c.get("/api/graphs").json()}
        assert "demo~tiny-prompt" in listed  # the data directory's graphs are still there
        assert listed["@pg.uploads~team-upload"]["prompt"] == g["metadata"]["prompt"]
        got = c.get("/api/graphs/@pg.uploads~team-upload").json()
        assert got["id"] == "@pg.uploads~team-upload"
        assert [n["node_id"] for n in got["nodes"]] == [n["node_id"] for n in g["nodes"]]
        assert [(e["source"], e["target"], e["weight"]) for e in got["links"]] == \
            [(e["source"], e["target"], e["weight"]) for e in g["links"]]
        assert c.get("/api/overview").json()["graphs"] == list(listed.values())

        pin = g["nodes"][-1]["node_id"]
        r = c.put("/api/graphs/@pg.uploads~team-upload/subgraphs",
                  json={"name": "mine", "pinnedIds": [pin], "supernodes": [], "clickedId": pin})
        assert r.status_code == 200, r.text
        stored = json.loads(read_graph(postgres_db, "uploads", "team-upload"))
        assert [s["name"] for s in stored["subgraphs"]] == ["mine"] and stored["qParams"]["pinnedIds"] == [pin]
        assert c.post("/api/graphs/@pg.uploads~team-upload/scores", json={"pinnedIds": [pin]}).status_code == 200

        job = c.post("/api/jobs/graph", json={"transcoders": web.TC_ID, "prompt": "The cat sat",
                                              "max_feature_nodes": 16})
        assert job.status_code == 202, job.text
        events = c.get(f"/api/jobs/{job.json()['id']}/events").text
        assert web.sse_events(events)[-1] == ("end", {"status": "done"}), events[-500:]
        gid = c.get(f"/api/jobs/{job.json()['id']}").json()["result"]["graph"]
        assert gid.startswith("@pg.computed~the-cat-sat")
        computed = c.get(f"/api/graphs/{gid}").json()
        assert computed["metadata"]["prompt"] == "The cat sat" and gid in {x["id"] for x in c.get("/api/graphs").json()}
        feature = next((n for n in computed["nodes"] if n["feature_type"] == "cross layer transcoder"),
                       computed["nodes"][-1])
        card = c.get(f"/api/graphs/{gid}/nodes/{feature['node_id']}")
        assert card.status_code == 200 and card.json()["node"]["node_id"] == feature["node_id"], card.text

        pushed = json.dumps(web.synthetic_graph(30, 40, seed=3), indent=2).encode()
        put_graph(postgres_db, "lab", "pushed-one", pushed)
        assert [n["node_id"] for n in c.get("/api/graphs/@pg.lab~pushed-one").json()["nodes"]] == \
            [n["node_id"] for n in json.loads(pushed)["nodes"]]
        put_graph(postgres_db, "lab", "not-a-graph", b'{"metadata": {}}')
        assert c.get("/api/graphs/@pg.lab~not-a-graph").status_code == 422
        for bad in ("@pg.uploads~nothing-here", "@pg.no-tilde", "@pg.a~b~c", "@pg.lab~pushed-one.json"):
            r = c.get(f"/api/graphs/{bad}")
            assert r.status_code == 404 and r.json()["detail"], (bad, r.text)
    assert sorted(p.relative_to(data) for p in (data / "graphs").rglob("*.json")) == files_before

    from featurelens.server.security import Limits

    with TestClient(create_app(data, db=postgres_db, limits=Limits(max_uploads=2))) as c:  # two are stored already
        r = c.post("/api/graphs", json=g)
        assert r.status_code == 429 and "FEATURELENS_MAX_UPLOADS" in r.json()["detail"], r.text

    with TestClient(create_app(data, model_loader=lambda name: model)) as c:  # without --db: as before
        assert not any(x["id"].startswith("@pg.") for x in c.get("/api/graphs").json())
        assert c.get("/api/graphs/@pg.uploads~team-upload").status_code == 404
