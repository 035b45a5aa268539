"""Feature analysis: streaming statistics, the store, dashboards, labels, the three searches, the CLI, bad input.

The concept-search tests need a real trained dictionary: a small TopK SAE on Gemma 3 270M (builders.TRAINED, the
`trained_sae` and `analyzed` fixtures of tests/conftest.py), trained once per data directory (a few minutes on a
2-core CPU) and then read from there.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

import featurelens as fl
from builders import ANALYSIS_TOKENS, TRAINED
from featurelens.analysis.accumulate import Accumulator, AccumulatorConfig
from featurelens.dictionaries import DictionaryConfig, SparseDictionary

@pytest.fixture(scope="session")
def small_contexts(gemma):
    return fl.load_contexts(gemma, "nlp-corpus", ctx_len=64, split="test", progress=False)[:8]


def _small_analysis(gemma, sae_path, contexts, out, **kw):
    return fl.analyze(gemma, sae_path, contexts, n_tokens=None, batch_size=2, out=out, embed=False,
                      progress=False, **kw)


# ----------------------------------------------------------------------------------------------- accumulator
def _brute_force_check(acc: Accumulator, A: torch.Tensor, K: int, R: int, before: int, after: int) -> None:
    N, T, d = A.shape
    cmax = A.max(1).values  # [N, d]
    for f in range(d):
        want = cmax[:, f].topk(K).values
        assert torch.allclose(acc.top_val[f], want)
        for k in range(K):
            c, p = int(acc.top_ctx[f, k]), int(acc.top_pos[f, k])
            if want[k] <= 0:
                assert c == -1
                continue
            assert A[c, p, f] == acc.top_val[f, k]
            w = torch.zeros(before + after + 1)
            for j, t in enumerate(range(p - before, p + after + 1)):
                if 0 <= t < T:
                    w[j] = A[c, t, f]
            assert torch.equal(w.half(), acc.top_win[f, k])
        fires = int((A[..., f] > 0).sum())
        got = acc.smp_ctx[f] >= 0
        assert int(got.sum()) == min(R, fires)
        for k in got.nonzero().squeeze(1).tolist():
            c, p = int(acc.smp_ctx[f, k]), int(acc.smp_pos[f, k])
            assert A[c, p, f] == acc.smp_val[f, k] > 0
            assert acc.smp_win[f, k, before] == A[c, p, f].half()
        assert len({(int(c), int(p)) for c, p in zip(acc.smp_ctx[f][got], acc.smp_pos[f][got])}) == int(got.sum())
    F = (A > 0).reshape(-1, d)
    assert torch.equal(acc.n_fire, F.sum(0))
    assert torch.equal(acc.cofire, (F.T.float() @ F.float()).int())


def test_accumulator_matches_brute_force():
    torch.manual_seed(0)
    d, B, T, K, R = 40, 3, 12, 4, 6
    acc = Accumulator(AccumulatorConfig(d_sae=d, n_top=K, n_sample=R, before=3, after=2))
    seen = []
    for i in range(5):
        a = torch.relu(torch.randn(B, T, d) - 1.2)
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[:, 0] = False  # BOS
        seen.append(a * valid[..., None])
        acc.update(a.clone(), valid, i * B)
    A = torch.cat(seen)
    _brute_force_check(acc, A, K, R, 3, 2)
    assert int(acc.n_tokens) == 5 * B * (T - 1)
    # the histogram counts every nonzero activation once
    assert torch.equal(acc.hist.sum(1), acc.n_fire)
    # a saved and restored state continues identically
    acc2 = Accumulator(AccumulatorConfig(d_sae=d, n_top=K, n_sample=R, before=3, after=2))
    acc2.load_state_dict(acc.state_dict())
    extra = torch.relu(torch.randn(B, T, d) - 1.2)
    acc.update(extra.clone(), torch.ones(B, T, dtype=torch.bool), 5 * B)
    acc2.update(extra.clone(), torch.ones(B, T, dtype=torch.bool), 5 * B)
    for k, v in acc.state_dict().items():
        assert torch.equal(v, acc2.state_dict()[k]), k


def test_accumulator_cofire_budget_counts_a_subset():
    torch.manual_seed(1)
    d, B, T = 30, 2, 10
    full = Accumulator(AccumulatorConfig(d_sae=d, n_top=3, n_sample=3, before=1, after=1))
    part = Accumulator(AccumulatorConfig(d_sae=d, n_top=3, n_sample=3, before=1, after=1, cofire_pairs=200))
    for i in range(4):
        a = torch.relu(torch.randn(B, T, d))
        v = torch.ones(B, T, dtype=torch.bool)
        full.update(a.clone(), v, i * B)
        part.update(a.clone(), v, i * B)
    assert (part.cofire <= full.cofire).all() and int(part.cofire_tokens) < int(full.cofire_tokens)
    assert part.cofire.trace() > 0  # the diagonal counts the sampled tokens, so P(g | f) stays estimable


def test_quantile_examples_span_the_distribution():
    acc = Accumulator(AccumulatorConfig(d_sae=1, n_top=2, n_sample=40, before=0, after=0))
    acts = torch.linspace(0.1, 4.0, 40).view(1, 40, 1)
    acc.update(acts.clone(), torch.ones(1, 40, dtype=torch.bool), 0)
    picks = acc.quantile_examples(0, n_bins=4, per_bin=2)
    bins = [b for b, _ in picks]
    assert sorted(set(bins)) == [0, 1, 2, 3]
    vals = {b: [float(acc.smp_val[0, k]) for bb, k in picks if bb == b] for b in range(4)}
    assert max(vals[0]) < min(vals[1]) and max(vals[2]) < min(vals[3])


# ----------------------------------------------------------------------------------------------- explainer
def _ev(tokens, promotes=(), idx=0):
    from featurelens.analysis.explain import Example, FeatureEvidence

    exs = [Example(tokens=["In", " the", t, " year"], acts=[0, 0, 3.0, 0], index=2, act=3.0) for t in tokens]
    return FeatureEvidence(index=idx, density=0.01, max_act=3.0, top_examples=exs, promotes=list(promotes))


def test_auto_explainer_labels():
    ex = fl.AutoExplainer()
    assert ex.explain(_ev([" film", " movie", " film", " movie", " film"],
                          promotes=[" critics", " reviews", "xq", " director"])).startswith('"film", "movie"')
    lab = ex.explain(_ev([" film", " film", " film"], promotes=[" critics", " reviews"]))
    assert lab.endswith(" → promotes: critics, reviews")  # what it does, after what it fires on
    # a logit-lens word also seen where the feature fires ("year" is in every example) comes first
    assert ex.explain(_ev([" film"] * 3, promotes=[" critics", " year"])).endswith("promotes: year, critics")
    from featurelens.analysis.explain import promoted_words

    assert promoted_words(lab) == ["critics", "reviews"] and promoted_words('"film", "movie"') == []
    assert ex.explain(_ev(["1", "9", "2", "7", "1"])).startswith("numbers")
    assert "punctuation" in ex.explain(_ev([",", ";", ",", ",", "."]))
    assert ex.explain(_ev([" York", " Boston", " York", " Paris", " Rome"])).startswith('capitalized words ("York"')
    assert ex.explain(_ev([" Paris"] * 9 + [" Rome"])).startswith('"Paris"')  # one word: its class adds nothing
    assert "promotes" not in ex.explain(_ev([" a", " a"], promotes=["ictures", "xam", " ok"]))  # pieces: no
    from featurelens.analysis.explain import FeatureEvidence

    assert ex.explain(FeatureEvidence(index=0, density=0.0, max_act=0.0)) == "dead (never fired)"


def test_bm25_ranks_matching_documents():
    from featurelens.search.lexical import BM25

    docs = ["the film was a great movie review", "United Nations General Assembly resolution", "numbers 1 2 3"]
    s = BM25(docs).scores("film reviews")
    assert s.argmax() == 0 and s[1] == 0


# ----------------------------------------------------------------------------------------------- analysis
def test_analysis_store_and_dashboard(analyzed):
    a = analyzed
    assert a.n_features == TRAINED["width"] and a.hook_name == TRAINED["hook"]
    meta = a.meta
    assert meta["status"] == "complete" and meta["corpus"]["split"] == "test"
    assert meta["stats"]["n_tokens"] > 0.9 * ANALYSIS_TOKENS  # BOS tokens are not counted
    density = a.store.column("density")
    alive = np.flatnonzero(density > 0)
    assert len(alive) > 0.3 * a.n_features
    f = int(alive[np.argsort(-density[alive])[len(alive) // 2]])  # a typical live feature
    d = a.feature(f)
    assert len(d.top_examples) >= 20
    acts = [x.act for x in d.top_examples]
    assert acts == sorted(acts, reverse=True) and acts[0] == pytest.approx(d.max_act)
    for x in d.top_examples:
        assert len(x.tokens) == len(x.acts) and x.acts[x.index] == pytest.approx(x.act, rel=2e-3, abs=1e-2)
        assert max(x.acts) <= d.max_act * 1.002 + 1e-3
        assert "<bos>" not in x.tokens  # windows stay inside the example's own document
    assert d.quantile_examples and {x.bin for x in d.quantile_examples} <= {0, 1, 2, 3}
    assert sum(d.hist_counts) == d.n_fires and 0 < d.density < 1
    assert d.density == pytest.approx(d.n_fires / d.n_tokens)
    assert len(d.logit_up) == len(d.logit_down) == 10
    assert [v for _, _, v in d.logit_up] == sorted((v for _, _, v in d.logit_up), reverse=True)
    assert len(d.similar) == 10 and all(-1 <= c <= 1 for _, c, _ in d.similar) and f not in [i for i, _, _ in d.similar]
    # decoder cosine, recomputed
    sae = fl.load_dictionary(a.meta["dictionary"]["path"])
    W = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    g, cos, _ = d.similar[0]
    assert float(W[f] @ W[g]) == pytest.approx(cos, abs=1e-3)
    assert float((W @ W[f]).topk(2).values[1]) == pytest.approx(cos, abs=1e-3)
    assert d.cofiring and all(0 < j <= 1 and 0 < p <= 1 for _, j, p, _, _ in d.cofiring)
    assert d.label and d.label_provenance == "auto:v3"
    # every label carries its score and method (fl.analyze scores them), shown with the label
    assert d.label_score is not None and 0 <= d.label_score <= 1 and "auroc" in d.label_score_method
    scored = analyzed.store.current_label_scores()
    fired = {i for i, n in analyzed.store.conn.execute("SELECT idx, n_fires FROM features") if n > 0}
    assert set(scored) == set(analyzed.store.current_labels()) & fired  # a dead feature has nothing to score on
    assert "label score" in d.to_html() and d.to_dict()["label_clear"] == (d.label_score >= 0.75)
    # views
    page = d.to_html()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and 'class="fl-tok' in page
    assert re.search(r"background:rgba\(255,110,20,1\.00\)", page)  # the max token is fully shaded
    assert "fl-dash" in d._repr_html_()
    from rich.console import Console

    con = Console(width=140, record=True)
    con.print(d)
    assert f"Feature {f}" in con.export_text()


def test_logit_lens_matches_the_models_own_response(gemma, analyzed):
    """Oracle: add a feature's decoder direction to the final residual stream with the final norm's scale frozen;
    the logits must move by (W_dec[i] * w_final) @ W_U, so the top tokens are the logit lens's."""
    a = analyzed
    sae = fl.load_dictionary(a.meta["dictionary"]["path"])
    f = int(np.nanargmax(a.store.column("n_fires")))
    d = a.feature(f)
    direction = sae.W_dec[f].detach().double()
    last = f"blocks.{gemma.cfg.n_layers - 1}.hook_resid_post"
    tokens = gemma.to_tokens("The Eiffel Tower is in")
    saved = {}
    with torch.inference_mode():
        base = gemma.run_with_hooks(tokens, fwd_hooks=[("ln_final.hook_scale", lambda x, hook: saved.setdefault("s", x))])
        scale = float(saved["s"][0, -1, 0])
        step = (direction / scale).float()  # so that the change in logits is in the lens's own units
        moved = gemma.run_with_hooks(tokens, fwd_hooks=[(last, lambda x, hook: x + step),
                                                        ("ln_final.hook_scale", lambda x, hook: saved["s"])])
    delta = (moved - base)[0, -1].double()
    assert gemma.cfg.final_softcap is None
    for lens, largest in ((d.logit_up, True), (d.logit_down, False)):
        ids = [t for _, t, _ in lens]
        vals = torch.tensor([v for _, _, v in lens], dtype=torch.float64)
        tol = 2e-3 * float(delta.abs().max())
        assert torch.allclose(delta[ids], vals, atol=tol)  # the lens's values are the model's response
        tenth = delta.topk(11, largest=largest).values  # and no other token moves more
        assert set(ids) == set(delta.topk(10, largest=largest).indices.tolist()) or \
            abs(float(tenth[9] - tenth[10])) < tol


def test_interrupted_analysis_resumes_to_the_same_result(gemma, trained_sae, small_contexts, tmp_path):
    assert _small_analysis(gemma, trained_sae, small_contexts, tmp_path / "a", _stop_after_batches=2) is None
    assert (tmp_path / "a" / "building" / "state.safetensors").is_file()
    assert not (tmp_path / "a" / "features.sqlite").exists()  # nothing published until complete
    resumed = _small_analysis(gemma, trained_sae, small_contexts, tmp_path / "a")
    straight = _small_analysis(gemma, trained_sae, small_contexts, tmp_path / "b")
    assert resumed.timings.tokens == 4 * 64 and straight.timings.tokens == 8 * 64  # resumed: only the rest
    assert not (tmp_path / "a" / "building").exists()
    for name in ("n_fires", "max_act", "mean_act", "logit_mean"):
        np.testing.assert_allclose(resumed.store.column(name), straight.store.column(name))
    q1 = "SELECT feature, kind, rank, ctx, pos, act, tokens FROM examples ORDER BY feature, kind, rank"
    assert resumed.store.conn.execute(q1).fetchall() == straight.store.conn.execute(q1).fetchall()
    # a finished analysis is reused, never rewritten
    before = (tmp_path / "a" / "features.sqlite").stat().st_mtime_ns
    again = _small_analysis(gemma, trained_sae, small_contexts, tmp_path / "a")
    assert again.n_features == resumed.n_features
    assert (tmp_path / "a" / "features.sqlite").stat().st_mtime_ns == before
    with sqlite3.connect(tmp_path / "a" / "features.sqlite") as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_shared_forward_analyses_several_layers_with_one_pass_and_the_same_result(gemma, small_contexts, tmp_path):
    """SharedForward (the demo's 18 transcoder layers): one forward pass per batch for all the layers, and each
    layer's analysis exactly what analysing it with the model alone gives."""
    from featurelens.analysis import SharedForward

    torch.manual_seed(3)
    layers = (1, 4)
    hooks = [f"blocks.{layer}.ln2.hook_normalized" for layer in layers]
    tcs = [SparseDictionary(DictionaryConfig(d_in=640, d_sae=48, arch="topk", k=4, transcoder=True, d_out=640,
                                             hook_name=h, hook_name_out=f"blocks.{layer}.hook_mlp_out",
                                             model_name="gemma-3-270m"))
           for layer, h in zip(layers, hooks)]
    for tc in tcs:
        torch.nn.init.normal_(tc.W_enc, std=0.05)
        tc.b_enc.data.fill_(0.0)
    shared = SharedForward(gemma, hooks)
    passes = {"n": 0}
    run = gemma.run_with_cache

    def counted(*a, **kw):
        passes["n"] += 1
        return run(*a, **kw)

    gemma.run_with_cache = counted
    try:
        together = [_small_analysis(shared, tc, small_contexts, tmp_path / f"shared-{i}") for i, tc in enumerate(tcs)]
    finally:
        del gemma.run_with_cache
    assert passes["n"] == 4  # 8 contexts in batches of 2, once for both layers
    assert shared.cfg is gemma.cfg and shared.run_with_cache(small_contexts[:2], "blocks.2.hook_resid_post")[1]
    q = "SELECT feature, kind, rank, ctx, pos, act, tokens FROM examples ORDER BY feature, kind, rank"
    for i in (1,):  # the layer answered from the record alone (the first ran the pass itself)
        tc = tcs[i]
        alone = _small_analysis(gemma, tc, small_contexts, tmp_path / f"alone-{i}")
        assert alone.n_features == together[i].n_features == 48
        for name in ("n_fires", "max_act", "mean_act", "logit_mean"):
            np.testing.assert_allclose(together[i].store.column(name), alone.store.column(name))
        assert together[i].store.conn.execute(q).fetchall() == alone.store.conn.execute(q).fetchall()
        assert together[i].store.column("n_fires").sum() > 0


def test_ctrl_c_saves_the_stream_and_the_rerun_continues(gemma, trained_sae, small_contexts, tmp_path, capsys,
                                                         sigint_default):
    import signal

    sae = fl.load_dictionary(trained_sae)
    calls = {"n": 0}
    encode = sae.encode

    def encode_then_ctrl_c(x):  # a real SIGINT, as Ctrl-C sends, during the third batch
        calls["n"] += 1
        if calls["n"] == 3:
            signal.raise_signal(signal.SIGINT)
        return encode(x)

    sae.encode = encode_then_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        _small_analysis(gemma, sae, small_contexts, tmp_path / "a", checkpoint_every=1e9)
    assert "saved after 384 of 512 tokens" in capsys.readouterr().err  # 3 batches of 2 x 64 tokens
    sae.encode = encode
    resumed = _small_analysis(gemma, sae, small_contexts, tmp_path / "a")
    assert resumed.timings.tokens == 512 - 384  # only the rest was streamed
    straight = _small_analysis(gemma, trained_sae, small_contexts, tmp_path / "b")
    for name in ("n_fires", "max_act", "mean_act"):
        np.testing.assert_allclose(resumed.store.column(name), straight.store.column(name))


def test_labels_are_editable_and_pluggable(gemma, trained_sae, small_contexts, tmp_path):
    a = _small_analysis(gemma, trained_sae, small_contexts, tmp_path)
    f = int(np.nanargmax(a.store.column("n_fires")))
    auto = a.label(f)
    assert a.store.labels(f)[0]["provenance"] == "auto:v3"

    class Shouting(fl.Explainer):
        provenance = "test:shout"

        def explain(self, ev):
            return f"SHOUT {ev.top_examples[0].token!r}" if ev.top_examples else None

    assert fl.explain(a, Shouting(), features=[f], progress=False) == 1
    assert a.label(f) == f"SHOUT {a.feature(f).top_examples[0].token!r}"
    assert a.feature(f).label_score is not None  # a plugged-in explainer's labels are scored too
    a.set_label(f, "  my own label ")
    assert a.label(f) == "my own label" and a.feature(f).label_provenance == "user"
    assert a.store.label_scores(f)["user"]["score"] == a.feature(f).label_score  # so is a person's
    assert {r["provenance"] for r in a.store.labels(f)} == {"auto:v3", "test:shout", "user"}
    a.set_label(f, None)
    assert a.label(f) != "my own label" and auto
    with pytest.raises(ValueError):
        a.set_label(f, "   ")
    # user labels survive a rebuild
    a.set_label(f, "kept")
    a.close()
    b = _small_analysis(gemma, trained_sae, small_contexts, tmp_path, overwrite=True)
    assert b.label(f) == "kept"


# ----------------------------------------------------------------------------------------------- searches
# What a feature is about shows at its maximally activating tokens: a hit is relevant when, in most of its strongest
# examples, the max token itself (or, for a multi-word concept, the token with its immediate neighbours) is about
# the query. A regex anywhere in a 33-token window would pass for almost any feature.
NUMBER_TOKEN = r"^\s*(\d[\d.,:/%-]*|[.,]\d+|one|two|three|four|five|six|seven|eight|nine|ten|hundred|thousand|million|" \
               r"billion|first|second|third|percent|number|numbers)\s*$"  # the concept's own word, as for the others
FILM = r"(?i)\b(film|films|movie|movies|cinema|actor|actress|actors|acting|director|screenplay|hollywood|scene|scenes|" \
       r"plot|cast|character|characters|performance)\b"
LAW = r"(?i)^\s*(law|laws|legal|court|courts|judge|lawyer|attorney|justice|trial|rights)\s*$"
DAYS = r"(?i)^\s*(monday|tuesday|wednesday|thursday|friday|saturday|sunday|weekend|week|day|days|today|tomorrow|" \
       r"yesterday)\s*$"
CONCEPTS = {  # query -> (what the max token must match, how many neighbours on each side it may borrow)
    "numbers": (NUMBER_TOKEN, 0),
    "film review": (FILM, 2),
    "law and courts": (LAW, 0),
    "days of the week": (DAYS, 0),
}


def _on_topic(example, pattern: str, reach: int) -> bool:
    i = example.index
    if reach == 0:
        return bool(re.search(pattern, example.tokens[i], re.IGNORECASE))
    return bool(re.search(pattern, "".join(example.tokens[max(0, i - reach): i + reach + 1])))


def _relevant(analysis, feature: int, pattern: str, reach: int, n: int = 5) -> bool:
    """Most of the feature's n strongest examples are about the concept at their max token."""
    top = analysis.feature(feature).top_examples[:n]
    return len(top) >= 3 and sum(_on_topic(e, pattern, reach) for e in top) > len(top) / 2


@pytest.mark.parametrize("query", list(CONCEPTS))
def test_concept_search_finds_features_about_the_concept(analyzed, query):
    """The oracle is the dictionary itself: every feature whose strongest examples' max tokens match the concept's
    lexicon. The best hit must be one of them, and the top five must hold at least half of those that could fit
    there (a small dictionary has only a few features per concept; the rest of its top five cannot be relevant)."""
    from featurelens.search import embedder_available

    pattern, reach = CONCEPTS[query]
    hits = analyzed.search(query, k=5)
    assert len(hits) == 5 and all(h.method == ("embedding" if embedder_available() else "lexical") for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    oracle = {f for f in range(analyzed.n_features) if _relevant(analyzed, f, pattern, reach)}
    assert oracle, f"the fixture dictionary has no {query!r} feature: the test would measure nothing"
    relevant = [h.feature in oracle for h in hits]
    shown = [(h.feature, h.label, [e.token for e in analyzed.feature(h.feature).top_examples[:5]]) for h in hits]
    assert relevant[0], shown  # the best hit is about the concept
    assert sum(relevant) >= min(len(oracle), 5) / 2, (shown, sorted(oracle))


def test_concept_search_lexical_fallback(analyzed, monkeypatch):
    monkeypatch.setenv("FEATURELENS_NO_EMBEDDINGS", "1")
    from featurelens.search import embed

    monkeypatch.setattr(embed, "_CACHE", {})
    hits = analyzed.search("numbers", k=5)
    assert hits and all(h.method == "lexical" for h in hits)
    relevant = [_relevant(analyzed, h.feature, *CONCEPTS["numbers"]) for h in hits]
    oracle = [f for f in range(analyzed.n_features) if _relevant(analyzed, f, *CONCEPTS["numbers"])]
    # BM25 over labels is the fallback, weaker than the embedding search: the best hit must be on-topic and the
    # top five must hold at least 2 on-topic features, many times the chance share 5 * |oracle| / width
    assert relevant[0] and sum(relevant) >= min(2, len(oracle)), [(h.feature, h.label) for h in hits]
    assert sum(relevant) > 4 * 5 * len(oracle) / analyzed.n_features


def test_steering_checked_search(gemma, analyzed):
    """fl.steerable_search steers the best matches in match order, gentlest strength first, until one raises the
    concept's words STEERS-fold: that one leads, the others keep their match order; the ratios it reports are the
    ones a user measures by steering the feature with fl.steer at the strength it reports."""
    from featurelens.interventions import checked_search as steerable
    from featurelens.search import PROBE_PROMPTS, next_token_probs, single_token_ids

    analyzed._model = gemma
    plain = analyzed.search("numbers", k=6)
    hits = fl.steerable_search(analyzed, "numbers", k=6, pool=6)
    assert len(hits) == 6 and {h.feature for h in hits} == {h.feature for h in plain}
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    matched = {h.feature: h.score for h in plain}
    best = max(matched.values())
    words = hits[0].steer_words
    assert words and all(h.steer_words == words for h in hits)
    ids = single_token_ids(gemma, words)
    assert ids and all(len(gemma.encode(gemma.tokenizer.decode([i]), prepend_bos=False)) == 1 for i in ids)
    leaders = [h for h in hits if h.score > 1]
    assert len(leaders) <= 1 and all(h.steer_ratio >= steerable.STEERS for h in leaders)
    rest = [h.feature for h in hits if h.score <= 1]
    assert rest == [h.feature for h in plain if h.feature in rest]  # the others in match order
    # steered in match order, among the close matches, until one steered: everything before the leader was
    # steered and did not steer; nothing after it was
    close = [h.feature for h in plain if h.score / best >= steerable.CLOSE_MATCH]
    by_feature = {h.feature: h for h in hits}
    stop = close.index(leaders[0].feature) if leaders else len(close) - 1
    assert all(by_feature[f].steer_ratio is not None for f in close[:stop + 1])
    assert all(by_feature[f].steer_ratio < steerable.STEERS for f in close[:stop])
    if leaders and leaders[0].steer_strength == steerable.STRENGTHS[0]:
        assert all(by_feature[f].steer_ratio is None for f in close[stop + 1:])
    clean = next_token_probs(gemma, PROBE_PROMPTS, per_prompt=True)[:, ids].sum(1)  # [prompts]
    for h in hits:
        assert h.match_score == pytest.approx(matched[h.feature])
        assert h.score == pytest.approx(steerable.checked_score(h.match_score / best, h in leaders))
        if h.steer_ratio is None:
            assert h.steer_strength is None and h.feature not in close[:stop + 1]
            continue
        assert h.steer_strength in steerable.STRENGTHS
        # measured again through the user-facing context manager, on the same prompts
        top = float(analyzed.store.column("max_act")[h.feature])  # relative strength 1 = the dashboard's max
        with fl.steer(gemma, [fl.Steer(analyzed.dictionary, h.feature, h.steer_strength, max_activation=top)]):
            steered = next_token_probs(gemma, PROBE_PROMPTS, per_prompt=True)[:, ids].sum(1)
        assert h.steer_ratio == pytest.approx(statistics.median((steered / clean).tolist()), rel=1e-3)  # median prompt
        if h.steer_strength != steerable.STRENGTHS[0]:  # stronger only where the first strength did not steer
            first = steerable.steering_ratios(gemma, [(analyzed.dictionary, h.feature, top)], ids,
                                              strength=steerable.STRENGTHS[0])
            assert first[0] < steerable.STEERS
    # steering at strength 0 changes nothing
    zero = steerable.steering_ratios(gemma, [(analyzed.dictionary, hits[0].feature, 1.0)], ids, strength=0.0)
    assert zero == [pytest.approx(1.0, rel=1e-5)]
    from featurelens.errors import InputError

    with pytest.raises(InputError, match="pool"):
        fl.steerable_search(analyzed, "numbers", pool=0)
    with pytest.raises(InputError, match="strengths"):
        fl.steerable_search(analyzed, "numbers", strengths=[])


def test_the_leader_is_the_first_match_that_steers_at_the_gentlest_strength():
    from featurelens.interventions.checked_search import pick_leader

    ratios = {(0, 1.0): 2.0, (1, 1.0): 3.0, (2, 1.0): 4.5, (0, 1.5): 9.0, (1, 1.5): 5.0, (2, 1.5): 6.0}
    calls = []

    def ratio(i, strength):
        calls.append((i, strength))
        return ratios[i, strength]

    # match 0 steers far more at 1.5, but match 2 already steers at 1: gentler wins, and the check stops there
    assert pick_leader([0, 1, 2], ratio, strengths=(1.0, 1.5), steers=4.0) == (2, {0: (2.0, 1.0), 1: (3.0, 1.0),
                                                                                  2: (4.5, 1.0)})
    assert calls == [(0, 1.0), (1, 1.0), (2, 1.0)]
    # without match 2, the next strength is tried in match order
    assert pick_leader([1, 0], ratio, strengths=(1.0, 1.5), steers=4.0) == (1, {1: (5.0, 1.5), 0: (2.0, 1.0)})
    # none steers: no leader, each keeps its best ratio and where it was measured
    assert pick_leader([0, 1], ratio, strengths=(1.0, 1.5), steers=10.0) == (None, {0: (9.0, 1.5), 1: (5.0, 1.5)})
    assert pick_leader([], ratio) == (None, {})


def test_concept_words_come_from_the_hits_and_fit_the_query():
    from featurelens.search import SearchHit, concept_words, get_embedder

    emb = get_embedder()
    if emb is None:
        pytest.skip("needs the embedding model")
    hits = [SearchHit(1, 0.5, '"dog"', max_tokens=[" dog", " dogs", " the"], near_max=["walked the puppy home"]),
            SearchHit(2, 0.4, "invoice", max_tokens=[" cat", ","])]
    words = concept_words("pets and animals", hits, emb)
    assert {"dog", "dogs", "cat", "puppy"} & set(words) and not {"the", "walked", "invoice"} & set(words)
    assert words[:2] == ["pets", "animals"]  # the query's own words lead, whatever the hits hold
    # where the hits hold nothing, the query's words and their other forms close to it ("pet") remain
    assert concept_words("pets", [SearchHit(3, 0.1, None)], emb) == ["pets", "pet"]
    assert concept_words("the", [SearchHit(3, 0.1, None)], emb) == []


def test_search_by_text_and_by_promoted_token(gemma, analyzed):
    analyzed._model = gemma
    r = analyzed.search_text("The Eiffel Tower is in Paris", k=8)
    assert r.tokens[0] == "<bos>" and len(r.per_token) == len(r.tokens) and r.per_token[0] == []
    assert len(r.overall) == 8 and all(h.max_act > 0 for h in r.overall)
    assert [h.relative for h in r.overall] == sorted((h.relative for h in r.overall), reverse=True)
    h = r.overall[0]
    assert h.acts[h.token_index] == pytest.approx(h.max_act)
    assert any(h.feature == f for f, *_ in r.per_token[h.token_index])
    hits = analyzed.search_promotes(" Paris", k=5)
    assert len(hits) == 5 and [h.logit for h in hits] == sorted((h.logit for h in hits), reverse=True)
    # recomputed directly: (W_dec * w_final) @ W_U[:, " Paris"], best among the features that fire
    sae = analyzed.dictionary
    paris = gemma.to_single_token(" Paris")
    vals = (sae.W_dec.detach() * gemma.net.ln_final.w.detach()) @ gemma.W_U[:, paris].detach()
    vals[torch.from_numpy(analyzed.store.column("n_fires") == 0)] = -float("inf")
    assert int(vals.argmax()) == hits[0].feature and float(vals.max()) == pytest.approx(hits[0].logit, rel=1e-4)
    assert hits[0].zscore > 0


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors(gemma, analyzed, tmp_path):
    a = analyzed
    a._model = gemma
    with pytest.raises(fl.FeatureIndexError, match=r"out of range.*2,048 features \(0 to 2,047\)"):
        a.feature(TRAINED["width"])
    with pytest.raises(fl.FeatureIndexError, match="out of range"):
        a.feature(-1)
    with pytest.raises(fl.FeatureIndexError, match="integer"):
        a.feature("abc")
    for call in (lambda: a.search(""), lambda: a.search("   "), lambda: a.search_text(""),
                 lambda: a.search_promotes("")):
        with pytest.raises(fl.EmptyQueryError, match="empty"):
            call()
    with pytest.raises(ValueError, match="tokens"):
        a.search_promotes(" Eiffel Tower")  # several tokens
    other = SparseDictionary(DictionaryConfig(d_in=576, d_sae=64, arch="relu", hook_name="blocks.2.hook_resid_post",
                                              model_name="smollm2-135m"))
    with pytest.raises(fl.DictionaryModelMismatchError, match=r"trained on 'smollm2-135m'.*'gemma-3-270m'"):
        fl.analyze(gemma, other, n_tokens=64, out=tmp_path / "x", progress=False)
    unnamed = SparseDictionary(DictionaryConfig(d_in=576, d_sae=64, arch="relu", hook_name="blocks.2.hook_resid_post"))
    with pytest.raises(fl.DictionaryModelMismatchError, match="576-dimensional"):
        fl.analyze(gemma, unnamed, n_tokens=64, out=tmp_path / "x", progress=False)
    with pytest.raises(fl.NotAnalyzedError, match="featurelens analyze"):
        fl.open_analysis(tmp_path)


# ----------------------------------------------------------------------------------------------- CLI
def test_cli(analyzed, tmp_path, capsys):
    from featurelens.cli import main

    path = str(analyzed.dir)
    f = int(np.nanargmax(analyzed.store.column("n_fires")))
    out = tmp_path / "f.html"
    assert main(["feature", path, str(f), "--html", str(out)]) == 0
    assert out.read_text().count('class="fl-tok') > 20
    assert main(["feature", path, str(f)]) == 0
    assert f"Feature {f}" in capsys.readouterr().out
    assert main(["search", path, "numbers", "-n", "3", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "numbers" in out and "checked by steering" not in out
    # the analysis names its model, so the steering check runs by default
    assert main(["search", path, "numbers", "-n", "2", "--pool", "3", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert len(got) == 2 and all(h["steer_ratio"] > 0 and h["steer_words"] and h["steer_strength"] for h in got)
    assert main(["search", path, "numbers", "--pool", "0"]) == 2
    assert "--pool" in capsys.readouterr().err
    assert main(["feature", path, "999999"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["search", path, ""]) == 2
    assert "empty search query" in capsys.readouterr().err
    assert main(["search", path]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert main(["search", str(tmp_path), "numbers"]) == 2
    assert "has not been analyzed" in capsys.readouterr().err


def test_timings_summary_gives_the_dictionary_share_only_of_a_forward_it_ran():
    from featurelens.analysis.timings import AnalysisTimings

    own = AnalysisTimings(model_forward=60.0, encoding=6.0, bookkeeping=12.0, tokens=150_000).summary()
    assert "dictionary work 30% of the forward" in own
    # a transcoder layer answered from a `SharedForward` record: its forward took no time of its own
    shared = AnalysisTimings(model_forward=0.001, encoding=0.2, bookkeeping=0.4, tokens=10_112).summary()
    assert "model forward 0.0s" in shared and "of the forward" not in shared
