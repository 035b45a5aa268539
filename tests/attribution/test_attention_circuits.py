"""Attention circuits are exact: the head split of an edge and the node-pair decomposition of an attention score.

Checked against independent computations on a tiny random model of every family (converted from `transformers`
as in tests/builders.py: GQA, MQA, qk-norm, post-attention norms, sliding windows, soft-capped scores, biases,
learned positions) and on its tiny featurelens models with skip, plain, cross-layer and partial transcoders:

* each layer's bypass equals the edge recomputed with that layer's attention output cut from the frozen model
  (its value held, no gradient through it), and each head's part equals the edge with only that head's values
  left live, minus the bypass;
* the sum of every pair's term equals the score recorded in the real model (before the soft-cap), and the query
  parts sum to the recorded (normed, rotated) query.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from featurelens.attribution import attribute
from featurelens.attribution.heads import AttentionCircuits, head_path_check
from featurelens.attribution.qk import BIAS, attention_story, qk_decomposition, strongest_cross_position_edges
from featurelens.attribution.replacement import demeaned_unembedding, frozen_forward
from featurelens.dictionaries.sae import DictionaryConfig, SparseDictionary, TranscoderSet
from featurelens.errors import InputError
from builders import TOKENS, tiny_clt, tiny_model, tiny_transcoders

OV_TOL = 1e-5
QK_TOL = 1e-4
FAMILY_NAMES = ["gemma", "gemma2", "gemma3_text", "llama", "qwen2", "qwen2_sliding", "qwen3", "gpt2"]


def _transcoders(model, skip: bool = True, seed: int = 3, width: int = 96, k: int = 6, noise: float = 0.1,
                 dtype: str = "float64") -> TranscoderSet:
    """Random transcoders on every layer (biases and skips drawn too, `noise` their scale)."""
    torch.manual_seed(seed)
    out = {}
    for layer in range(model.cfg.n_layers):
        cfg = DictionaryConfig(d_in=model.cfg.d_model, d_sae=width, arch="topk", k=k, transcoder=True, skip=skip,
                               dtype=dtype, hook_name=f"blocks.{layer}.ln2.hook_normalized",
                               hook_name_out=f"blocks.{layer}.hook_mlp_out", model_name=model.name)
        tc = SparseDictionary(cfg)
        with torch.no_grad():
            tc.b_enc.normal_(0, noise)
            tc.b_dec.normal_(0, noise)
            if skip:
                tc.W_skip.normal_(0, noise / 2)
        out[layer] = tc
    return TranscoderSet(out)


def _family(name: str):
    pytest.importorskip("transformers")
    from builders import _build

    _, _, model = _build(name)
    model = model.to(torch.float64)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(3, model.cfg.d_vocab, (12,), generator=g)  # longer than the sliding windows (7)
    tcs = _transcoders(model, skip=name != "gpt2")
    return model, tcs, tokens


@pytest.fixture(scope="module", params=FAMILY_NAMES + ["tiny-gemma3-clt", "tiny-llama-partial", "tiny-llama-plain"])
def case(request):
    torch.set_num_threads(1)
    name = request.param
    if name.startswith("tiny-"):
        _, kind, tkind = name.split("-")
        model = tiny_model(kind)
        tcs = {"clt": lambda: tiny_clt(model), "partial": lambda: tiny_transcoders(model, skip=True, layers=[0, 2]),
               "plain": lambda: tiny_transcoders(model)}[tkind]()
        tokens = TOKENS
    else:
        model, tcs, tokens = _family(name)
    graph = attribute(model, tcs, tokens, progress=False, batch_size=64)
    return name, model, tcs, graph, AttentionCircuits(graph, model, tcs)


# --------------------------------------------------------------------------------------------- the OV split


def _cut_edge(model, tcs, circuits, s: int, t: int, layer: int, keep: list[int] | None) -> float:
    """The edge s -> t in the frozen model with layer `layer`'s attention cut: its output held at its value with no
    gradient through it (keep None), or only the heads in `keep` left live."""
    g, rec, rep = circuits.graph, circuits.rec, tcs

    def cut_out(x, hook):
        return x.detach()

    def cut_heads(z, hook):
        live = torch.zeros(z.shape[-2], dtype=torch.bool)
        live[keep] = True
        return torch.where(live[:, None], z, z.detach())

    hook = (f"blocks.{layer}.hook_attn_out", cut_out) if keep is None else (f"blocks.{layer}.attn.hook_z", cut_heads)
    with model.hooks([hook]):
        run = frozen_forward(model, rep, rec, grad=True, logits=False)
    if g.node_kind(t) == "logit":
        tok = g.logit_tokens[t - g.logit_slice.start]
        value = run.final[0, -1] @ demeaned_unembedding(model, tok[None])[0]
    else:
        tl, tp, ti = g.features[t].tolist()
        value = run.inputs[tl][0, tp] @ rep.encoder(tl)[:, ti]
    kind, pos = g.node_kind(s), g.node_pos(s)
    if kind == "embedding":
        points = [(run.resid0, rec.resid0[pos])]
    elif kind == "error":
        points = [(run.outputs[g.node_layer(s)], rec.errors[g.node_layer(s)][pos])]
    else:
        sl, _, si = g.features[s].tolist()
        a = rec.acts[sl][pos, si]
        points = [(run.outputs[o], a * rep.decoder(sl)[si, j]) for j, o in enumerate(rep.output_layers(sl))]
    grads = torch.autograd.grad(value, [p for p, _ in points], allow_unused=True)
    return sum(float(gr[0, pos] @ w) for gr, (_, w) in zip(grads, points) if gr is not None)


def test_head_split_is_exact(case):
    name, model, tcs, g, circuits = case
    A = g.dense()
    edges = strongest_cross_position_edges(g, 3)
    assert edges
    kinds = set()
    for s, t in edges:
        split = circuits.edge_heads(g.node_id(s), g.node_id(t))
        kinds.add(g.node_kind(s))
        assert split.edge == pytest.approx(float(A[t, s]), rel=1e-5, abs=1e-6)
        assert split.layers, (name, g.node_id(s), g.node_id(t))
        tol = OV_TOL * max(abs(split.edge), max(abs(h.contribution) for ls in split.layers for h in ls.heads))
        for ls in split.layers:
            assert len(ls.heads) == model.cfg.n_heads
            assert [abs(h.contribution) for h in ls.heads] == sorted((abs(h.contribution) for h in ls.heads),
                                                                      reverse=True)
            assert abs(ls.bypass + ls.through - split.edge) <= tol
            bypass = _cut_edge(model, tcs, circuits, s, t, ls.layer, None)
            assert abs(ls.bypass - bypass) <= tol, (name, ls.layer, ls.bypass, bypass)
            for h in ls.heads[:1] + ls.heads[-1:]:
                only = _cut_edge(model, tcs, circuits, s, t, ls.layer, [h.head])
                assert abs(h.contribution - (only - bypass)) <= tol, (name, ls.layer, h.head)
        # some head carries a real part of a cross-position edge
        assert max(abs(h.contribution) for ls in split.layers for h in ls.heads) > 1e-3 * abs(split.edge)
    assert kinds & {"feature", "embedding", "error"}


def test_head_split_pattern_and_summary(case):
    name, model, _, g, circuits = case
    s, t = strongest_cross_position_edges(g, 1)[0]
    split = g.edge_heads(g.node_id(s), g.node_id(t), model=model, transcoders=circuits.transcoders)
    ls = split.layers[-1]
    pat = circuits.rec.frozen[f"blocks.{ls.layer}.attn.hook_pattern"][0]
    for h in ls.heads:
        assert h.pattern == pytest.approx(float(pat[h.head, g.node_pos(t), g.node_pos(s)]))
    text = split.summary()
    assert text.startswith("edge ") and "head " in text
    assert split.to_dict()["layers"][0]["heads"][0]["head"] == split.layers[0].heads[0].head


def test_head_split_bad_nodes(case):
    _, _, _, g, circuits = case
    logit = g.node_id(g.logit_slice.start)
    token = g.node_id(g.token_slice.start + 1)
    with pytest.raises(InputError, match="logit"):
        circuits.edge_heads(logit, token)
    with pytest.raises(InputError, match="no incoming edges"):
        circuits.edge_heads(token, g.node_id(g.token_slice.start + 2))
    with pytest.raises(InputError, match="no node"):
        circuits.edge_heads("99_99_99", logit)


def test_path_patching_one_head_removes_its_part(case):
    """Patching a head's values with those of a run without the source moves the target by minus the head's part:
    exactly in the frozen model (a forward difference, not a gradient), approximately in the real one."""
    name, model, _, g, circuits = case
    s, t = strongest_cross_position_edges(g, 1)[0]
    split = circuits.edge_heads(s, t)
    for layer, share in split.top(2):
        check = head_path_check(circuits, s, t, layer, share.head)
        assert check.predicted == share.contribution
        assert check.frozen == pytest.approx(share.contribution, rel=1e-3, abs=1e-4 * abs(split.edge))
        assert math.isfinite(check.live) and "real-model" in check.summary()
    with pytest.raises(InputError, match="not between"):
        head_path_check(circuits, s, t, model.cfg.n_layers + 5, 0)


def test_attention_story(case):
    name, model, _, g, circuits = case
    seen = []
    story = attention_story(circuits, n_edges=2, heads=3, progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (len(story["edges"]), len(story["edges"])) and story["version"] == 1
    for e in story["edges"]:
        assert len(e["top_heads"]) == 3
        top = e["top_heads"][0]
        assert abs(top["contribution"]) == max(abs(h["contribution"]) for ls in e["layers"] for h in ls["heads"])
        if "qk" in e:
            assert e["qk"]["layer"] == top["layer"] and e["qk"]["head"] == top["head"]
            assert e["qk"]["total"] == pytest.approx(e["qk"]["score"], rel=QK_TOL, abs=1e-6)
    json.dumps(story)


# --------------------------------------------------------------------------------------------- the QK decomposition


def _queries(model, P: int) -> list[tuple[int, int, int, int]]:
    cfg = model.cfg
    last = cfg.n_layers - 1
    return [(last, cfg.n_heads - 1, P - 1, P - 4), (last, 0, P - 1, P - 1), (1, 1, P - 2, P - 6), (0, 2, 5, 3)]


def test_qk_sum_is_the_recorded_score(case):
    name, model, _, g, circuits = case
    cfg = model.cfg
    for layer, head, q, k in _queries(model, g.n_pos):
        r = qk_decomposition(circuits, layer, head, q, k)
        kv = head // (cfg.n_heads // cfg.n_kv_heads)
        names = [f"blocks.{layer}.attn.{s}" for s in ("hook_rot_q", "hook_rot_k", "hook_attn_scores")]
        _, cache = model.run_with_cache(torch.tensor(g.tokens)[None], names_filter=names)
        rq, rk = cache[names[0]][0, q, head].double(), cache[names[1]][0, k, kv].double()
        score = float(rq @ rk) * cfg.q_scale
        size = float(rq.norm() * rk.norm()) * cfg.q_scale
        assert abs(r.total - score) <= QK_TOL * max(abs(score), size), (name, layer, head, q, k, r.total, score)
        assert abs(r.score - score) <= QK_TOL * max(abs(score), size)  # recorded in another pass
        # each side sums to the recorded vector, and a pair's term is its product
        assert torch.allclose(r.query_vectors.double().sum(0), rq, rtol=0, atol=1e-5 * float(rq.abs().max()))
        assert torch.allclose(r.key_vectors.double().sum(0), rk, rtol=0, atol=1e-5 * float(rk.abs().max()))
        assert float(cache[names[2]][0, head, q, k]) == pytest.approx(r.capped, rel=1e-4, abs=1e-5)
        top = r.top_pairs[0]
        assert r.pair(top.query, top.key) == pytest.approx(top.value, rel=1e-5)
        assert abs(top.value) == max(abs(t.value) for t in r.top_pairs)
        assert sum(t.value for t in r.top_query) == pytest.approx(sum(t.value for t in r.top_query))
        # query-side nodes sit at positions <= q, key-side ones at <= k
        for t in r.top_pairs:
            if t.key != BIAS:
                assert g.node_pos(g.index_of(t.key)) <= k
            if t.query != BIAS:
                assert g.node_pos(g.index_of(t.query)) <= q
    if name == "gemma2":
        assert r.softcap is not None and "soft-cap" in r.summary()
    if name in ("gpt2", "qwen2"):  # biases on the projections: the constant node carries something
        assert float(r.query_vectors[-1].abs().max()) > 0


def test_qk_bad_positions(case):
    _, model, _, g, circuits = case
    with pytest.raises(InputError, match="comes after"):
        qk_decomposition(circuits, 0, 0, 2, 3)
    with pytest.raises(InputError, match="layer"):
        qk_decomposition(circuits, model.cfg.n_layers, 0, 3, 2)
    with pytest.raises(InputError, match="head"):
        qk_decomposition(circuits, 0, model.cfg.n_heads, 3, 2)
    sliding = [l for l, t in enumerate(model.cfg.layer_types) if t == "sliding"]
    if sliding and g.n_pos > model.cfg.sliding_window:
        with pytest.raises(InputError, match="window"):
            qk_decomposition(circuits, sliding[0], 0, g.n_pos - 1, 0)


def test_qk_through_the_graph(case):
    name, model, tcs, g, circuits = case
    pruned = g.prune(0.5, 0.9)
    r = pruned.qk(model.cfg.n_layers - 1, 0, pruned.n_pos - 1, pruned.n_pos - 3, model=model, transcoders=tcs)
    assert r.total == pytest.approx(r.score, rel=QK_TOL, abs=1e-6)
    assert len(r.node_ids) == pruned.logit_slice.start + 1 and r.node_ids[-1] == BIAS
    assert "top pairs" in r.summary()
    assert pruned.qk(model.cfg.n_layers - 1, 0, pruned.n_pos - 1, pruned.n_pos - 3) is not None  # circuits kept


# --------------------------------------------------------------------------------------------- the command line


def test_cli_graph_qk_and_heads(cli_setup, capsys):
    from featurelens.attribution import load_graph
    from featurelens.cli import main

    model, tc_dir, tmp = cli_setup
    out = tmp / "graphs"
    assert main(["graph", "-m", "tiny", str(tc_dir), "hello world", "--out", str(out), "--no-cards",
                 "--batch-size", "16"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    path = str(out / "hello-world.json")
    assert main(["graph-qk", path, "--layer", "2", "--head", "1", "--query", "-1", "--key", "-2", "-n", "3"]) == 0, \
        capsys.readouterr().err
    text = capsys.readouterr().out
    assert "head 2.1 attends from" in text and "top pairs" in text and text.count("  x  key: ") == 3
    assert main(["graph-qk", path, "--layer", "2", "--head", "1", "--query", "-1", "--key", "-2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["total"] == pytest.approx(data["score"], rel=QK_TOL)
    g = load_graph(path)
    s, t = strongest_cross_position_edges(g, 1)[0]
    assert main(["graph-heads", path, g.node_id(s), g.node_id(t), "--json"]) == 0, capsys.readouterr().err
    split = json.loads(capsys.readouterr().out)
    assert split["source"] == g.node_id(s) and split["layers"]
    assert main(["graph-heads", path, g.node_id(s), g.node_id(t), "--check", "2"]) == 0
    text = capsys.readouterr().out
    assert "bypass" in text and text.count("real-model patch") == 2
    assert main(["graph-attention", path, "--edges", "3"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert text.count(" carries ") == 3 and "hello-world.attention.json" in text
    story = json.loads((out / "hello-world.attention.json").read_text())
    assert len(story["edges"]) == 3 and story["edges"][0]["top_heads"]
    assert json.loads((out / "graph-metadata.json").read_text())["graphs"][0]["slug"] == "hello-world"
    assert main(["graph-qk", path, "--layer", "0", "--head", "0", "--query", "1", "--key", "3"]) == 2
    assert "comes after" in capsys.readouterr().err
    assert main(["graph-heads", path, "nope", g.node_id(t)]) == 2
    assert "no node" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- the embedded model


def test_exact_on_the_embedded_model(gemma):
    """The same checks on Gemma 3 270M (float32: 4 query heads on 1 key/value head, qk-norm, post-attention norms,
    sliding and global layers), with random skip transcoders on every layer."""
    tcs = _transcoders(gemma, seed=0, width=256, k=8, noise=0.02, dtype="float32")
    g = attribute(gemma, tcs, "The capital of France is", max_feature_nodes=48, batch_size=32, progress=False)
    circuits = AttentionCircuits(g, gemma, tcs)
    A = g.dense()
    for s, t in strongest_cross_position_edges(g, 3):
        split = circuits.edge_heads(s, t)
        assert split.edge == pytest.approx(float(A[t, s]), rel=1e-4)
        tol = 1e-5 * max(abs(split.edge), max(abs(h.contribution) for ls in split.layers for h in ls.heads))
        for ls in split.layers[:: max(1, len(split.layers) // 4)]:  # a few layers: each cut is a frozen pass
            assert abs(ls.bypass + ls.through - split.edge) <= tol
            bypass = _cut_edge(gemma, tcs, circuits, s, t, ls.layer, None)
            assert abs(ls.bypass - bypass) <= tol, (ls.layer, ls.bypass, bypass)
            top = ls.heads[0]
            only = _cut_edge(gemma, tcs, circuits, s, t, ls.layer, [top.head])
            assert abs(top.contribution - (only - bypass)) <= tol, (ls.layer, top.head)
    P = g.n_pos
    for layer, head, q, k in [(17, 3, P - 1, 1), (5, 2, P - 1, P - 3), (11, 0, P - 2, P - 2)]:
        r = qk_decomposition(circuits, layer, head, q, k)
        size = float(r.query_vectors.double().sum(0).norm() * r.key_vectors.double().sum(0).norm()) * r.scale
        assert abs(r.total - r.score) <= QK_TOL * max(abs(r.score), size), (layer, head, q, k, r.total, r.score)
        assert r.top_pairs and r.top_query and r.top_key
