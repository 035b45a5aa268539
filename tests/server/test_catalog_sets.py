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


def test_a_cross_layer_transcoder_is_listed_with_its_layers_like_a_set(tmp_path):
    """One set of weights (cfg.json names the CLT's layers), but per-layer figures, analyses and feature pages:
    <clt>/layer_L is that layer's id even where the folder holds only its analysis."""
    d = tmp_path / "dictionaries" / "m" / "clt"
    d.mkdir(parents=True)
    (d / "cfg.json").write_text(json.dumps({"architecture": "cross_layer_transcoder", "layers": [0, 1, 2], "d_in": 4,
                                            "d_sae": 8, "model_name": "m"}))
    (d / "featurelens.json").write_text(json.dumps({"kind": "cross_layer_transcoder", "config": {"arch": "topk",
                                                                                                 "k": 2}}))
    (d / "eval.json").write_text('{"0": {"l0": 2.0, "explained_variance": 0.9}, "1": {"l0": 4.0}, '
                                 '"all": {"ce_loss_recovered": 0.83, "kl_div": 0.8}}')
    (d / "layer_2" / "analysis").mkdir(parents=True)
    (d / "layer_2" / "analysis" / "features.sqlite").write_bytes(b"")
    [e] = catalog.list_dictionaries(tmp_path)
    assert e["kind"] == "transcoders" and e["cross_layer"] and e["layers"] == [0, 1, 2]
    assert e["metrics"]["ce_loss_recovered"] == 0.83 and e["metrics"]["l0"] == 3.0
    assert e["analyzed_layers"] == [2] and e["layer_ids"] == {"2": "m~clt~layer_2"} and e["arch"] == "topk"
    assert catalog.dictionary_dir(tmp_path, "m~clt~layer_2") == (d / "layer_2", d / "layer_2" / "analysis")
    assert catalog.dictionary_dir(tmp_path, "m~clt~layer_0") == (d / "layer_0", None)  # no folder, not analysed
    for missing in ("m~clt~layer_3", "m~clt~layer_x"):
        try:
            catalog.dictionary_dir(tmp_path, missing)
        except catalog.UnknownIdError as err:
            assert missing in str(err)
        else:
            raise AssertionError(f"{missing} was accepted")
