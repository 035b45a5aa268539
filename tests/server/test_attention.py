"""The attention-circuit endpoints: an edge's heads, one QK decomposition, and the attention story of a saved graph
as a background job (progress, cancel), on a graph the server computed over the tiny data directory's transcoders.

Oracles: the answers equal featurelens' Python API on the same graph file (`AttentionCircuits`), each layer's parts
sum to the edge and the QK terms to the recorded score; bad input is a 4xx whose message names what is wrong.
"""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from featurelens.attribution import load_graph  # noqa: E402
from featurelens.attribution.heads import AttentionCircuits  # noqa: E402
from featurelens.attribution.qk import attention_story_path, qk_decomposition, strongest_cross_position_edges  # noqa: E402,E501
from featurelens.dictionaries import load_dictionary  # noqa: E402
from featurelens.server import create_app  # noqa: E402
from featurelens.server.catalog import graph_file  # noqa: E402

import builders as web  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(client, app, graph id, AttentionCircuits built here from the graph file) for a graph computed by a job."""
    data, model = web.shared_data(tmp_path_factory)
    app = create_app(data, model_loader=lambda name: model)
    with TestClient(app) as client:
        r = client.post("/api/jobs/graph", json={"transcoders": web.TC_ID, "prompt": "the cat sat on the mat",
                                                 "max_feature_nodes": 200, "node_threshold": 1.0,
                                                 "edge_threshold": 1.0, "slug": "attention-test"})
        assert r.status_code == 202, r.text
        ev = web.sse_events(client.get(f"/api/jobs/{r.json()['id']}/events").text)
        assert ev[-1] == ("end", {"status": "done"}), ev[-3:]
        gid = client.get(f"/api/jobs/{r.json()['id']}").json()["result"]["graph"]
        f = graph_file(data, gid)
        tcs = load_dictionary(data / "dictionaries" / web.MODEL / "transcoders")
        circuits = AttentionCircuits(load_graph(f), model, tcs)
        assert circuits.graph.n_features >= 10  # features on several positions and layers, for the questions below
        yield client, app, gid, circuits


def _edge(circuits, rank: int = 0) -> tuple[str, str]:
    g = circuits.graph
    s, t = strongest_cross_position_edges(g, rank + 1)[rank]
    return g.node_id(s), g.node_id(t)


def test_edge_heads_match_the_python_api_and_sum_to_the_edge(setup):
    client, _, gid, circuits = setup
    s, t = _edge(circuits)
    r = client.get(f"/api/graphs/{gid}/heads", params={"source": s, "target": t})
    assert r.status_code == 200, r.text
    got = r.json()
    want = circuits.edge_heads(s, t)
    assert got["source"] == s and got["target"] == t and got["edge"] == pytest.approx(want.edge, rel=1e-6)
    assert [x["layer"] for x in got["layers"]] == [x.layer for x in want.layers] and got["layers"]
    for layer, ref in zip(got["layers"], want.layers):
        parts = [h["contribution"] for h in layer["heads"]]
        assert parts == sorted(parts, key=lambda v: -abs(v))  # strongest first
        assert sum(parts) + layer["bypass"] == pytest.approx(got["edge"], rel=1e-5, abs=1e-7)
        assert {h["head"]: h["pattern"] for h in layer["heads"]} == \
            pytest.approx({h.head: h.pattern for h in ref.heads})
        assert all(0.0 <= h["pattern"] <= 1.0 for h in layer["heads"])


def test_qk_matches_the_python_api_and_sums_to_the_score(setup):
    client, _, gid, circuits = setup
    s, t = _edge(circuits)
    g = circuits.graph
    q, k = g.node_pos(circuits.node(t)), g.node_pos(circuits.node(s))
    r = client.get(f"/api/graphs/{gid}/qk", params={"layer": 1, "head": 2, "query": q, "key": k, "top": 5})
    assert r.status_code == 200, r.text
    got = r.json()
    want = qk_decomposition(circuits, 1, 2, q, k, top=5)
    assert got["total"] == pytest.approx(got["score"], rel=1e-4, abs=1e-6)
    assert got["score"] == pytest.approx(want.score, rel=1e-6)
    assert [(p["query"], p["key"]) for p in got["top_pairs"]] == [(p.query, p.key) for p in want.top_pairs]
    assert len(got["top_pairs"]) == 5 and got["top_query"] and got["top_key"]
    assert got["query_token"] == g.token_strs[q] and got["key_token"] == g.token_strs[k]
    ids = set(g.node_ids()) | {"bias"}
    assert all(p["query"] in ids and p["key"] in ids and p["query_label"] for p in got["top_pairs"])


@pytest.mark.parametrize("params, status, words", [
    ({"source": "nope", "target": "{t}"}, 404, ["'nope'", "not in graph"]),
    ({"source": "{s}", "target": "0_99999_1"}, 404, ["'0_99999_1'"]),
    ({"source": "{late}", "target": "{early}"}, 400, ["position"]),  # the target sits before the source
    ({"source": "{logit}", "target": "{t}"}, 400, ["logit", "no outgoing edges"]),
    ({"source": "{s}"}, 422, ["target"]),
])
def test_edge_heads_bad_input_names_the_problem(setup, params, status, words):
    client, _, gid, circuits = setup
    s, t = _edge(circuits)
    g = circuits.graph
    # the last token's embedding, and a feature at an earlier position (it cannot read the embedding)
    late = g.token_slice.start + g.n_pos - 1
    early = next(i for i in range(g.n_features) if g.node_pos(i) < g.n_pos - 1)
    params = {k: v.format(s=s, t=t, late=g.node_id(late), early=g.node_id(early), logit=g.node_id(g.logit_slice.start))
              for k, v in params.items()}
    r = client.get(f"/api/graphs/{gid}/heads", params=params)
    assert r.status_code == status, r.text
    assert all(w in r.json()["detail"] for w in words), r.json()["detail"]


@pytest.mark.parametrize("patch, status, word", [
    ({"layer": 7}, 400, "layer"), ({"head": 4}, 400, "head"), ({"query": 50}, 400, "query"),
    ({"key": 50}, 400, "key"), ({"query": 1, "key": 3}, 400, "after the query"), ({"layer": -1}, 422, "layer"),
    ({"top": 0}, 422, "top"), ({"head": "x"}, 422, "head"),
])
def test_qk_bad_input_names_the_problem(setup, patch, status, word):
    client, _, gid, _ = setup
    r = client.get(f"/api/graphs/{gid}/qk", params={"layer": 1, "head": 0, "query": 3, "key": 1, **patch})
    assert r.status_code == status, r.text
    assert word in r.json()["detail"], r.json()["detail"]


def test_unknown_graph_and_a_graph_without_transcoders(setup):
    client, _, _, _ = setup
    r = client.get("/api/graphs/demo~nothing/qk", params={"layer": 0, "head": 0, "query": 0, "key": 0})
    assert r.status_code == 404 and "nothing" in r.json()["detail"]
    # the builders' hand-written demo graph has made-up activations: the job fails and says why
    r = client.post("/api/jobs/attention", json={"graph": web.GRAPH_ID})
    assert r.status_code == 202, r.text
    ev = web.sse_events(client.get(f"/api/jobs/{r.json()['id']}/events").text)
    assert ev[-1] == ("end", {"status": "failed"}), ev[-3:]
    assert "not the transcoders" in client.get(f"/api/jobs/{r.json()['id']}").json()["error"]
    r = client.post("/api/jobs/attention", json={"graph": "../x"})
    assert r.status_code == 422


def test_story_job_saves_the_story_the_api_serves(setup):
    client, _, gid, circuits = setup
    assert client.get(f"/api/graphs/{gid}/attention").status_code == 404
    assert "POST /api/jobs/attention" in client.get(f"/api/graphs/{gid}/attention").json()["detail"]
    r = client.post("/api/jobs/attention", json={"graph": gid, "edges": 3, "heads": 2, "top": 4})
    assert r.status_code == 202, r.text
    ev = web.sse_events(client.get(f"/api/jobs/{r.json()['id']}/events").text)
    assert ev[-1] == ("end", {"status": "done"}), ev[-3:]
    steps = [(d["done"], d["total"]) for n, d in ev if n == "progress" and d["stage"] == "explaining edges"]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    story = client.get(f"/api/graphs/{gid}/attention").json()
    assert story["graph"] == gid and len(story["edges"]) == 3
    s, t = _edge(circuits)
    first = story["edges"][0]
    assert (first["source"], first["target"]) == (s, t) and len(first["top_heads"]) == 2
    top = circuits.edge_heads(s, t).top(1)[0]
    assert (first["top_heads"][0]["layer"], first["top_heads"][0]["head"]) == (top[0], top[1].head)
    if "qk" in first:
        assert first["qk"]["total"] == pytest.approx(first["qk"]["score"], rel=1e-4, abs=1e-6)
        assert len(first["qk"]["top_pairs"]) <= 4
    assert attention_story_path(graph_file(setup[1].state.featurelens.data, gid)).is_file()
    # the story file is no graph of its own
    assert client.get(f"/api/graphs/{gid}.attention").status_code == 404


def test_story_job_cancels_between_edges(setup, monkeypatch):
    import featurelens.server.routes.attention as routes

    client, _, gid, _ = setup
    first_edge, cancelled = threading.Event(), threading.Event()

    def hold(lock):  # after the first edge: wait until the test has cancelled the job
        first_edge.set()
        cancelled.wait(10)

    monkeypatch.setattr(routes, "yield_lock", hold)
    r = client.post("/api/jobs/attention", json={"graph": gid, "edges": 3})
    assert r.status_code == 202
    jid = r.json()["id"]
    assert first_edge.wait(30)
    assert client.delete(f"/api/jobs/{jid}").status_code == 200
    cancelled.set()
    ev = web.sse_events(client.get(f"/api/jobs/{jid}/events").text)
    assert ev[-1] == ("end", {"status": "cancelled"}), ev[-3:]
    done = [d["done"] for n, d in ev if n == "progress" and d["stage"] == "explaining edges"]
    assert set(done) == {1}  # stopped at the report after the first edge


def test_asking_again_gives_the_same_answer(setup):
    """Every question after the first reuses the graph's frozen model (kept by the server): nothing of one answer
    leaks into the next."""
    client, _, gid, circuits = setup
    s, t = _edge(circuits, 1)
    a = client.get(f"/api/graphs/{gid}/heads", params={"source": s, "target": t}).json()
    client.get(f"/api/graphs/{gid}/qk", params={"layer": 1, "head": 1, "query": 3, "key": 2})
    assert client.get(f"/api/graphs/{gid}/heads", params={"source": s, "target": t}).json() == a
