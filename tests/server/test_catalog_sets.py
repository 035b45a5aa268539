"""A transcoder set in the catalog: its evaluation's figures and its analyzed layers (what the home page shows)."""

from __future__ import annotations

import json
import math

from featurelens.server import catalog


def _set(root, analyzed=(0, 1), eval_all=True):
    d = root / "dictionaries" / "m" / "tcs"
    layers = {str(l): f"layer_{l}" for l in (0, 1)}
    d.mkdir(parents=True)
    (d / "featurelens.json").write_text(json.dumps({"kind": "transcoder_set", "layers": layers}))
    for l in (0, 1):
        sub = d / f"layer_{l}"
        sub.mkdir()
        (sub / "cfg.json").write_text(json.dumps({"d_sae": 8, "model_name": "m", "hook_name": f"blocks.{l}.x"}))
        (sub / "eval.json").write_text(json.dumps({"l0": 10.0 + l, "explained_variance": 0.5}))
        if l in analyzed:
            (sub / "analysis").mkdir()
            (sub / "analysis" / "features.sqlite").write_bytes(b"")
    if eval_all:  # the demo's file: per layer, and "all" (NaN where a figure was not measured, as Python writes it)
        (d / "eval.json").write_text('{"0": {"l0": 4.0, "explained_variance": 0.9, "ce_loss_recovered": NaN}, '
                                     '"1": {"l0": 6.0, "explained_variance": 0.7}, '
                                     '"all": {"l0": 10.0, "ce_loss_recovered": 0.778, "kl_div": 0.5}}')
    return d


def test_set_figures_and_layers(tmp_path):
    _set(tmp_path)
    [e] = catalog.list_dictionaries(tmp_path)
    assert e["kind"] == "transcoders" and e["layers"] == [0, 1] and e["analyzed_layers"] == [0, 1]
    m = e["metrics"]
    assert m["ce_loss_recovered"] == 0.778 and m["l0"] == 5.0 and math.isclose(m["explained_variance"], 0.8)
    assert m["layers_evaluated"] == 2 and m["kl_div"] == 0.5
    assert e["layer_ids"] == {"0": "m~tcs~layer_0", "1": "m~tcs~layer_1"}
    assert catalog.dictionary_dir(tmp_path, e["layer_ids"]["1"])[1] is not None  # a layer id opens its analysis


def test_set_without_its_own_eval_reads_the_layers(tmp_path):
    _set(tmp_path, analyzed=(1,), eval_all=False)
    [e] = catalog.list_dictionaries(tmp_path)
    assert e["metrics"]["l0"] == 10.5 and e["metrics"]["ce_loss_recovered"] is None
    assert e["analyzed_layers"] == [1] and list(e["layer_ids"]) == ["1"] and e["analyzed"] is False
