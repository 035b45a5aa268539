"""Attribution graphs on tiny random models: exact edges, a faithful replacement, pruning, files, interventions.

Models are built from a config with random weights in float64 (a Gemma-3-like one with post norms, qk-norm, sliding
windows and an embedding scale; a Llama-like one), with small random transcoders: per-layer (with and without an
affine skip) and cross-layer. Nothing is downloaded or trained.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

import featurelens as fl
from featurelens.attribution import attribute
from featurelens.attribution.files import load_graph, save_graph
from featurelens.attribution.graph import cantor, uncantor
from featurelens.attribution.intervene import feature_intervention
from featurelens.attribution.replacement import (
    demeaned_unembedding, frozen_forward, record,
)
from featurelens.dictionaries.clt import CLTConfig, CrossLayerTranscoder
from featurelens.dictionaries.compat import DictionaryModelMismatchError
from featurelens.dictionaries.sae import DictionaryConfig, SparseDictionary, TranscoderSet
from featurelens.engine.config import ModelConfig
from featurelens.engine.hooked import HookedTransformer
from featurelens.errors import FeaturelensError, InputError

from builders import D, TOKENS, tiny_clt, tiny_model, tiny_transcoders  # noqa: E402


@pytest.fixture(scope="module", params=["gemma3-skip", "llama-plain", "gemma3-clt", "llama-partial"])
def setup(request):
    kind, tkind = request.param.split("-")
    model = tiny_model(kind)
    if tkind == "clt":
        tcs = tiny_clt(model)
    elif tkind == "partial":  # layer 1 has no transcoder: its whole output is an error node
        tcs = tiny_transcoders(model, skip=True, layers=[0, 2])
    else:
        tcs = tiny_transcoders(model, skip=tkind == "skip")
    graph = attribute(model, tcs, TOKENS, progress=False, batch_size=64)
    return model, tcs, graph


# --------------------------------------------------------------------------------------------- exactness


def _target_value(model, rep, run, graph, t: int) -> float:
    """A target node's value in a frozen run: a feature's pre-activation or a demeaned logit."""
    kind = graph.node_kind(t)
    if kind == "logit":
        tok = graph.logit_tokens[t - graph.logit_slice.start]
        u = demeaned_unembedding(model, tok[None])[0]
        return float(run.final[0, -1] @ u)
    layer, pos, idx = graph.features[t].tolist()
    with torch.no_grad():
        return float(rep.pre_activation(layer, run.inputs[layer][0, pos])[idx])


def _perturbed_run(model, rep, rec, graph, s: int, eps: float):
    kind, pos = graph.node_kind(s), graph.node_pos(s)
    if kind == "feature":
        layer, _, idx = graph.features[s].tolist()
        a = rec.acts[layer].clone()
        a[pos, idx] *= 1 + eps
        return frozen_forward(model, rep, rec, acts={layer: a})
    if kind == "error":
        layer = graph.node_layer(s)
        e = rec.errors[layer].clone()
        e[pos] *= 1 + eps
        return frozen_forward(model, rep, rec, errors={layer: e})
    r0 = rec.resid0.clone()
    r0[pos] *= 1 + eps
    return frozen_forward(model, rep, rec, resid0=r0)


def test_replacement_reproduces_the_model(setup):
    model, tcs, graph = setup
    rep = tcs
    rec = record(model, rep, TOKENS)
    real = model(TOKENS[None])[0]
    frozen = frozen_forward(model, rep, rec).logits[0]
    assert float((frozen - real).abs().max()) < 1e-5 * float(real.abs().max())  # norms run in float32
    # and the reconstruction is not trivially the model: errors are non-zero
    assert all(float(e.abs().max()) > 1e-3 for e in rec.errors.values())


def test_edges_are_exact_direct_effects(setup):
    """Scaling a source's activation by (1 + eps) in the frozen replacement moves each target by eps x edge weight."""
    model, tcs, graph = setup
    rep = tcs
    rec = record(model, rep, TOKENS)
    base = frozen_forward(model, rep, rec)
    A = graph.dense()
    rng = random.Random(0)
    nz = list(zip(*[x.tolist() for x in graph.edges]))
    strongest = graph.weights.abs().argsort(descending=True)[:10].tolist()
    sample = [nz[i] for i in strongest] + rng.sample(nz, 25)
    # pairs without an edge (a later source, or a zero direct effect) must not move
    zeros = (A == 0).nonzero().tolist()
    sample_zero = [tuple(p) for p in rng.sample(zeros, 10)]
    kinds = {graph.node_kind(s) for _, s in sample}
    assert {"feature", "error", "embedding"} <= kinds
    assert any(graph.node_kind(t) == "logit" for t, _ in sample) and any(graph.node_kind(t) == "feature" for t, _ in sample)
    eps = 0.5
    runs: dict[int, object] = {}
    for t, s in sample + sample_zero:
        if graph.node_kind(t) not in ("feature", "logit"):
            continue
        run = runs.setdefault(s, _perturbed_run(model, rep, rec, graph, s, eps))
        moved = _target_value(model, rep, run, graph, t) - _target_value(model, rep, base, graph, t)
        want = eps * float(A[t, s])
        # the engine's norms compute in float32: edges far below the row's largest are held to ~1e-7 of it
        scale = max(abs(want), 1e-3 * eps * float(A[t].abs().max()))
        assert abs(moved - want) / scale < 1e-3, (graph.node_id(t), graph.node_id(s), moved, want)


def test_logit_nodes_cover_the_probability(setup):
    model, _, graph = setup
    probs = torch.softmax(model(TOKENS[None])[0, -1].double(), -1)
    top = probs.topk(graph.n_logits)
    assert graph.logit_tokens.tolist() == top.indices.tolist()
    assert graph.n_logits == 10 or float(graph.logit_probs.sum()) >= 0.95 - 1e-6
    assert float(graph.logit_probs[:-1].sum()) < 0.95


def test_bos_position_is_left_out(setup):
    _, _, graph = setup
    assert graph.bos and int(graph.features[:, 1].min()) >= 1
    errors_at_0 = {graph.error_index(layer, 0) for layer in range(graph.n_layers)}
    assert not (set(graph.edges[1].tolist()) & errors_at_0)


@pytest.mark.parametrize("length", [10, 40])
def test_prefix_runs_give_the_same_edges(monkeypatch, length):
    """Targets at position p are attributed on the frozen model of the prefix [0, p]: per position for short
    prompts, in buckets for long ones. Both must equal backward passes over the whole prompt."""
    import importlib

    attr = importlib.import_module("featurelens.attribution.attribute")

    model = tiny_model("gemma3")
    tcs = tiny_transcoders(model, skip=True)
    gen = torch.Generator().manual_seed(3)
    tokens = torch.cat([TOKENS, torch.randint(2, 50, (length - len(TOKENS),), generator=gen)])
    monkeypatch.setattr(attr, "_bucket_ends", lambda P, f=attr._bucket_ends: f(P, min_width=4, max_buckets=P // 4))
    assert len(attr._bucket_ends(length)) == length // 4
    g = attribute(model, tcs, tokens, progress=False, batch_size=32)
    monkeypatch.setattr(attr, "_bucket_ends", lambda P: [P])
    whole = attribute(model, tcs, tokens, progress=False, batch_size=32)
    assert g.node_ids() == whole.node_ids()
    assert torch.allclose(g.dense(), whole.dense(), rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------------------------- admission order


def test_max_feature_nodes_admits_the_most_influential(setup):
    model, tcs, full = setup
    part = attribute(model, tcs, TOKENS, progress=False, batch_size=8, max_feature_nodes=12)
    assert part.n_features == 12
    # the rows that were computed are identical to the full graph's rows (restricted to the kept columns)
    ids_full = {nid: i for i, nid in enumerate(full.node_ids())}
    Af, Ap = full.dense(), part.dense()
    for t in list(range(part.n_features)) + list(range(part.logit_slice.start, part.n_nodes)):
        ft = ids_full[part.node_id(t)]
        for s in range(part.n_nodes):
            assert Ap[t, s] == pytest.approx(float(Af[ft, ids_full[part.node_id(s)]]), abs=1e-6)
    # and the admitted features are among the most influential ones of the full graph
    infl = full.node_influence()[: full.n_features]
    top = {full.node_id(i) for i in infl.argsort(descending=True)[:24].tolist()}
    chosen = {part.node_id(i) for i in range(part.n_features)}
    assert len(chosen & top) >= 9


# --------------------------------------------------------------------------------------------- pruning and scores


def test_prune_keeps_tokens_and_logits_and_connects_features(setup):
    _, _, graph = setup
    p = graph.prune(node_threshold=0.6, edge_threshold=0.9)
    kept = p.kept()
    assert bool(kept[p.token_slice].all()) and bool(kept[p.logit_slice].all())
    assert 0 < p.n_features < graph.n_features
    srcs, tgts = set(p.edges[1].tolist()), set(p.edges[0].tolist())
    for i in range(p.n_features):
        assert i in srcs and i in tgts, p.node_id(i)
    assert all(bool(kept[s]) and bool(kept[t]) for t, s in p.edges.T.tolist())
    # pruned edges keep their weights
    ids = {nid: i for i, nid in enumerate(graph.node_ids())}
    A = graph.dense()
    for (t, s), w in list(zip(p.edges.T.tolist(), p.weights.tolist()))[:50]:
        assert float(A[ids[p.node_id(t)], ids[p.node_id(s)]]) == pytest.approx(w)
    # a looser threshold keeps more
    assert graph.prune(0.95, 0.99).n_features >= p.n_features


def test_scores(setup):
    _, _, graph = setup
    s = graph.scores
    assert 0 < s["replacement"] < 1 and 0 < s["completeness"] <= 1
    assert graph.prune().scores == s  # scores are those of the unpruned graph
    every = graph.subgraph_scores([graph.node_id(i) for i in range(graph.n_features)])
    assert every["replacement"] == pytest.approx(s["replacement"]) and every["completeness"] == pytest.approx(
        s["completeness"])
    none = graph.subgraph_scores([])
    assert none["replacement"] < s["replacement"] and none["completeness"] < s["completeness"]


@pytest.mark.parametrize("bad", [0, -0.1, 1.5, "0.8", True])
def test_bad_thresholds(setup, bad):
    _, _, graph = setup
    with pytest.raises(InputError):
        graph.prune(node_threshold=bad)
    with pytest.raises(InputError):
        graph.prune(edge_threshold=bad)


def test_top_paths(setup):
    _, _, graph = setup
    p = graph.prune()
    paths = p.top_paths(None, k=4)
    assert 1 <= len(paths) <= 4
    assert [x.score for x in paths] == sorted((x.score for x in paths), reverse=True)
    top_logit = p.node_id(p.logit_slice.start)
    for path in paths:
        assert path.nodes[-1] == top_logit
        assert path.nodes[0].startswith("E_") or "_-1_" in path.nodes[0] or len(path.nodes) >= 2
    with pytest.raises(InputError):
        p.top_paths("no such token", k=2)


def test_cantor():
    for layer, idx in [(0, 0), (0, 5), (3, 0), (17, 2047), (25, 131071)]:
        assert uncantor(cantor(layer, idx)) == (layer, idx)


# --------------------------------------------------------------------------------------------- files


def test_json_round_trip(setup, tmp_path):
    model, tcs, graph = setup
    p = graph.prune()
    path = save_graph(p, tmp_path, slug="My Graph!", model=model, transcoders=tcs)
    assert path == tmp_path / "my-graph.json"
    data = json.loads(path.read_text())
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    for key, typ in [("slug", str), ("scan", str), ("transcoder_list", list), ("prompt_tokens", list),
                     ("prompt", str), ("node_threshold", float), ("schema_version", int), ("info", dict)]:
        assert isinstance(meta[key], typ), key
    assert set(data["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    node_fields = {"node_id": str, "feature": int, "layer": str, "ctx_idx": int, "feature_type": str,
                   "token_prob": float, "is_target_logit": bool, "run_idx": int, "reverse_ctx_idx": int,
                   "jsNodeId": str, "clerp": str}
    for nd in data["nodes"]:
        for key, typ in node_fields.items():
            assert isinstance(nd[key], typ), (key, nd)
        assert nd["influence"] is None or isinstance(nd["influence"], float)
    ids = [nd["node_id"] for nd in data["nodes"]]
    assert len(ids) == len(set(ids))  # unambiguous
    types = {nd["feature_type"] for nd in data["nodes"]}
    assert {"cross layer transcoder", "embedding", "logit"} <= types
    for nd in data["nodes"]:
        if nd["feature_type"] == "cross layer transcoder":
            layer, idx, pos = map(int, nd["node_id"].split("_"))
            assert uncantor(nd["feature"]) == (layer, idx) and pos == nd["ctx_idx"]
        if nd["feature_type"] == "logit":
            assert nd["clerp"].startswith('Output "') and float(nd["clerp"].split("(p=")[1].rstrip(")")) > 0
        if nd["feature_type"] == "mlp reconstruction error":
            assert nd["node_id"] == f"{nd['layer']}_-1_{nd['ctx_idx']}" and nd["feature"] == -1
    node_set = set(ids)
    assert all(l["source"] in node_set and l["target"] in node_set for l in data["links"])
    assert sum(nd["is_target_logit"] for nd in data["nodes"]) == 1

    # graph-metadata.json: one entry per slug, replaced on a second save
    save_graph(p, tmp_path, slug="My Graph!")
    save_graph(p, tmp_path, slug="other")
    listing = json.loads((tmp_path / "graph-metadata.json").read_text())["graphs"]
    assert sorted(m["slug"] for m in listing) == ["my-graph", "other"]
    # feature cards for every feature node, with decoder logits
    # where circuit-tracer's viewer fetches them: `${scan}/${feature}.json` relative to the graph, for a "./" scan
    assert meta["scan"].startswith("./features/")
    cards = list((tmp_path / meta["scan"]).glob("*.json"))
    assert len(cards) == len({(l, f) for l, _, f in p.features.tolist()})
    card = json.loads(cards[0].read_text())
    for key in ("examples_quantiles", "top_logits", "bottom_logits", "act_min", "act_max", "quantile_values",
                "histogram", "activation_frequency", "index"):
        assert key in card
    assert len(card["top_logits"]) == 10

    back = load_graph(path)
    assert back.node_ids() == p.node_ids() or set(back.node_ids()) >= {nid for nid in ids}
    kept_ids = {back.node_id(i) for i in range(back.n_nodes) if bool(back.kept()[i])}
    assert kept_ids == node_set
    orig = {(ids_t, ids_s): w for (ids_t, ids_s), w in zip(
        [(p.node_id(t), p.node_id(s)) for t, s in p.edges.T.tolist()], p.weights.tolist())}
    again = {(back.node_id(t), back.node_id(s)): w for (t, s), w in zip(back.edges.T.tolist(), back.weights.tolist())}
    assert orig.keys() == again.keys() and all(again[k] == pytest.approx(v, rel=1e-6) for k, v in orig.items())
    assert back.scores == pytest.approx(graph.scores)
    assert back.logit_tokens.tolist() == p.logit_tokens.tolist() and back.tokens == graph.tokens


def test_circuit_tracer_models_read_our_files(setup, tmp_path):
    """circuit-tracer's own pydantic models (graph, metadata, feature cards) accept our files. Needs a Python with
    circuit-tracer installed (the attribution benchmark makes one): FEATURELENS_CIRCUIT_TRACER_PYTHON=path/to/python."""
    import os
    import subprocess

    python = os.environ.get("FEATURELENS_CIRCUIT_TRACER_PYTHON")
    if not python:
        pytest.skip("set FEATURELENS_CIRCUIT_TRACER_PYTHON to a Python with circuit-tracer installed")
    model, tcs, graph = setup
    save_graph(graph.prune(), tmp_path, slug="g", model=model, transcoders=tcs)
    script = (
        "import json, glob, sys\n"
        "from circuit_tracer.frontend.graph_models import Model, Metadata\n"
        "from circuit_tracer.frontend import feature_models\n"
        "d = sys.argv[1]\n"
        "Model(**json.load(open(d + '/g.json')))\n"
        "[Metadata(**m) for m in json.load(open(d + '/graph-metadata.json'))['graphs']]\n"
        "cards = glob.glob(d + '/features/*/*.json')\n"
        "assert cards\n"
        "[feature_models.Model(**json.load(open(f))) for f in cards]\n"
        "print('ok', len(cards))\n"
    )
    out = subprocess.run([python, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


def test_scores_and_pruning_match_circuit_tracer(setup, tmp_path):
    """circuit-tracer's own `prune_graph` and `compute_graph_scores` on our adjacency matrix give our masks and scores
    (same optional Python as above)."""
    import os
    import subprocess

    python = os.environ.get("FEATURELENS_CIRCUIT_TRACER_PYTHON")
    if not python:
        pytest.skip("set FEATURELENS_CIRCUIT_TRACER_PYTHON to a Python with circuit-tracer installed")
    _, _, g = setup
    torch.save({"A": g.dense().float(), "probs": g.logit_probs.float(), "n_tok": g.n_pos, "n_logits": g.n_logits,
                "F": g.n_features, "L": g.n_layers}, tmp_path / "A.pt")
    script = (
        "import sys, json, types, torch\n"
        "from circuit_tracer import graph as G\n"
        "d = torch.load(sys.argv[1])\n"
        "g = types.SimpleNamespace(adjacency_matrix=d['A'], input_tokens=torch.zeros(d['n_tok']), "
        "logit_targets=list(range(d['n_logits'])), logit_tokens=torch.zeros(d['n_logits']), "
        "selected_features=torch.zeros(d['F']), logit_probabilities=d['probs'], "
        "cfg=types.SimpleNamespace(n_layers=d['L']), n_pos=d['n_tok'])\n"
        "r = G.prune_graph(g, 0.8, 0.98)\n"
        "s = G.compute_graph_scores(g) if hasattr(G, 'compute_graph_scores') else None\n"
        "print(json.dumps({'mask': r.node_mask.tolist(), 'edges': int(r.edge_mask.sum()), 'scores': s}))\n"
    )
    out = subprocess.run([python, "-c", script, str(tmp_path / "A.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ct = json.loads(out.stdout.strip().splitlines()[-1])
    p = g.prune(0.8, 0.98)
    kept_ids = {p.node_id(i) for i in range(p.n_nodes) if bool(p.kept()[i])}
    assert [nid in kept_ids for nid in g.node_ids()] == ct["mask"]
    assert p.edges.shape[1] == ct["edges"]
    if ct["scores"] is not None:
        assert g.scores["replacement"] == pytest.approx(ct["scores"][0], rel=1e-5)
        assert g.scores["completeness"] == pytest.approx(ct["scores"][1], rel=1e-5)


def test_cards_and_labels_from_an_analysis(setup, tmp_path):
    """With a dictionary analysis, feature cards carry its examples, histogram and density, and labels become clerps."""
    from featurelens.analysis.dashboard import FeatureDashboard, TokenExample

    model, tcs, graph = setup
    p = graph.prune()
    layer, _, idx = p.features[0].tolist()

    class Analysis:  # what save_graph reads from a DictionaryAnalysis
        def label(self, i):
            return f"label {i}"

        def feature(self, i):
            ex = TokenExample(tokens=["a", "b\n"], acts=[0.0, 2.5], index=1, act=2.5, ctx=0, pos=1)
            q = TokenExample(tokens=["c"], acts=[0.5], index=0, act=0.5, ctx=1, pos=0, bin=0)
            return FeatureDashboard(
                index=i, d_sae=64, model=model.name, hook_name="h", label=f"label {i}", label_provenance=None,
                labels=[], density=0.01, n_fires=10, n_tokens=1000, max_act=2.5, mean_act=1.0,
                hist_edges=[0.0, 1.0, 2.0, 3.0], hist_counts=[3, 5, 2], logit_up=[(" up", 5, 1.0)],
                logit_down=[(" down", 6, -1.0)], similar=[], cofiring=[], top_examples=[ex], quantile_examples=[q])

    path = save_graph(p, tmp_path, slug="a", analyses={layer: Analysis()})
    data = json.loads(path.read_text())
    mine = [nd for nd in data["nodes"] if nd["node_id"].startswith(f"{layer}_") and nd["feature_type"] ==
            "cross layer transcoder"]
    assert mine and all(nd["clerp"] == f"label {nd['node_id'].split('_')[1]}" for nd in mine)
    card = json.loads((tmp_path / data["metadata"]["scan"] / f"{cantor(layer, idx)}.json").read_text())
    assert card["top_logits"] == [" up"] and card["bottom_logits"] == [" down"]
    assert card["histogram"] == [3.0, 5.0, 2.0] and card["activation_frequency"] == 0.01 and card["act_max"] == 2.5
    top = card["examples_quantiles"][0]["examples"][0]
    assert top["tokens"] == ["a", "b⏎"] and top["tokens_acts_list"] == [0.0, 2.5] and top["train_token_ind"] == 1
    assert len(card["examples_quantiles"]) == 2 and card["quantile_values"] == [0.5]
    assert load_graph(path).labels


def test_load_circuit_tracer_error_ids(tmp_path):
    """Files with circuit-tracer's older error ids (0_{layer}_{pos}) read by feature_type, not by id."""
    nodes = [
        {"node_id": "E_5_0", "feature": 0, "layer": "E", "ctx_idx": 0, "feature_type": "embedding", "jsNodeId": "E_5-0"},
        {"node_id": "0_1_0", "feature": 1, "layer": "0", "ctx_idx": 0, "feature_type": "cross layer transcoder",
         "jsNodeId": "0_1-0", "activation": 2.0},
        {"node_id": "0_1_0x", "feature": -1, "layer": "1", "ctx_idx": 0, "feature_type": "mlp reconstruction error",
         "jsNodeId": "1_0-0"},
        {"node_id": "3_7_0", "feature": 7, "layer": "3", "ctx_idx": 0, "feature_type": "logit", "jsNodeId": "L_7-0",
         "clerp": 'Output " x" (p=0.600)', "token_prob": 0.6, "is_target_logit": True},
    ]
    links = [{"source": "E_5_0", "target": "0_1_0", "weight": 1.5}, {"source": "0_1_0", "target": "3_7_0", "weight": 2.0},
             {"source": "0_1_0x", "target": "3_7_0", "weight": -1.0}]
    meta = {"slug": "t", "scan": "s", "transcoder_list": [], "prompt_tokens": ["a"], "prompt": "a"}
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"metadata": meta, "qParams": {}, "nodes": nodes, "links": links}))
    g = load_graph(f)
    assert g.n_layers == 2 and g.n_features == 1 and g.logit_strs == [" x"]
    assert {(g.node_id(t), g.node_id(s)): w for (t, s), w in zip(g.edges.T.tolist(), g.weights.tolist())} == {
        ("0_1_0", "E_5_0"): 1.5, ("3_7_0", "0_1_0"): 2.0, ("3_7_0", "1_-1_0"): -1.0}
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(FeaturelensError):
        load_graph(bad)
    with pytest.raises(FeaturelensError):
        load_graph(tmp_path / "missing.json")


# --------------------------------------------------------------------------------------------- interventions


def test_direct_intervention_matches_the_graph(setup):
    """With attention frozen and only direct effects, scaling a feature moves each logit by exactly the graph's edge."""
    model, tcs, graph = setup
    L = graph.logit_slice.start
    to_logit = [(t, s, w) for (t, s), w in zip(graph.edges.T.tolist(), graph.weights.tolist())
                if t == L and graph.node_kind(s) == "feature"]
    t, s, w = max(to_logit, key=lambda x: abs(x[2]))
    layer, pos, idx = graph.features[s].tolist()
    r = feature_intervention(model, tcs, TOKENS, [(layer, pos, idx, 0.0)], freeze_attention=True, direct_only=True)
    tok = graph.logit_tokens[0:1]
    u = demeaned_unembedding(model, tok)[0]
    # the demeaned logit before the final norm's scale is what the graph measures; the norm scale is frozen, so
    # compare the change of (logit - mean logit)
    d = (r.logits[-1] - r.original_logits[-1])
    moved = float(d[tok] - d.mean())
    assert moved == pytest.approx(-w, rel=1e-3, abs=1e-6)
    assert r.edits[0][:3] == (layer, pos, idx) and r.edits[0][4] == 0.0
    assert u.shape == (D,)


def test_intervention_modes_and_generation(setup):
    model, tcs, graph = setup
    layer, pos, idx = graph.features[0].tolist()
    none = feature_intervention(model, tcs, TOKENS, [(layer, pos, idx, 1.0)], mode="scale", freeze_attention=False)
    assert torch.allclose(none.logits, none.original_logits, atol=1e-6)  # scaling by 1 changes nothing
    big = feature_intervention(model, tcs, TOKENS, [(layer, pos, idx, 50.0)], freeze_attention=False,
                               max_new_tokens=3)
    assert not torch.allclose(big.logits[-1], big.original_logits[-1], atol=1e-3)
    assert torch.allclose(big.logits[:pos], big.original_logits[:pos], atol=1e-6)  # earlier positions untouched
    assert big.generation is not None and big.original_generation is not None
    frozen = feature_intervention(model, tcs, TOKENS, [(layer, pos, idx, 50.0)], freeze_attention=True)
    assert not torch.allclose(frozen.logits[-1], big.logits[-1], atol=1e-6)
    with pytest.raises(InputError):
        feature_intervention(model, tcs, TOKENS, [(layer, 99, idx, 0.0)])
    with pytest.raises(FeaturelensError):
        feature_intervention(model, tcs, TOKENS, [(layer, pos, 10_000, 0.0)])
    with pytest.raises(InputError):
        feature_intervention(model, tcs, TOKENS, [])


def test_check_graph_runs_in_the_real_model(setup):
    from featurelens.attribution.check import check_graph

    model, tcs, graph = setup
    res = check_graph(graph, model, tcs, k=6)
    assert len(res.features) == 6 and 0 <= res.sign_agreement <= 1
    # features' predicted direct effects are the graph's edges into the target logit
    A = graph.dense()
    L = graph.logit_slice.start
    ids = {graph.node_id(i): i for i in range(graph.n_features)}
    for c in res.features:
        assert c.predicted_direct == pytest.approx(-float(A[L, ids[c.node_id]]))
    assert "faithfulness" in res.summary()


def test_local_replacement_is_exact_for_small_edits(setup):
    """Tier (a) is the model the graph describes: scaling a feature by 0.99 moves the target by the graph's predicted
    total effect (x 0.01) to 1e-3 relative, wherever no other feature crossed its threshold (TopK near-ties may).
    The 1e-6 floor is the float32 precision of the stored edges and of the clean run (changes here are ~1e-3)."""
    from featurelens.attribution.check import check_graph

    model, tcs, graph = setup
    res = check_graph(graph, model, tcs, k=8, scale=0.99)
    quiet = [f for f in res.features if f.crossings == 0]
    assert len(quiet) >= 4
    for f in quiet:
        assert f.measured_a == pytest.approx(f.predicted_total, rel=1e-3, abs=1e-6), f.node_id
    assert res.tiers_no_crossing["a"].sign_agreement == 1.0
    # the real model's own gradient is its first-order prediction: nudges of -0.1% and +0.1% in (c) differ by it
    # with the curvature cancelled (a one-sided nudge is off by the curvature: 1-3% at a 1% nudge on these random
    # models, and up to 1.7% at 0.1% for a feature whose first-order effect nearly cancels). What is left, 0.1-0.2%
    # on these models, is not curvature; its source is not pinned down yet.
    down = check_graph(graph, model, tcs, k=8, scale=0.999, tiers=("c",))
    up = {f.node_id: f for f in check_graph(graph, model, tcs, k=8, scale=1.001, tiers=("c",)).features}
    for f in down.features:
        g = up[f.node_id]
        assert f.measured - g.measured == pytest.approx(f.predicted_gradient - g.predicted_gradient, rel=5e-3,
                                                        abs=1e-9), f.node_id
    # the live tiers differ from the frozen one (attention, norms and the real MLPs respond)
    assert any(abs(f.measured_b - f.measured_a) > 1e-3 * abs(f.measured_a) for f in res.features)
    assert set(res.tiers) == {"a", "b", "c"}
    whole = check_graph(graph, model, tcs, k=8)  # whole ablations: crossings are counted, agreement split by them
    assert whole.scale == 0.0 and any(f.crossings > 0 for f in whole.features)
    assert whole.tiers_no_crossing["c"].n == sum(f.crossings == 0 for f in whole.features)
    info = whole.to_info()
    json.dumps(info)
    assert len(info["features"]) == 8 and set(info["tiers"]) == {"a", "b", "c"} and 0 <= info["score"] <= 1
    # every feature node, checked or not, carries the graph's prediction and the real model's gradient; for the
    # checked ones they are the table's figures
    assert set(info["node_effects"]) == {graph.node_id(i) for i in range(graph.n_features)}
    for f in whole.features:
        graph_says, model_says = info["node_effects"][f.node_id]
        assert graph_says == pytest.approx(f.predicted_total, rel=1e-4) and \
            model_says == pytest.approx(f.predicted_gradient, rel=1e-4)
    unchecked = set(info["node_effects"]) - {f.node_id for f in whole.features}
    assert unchecked and any(abs(info["node_effects"][n][1]) > 0 for n in unchecked)


def test_faithfulness_over_prompts():
    from featurelens.attribution import check_prompts

    model = tiny_model("llama")
    tcs = tiny_transcoders(model, skip=True)
    prompts = [TOKENS, TOKENS[:6], torch.tensor([1, 3, 3, 4, 40, 41, 7])]
    rep = check_prompts(model, tcs, prompts, k=4, batch_size=32)
    assert len(rep.per_prompt) == 3 and sum(len(r.features) for _, r in rep.per_prompt) == 12
    assert 0 <= rep.sign_agreement <= 1 and -1 <= rep.correlation <= 1
    assert rep.tiers["c"].sign_agreement == rep.sign_agreement and rep.tiers["a"].n == 12
    assert "3 prompts" in rep.summary() and "(b) attention frozen" in rep.summary()


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs():
    model = tiny_model("llama")
    tcs = tiny_transcoders(model)
    with pytest.raises(InputError):
        attribute(model, tcs, torch.tensor([], dtype=torch.long), progress=False)
    with pytest.raises(InputError):
        attribute(model, tcs, torch.randint(2, 50, (model.cfg.n_ctx + 1,)), progress=False)
    with pytest.raises(InputError):
        attribute(model, tcs, TOKENS, progress=False, batch_size=0)
    other = tiny_model("llama")
    other.name = "another-model"
    with pytest.raises(DictionaryModelMismatchError):
        attribute(other, tcs, TOKENS, progress=False)
    wide = HookedTransformer(ModelConfig(architecture="llama", n_layers=2, d_model=16, n_heads=2, n_kv_heads=2,
                                         d_head=8, d_mlp=16, d_vocab=50, n_ctx=64), name=model.name)
    with pytest.raises(DictionaryModelMismatchError):  # layer 2 does not exist, and widths differ
        attribute(wide, tcs, TOKENS, progress=False)
    assert issubclass(DictionaryModelMismatchError, FeaturelensError)


def test_memory_guard(monkeypatch):
    import importlib

    attr = importlib.import_module("featurelens.attribution.attribute")
    model = tiny_model("llama")
    tcs = tiny_transcoders(model)
    monkeypatch.setattr(attr, "_memory_budget", lambda: 20 * 4 * 300)  # room for about 20 rows of ~300 columns
    with pytest.raises(InputError, match="max_feature_nodes"):
        attribute(model, tcs, TOKENS, progress=False)
    g = attribute(model, tcs, TOKENS, progress=False, max_feature_nodes=5)
    assert g.n_features == 5


def test_top_level_exports():
    assert fl.attribute is attribute and fl.feature_intervention is feature_intervention
    assert fl.load_graph is load_graph and fl.AttributionGraph is not None


# --------------------------------------------------------------------------------------------- command line


def test_cli_graph_check_and_intervene(cli_setup, capsys):
    from featurelens.cli import main

    model, tc_dir, tmp = cli_setup
    out = tmp / "graphs"
    assert main(["graph", "-m", "tiny", str(tc_dir), "hello world", "--out", str(out),
                 "--batch-size", "16", "--node-threshold", "0.9"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "replacement score" in text and "wrote" in text
    files = sorted(p.name for p in out.glob("*.json"))
    assert files == ["graph-metadata.json", "hello-world.json"]
    assert main(["graph-check", str(out / "hello-world.json"), "--ablate-top", "4", "-n", "2"]) == 0
    text = capsys.readouterr().out
    assert "top paths" in text and "sign agreement" in text and "subgraph" in text
    assert main(["intervene", "-m", "tiny", "--transcoders", str(tc_dir), "hello world", "--set", "1:3@2=0",
                 "--freeze-attention", "--max-new-tokens", "2"]) == 0
    text = capsys.readouterr().out
    assert "before" in text and "continuation after" in text


@pytest.mark.parametrize("argv, message", [
    (["--node-threshold", "0"], "node-threshold"),
    (["--edge-threshold", "1.5"], "edge-threshold"),
])
def test_cli_bad_thresholds(cli_setup, capsys, argv, message):
    from featurelens.cli import main

    _, tc_dir, tmp = cli_setup
    assert main(["graph", "--transcoders", str(tc_dir), "hi", "--out", str(tmp / "g")] + argv) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_input(cli_setup, capsys):
    from featurelens.cli import main

    _, tc_dir, tmp = cli_setup
    assert main(["graph", "--transcoders", str(tc_dir), "   ", "--out", str(tmp / "g")]) == 2
    assert "empty prompt" in capsys.readouterr().err
    assert main(["graph", "--transcoders", str(tc_dir), "x" * 100, "--out", str(tmp / "g")]) == 2
    assert "context" in capsys.readouterr().err
    assert main(["intervene", "--transcoders", str(tc_dir), "hi", "--set", "12-3071@5"]) == 2
    assert "LAYER:FEATURE@POSITION=VALUE" in capsys.readouterr().err
    assert main(["graph", "--transcoders", str(tmp / "nothing"), "hi"]) == 2
    assert main(["graph-check", str(tmp / "nothing.json")]) == 2


# --------------------------------------------------------------------------------------------- the embedded model


def test_exact_edges_on_the_embedded_model(gemma, tmp_path):
    """The same exactness on Gemma 3 270M (float32), with random skip transcoders on every layer."""
    torch.manual_seed(0)
    d = gemma.cfg.d_model
    tcs = {}
    for layer in range(gemma.cfg.n_layers):
        cfg = DictionaryConfig(d_in=d, d_sae=256, arch="topk", k=8, transcoder=True, skip=True,
                               hook_name=f"blocks.{layer}.ln2.hook_normalized",
                               hook_name_out=f"blocks.{layer}.hook_mlp_out", model_name=gemma.name)
        tc = SparseDictionary(cfg)
        with torch.no_grad():
            tc.W_skip.normal_(0, 0.01)
        tcs[layer] = tc
    tcs = TranscoderSet(tcs)
    prompt = "The capital of France is"
    g = attribute(gemma, tcs, prompt, max_feature_nodes=48, batch_size=32, progress=False)
    rep = tcs
    rec = record(gemma, rep, gemma.to_tokens(prompt)[0])
    base = frozen_forward(gemma, rep, rec)
    real = gemma(prompt)[0]
    assert float((base.logits[0] - real).abs().max()) < 1e-3 * float(real.abs().max())
    A = g.dense()
    strongest = g.weights.abs().argsort(descending=True)[:8].tolist()
    for e in strongest:
        t, s = g.edges[:, e].tolist()
        run = _perturbed_run(gemma, rep, rec, g, s, 0.5)
        moved = _target_value(gemma, rep, run, g, t) - _target_value(gemma, rep, base, g, t)
        assert moved == pytest.approx(0.5 * float(A[t, s]), rel=1e-3, abs=1e-3 * float(A[t].abs().max()))
    path = save_graph(g.prune(), tmp_path, model=gemma, transcoders=tcs)
    assert load_graph(path).logit_strs[0] == g.logit_strs[0]
    from featurelens.attribution import check_graph

    assert len(check_graph(g, gemma, tcs, k=5).features) == 5
    # tier (a) on Gemma: a 1% nudge of a feature moves the target by the graph's prediction (the 48 admitted
    # features live, the rest of the active ones held as the graph holds them)
    res = check_graph(g, gemma, tcs, k=4, scale=0.99, tiers=("a", "c"))
    quiet = [f for f in res.features if f.crossings == 0]
    assert quiet
    for f in quiet:
        assert f.measured_a == pytest.approx(f.predicted_total, rel=1e-3, abs=1e-5), f.node_id
    for f in res.features:  # the real model's gradient predicts the same nudge in (c)
        assert f.measured == pytest.approx(f.predicted_gradient, rel=5e-2, abs=1e-4), f.node_id


def test_local_replacement_holds_the_features_a_graph_left_out():
    """With max_feature_nodes, tier (a) is the model of the partial graph: a small nudge still matches it."""
    from featurelens.attribution.check import check_graph

    model = tiny_model("gemma3")
    tcs = tiny_transcoders(model, skip=True)
    g = attribute(model, tcs, TOKENS, progress=False, batch_size=64, max_feature_nodes=20)
    res = check_graph(g, model, tcs, k=6, scale=0.99, tiers=("a", "c"))
    quiet = [f for f in res.features if f.crossings == 0]
    assert len(quiet) >= 3
    for f in quiet:
        assert f.measured_a == pytest.approx(f.predicted_total, rel=1e-3, abs=1e-6), f.node_id
