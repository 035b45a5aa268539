"""Graph sets under concurrency, `metadata.scan` against path traversal, and the one score function (sparse, circuit-
tracer's definitions) on graph JSON and on AttributionGraph alike."""

from __future__ import annotations

import copy
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from featurelens.attribution import attribute
from featurelens.attribution.files import (METADATA_FILE, add_to_set, graph_json, json_graph_scores,
                                           read_feature_card, read_listing)
from featurelens.attribution.schema import (GraphFormatError, check_scan, is_feature, node_kind, scan_dir,
                                            validate_graph)
from builders import synthetic_graph
from test_graph_clients import tiny_model, tiny_transcoders


@pytest.fixture(scope="module")
def tiny_graph():
    model = tiny_model()
    return attribute(model, tiny_transcoders(model), torch.tensor([1, 5, 7, 3, 11, 13, 2, 4, 21, 8]), progress=False)


def _small_graph(slug: str = "g") -> dict[str, Any]:
    g = synthetic_graph(40, 60, seed=1)
    g["metadata"]["slug"] = slug
    return g


# ----------------------------------------------------------------------------------------------- concurrent writers
def test_concurrent_writers_lose_no_graph(tmp_path):
    """Many threads store graphs with one slug into one set at once: every graph gets its own slug, is listed, and
    every file parses (before the set lock, 48 concurrent uploads left 6 graphs listed)."""
    n = 32
    slugs: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(n)

    def write(i: int) -> None:
        g = _small_graph("same")
        g["metadata"]["prompt"] = f"writer {i}"
        start.wait()
        try:
            slugs.append(add_to_set(tmp_path, g, unique=True))
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert len(slugs) == n and len(set(slugs)) == n
    listing = read_listing(tmp_path)
    assert sorted(m["slug"] for m in listing) == sorted(slugs)
    prompts = set()
    for s in slugs:
        g = validate_graph(json.loads((tmp_path / f"{s}.json").read_text()))
        assert g["metadata"]["slug"] == s
        prompts.add(g["metadata"]["prompt"])
    assert prompts == {f"writer {i}" for i in range(n)}  # no write replaced another's file
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") and ".tmp" in p.name) == []


def test_concurrent_processes_share_the_set_lock(tmp_path):
    """The lock is also an OS file lock: writers in other processes wait for it."""
    pytest.importorskip("fcntl")  # POSIX
    import subprocess
    import sys

    code = ("import json, sys; from featurelens.attribution.files import add_to_set; "
            "from test_graph_files import _small_graph\n"
            "for i in range(6):\n"
            "    g = _small_graph('shared'); g['metadata']['prompt'] = sys.argv[2] + str(i)\n"
            "    print(add_to_set(sys.argv[1], g, unique=True))")
    here = Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (here.parents[1], here.parent, here))))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"p{k}-"], stdout=subprocess.PIPE,
                              text=True, env=env) for k in range(2)]
    out = [p.communicate(timeout=300)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    slugs = [s for o in out for s in o]
    assert len(slugs) == 12 and len(set(slugs)) == 12
    assert sorted(m["slug"] for m in read_listing(tmp_path)) == sorted(slugs)


def test_same_slug_without_unique_replaces(tmp_path):
    add_to_set(tmp_path, _small_graph("a"), unique=False)
    g = _small_graph("a")
    g["metadata"]["prompt"] = "second"
    assert add_to_set(tmp_path, g, unique=False) == "a"
    listing = read_listing(tmp_path)
    assert [m["prompt"] for m in listing] == ["second"]


def test_a_corrupt_listing_is_reported_not_replaced(tmp_path):
    (tmp_path / METADATA_FILE).write_text("{not json")
    with pytest.raises(GraphFormatError, match="graph-metadata.json"):
        add_to_set(tmp_path, _small_graph())
    assert (tmp_path / METADATA_FILE).read_text() == "{not json"


# ----------------------------------------------------------------------------------------------- scan
@pytest.mark.parametrize("scan", ["/etc", "/some/dir", "../secrets", "./features/../../x", "a/../../b", "C:/x",
                                  "..\\..\\x"])
def test_scan_cannot_leave_the_graph_directory(tmp_path, scan):
    """A scan is followed to feature cards only inside the graph's directory; a graph with another scan still opens
    (circuit-tracer writes "/..." scans for features its own server serves), it just has no cards here."""
    with pytest.raises(GraphFormatError, match="scan"):
        check_scan(scan)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "7.json").write_text(json.dumps({"secret": 1}))
    graphs = tmp_path / "a" / "b"
    graphs.mkdir(parents=True)
    for s in (scan, str(outside), "../../outside", "./../../outside"):
        g = _small_graph()
        g["metadata"]["scan"] = s
        validate_graph(g)
        assert read_feature_card(graphs / "g.json", s, 7) is None, s


def test_feature_cards_found_for_new_and_old_scans(tmp_path):
    card = {"index": 7}
    (tmp_path / "features" / "tc").mkdir(parents=True)
    (tmp_path / "features" / "tc" / "7.json").write_text(json.dumps(card))
    graph_file = tmp_path / "g.json"
    assert scan_dir("./features/tc").as_posix() == "features/tc" and scan_dir("tc").as_posix() == "features/tc"
    assert read_feature_card(graph_file, "./features/tc", 7) == card  # written since circuit-tracer's "./" form
    assert read_feature_card(graph_file, "tc", 7) == card  # written before it
    assert read_feature_card(graph_file, "tc", 8) is None


def test_feature_card_symlinked_out_is_not_read(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "7.json").write_text(json.dumps({"secret": 1}))
    graphs = tmp_path / "graphs"
    (graphs / "features").mkdir(parents=True)
    (graphs / "features" / "tc").symlink_to(outside, target_is_directory=True)
    assert read_feature_card(graphs / "g.json", "./features/tc", 7) is None
    assert read_feature_card(graphs / "g.json", "./features/tc", 7, root=tmp_path) == {"secret": 1}


# ----------------------------------------------------------------------------------------------- node kinds
def test_node_kind():
    assert [node_kind(t) for t in ("embedding", "logit", "mlp reconstruction error", "lorsa error",
                                   "cross layer transcoder", "transcoder", "lorsa")] == [
        "embedding", "logit", "error", "error", "feature", "feature", "feature"]
    assert is_feature({"feature_type": "cross layer transcoder"}) and not is_feature("mlp reconstruction error")


# ----------------------------------------------------------------------------------------------- scores
def dense_scores(graph: dict[str, Any], pinned: list[str] | None = None) -> dict[str, float]:
    """circuit-tracer's compute_graph_scores written densely (the reference; small graphs only): |A| row-normalised,
    influence = w (I - A)^-1 - w with error nodes' inputs not followed, replacement = tokens' share of the tokens'
    and errors' influence, completeness = the influence-weighted non-error share of every node's input."""
    nodes = graph["nodes"]
    idx = {nd["node_id"]: i for i, nd in enumerate(nodes)}
    n = len(nodes)
    kinds = [node_kind(nd) for nd in nodes]
    err = np.array([k == "error" or (pinned is not None and k == "feature" and nd["node_id"] not in pinned)
                    for k, nd in zip(kinds, nodes)])
    tok = np.array([k == "embedding" for k in kinds])
    A = np.zeros((n, n))
    for e in graph["links"]:
        A[idx[e["target"]], idx[e["source"]]] += abs(e["weight"])
    A[err] = 0.0
    rows = A.sum(1, keepdims=True)
    A = np.divide(A, rows, out=np.zeros_like(A), where=rows > 0)
    w = np.array([nd.get("token_prob") or 0.0 if k == "logit" else 0.0 for k, nd in zip(kinds, nodes)])
    w = w / w.sum()
    infl = np.linalg.solve((np.eye(n) - A).T, w) - w
    t, e_ = infl[tok].sum(), infl[err].sum()
    out = infl + w
    return {"replacement": float(t / (t + e_)),
            "completeness": float(((1 - A[:, err].sum(1)) * out).sum() / out.sum())}


def test_json_scores_match_the_dense_reference_and_the_library(tiny_graph):
    g = tiny_graph
    full = graph_json(g, "t", "./features/t")  # every node: the graph as attributed
    validate_graph(full)
    got = json_graph_scores(full)
    assert got == pytest.approx(dense_scores(full), abs=1e-6)
    assert got == pytest.approx(g.scores, abs=1e-6)  # the library's and the server's scores are one function
    pruned = graph_json(g.prune(0.8, 0.98), "p", "./features/t")
    feats = [nd["node_id"] for nd in pruned["nodes"] if is_feature(nd)]
    for pins in (None, feats, feats[: len(feats) // 2], []):
        s = json_graph_scores(pruned, pins)
        assert s == pytest.approx(dense_scores(pruned, pins), abs=1e-6), pins


def test_undefined_scores_are_nan_in_both_callers(tiny_graph):
    from dataclasses import replace

    # no edges: no influence reaches a token or an error, so the replacement score is circuit-tracer's 0 / 0 (not 0.0);
    # completeness stays defined (the logits' own weight, with no input from errors: 1)
    g = replace(tiny_graph, edges=torch.zeros(2, 0, dtype=torch.long), weights=torch.zeros(0), _scores=None)
    assert math.isnan(g.scores["replacement"]) and g.scores["completeness"] == 1.0
    data = graph_json(g, "t", "./features/t")
    assert data["metadata"]["info"]["featurelens"]["scores"] == {"replacement": None, "completeness": 1.0}
    json.dumps(data, allow_nan=False)  # what is written is strict JSON
    s = json_graph_scores(data)
    assert math.isnan(s["replacement"]) and s["completeness"] == 1.0
    # no logit at all: both undefined
    data["nodes"] = [nd for nd in data["nodes"] if node_kind(nd) != "logit"]
    assert all(math.isnan(v) for v in json_graph_scores(data).values())


def test_scores_of_a_big_graph_need_no_dense_matrix():
    """50,000 nodes in 24 layers with 400,000 links: a dense n x n solve needs 20 GB; the sparse one, seconds."""
    rng = np.random.default_rng(0)
    n_pos, n_layers, per_layer = 25, 24, 2082
    nodes = [{"node_id": f"E_{p}_{p}", "feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
              "jsNodeId": f"E_{p}-{p}"} for p in range(n_pos)]
    layers = [[nd["node_id"] for nd in nodes]]
    for layer in range(n_layers):
        ids = [f"{layer}_{i}_{i % n_pos}" for i in range(per_layer)]
        nodes += [{"node_id": nid, "feature": i, "layer": str(layer), "ctx_idx": i % n_pos,
                   "feature_type": "cross layer transcoder", "jsNodeId": nid} for i, nid in enumerate(ids)]
        layers.append(ids)
    nodes.append({"node_id": "99_1_24", "feature": 1, "layer": "25", "ctx_idx": 24, "feature_type": "logit",
                  "token_prob": 1.0, "jsNodeId": "L_1-24"})
    links = []
    for k in range(1, len(layers)):
        tgt = layers[k]
        src = [s for prev in layers[:k] for s in prev]
        picks, ws = rng.integers(0, len(src), size=(len(tgt), 8)), rng.normal(size=(len(tgt), 8))
        links += [{"source": src[j], "target": t, "weight": float(w)}
                  for t, row, wrow in zip(tgt, picks.tolist(), ws.tolist()) for j, w in zip(row, wrow)]
    links += [{"source": s, "target": "99_1_24", "weight": 1.0} for s in layers[-1][:200]]
    g = {"metadata": {"slug": "big", "scan": "x", "transcoder_list": [], "prompt_tokens": ["a"] * n_pos,
                      "prompt": "a"}, "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both",
                                                   "clickedId": "", "sg_pos": ""}, "nodes": nodes, "links": links}
    assert 49_900 < len(nodes) <= 50_000
    t = time.perf_counter()
    s = json_graph_scores(g)
    took = time.perf_counter() - t
    assert s["replacement"] == pytest.approx(1.0) and 0 < s["completeness"] <= 1  # no error nodes at all
    assert took < 60, took


def test_cyclic_links_are_a_clear_error():
    g = _small_graph()
    assert json_graph_scores(g)["replacement"] >= 0  # synthetic_graph's links run forward: no cycle
    feats = [nd["node_id"] for nd in g["nodes"] if is_feature(nd)]
    logit = next(nd["node_id"] for nd in g["nodes"] if node_kind(nd) == "logit")
    cyclic = copy.deepcopy(g)
    cyclic["links"] = [{"source": feats[0], "target": logit, "weight": 1.0},
                       {"source": feats[1], "target": feats[0], "weight": 1.0},
                       {"source": feats[0], "target": feats[1], "weight": 1.0}]
    with pytest.raises(GraphFormatError, match="cycle"):
        json_graph_scores(cyclic)
    cyclic["links"] = []
    assert math.isnan(json_graph_scores(cyclic)["replacement"])
