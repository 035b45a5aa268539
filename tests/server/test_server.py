"""The web app's JSON API (featurelens.server): every endpoint with good and bad input, against a tiny data directory
(tests/builders.py: a random 2-layer Llama, a trained and analyzed SAE, transcoders, a saved graph).

Oracles: what the API returns is checked against featurelens' own Python API on the same files (dashboards, labels,
activations, generations), the graph scores against a property they must have (pinning every feature is the whole
graph), and the OpenAPI description is fuzzed with schemathesis (bounded) with zero server errors allowed.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import featurelens as fl  # noqa: E402
from featurelens import paths  # noqa: E402
from featurelens.server import create_app  # noqa: E402

import builders as web  # noqa: E402


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def web_data(tmp_path_factory):
    """(data dir, tiny model), built once per session."""
    return web.shared_data(tmp_path_factory)


@pytest.fixture(scope="session")
def app(web_data):
    data, model = web_data
    return create_app(data, model_loader=lambda name: model)


@pytest.fixture
def client(app):
    with TestClient(app) as c:
        yield c


def _analysis(web_data):
    data, model = web_data
    return fl.open_analysis(data / "dictionaries" / web.MODEL / "sae" / "analysis")


_events = web.sse_events


# ----------------------------------------------------------------------------------------------- listings
def test_overview_lists_models_dictionaries_metrics_and_graphs(client, web_data):
    o = client.get("/api/overview").json()
    dicts = {d["id"]: d for d in o["dictionaries"]}
    sae = dicts[web.SAE_ID]
    assert sae["kind"] == "sae" and sae["analyzed"] and sae["d_sae"] == 96 and sae["k"] == 4
    assert sae["hook_name"] == web.HOOK and sae["model"] == web.MODEL
    assert sae["metrics"]["l0"] == pytest.approx(4.0)  # TopK k=4: exactly 4 per token
    stats = json.loads((web_data[0] / "dictionaries" / web.MODEL / "sae" / "featurelens.json").read_text())["stats"]
    assert sae["metrics"]["explained_variance"] == pytest.approx(1 - stats["final_train_metrics"]["fvu"])
    tcs = dicts[web.TC_ID]
    assert tcs["kind"] == "transcoders" and tcs["layers"] == [0, 1]
    assert web.MODEL in {m["name"] for m in o["models"]}
    assert web.GRAPH_ID in [g["id"] for g in o["graphs"]]
    assert client.get("/api/models").status_code == 200
    assert client.get("/api/dictionaries").json() == o["dictionaries"]
    assert client.get(f"/api/dictionaries/{web.SAE_ID}").json()["id"] == web.SAE_ID
    assert client.get("/api/health").json()["ok"] is True


def test_eval_file_metrics_take_precedence(tmp_path):
    from featurelens.server.catalog import dictionary_metrics

    (tmp_path / "featurelens.json").write_text(json.dumps({"stats": {"final_train_metrics": {"l0": 9, "fvu": 0.5}}}))
    assert dictionary_metrics(tmp_path)["l0"] == 9 and dictionary_metrics(tmp_path)["explained_variance"] == 0.5
    (tmp_path / "eval.json").write_text(json.dumps({"l0": 31.5, "explained_variance": 0.95, "ce_loss_recovered": 0.98}))
    m = dictionary_metrics(tmp_path)
    assert (m["l0"], m["explained_variance"], m["ce_loss_recovered"], m["source"]) == (31.5, 0.95, 0.98, "eval")


@pytest.mark.parametrize("ident", ["nope", "..~..~etc", "a~..~b", "@missing", "x" * 401, "a b"])
def test_unknown_or_hostile_dictionary_ids_are_404(client, ident):
    r = client.get(f"/api/dictionaries/{ident}/features/0")
    assert r.status_code in (404, 422), r.text
    assert r.json()["detail"]


# ----------------------------------------------------------------------------------------------- features
def test_feature_dashboard_matches_the_python_api(client, web_data):
    a = _analysis(web_data)
    fired = [i for i in range(a.n_features) if a.feature(i).n_fires > 0]
    i = fired[0]
    want = a.feature(i)
    got = client.get(f"/api/dictionaries/{web.SAE_ID}/features/{i}").json()
    assert got["feature"] == i and got["label"] == want.label and got["label_provenance"] == want.label_provenance
    assert got["density"] == pytest.approx(want.density) and got["n_fires"] == want.n_fires
    assert got["max_act"] == pytest.approx(want.max_act)
    assert [x["tokens"] for x in got["top_examples"]] == [x.tokens for x in want.top_examples]
    assert got["top_examples"][0]["acts"] == pytest.approx(want.top_examples[0].acts)
    assert [b["count"] for b in got["histogram"]] == [c for _, _, c in want.histogram()]
    assert [u["token"] for u in got["logit_up"]] == [t for t, _, _ in want.logit_up]
    assert [s["feature"] for s in got["similar"]] == [s[0] for s in want.similar]
    assert [c["feature"] for c in got["cofiring"]] == [c[0] for c in want.cofiring]
    assert {x["bin"] for x in got["quantile_examples"]} <= {0, 1, 2, 3}
    a.close()


def test_feature_bad_indices(client):
    r = client.get(f"/api/dictionaries/{web.SAE_ID}/features/96")
    assert r.status_code == 404 and "96" in r.json()["detail"]
    assert client.get(f"/api/dictionaries/{web.SAE_ID}/features/-1").status_code == 422
    assert client.get(f"/api/dictionaries/{web.SAE_ID}/features/abc").status_code == 422
    r = client.get(f"/api/dictionaries/{web.TC_ID}/features/0")
    assert r.status_code == 404 and "not been analyzed" in r.json()["detail"]


def test_label_edit_persists_with_provenance(client, web_data):
    url = f"/api/dictionaries/{web.SAE_ID}/features/5/label"
    r = client.put(url, json={"label": "  my <b>label</b>  "})
    assert r.status_code == 200 and r.json()["label"] == "my <b>label</b>" and r.json()["provenance"] == "user"
    assert 0 <= r.json()["label_score"] <= 1 and "auroc" in r.json()["label_score_method"]  # scored on save
    a = _analysis(web_data)  # a fresh connection: it is on disk
    assert a.label(5) == "my <b>label</b>"
    a.close()
    assert client.get(f"/api/dictionaries/{web.SAE_ID}/features/5").json()["label"] == "my <b>label</b>"
    r = client.put(url, json={"label": None})
    assert r.status_code == 200 and r.json()["provenance"] != "user"
    assert client.put(url, json={"label": "   "}).status_code == 422
    assert client.put(url, json={"label": "x" * 501}).status_code == 422
    assert client.put(url, json={"text": "x"}).status_code == 422
    assert client.put(f"/api/dictionaries/{web.SAE_ID}/features/999/label", json={"label": "x"}).status_code == 404


def test_test_your_own_text_matches_encoding_the_activations(client, web_data):
    data, model = web_data
    text = "The cat sat on the mat"
    a = _analysis(web_data)
    fired = max(range(a.n_features), key=lambda i: a.feature(i).n_fires)
    r = client.post(f"/api/dictionaries/{web.SAE_ID}/features/{fired}/activations", json={"text": text})
    assert r.status_code == 200, r.text
    got = r.json()
    sae = fl.load_dictionary(data / "dictionaries" / web.MODEL / "sae")
    _, cache = model.run_with_cache(text, names_filter=[web.HOOK])
    want = sae.encode(cache[web.HOOK][0])[:, fired]
    want[0] = 0.0  # BOS ignored
    assert got["tokens"] == model.to_str_tokens(text)
    assert got["acts"] == pytest.approx(want.tolist(), abs=1e-5)
    assert got["acts"][0] == 0.0
    a.close()
    url = f"/api/dictionaries/{web.SAE_ID}/features/{fired}/activations"
    assert client.post(url, json={"text": ""}).status_code == 422
    assert client.post(url, json={"text": "  "}).status_code == 422
    r = client.post(url, json={"text": "a" * 4001})
    assert r.status_code == 422 and "text" in r.json()["detail"]


# ----------------------------------------------------------------------------------------------- search
def test_concept_search_finds_labelled_features(client, web_data):
    a = _analysis(web_data)
    labels = a.labels()
    a.close()
    word = next(w for w in ("mat", "cat", "river", "garden", "moon") if any(w in (l or "") for l in labels.values()))
    r = client.get("/api/search/concept", params={"q": word, "method": "lexical", "k": 5, "steerable": "false"})
    assert r.status_code == 200, r.text
    hits = r.json()["hits"]
    assert hits and hits[0]["dictionary"] == web.SAE_ID and all(h["steer_ratio"] is None for h in hits)
    assert word in (hits[0]["label"] or "") + " ".join(hits[0]["snippets"])
    assert client.get("/api/search/concept", params={"q": ""}).status_code == 422
    assert client.get("/api/search/concept", params={"q": "x", "k": 0}).status_code == 422
    assert client.get("/api/search/concept", params={"q": "x", "dictionaries": "nope"}).status_code == 404
    assert client.get("/api/search/concept", params={"q": "x", "method": "magic"}).status_code == 422
    # checked by steering by default: the same matches; the first close match (in match order) that raises the
    # concept's words STEERS-fold leads, the others keep their match order (steerable.checked_score)
    from featurelens.interventions import checked_search as steerable

    assert client.get("/api/search/concept", params={"q": "x", "pool": 0}).status_code == 422
    r = client.get("/api/search/concept", params={"q": word, "method": "lexical", "k": 3, "pool": 5})
    assert r.status_code == 200, r.text
    checked = r.json()["hits"]
    plain = {h["feature"]: h["score"] for h in hits}
    assert len(checked) == min(3, len(plain)) and {h["feature"] for h in checked} <= set(plain)
    assert [h["score"] for h in checked] == sorted((h["score"] for h in checked), reverse=True)
    from featurelens.search import single_token_ids

    if single_token_ids(web_data[1], checked[0]["steer_words"]):  # words to measure: the best match is steered
        assert checked[0]["steer_ratio"] is not None
    for h in checked:
        assert h["match_score"] == pytest.approx(plain[h["feature"]])
        assert h["steer_ratio"] is None or (h["steer_ratio"] > 0 and h["steer_strength"] in steerable.STRENGTHS)
        leads = h["score"] > 1
        assert h["score"] == pytest.approx(steerable.checked_score(h["match_score"] / max(plain.values()), leads))
        assert not leads or h["steer_ratio"] >= steerable.STEERS
    assert sum(h["score"] > 1 for h in checked) <= 1


def test_search_by_text_and_by_token(client, web_data):
    r = client.post("/api/search/text", json={"text": "The cat sat on the mat", "k": 5})
    assert r.status_code == 200, r.text
    res = r.json()["results"][0]
    assert res["tokens"][0] == "<bos>" and res["per_token"][0] == []  # BOS ignored
    assert any(res["per_token"][1:]) and len(res["overall"]) <= 5
    top = res["overall"][0]
    assert top["acts"][top["token_index"]] == pytest.approx(top["max_act"])
    r = client.get("/api/search/token", params={"token": " the", "k": 3})
    assert r.status_code == 200 and 0 < len(r.json()["hits"]) <= 3
    logits = [h["logit"] for h in r.json()["hits"]]
    assert logits == sorted(logits, reverse=True)
    r = client.get("/api/search/token", params={"token": " the cat sat"})
    assert r.status_code == 400 and "single token" in r.json()["detail"]
    assert client.post("/api/search/text", json={"text": ""}).status_code == 422
    assert client.post("/api/search/text", json={"text": "x", "dictionaries": ["nope"]}).status_code == 404
    assert client.post("/api/search/text", json={"text": "x", "k": 1000}).status_code == 422


# ----------------------------------------------------------------------------------------------- steering
STEER = {"dictionary": web.SAE_ID, "features": [{"feature": 3, "strength": 40.0}], "prompt": "The cat",
         "max_new_tokens": 10, "temperature": 0.7, "seed": 3}


def test_steer_matches_generate_and_streams_token_by_token(client, web_data):
    data, model = web_data
    r = client.post("/api/steer", json=STEER)
    assert r.status_code == 200, r.text
    out = r.json()
    want_default = model.generate("The cat", max_new_tokens=10, temperature=0.7, seed=3, return_new_only=True)
    sae = fl.load_dictionary(data / "dictionaries" / web.MODEL / "sae")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steer = fl.Steer(sae, 3, 40.0, max_activation=_analysis(web_data).feature(3).max_act)
    want_steered = model.generate("The cat", max_new_tokens=10, temperature=0.7, seed=3, return_new_only=True,
                                  interventions=[steer])
    assert out["default"] == want_default and out["steered"] == want_steered
    assert out["default"] != out["steered"]
    r = client.post("/api/steer/stream", json=STEER)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    ev = _events(r.text)
    assert ev[0][0] == "start" and ev[-1][0] == "done"
    toks = [d for n, d in ev if n == "token"]
    assert len(toks) >= 10 and {t["side"] for t in toks} == {"default", "steered"}
    assert [t["side"] for t in toks[:4]] == ["default", "steered", "default", "steered"]  # side by side
    assert "".join(t["text"] for t in toks if t["side"] == "default") == want_default
    assert "".join(t["text"] for t in toks if t["side"] == "steered") == want_steered


@pytest.mark.parametrize("patch,where", [
    ({"features": []}, "features"), ({"features": [{"feature": 3, "strength": 1e9}]}, "strength"),
    ({"features": [{"feature": -2, "strength": 1}]}, "feature"), ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"), ({"prompt": "x" * 2001}, "prompt"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10_000}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"seed": -5}, "seed"),
    ({"mode": "weird"}, "mode"), ({"dictionary": "../x"}, "dictionary"), ({"bogus": 1}, "bogus"),
])
def test_steer_rejects_bad_input_with_the_field_named(client, patch, where):
    r = client.post("/api/steer", json={**STEER, **patch})
    assert r.status_code == 422, r.text
    assert where in r.json()["detail"]


def test_a_damaged_analysis_is_a_409_that_says_how_to_repair_it(tmp_path, web_data):
    """An analysis database that lost its record of the dictionary, or is not a database at all: the request is
    fine and nothing is missing, the file on the server needs rebuilding (409, and the message says how)."""
    import sqlite3
    from contextlib import closing

    data, model = web_data
    broken = tmp_path / "analysis" / "broken"
    broken.mkdir(parents=True)
    # copied by SQLite, not by copying files: closing a file of a database this process has open would drop its
    # locks and break the session's other connections to it
    src = data / "dictionaries" / web.MODEL / "sae" / "analysis" / "features.sqlite"
    with closing(sqlite3.connect(f"file:{src}?mode=ro", uri=True)) as a, \
            closing(sqlite3.connect(broken / "features.sqlite")) as b:
        a.backup(b)
        b.execute("DELETE FROM meta WHERE key = 'dictionary'")
        b.commit()
    (tmp_path / "analysis" / "garbage").mkdir()
    (tmp_path / "analysis" / "garbage" / "features.sqlite").write_bytes(b"this is not a database" * 100)
    with TestClient(create_app(tmp_path, model_loader=lambda name: model)) as c:
        listed = c.get("/api/dictionaries")
        assert listed.status_code == 200 and {"@broken", "@garbage"} <= {d["id"] for d in listed.json()}
        r = c.get("/api/dictionaries/@broken/features/0")
        assert r.status_code == 409, r.text
        assert "damaged" in r.json()["detail"] and "analyze --overwrite" in r.json()["detail"]
        r = c.get("/api/dictionaries/@garbage/features/0")
        assert r.status_code == 409 and "not a readable analysis database" in r.json()["detail"], r.text


def test_a_bug_is_a_500_with_a_log_line(client, monkeypatch, caplog):
    """Built-in exceptions are bugs, whatever their class (KeyError was a 404, TypeError a 400): a 500 with a
    generic message (no internals), and the traceback in the log."""
    from featurelens.analysis import DictionaryAnalysis
    from featurelens.server import catalog
    from featurelens.server.errors import INTERNAL_ERROR

    def broken(*args, **kwargs):
        raise KeyError("dictionary")

    def also_broken(*args, **kwargs):
        raise TypeError("an internal detail")

    monkeypatch.setattr(DictionaryAnalysis, "feature", broken)
    monkeypatch.setattr(catalog, "list_dictionaries", also_broken)
    with caplog.at_level("ERROR", logger="featurelens.server"):
        for url in (f"/api/dictionaries/{web.SAE_ID}/features/0", "/api/dictionaries"):
            r = client.get(url)
            assert r.status_code == 500 and r.json() == {"detail": INTERNAL_ERROR}, (url, r.text)
    logged = [rec for rec in caplog.records if rec.exc_info]
    assert [type(rec.exc_info[1]) for rec in logged] == [KeyError, TypeError]
    assert "/api/dictionaries" in logged[1].getMessage()


def test_steer_errors_from_the_library_are_4xx(client):
    r = client.post("/api/steer", json={**STEER, "features": [{"feature": 500, "strength": 1}]})
    assert r.status_code == 404 and "500" in r.json()["detail"]
    r = client.post("/api/steer", json={**STEER, "dictionary": web.TC_ID})
    assert r.status_code == 422 and "transcoders" in r.json()["detail"]
    r = client.post("/api/steer", json={**STEER, "dictionary": "nope"})
    assert r.status_code == 404


def test_server_answers_while_two_generations_run(app, web_data):
    """Two tabs steering at once: both finish with the right text, and a listing is answered meanwhile."""
    results: dict[int, dict] = {}

    def go(i: int) -> None:
        with TestClient(app) as c:
            results[i] = c.post("/api/steer", json={**STEER, "max_new_tokens": 60, "seed": i}).json()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    with TestClient(app) as c:  # and a graph computing meanwhile
        job = c.post("/api/jobs/graph", json={"transcoders": web.TC_ID, "prompt": "A dog ran",
                                                  "max_feature_nodes": 16}).json()["id"]
    for t in threads:
        t.start()
    time.sleep(0.2)
    with TestClient(app) as c:
        t0 = time.perf_counter()
        assert c.get("/api/graphs").status_code == 200
        listing_s = time.perf_counter() - t0
    busy = any(t.is_alive() for t in threads)
    for t in threads:
        t.join()
    _, model = web_data
    for i in range(2):
        assert results[i]["default"] == model.generate("The cat", max_new_tokens=60, temperature=0.7, seed=i,
                                                       return_new_only=True)
    assert listing_s < 5.0 and (busy or listing_s < 1.0)
    with TestClient(app) as c:
        end = time.time() + 120
        while c.get(f"/api/jobs/{job}").json()["status"] in ("queued", "running") and time.time() < end:
            time.sleep(0.1)
        assert c.get(f"/api/jobs/{job}").json()["status"] == "done"


def test_a_cancelled_job_stops_at_its_next_report(tmp_path):
    from featurelens.server.jobs import JobManager

    jm = JobManager(tmp_path)
    started = threading.Event()

    def work(job):
        for i in range(1000):
            started.set()
            job.progress("step", i, 1000)
            time.sleep(0.01)
        return {"finished": True}

    rec = jm.submit("test", {}, work)
    started.wait(5)
    jm.cancel(rec["id"])
    end = time.time() + 10
    while jm.get(rec["id"])["status"] == "running" and time.time() < end:
        time.sleep(0.02)
    got = jm.get(rec["id"])
    assert got["status"] == "cancelled" and got["done"] < 999


# ----------------------------------------------------------------------------------------------- graphs
def test_graph_get_upload_and_validation(client):
    g = client.get(f"/api/graphs/{web.GRAPH_ID}").json()
    assert g["metadata"]["prompt"] == web.PROMPT and g["nodes"] and g["links"]
    big = web.synthetic_graph(200, 800)
    r = client.post("/api/graphs", json=big)
    assert r.status_code == 201, r.text
    gid = r.json()["id"]
    assert gid in {x["id"] for x in client.get("/api/graphs").json()}
    assert len(client.get(f"/api/graphs/{gid}").json()["links"]) == 800
    # a second upload of the same slug gets its own id
    assert client.post("/api/graphs", json=big).json()["id"] != gid
    bad = json.loads(json.dumps(big))
    bad["links"].append({"source": "nowhere", "target": big["nodes"][0]["node_id"], "weight": 1.0})
    r = client.post("/api/graphs", json=bad)
    assert r.status_code == 422 and "nowhere" in r.json()["detail"]
    for mutate, word in [(lambda x: x.pop("nodes"), "nodes"), (lambda x: x["metadata"].pop("prompt_tokens"),
                                                                 "prompt_tokens"),
                         (lambda x: x["nodes"][0].pop("ctx_idx"), "ctx_idx"),
                         (lambda x: x["nodes"][1].update(node_id=x["nodes"][0]["node_id"]), "twice")]:
        b = json.loads(json.dumps(big))
        mutate(b)
        r = client.post("/api/graphs", json=b)
        assert r.status_code == 422 and word in r.json()["detail"], r.text
    assert client.post("/api/graphs", json=[1, 2]).status_code == 422
    assert client.get("/api/graphs/nope").status_code == 404
    assert client.get("/api/graphs/..~..~x").status_code == 404


def test_concurrent_uploads_are_all_kept(client):
    """24 uploads of one slug at once (issue: 48 gave 37 errors and 6 listed graphs): every one answers 201 with its
    own id, and every id is listed and opens."""
    from concurrent.futures import ThreadPoolExecutor

    g = web.synthetic_graph(60, 120)
    g["metadata"]["slug"] = "concurrent-upload"
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post("/api/graphs", json=g), range(24)))
    assert [r.status_code for r in answers] == [201] * 24, [r.text for r in answers if r.status_code != 201][:2]
    ids = [r.json()["id"] for r in answers]
    assert len(set(ids)) == 24
    listed = {x["id"] for x in client.get("/api/graphs").json()}
    assert set(ids) <= listed
    for gid in ids:
        assert len(client.get(f"/api/graphs/{gid}").json()["links"]) == 120


def test_circuit_tracer_graph_file_opens(client):
    """A graph file as circuit-tracer writes it (its error-node ids, no optional fields) uploads and opens."""
    g = {"metadata": {"slug": "ct", "scan": "gemma-2-2b", "transcoder_list": [], "prompt_tokens": ["<bos>", "Hi"],
                      "prompt": "Hi", "node_threshold": 0.8, "schema_version": 1},
         "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
         "nodes": [{"node_id": "E_2_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding",
                    "jsNodeId": "E_2-0"},
                   {"node_id": "E_9_1", "feature": 1, "layer": "E", "ctx_idx": 1, "feature_type": "embedding",
                    "jsNodeId": "E_9-1"},
                   {"node_id": "0_77_1", "feature": 3080, "layer": "0", "ctx_idx": 1,
                    "feature_type": "cross layer transcoder", "jsNodeId": "0_77-0", "influence": 0.3,
                    "activation": 2.0},
                   {"node_id": "0_1_1", "feature": -1, "layer": "0", "ctx_idx": 1,
                    "feature_type": "mlp reconstruction error", "jsNodeId": "0_1-0", "influence": 0.5},
                   {"node_id": "27_100_1", "feature": 100, "layer": "27", "ctx_idx": 1, "feature_type": "logit",
                    "token_prob": 0.9, "is_target_logit": True, "jsNodeId": "L_100-1", "clerp": 'Output " a"'}],
         "links": [{"source": "E_9_1", "target": "0_77_1", "weight": 2.0},
                   {"source": "0_77_1", "target": "27_100_1", "weight": 1.0},
                   {"source": "0_1_1", "target": "27_100_1", "weight": 1.0}]}
    r = client.post("/api/graphs", json=g)
    assert r.status_code == 201, r.text
    gid = r.json()["id"]
    s = client.post(f"/api/graphs/{gid}/scores", json={"pinnedIds": None}).json()["graph"]
    # the logit gets half its input from the feature (fed by a token) and half from the error. circuit-tracer's
    # completeness weighs every node's non-error input share by its influence plus its logit weight: the logit
    # (1 x 1/2), the feature (0.5 x 1), the error and the token E_9_1 (0.5 x 1 each: no inputs), E_2_0 (0):
    # 2.0 / 2.5
    assert s["replacement"] == pytest.approx(0.5) and s["completeness"] == pytest.approx(0.8)


def test_graph_written_by_circuit_tracer_opens(client):
    """tests/fixtures/circuit-tracer-graph.json was written by circuit-tracer's own create_graph_files (in the attribution
    benchmark's environment, on Gemma 3 270M): it uploads, opens, and its scores and node cards work."""
    g = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "circuit-tracer-graph.json").read_text())
    r = client.post("/api/graphs", json=g)
    assert r.status_code == 201, r.text
    gid = r.json()["id"]
    got = client.get(f"/api/graphs/{gid}").json()
    assert [n["node_id"] for n in got["nodes"]] == [n["node_id"] for n in g["nodes"]]
    s = client.post(f"/api/graphs/{gid}/scores", json={"pinnedIds": None}).json()["graph"]
    assert 0 <= s["replacement"] <= 1 and 0 <= s["completeness"] <= 1
    logit = next(n for n in g["nodes"] if n["feature_type"] == "logit")
    card = client.get(f"/api/graphs/{gid}/nodes/{logit['node_id']}").json()
    assert len(card["inputs"]) == min(20, sum(e["target"] == logit["node_id"] for e in g["links"]))


def test_subgraph_scores_save_and_export(client, web_data):
    g = client.get(f"/api/graphs/{web.GRAPH_ID}").json()
    feats = [n["node_id"] for n in g["nodes"] if n["feature_type"] == "cross layer transcoder"]
    full = client.post(f"/api/graphs/{web.GRAPH_ID}/scores", json={"pinnedIds": None}).json()["graph"]
    every = client.post(f"/api/graphs/{web.GRAPH_ID}/scores", json={"pinnedIds": feats}).json()["subgraph"]
    assert every == pytest.approx(full)  # pinning every feature is the whole graph
    none = client.post(f"/api/graphs/{web.GRAPH_ID}/scores", json={"pinnedIds": []}).json()["subgraph"]
    assert none["replacement"] <= full["replacement"] + 1e-9
    r = client.post(f"/api/graphs/{web.GRAPH_ID}/scores", json={"pinnedIds": ["nope"]})
    assert r.status_code == 422 and "nope" in r.json()["detail"]

    sg = {"name": "my circuit", "pinnedIds": feats[:3], "supernodes": [["cat things", *feats[:2]]],
          "clickedId": feats[0], "labels": {feats[0]: "<script>x</script>"}}
    r = client.put(f"/api/graphs/{web.GRAPH_ID}/subgraphs", json=sg)
    assert r.status_code == 200, r.text
    again = client.get(f"/api/graphs/{web.GRAPH_ID}").json()
    assert again["subgraphs"][-1]["pinnedIds"] == feats[:3] and again["qParams"]["pinnedIds"] == feats[:3]
    assert again["qParams"]["supernodes"] == [["cat things", *feats[:2]]]
    # saving the same name replaces it; the file stays a valid graph that uploads again (export -> import)
    client.put(f"/api/graphs/{web.GRAPH_ID}/subgraphs", json={**sg, "pinnedIds": feats[:1], "supernodes": []})
    exported = client.get(f"/api/graphs/{web.GRAPH_ID}").json()
    assert [s["name"] for s in exported["subgraphs"]] == ["my circuit"]
    imported = client.post("/api/graphs", json=exported).json()["id"]
    assert client.get(f"/api/graphs/{imported}").json()["subgraphs"][0]["pinnedIds"] == feats[:1]
    bad = client.put(f"/api/graphs/{web.GRAPH_ID}/subgraphs", json={**sg, "pinnedIds": ["ghost"]})
    assert bad.status_code == 422 and "ghost" in bad.json()["detail"]
    assert client.put(f"/api/graphs/{web.GRAPH_ID}/subgraphs", json={**sg, "name": ""}).status_code == 422


def test_graph_scan_cannot_read_outside_the_data_directory(client, web_data):
    """metadata.scan names the feature cards' directory beside the graph: a "./features/<name>" scan (circuit-tracer's
    viewer's form) and an older bare name both find the cards; an absolute or climbing scan opens nothing outside,
    whether the graph was uploaded or put on disk by hand."""
    data, _ = web_data
    g = web.synthetic_graph(30, 40)
    feat = next(n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder")
    card = {"transcoder_id": "tc/0", "index": feat["feature"], "examples_quantiles": [], "top_logits": ["x"],
            "bottom_logits": [], "act_min": 0.0, "act_max": 1.0, "quantile_values": [], "histogram": [],
            "activation_frequency": 0.1}
    outside = data.parent / "outside-the-data-dir"
    outside.mkdir(exist_ok=True)
    (outside / f"{feat['feature']}.json").write_text(json.dumps({**card, "top_logits": ["secret"]}))
    cards = data / "graphs" / "uploads" / "features" / "tc"
    cards.mkdir(parents=True, exist_ok=True)
    (cards / f"{feat['feature']}.json").write_text(json.dumps(card))
    for scan, found in (("./features/tc", True), ("tc", True), (str(outside), False),
                        ("../../../outside-the-data-dir", False), ("./features/../../../../outside-the-data-dir", False)):
        g["metadata"]["scan"] = scan
        r = client.post("/api/graphs", json=g)
        assert r.status_code == 201, r.text
        gid = r.json()["id"]
        got = client.get(f"/api/graphs/{gid}/nodes/{feat['node_id']}").json()["feature_card"]
        assert (got["top_logits"] == ["x"]) if found else got is None, scan
    # a graph file edited on disk to point outside: still nothing read
    f = data / "graphs" / "uploads" / f"{gid.split('~')[-1]}.json"
    on_disk = json.loads(f.read_text())
    on_disk["metadata"]["scan"] = str(outside)
    f.write_text(json.dumps(on_disk))
    assert client.get(f"/api/graphs/{gid}/nodes/{feat['node_id']}").json()["feature_card"] is None


def test_node_card_lists_inputs_and_outputs(client):
    g = client.get(f"/api/graphs/{web.GRAPH_ID}").json()
    logit = next(n for n in g["nodes"] if n["feature_type"] == "logit")
    card = client.get(f"/api/graphs/{web.GRAPH_ID}/nodes/{logit['node_id']}").json()
    want = sorted((e for e in g["links"] if e["target"] == logit["node_id"]), key=lambda e: -abs(e["weight"]))
    assert [x["node"]["node_id"] for x in card["inputs"]] == [e["source"] for e in want]
    assert card["outputs"] == [] and card["feature_card"] is None
    assert client.get(f"/api/graphs/{web.GRAPH_ID}/nodes/nope").status_code == 404


def test_analyzed_transcoder_layer_gives_cards_and_densities(client, web_data):
    """Layer 1 of the transcoders was analyzed: its feature nodes get dashboards and densities, layer 0's do not."""
    data, _ = web_data
    tcs = next(d for d in client.get("/api/dictionaries").json() if d["id"] == web.TC_ID)
    assert tcs["analyzed_layers"] == [1]
    a = fl.open_analysis(data / "dictionaries" / web.MODEL / "transcoders" / "layer_1" / "analysis")
    g = client.get(f"/api/graphs/{web.GRAPH_ID}").json()
    l1 = [n for n in g["nodes"] if n["layer"] == "1" and n["feature_type"] == "cross layer transcoder"]
    l0 = [n for n in g["nodes"] if n["layer"] == "0" and n["feature_type"] == "cross layer transcoder"]
    for n in l1:
        assert n["density"] == pytest.approx(a.feature(int(n["node_id"].split("_")[1])).density)
    assert all("density" not in n for n in l0)
    n = l1[0]
    feat = int(n["node_id"].split("_")[1])
    card = client.get(f"/api/graphs/{web.GRAPH_ID}/nodes/{n['node_id']}").json()["feature_card"]
    assert card["source"] == "analysis" and card["feature"] == feat and card["label"] == a.label(feat)
    # the card's dictionary id opens the same dashboard as a feature page
    page = client.get(f"/api/dictionaries/{card['dictionary']}/features/{feat}").json()
    assert page["label"] == card["label"] and page["n_fires"] == card["n_fires"]
    assert client.get(f"/api/graphs/{web.GRAPH_ID}/nodes/{l0[0]['node_id']}").json()["feature_card"] is None
    a.close()


def test_intervene_from_graph(client, web_data):
    g = client.get(f"/api/graphs/{web.GRAPH_ID}").json()
    feat = next(n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder")
    err = next(n for n in g["nodes"] if "error" in n["feature_type"])
    body = {"interventions": [{"node_id": feat["node_id"], "value": None}], "top_k": 5, "max_new_tokens": 5}
    r = client.post(f"/api/graphs/{web.GRAPH_ID}/intervene", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    _, model = web_data
    clean = model(web.PROMPT)[0, -1].softmax(-1)
    assert [t["id"] for t in out["original"]] == clean.topk(5).indices.tolist()
    assert [t["prob"] for t in out["original"]] == pytest.approx(clean.topk(5).values.tolist(), abs=1e-5)
    greedy = model.generate(model.to_tokens(web.PROMPT), max_new_tokens=5, temperature=0.0, return_new_only=True)
    assert out["continuation"]["original"] == model.tokenizer.decode(greedy[0].tolist())
    assert set(out["continuation"]) == {"original", "frozen", "live"}
    # setting the feature to a large value moves the next-token distribution, with attention frozen and live
    r = client.post(f"/api/graphs/{web.GRAPH_ID}/intervene", json={**body, "interventions": [
        {"node_id": feat["node_id"], "value": 25.0}]})
    moved = r.json()
    assert moved["edits"][0][:3] == [int(feat["layer"]), feat["ctx_idx"], int(feat["node_id"].split("_")[1])]
    for key in ("frozen", "live"):
        assert max(abs(t["prob"] - t["original_prob"]) for t in moved[key]) > 1e-4
    r = client.post(f"/api/graphs/{web.GRAPH_ID}/intervene", json={**body, "interventions": [
        {"node_id": err["node_id"], "value": 1.0}]})
    assert r.status_code == 422 and "error" in r.json()["detail"]
    r = client.post(f"/api/graphs/{web.GRAPH_ID}/intervene", json={**body, "interventions": []})
    assert r.status_code == 422


@pytest.mark.parametrize("layer, feature, pos", [(7, 3, 1), (1, 99_999, 1), (1, 3, 999)])
def test_intervene_on_a_node_the_transcoders_do_not_have_is_4xx(client, layer, feature, pos):
    """An uploaded graph can name any layer, feature and position: what the transcoders or the prompt lack is bad
    input (4xx naming it), never a 500."""
    g = client.get(f"/api/graphs/{web.GRAPH_ID}").json()
    feat = next(n for n in g["nodes"] if n["feature_type"] == "cross layer transcoder")
    old, new = feat["node_id"], f"{layer}_{feature}_{pos}"
    feat.update(layer=str(layer), ctx_idx=pos)
    g = json.loads(json.dumps(g).replace(json.dumps(old), json.dumps(new)))  # in links and subgraphs too
    g.pop("id", None)
    g["metadata"]["slug"] = f"odd-node-{layer}-{feature}-{pos}"
    up = client.post("/api/graphs", json=g)
    assert up.status_code == 201, up.text
    r = client.post(f"/api/graphs/{up.json()['id']}/intervene", json={
        "interventions": [{"node_id": new, "value": 1.0}], "transcoders": web.TC_ID, "max_new_tokens": 0})
    assert 400 <= r.status_code < 500 and r.json()["detail"], r.text


# ----------------------------------------------------------------------------------------------- jobs
def test_graph_job_runs_in_background_with_progress_events(client, app):
    body = {"transcoders": web.TC_ID, "prompt": "The cat sat", "max_feature_nodes": 32}
    r = client.post("/api/jobs/graph", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    ev = _events(client.get(f"/api/jobs/{job['id']}/events").text)
    assert ev[-1] == ("end", {"status": "done"}), ev[-3:]
    stages = [d["stage"] for n, d in ev if n == "progress"]
    assert "attributing" in stages and stages[-1] == "done"
    rows = [(d["done"], d["total"]) for n, d in ev if n == "progress" and d["stage"] == "attributing" and d["total"]]
    assert rows and rows[-1][0] == rows[-1][1] > 0  # every row of the edge matrix, reported as it was computed
    done = client.get(f"/api/jobs/{job['id']}").json()
    assert done["status"] == "done"
    gid = done["result"]["graph"]
    g = client.get(f"/api/graphs/{gid}").json()
    assert g["metadata"]["prompt"] == "The cat sat" and g["metadata"]["info"]["featurelens"]["transcoders_id"] == web.TC_ID
    assert job["id"] in {j["id"] for j in client.get("/api/jobs").json()}
    # persisted: a new server on the same data dir still knows it
    from featurelens.server.jobs import JobManager

    assert JobManager(app.state.jobs.root).get(job["id"])["status"] == "done"
    r = client.post("/api/jobs/graph", json={**body, "transcoders": web.SAE_ID})
    assert r.status_code == 422 and "transcoders" in r.json()["detail"]


def test_job_bad_input(client):
    assert client.get("/api/jobs/nothex").status_code == 404
    assert client.get("/api/jobs/0123456789ab").status_code == 404
    assert client.get("/api/jobs/0123456789ab/events").status_code == 404
    assert client.delete("/api/jobs/0123456789ab").status_code == 404
    for patch in ({"prompt": ""}, {"node_threshold": 0}, {"node_threshold": 1.5}, {"edge_threshold": -1},
                  {"max_feature_nodes": 0}, {"transcoders": "../../x"}):
        body = {"transcoders": web.TC_ID, "prompt": "hi", **patch}
        r = client.post("/api/jobs/graph", json=body)
        assert r.status_code == 422, (patch, r.text)


def test_interrupted_job_is_marked_so_after_a_restart(tmp_path):
    from featurelens.server.jobs import JobManager

    (tmp_path / "abcdefabcdef.json").write_text(json.dumps({"id": "abcdefabcdef", "status": "running"}))
    assert JobManager(tmp_path).get("abcdefabcdef")["status"] == "interrupted"


def test_job_progress_and_failure_are_recorded(tmp_path):
    from featurelens.errors import InputError
    from featurelens.server.jobs import JobManager

    jm = JobManager(tmp_path)

    def work(job):
        job.progress("step", 1, 2)
        raise InputError("the prompt is too long for this model")

    rec = jm.submit("test", {}, work)
    end = time.time() + 10
    while jm.get(rec["id"])["status"] not in ("failed", "done") and time.time() < end:
        time.sleep(0.02)
    got = jm.get(rec["id"])
    assert got["status"] == "failed" and got["error"] == "the prompt is too long for this model"


def test_a_late_reader_sees_every_update_in_order(tmp_path):
    """Updates faster than a reader wakes up are replayed, not coalesced: a page that subscribes late (or is slow)
    still sees a stage reach its total before the next stage starts."""
    from featurelens.server.jobs import JobManager

    jm = JobManager(tmp_path)

    def work(job):
        for i in range(50):
            job.progress("fast", i + 1, 50)
        job.progress("next")
        return {"ok": True}

    rec = jm.submit("test", {}, work)
    end = time.time() + 10
    while jm.get(rec["id"])["status"] != "done" and time.time() < end:
        time.sleep(0.02)
    seen = jm.changes_since(rec["id"], -1, timeout=0.0)
    assert [r["done"] for r in seen if r["stage"] == "fast"] == list(range(1, 51))
    assert [r["version"] for r in seen] == sorted({r["version"] for r in seen})
    assert seen[-1]["status"] == "done"
    assert jm.changes_since(rec["id"], seen[-1]["version"], timeout=0.0) == []
    # a server that did not run the job answers with the stored record alone
    assert [r["status"] for r in JobManager(tmp_path).changes_since(rec["id"], -1, timeout=0.0)] == ["done"]


# ----------------------------------------------------------------------------------------------- token, pages, CLI
def test_default_loader_loads_a_model_folder_by_name(web_data):
    """Without a model_loader the server loads models itself: a Hugging Face folder under <data>/models by name."""
    data, model = web_data
    app = create_app(data)
    loaded = app.state.runtime.model(web.MODEL)
    assert loaded is app.state.runtime.model(web.MODEL)  # loaded once, shared
    assert torch.equal(loaded(web.PROMPT), model(web.PROMPT))


def test_token_is_required_when_set(web_data):
    data, model = web_data
    with TestClient(create_app(data, model_loader=lambda n: model, token="s3cret")) as c:
        r = c.get("/api/overview")
        assert r.status_code == 401 and "token" in r.json()["detail"]
        assert c.get("/api/overview", headers={"X-Featurelens-Token": "wrong"}).status_code == 401
        assert c.get("/api/overview", headers={"X-Featurelens-Token": "s3cret"}).status_code == 200
        assert c.get("/api/overview", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/api/overview?token=s3cret").status_code == 200
        c.cookies.clear()
        assert c.get("/static/app.js").status_code == 401
        assert c.get("/?token=s3cret").status_code == 200  # the page, and a cookie for its scripts and styles
        assert c.get("/static/app.js").status_code == 200
        c.cookies.clear()
        assert c.get("/static/app.js").status_code == 401


def test_pages_and_openapi_are_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "app.js" in r.text
    for f in ("app.js", "dom.js", "api.js", "graph.js", "apidoc.js", "style.css"):
        assert client.get(f"/static/{f}").status_code == 200
    # FastAPI's /docs and /redoc would load their scripts from the web: the app's own #/api page replaces them
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    spec = client.get("/openapi.json").json()
    assert "/api/steer/stream" in spec["paths"] and "/api/graphs/{graph}/intervene" in spec["paths"]


def test_web_code_never_puts_data_in_innerhtml():
    """The pages build the DOM with textContent only: corpus text holds HTML and scripts."""
    web_dir = Path(__file__).resolve().parents[2] / "featurelens" / "web"
    for f in web_dir.glob("*.js"):
        src = f.read_text()
        for bad in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert bad not in src, f"{f.name} uses {bad}"


def test_serve_cli_refuses_nothing_on_loopback_and_makes_a_token_elsewhere(monkeypatch, capsys, tmp_path):
    import uvicorn

    from featurelens.cli import main

    monkeypatch.setattr(paths, "_override", paths._override)  # `serve --data-dir` points featurelens there
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: seen.update(host=host, port=port, app=app))
    assert main(["serve", "--data-dir", str(tmp_path), "--port", "9911"]) == 0
    out = capsys.readouterr().out
    assert "http://127.0.0.1:9911/" in out and "token" not in out and seen["port"] == 9911
    assert main(["serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0"]) == 0
    out = capsys.readouterr().out
    assert "?token=" in out
    with TestClient(seen["app"]) as c:
        assert c.get("/api/health").status_code == 401
        token = out.strip().split("?token=")[1]
        assert c.get(f"/api/health?token={token}").status_code == 200
    assert main(["serve", "--data-dir", str(tmp_path), "--port", "0"]) == 2


def test_featurelens_serve_runs_the_app(web_data):
    """The real command in a subprocess: it prints its URL, serves the pages and the API, and loads models itself."""
    import socket
    import subprocess
    import sys

    import httpx

    data, model = web_data
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "featurelens", "serve", "--data-dir", str(data), "--port",
                             str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, line
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                r = httpx.get(base + "/api/health", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        assert r.status_code == 200 and r.json()["data_dir"] == str(data)
        assert "app.js" in httpx.get(base + "/").text
        out = httpx.post(base + "/api/steer", json={**STEER, "max_new_tokens": 4}, timeout=120).json()
        assert out["default"] == model.generate("The cat", max_new_tokens=4, temperature=0.7, seed=3,
                                                return_new_only=True)
    finally:
        proc.terminate()
        proc.wait(10)


# ----------------------------------------------------------------------------------------------- fuzzing
# Operations that run the model for every valid example get fewer examples, to keep the run under a minute.
FUZZ_EXAMPLES, FUZZ_EXAMPLES_HEAVY = 15, 4
FUZZ_HEAVY = {("POST", "/api/steer"), ("POST", "/api/steer/stream"), ("POST", "/api/jobs/graph"),
              ("POST", "/api/graphs/{graph}/intervene"), ("POST", "/api/search/text"),
              ("POST", "/api/dictionaries/{dictionary}/features/{feature}/activations")}


def test_openapi_fuzz_has_no_server_errors(app):
    """Every operation of the OpenAPI description, with schemathesis' valid and invalid inputs (a bounded run): no
    5xx at all (a bug answers 500 now, see test_a_bug_is_a_500_with_a_log_line), and every error a JSON detail."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures, n_calls = [], 0
    t0 = time.perf_counter()
    for result in schema.get_all_operations():
        op = result.ok()
        n = FUZZ_EXAMPLES_HEAVY if (op.method.upper(), op.path) in FUZZ_HEAVY else FUZZ_EXAMPLES
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=n, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def run(case):
                nonlocal n_calls
                response = case.call()
                n_calls += 1
                where = f"{case.method} {case.formatted_path} {case.query!r:.100} {case.body!r:.200}"
                if response.status_code >= 500:
                    failures.append(f"{where} -> {response.status_code}: {response.text[:300]}")
                elif response.status_code >= 400:
                    try:
                        detail = response.json().get("detail")
                    except ValueError:
                        detail = None
                    if not isinstance(detail, str) or not detail:
                        failures.append(f"{where} -> {response.status_code} without a detail: {response.text[:300]}")

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (an operation without parameters)
                pass
    took = time.perf_counter() - t0
    assert n_calls > 400, n_calls
    assert not failures, "\n".join(failures)
    print(f"fuzz: {n_calls} calls in {took:.1f} s")
