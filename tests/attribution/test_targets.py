"""Attribution targets: chosen tokens and logit differences, through the API, the files and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from featurelens.attribution import attribute, check_graph, load_graph, save_graph
from featurelens.attribution.replacement import frozen_forward, record
from featurelens.attribution.targets import Target, parse_target
from featurelens.errors import InputError

from builders import TOKENS, tiny_model, tiny_transcoders


class _WordTokenizer:
    """Whole words as tokens (' Paris' is one token, ' Parisian' two), enough to spell targets as text."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        known = {" Paris": [10], " London": [11], " Rome": [12], "4": [13], " Parisian": [10, 14]}
        return known.get(text, [2 + ord(c) % 48 for c in text])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        names = {10: " Paris", 11: " London", 12: " Rome", 13: "4", 14: "ian"}
        return "".join(names.get(i, f"<{i}>") for i in ids)


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("gemma3")
    model.tokenizer = _WordTokenizer()
    return model, tiny_transcoders(model, skip=True)


def test_parse_targets(setup):
    model, _ = setup
    assert parse_target(model, " Paris") == Target((10,), (" Paris",))
    assert parse_target(model, '" Paris"') == Target((10,), (" Paris",))
    assert parse_target(model, '" Paris", " Rome"').tokens == (10, 12)
    assert parse_target(model, [" Paris", 13]).tokens == (10, 13)
    d = parse_target(model, '" Paris" - " London"')
    assert d.is_difference and d.tokens == (10,) and d.minus == 11 and d.label() == '" Paris" - " London"'
    assert parse_target(model, (" Paris", " London")) == d
    assert Target.from_info(json.loads(json.dumps(d.info()))) == d


@pytest.mark.parametrize("bad, message", [("", "empty target"), ('""', "empty target"), (" Parisian", "2 tokens"),
                                          (999, "outside the vocabulary"), ([" Paris", " Paris"], "twice"),
                                          ('" Paris" - " Paris"', "two different"), ([], "a target is"),
                                          (1.5, "text or a token id")])
def test_bad_targets(setup, bad, message):
    model, tcs = setup
    with pytest.raises(InputError, match=message):
        attribute(model, tcs, TOKENS, progress=False, target=bad)


def test_a_chosen_token_that_is_not_the_top(setup):
    model, tcs = setup
    rec = record(model, tcs, TOKENS)
    low = int(rec.logits[-1].argsort()[5])  # far from the top
    g = attribute(model, tcs, TOKENS, progress=False, batch_size=64, target=low)
    assert g.logit_tokens.tolist() == [low] and g.info["target"]["tokens"] == [low]
    probs = torch.softmax(rec.logits[-1].double(), -1)
    assert float(g.logit_probs[0]) == pytest.approx(float(probs[low]), rel=1e-5)
    top = attribute(model, tcs, TOKENS, progress=False, batch_size=64)
    assert int(top.logit_tokens[0]) != low


def test_logit_difference_edges_are_exact(setup, tmp_path):
    """A difference node's edge from a feature is the change of logit(A) - logit(B) per unit of that feature."""
    model, tcs = setup
    g = attribute(model, tcs, TOKENS, progress=False, batch_size=64, target='" Paris" - " London"')
    assert g.n_logits == 1 and g.logit_strs == [" Paris -  London"]
    L = g.logit_slice.start
    rec = record(model, tcs, TOKENS)
    A = g.dense()
    f = int(A[L, : g.n_features].abs().argmax())
    layer, pos, idx = g.features[f].tolist()
    a = rec.acts[layer].clone()
    a[pos, idx] = 0
    run = frozen_forward(model, tcs, rec, acts={layer: a})
    diff = lambda x: float(x[-1, 10] - x[-1, 11])  # noqa: E731
    moved = diff(run.logits[0]) - diff(rec.logits)
    # frozen patterns and norms, no other feature moves in the frozen model: the direct effect is the whole change
    # only for a last-layer feature; for any feature the graph's total effect predicts it
    from featurelens.attribution.check import total_effects

    assert moved == pytest.approx(float(total_effects(g, L)[f]), rel=1e-3, abs=1e-6)
    # saved and read back: the target travels in the metadata, and the check reads the same difference
    p = save_graph(g.prune(), tmp_path, slug="diff")
    meta = json.loads(p.read_text())["metadata"]["info"]["featurelens"]
    assert meta["target"]["minus"] == 11 and meta["target"]["label"] == '" Paris" - " London"'
    back = load_graph(p)
    assert Target.from_info(back.info["target"]).is_difference
    res = check_graph(g, model, tcs, k=3, scale=0.99)
    assert res.target == " Paris -  London"
    for c in res.features:
        if c.crossings == 0:
            assert c.measured_a == pytest.approx(c.predicted_total, rel=1e-3, abs=1e-6)


def test_cli_target_and_saved_faithfulness(cli_setup, capsys):
    from featurelens.cli import main

    model, tc_dir, tmp = cli_setup
    out = tmp / "graphs"
    assert main(["graph", "-m", "tiny", str(tc_dir), "hello world", "--out", str(out), "--batch-size", "16",
                 "--target", "h", "--ablate-top", "4"]) == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "target 'h'" in text and "(a) local replacement" in text
    meta = json.loads((out / "hello-world.json").read_text())["metadata"]["info"]["featurelens"]
    assert meta["target"]["strs"] == ["h"] and len(meta["faithfulness"]["features"]) == 4
    assert set(meta["faithfulness"]["tiers"]) == {"a", "b", "c"}
    assert main(["graph-check", str(out / "hello-world.json"), "--ablate-top", "3"]) == 0
    text = capsys.readouterr().out
    assert "faithfulness saved with the graph" in text and "on target 'h'" in text
    assert main(["graph", "-m", "tiny", str(tc_dir), "hello world", "--out", str(out), "--target", "hh"]) == 2
    assert "2 tokens" in capsys.readouterr().err
