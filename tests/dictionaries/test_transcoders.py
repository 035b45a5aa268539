"""Transcoders for circuit work: skip transcoders, cross-layer transcoders (CLT), the replacement protocol and the
replacement model's evaluation, circuit-tracer's layout. Tiny random models and synthetic activations: fast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import featurelens as fl
from featurelens.dictionaries import (
    CLTConfig, CorruptDictionaryError, CrossLayerTranscoder, DictionaryConfig, SparseDictionary, TrainConfig,
    TranscoderSet, load_circuit_tracer, load_dictionary, run_training, save_circuit_tracer, save_clt,
)
from featurelens.dictionaries.clt import CLTLayerError
from featurelens.dictionaries.learner import CLTLearner
from featurelens.dictionaries.compat import DictionaryModelMismatchError, check_fits
from featurelens.dictionaries.protocol import decode_contributions
from featurelens.dictionaries.replacement import evaluate_replacement
from featurelens.dictionaries.batches import reuse_batches
from featurelens.engine.errors import InputError, MissingFileError
from featurelens.engine.model import ForwardContext

D, N_LAYERS = 16, 3


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """A 3-layer Gemma-3-shaped model with random weights (no tokenizer, nothing downloaded)."""
    from featurelens.engine.config import ModelConfig
    from featurelens.engine.hooked import HookedTransformer

    cfg = ModelConfig(architecture="gemma3", n_layers=N_LAYERS, d_model=D, n_heads=2, n_kv_heads=1, d_head=8, d_mlp=32,
                      d_vocab=50, post_attn_norm=True, post_mlp_norm=True, act_fn="gelu_tanh", bos_token_id=1)
    model = HookedTransformer(cfg, name="tiny-random")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


@pytest.fixture(scope="module")
def contexts():
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(2, 50, (48, 12), generator=g)
    toks[:, 0] = 1
    return toks


def random_clt(arch="jumprelu", skip=True, layers=(0, 1, 2), d_sae=24, k=None, seed=0) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(layers=list(layers), d_in=D, d_sae=d_sae, arch=arch, k=k, skip=skip,
                                         model_name="tiny-random", n_layers_model=N_LAYERS))
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
        if clt.threshold is not None:
            for t in clt.threshold:
                t.copy_(torch.rand(t.shape) * 0.3)
    return clt.eval()


def random_set(skip=True, arch="topk", seed=0, layers=range(N_LAYERS)) -> TranscoderSet:
    torch.manual_seed(seed)
    tcs = {}
    for layer in layers:
        cfg = DictionaryConfig(d_in=D, d_sae=20, arch=arch, k=4 if arch in ("topk", "batchtopk") else None,
                               transcoder=True, skip=skip, hook_name=f"blocks.{layer}.ln2.hook_normalized",
                               hook_name_out=f"blocks.{layer}.hook_mlp_out", model_name="tiny-random")
        tc = SparseDictionary(cfg)
        with torch.no_grad():
            for p in tc.parameters():
                p.copy_(torch.randn(p.shape) * 0.3)
            if tc.threshold is not None:
                tc.threshold.copy_(torch.rand(tc.threshold.shape) * 0.3)
        tcs[layer] = tc.eval()
    return TranscoderSet(tcs, n_layers_model=N_LAYERS)


# ----------------------------------------------------------------------------------------------- the maths
def test_clt_output_is_the_sum_of_decoder_contributions_of_layers_up_to_L():
    clt = random_clt()
    xs = {l: torch.randn(7, D) for l in clt.layers}
    out = clt.reconstruct(xs)
    for L in clt.layers:
        expected = clt.b_dec_out(L) + xs[L] @ clt.W_skip[clt.index(L)].T
        for l in clt.layers:
            if l <= L:
                expected = expected + clt.encode_layer(l, xs[l]) @ clt.decoder(l)[:, L - l, :]
        torch.testing.assert_close(out[L], expected, rtol=1e-5, atol=1e-5)
        # a later layer's features never reach an earlier output
        changed = dict(xs)
        changed[clt.layers[-1]] = torch.randn(7, D)
        if L < clt.layers[-1]:
            torch.testing.assert_close(clt.reconstruct(changed)[L], out[L])
    assert clt.output_layers(1) == [1, 2] and clt.decoder(1).shape == (24, 2, D)


@pytest.mark.parametrize("kind", ["clt", "set"])
def test_replacement_protocol_agrees_with_reconstruct(kind):
    tc = random_clt() if kind == "clt" else random_set(skip=True)
    xs = {l: torch.randn(5, D) for l in tc.layers}
    total = {L: tc.b_dec_out(L).expand(5, D).clone() for L in tc.layers}
    for l in tc.layers:
        f = tc.encode_layer(l, xs[l])
        assert f.shape == (5, tc.d_sae)
        W = tc.decoder(l)
        assert W.shape == (tc.d_sae, len(tc.output_layers(l)), D)
        for j, L in enumerate(tc.output_layers(l)):
            total[L] += f @ W[:, j]
        skip = tc.skip_out(l, xs[l])
        assert skip is not None
        total[l] += skip
        assert tc.input_hook(l) == f"blocks.{l}.ln2.hook_normalized"
        assert tc.output_hook(l) == f"blocks.{l}.hook_mlp_out"
    rec = tc.reconstruct(xs)
    for L in tc.layers:
        torch.testing.assert_close(rec[L], total[L], rtol=1e-5, atol=1e-5)
    plain = random_set(skip=False)
    assert plain.skip_out(0, xs[0]) is None


def test_sparse_decode_matches_dense():
    W = torch.randn(30, 3, D)
    f = torch.relu(torch.randn(4, 6, 30) - 1.5)  # mostly zeros
    parts = decode_contributions(f, W)
    for j, part in enumerate(parts):
        torch.testing.assert_close(part, f @ W[:, j], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- training
def synthetic_stream(n=6000, n_feat=40, seed=0):
    """MLP inputs x_l and outputs y_L where y_L = sum over l <= L of sparse codes of x_l times fixed directions."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    codes = []
    for l in range(N_LAYERS):
        feats = torch.randn(n_feat, D, generator=g)
        feats /= feats.norm(dim=1, keepdim=True)
        c = (torch.rand(n, n_feat, generator=g) < 0.08).float() * (torch.rand(n, n_feat, generator=g) + 0.5)
        codes.append(c)
        xs.append(c @ feats)
    outs = [torch.randn(n_feat, N_LAYERS, D, generator=g) * 0.5 for _ in range(N_LAYERS)]
    for L in range(N_LAYERS):
        ys.append(sum(codes[l] @ outs[l][:, L] for l in range(L + 1)))
    data = {f"blocks.{l}.ln2.hook_normalized": xs[l] for l in range(N_LAYERS)}
    data.update({f"blocks.{l}.hook_mlp_out": ys[l] for l in range(N_LAYERS)})

    def batches(tokens_seen, batch_size=500):
        i = tokens_seen % n
        while True:
            if i + batch_size > n:
                i = 0
            yield {h: v[i:i + batch_size] for h, v in data.items()}
            i += batch_size

    return batches, data


@pytest.mark.parametrize("arch,kw", [("batchtopk", {"k": 4}), ("topk", {"k": 4, "loss": "normalized_mse"}),
                                     ("jumprelu", {})])
def test_training_a_tiny_clt_reduces_its_loss(arch, kw):
    batches, data = synthetic_stream()
    torch.manual_seed(0)
    tcfg = TrainConfig(arch=arch, width=64, tokens=30_000, batch_size=500, lr=3e-3, **kw)
    learner = CLTLearner("clt", CLTConfig(layers=[0, 1, 2], d_in=D, d_sae=64, arch=arch, k=tcfg.k), tcfg)
    xs = [data[f"blocks.{l}.ln2.hook_normalized"][:500] for l in range(N_LAYERS)]
    ys = [data[f"blocks.{l}.hook_mlp_out"][:500] for l in range(N_LAYERS)]
    first = learner.step(xs, ys, 0.0, 0.0)["fvu"]  # lr 0: just measures the initial error
    run_training([learner], batches, tcfg, None, progress=False)
    assert learner.ema["fvu"] < 0.5 * first, (first, learner.ema)
    clt = learner.export()
    with torch.no_grad():
        rec = clt.reconstruct({l: x for l, x in enumerate(xs)})
    fvu = sum(float((rec[l] - ys[l]).pow(2).sum()) for l in range(N_LAYERS)) / \
        sum(float((y - y.mean(0)).pow(2).sum()) for y in ys)
    assert fvu < 0.5 * first  # the exported (scale-folded) CLT computes what was trained, on raw activations


def test_reuse_buffer_serves_each_row_reuse_times_and_resumes():
    rows = torch.arange(400, dtype=torch.float32)[:, None]

    def inner(tokens_seen):
        for s in range(tokens_seen, 10_000, 50):
            yield {"h": rows[s % 400:s % 400 + 50] if s % 400 + 50 <= 400 else rows[:50]}

    gen = reuse_batches(inner, reuse=3, buffer_tokens=200, batch_size=40)
    out = [b["h"] for _, b in zip(range(15), gen(0))]  # 15 batches = 600 rows = the first buffer 3 times
    seen = torch.cat(out).squeeze(1)
    assert sorted(seen.tolist()) == sorted(list(range(200)) * 3)
    resumed = [b["h"] for _, b in zip(range(5), gen(400))]  # from row 400 of the reuse sequence: batch 10 on
    for a, b in zip(out[10:], resumed):
        assert torch.equal(a, b)


def test_train_clt_on_a_tiny_model_saves_loads_and_resumes(tiny, contexts, tmp_path):
    out = tmp_path / "clt"
    with pytest.raises(KeyboardInterrupt):
        # stop after 2 steps, as Ctrl-C would, leaving a checkpoint
        from featurelens.dictionaries import train as clt_mod

        real = clt_mod.run_training

        def stopping(*a, **kw):
            kw["stop_after_steps"] = 2
            real(*a, **kw)
            raise KeyboardInterrupt

        clt_mod.run_training = stopping
        try:
            fl.train_clt(tiny, layers="all", k=3, width=32, tokens=1500, batch_size=100, out=out, contexts=contexts,
                         checkpoint_every=1, progress=False)
        finally:
            clt_mod.run_training = real
    assert any((out / "checkpoints").glob("step-*.pt"))
    clt = fl.train_clt(tiny, layers="all", k=3, width=32, tokens=1500, batch_size=100, out=out, contexts=contexts,
                       resume=True, progress=False)
    assert clt.stats["resumed_from_step"] == 2 and clt.stats["tokens_trained"] == 1500
    back = load_dictionary(out)
    assert isinstance(back, CrossLayerTranscoder) and back.layers == [0, 1, 2]
    xs = {l: torch.randn(4, D) for l in back.layers}
    for L, y in clt.reconstruct(xs).items():
        assert torch.equal(y, back.reconstruct(xs)[L])
    with pytest.raises(CLTLayerError, match=r"layers \[5\] do not exist: the model has 3 layers"):
        CLTConfig(layers=[0, 5], d_in=D, d_sae=8, arch="topk", k=2, n_layers_model=3)
    with pytest.raises(InputError, match="layers must lie in 0..2"):
        fl.train_clt(tiny, layers=[1, 7], out=tmp_path / "bad", contexts=contexts, progress=False)


def test_skip_is_the_default_for_train_transcoders(tiny, contexts, tmp_path):
    tset = fl.train_transcoders(tiny, layers=[0, 2], k=3, width=32, tokens=600, batch_size=100, out=tmp_path / "tc",
                                contexts=contexts, progress=False)
    assert all(tc.cfg.skip and tc.W_skip is not None for tc in tset)
    plain = fl.train_transcoders(tiny, layers=[1], k=3, width=32, tokens=300, batch_size=100, skip=False,
                                 out=tmp_path / "plain", contexts=contexts, progress=False)
    assert plain[1].W_skip is None


# ----------------------------------------------------------------------------------------------- the replacement model
def test_replacement_model_matches_per_layer_splicing_and_diagonal_clt(tiny, contexts):
    tset = random_set(skip=True, arch="jumprelu")
    test = contexts[:4]
    via_splice = fl.evaluate_dictionary(tiny, tset, contexts=test, tokens=200, ce_contexts=2, progress=False)
    via_replacement = evaluate_replacement(tiny, tset, contexts=test, tokens=200, ce_contexts=2, progress=False)
    assert set(via_replacement) == {0, 1, 2, "all"}
    for key in (0, 1, 2, "all"):
        assert via_replacement[key].ce_spliced == pytest.approx(via_splice[key].ce_spliced, rel=1e-5)
        assert via_replacement[key].kl_div == pytest.approx(via_splice[key].kl_div, rel=1e-4, abs=1e-7)
    for layer in (0, 1, 2):
        assert via_replacement[layer].l0 == pytest.approx(via_splice[layer].l0)
        assert via_replacement[layer].explained_variance == pytest.approx(via_splice[layer].explained_variance,
                                                                          rel=1e-5)
    assert via_replacement["all"].ce_zero_ablation == pytest.approx(via_splice["all"].ce_zero_ablation)

    # a CLT whose features write only to their own layer is the same replacement model
    clt = CrossLayerTranscoder(CLTConfig(layers=[0, 1, 2], d_in=D, d_sae=20, arch="jumprelu", skip=True))
    with torch.no_grad():
        for i, l in enumerate(clt.layers):
            tc = tset[l]
            clt.W_enc[i].copy_(tc.W_enc)
            clt.b_enc[i].copy_(tc.b_enc)
            clt.threshold[i].copy_(tc.threshold)
            W = torch.zeros(20, 3 - i, D)
            W[:, 0] = tc.W_dec
            clt.W_dec[i].copy_(W.reshape(20, -1))
            clt.b_dec[i].copy_(tc.b_dec)
            clt.W_skip[i].copy_(tc.W_skip)
    res = fl.evaluate_dictionary(tiny, clt, contexts=test, tokens=200, ce_contexts=2, progress=False)
    assert res["all"].ce_spliced == pytest.approx(via_splice["all"].ce_spliced, rel=1e-5)
    assert res[1].explained_variance == pytest.approx(via_splice[1].explained_variance, rel=1e-5)
    # and cross-layer decoders do change it
    with torch.no_grad():
        clt.W_dec[0].view(20, 3, D)[:, 2] += 0.5
    moved = evaluate_replacement(tiny, clt, contexts=test, tokens=200, ce_contexts=2, progress=False)
    assert moved["all"].ce_spliced != pytest.approx(res["all"].ce_spliced, rel=1e-6)
    assert moved[0].explained_variance == pytest.approx(res[0].explained_variance, rel=1e-6)  # layer 0 unchanged


def test_cli_eval_prints_a_row_per_layer_and_all(tiny, contexts, capsys):
    from featurelens.cli.train import _report

    res = evaluate_replacement(tiny, random_clt(), contexts=contexts[:4], tokens=100, ce_contexts=1, progress=False)
    _report(res, as_json=False)
    rows = [ln.split("│")[1].strip() for ln in capsys.readouterr().out.splitlines() if ln.count("│") > 3]
    assert rows[-4:] == ["0", "1", "2", "all"]


# ----------------------------------------------------------------------------------------------- formats
def _same_outputs(a, b):
    xs = {l: torch.randn(9, D) for l in a.layers}
    ra, rb = a.reconstruct(xs), b.reconstruct(xs)
    assert set(ra) == set(rb)
    for L in ra:
        assert torch.equal(ra[L], rb[L]), L
    for l in a.layers:
        assert torch.equal(a.encode_layer(l, xs[l]), b.encode_layer(l, xs[l]))


# the tensors circuit-tracer 0.5's per-layer loader hands to SingleLayerTranscoder.load_state_dict (strict)
CIRCUIT_TRACER_LAYER_KEYS = {"W_enc", "W_dec", "b_enc", "b_dec", "W_skip", "activation_function.threshold"}

CIRCUIT_TRACER_LOADS = r'''
import sys
from pathlib import Path

import torch
from circuit_tracer.transcoder.activation_functions import TopK
from circuit_tracer.utils.caching import load_transcoders_from_cache

d, x = Path(sys.argv[1]), torch.load(sys.argv[2])
tcs, cfg = load_transcoders_from_cache(d.name, cache_dir=str(d.parent), device=torch.device("cpu"),
                                       dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
if cfg.get("activation") == "topk":  # its loader reads ReLU / JumpReLU; the caller applies TopK from config.yaml
    for t in tcs:
        t.activation_function = torch.nn.Sequential(TopK(int(cfg["k"])), torch.nn.ReLU())
out = {}
for layer, t in enumerate(tcs):
    out[f"f{layer}"] = t.encode(x)
    out[f"y{layer}"] = t.decode(out[f"f{layer}"], x)
torch.save(out, sys.argv[3])
'''


@pytest.mark.parametrize("skip,arch", [(True, "topk"), (False, "topk"), (True, "jumprelu"), (False, "relu")])
def test_circuit_tracer_loads_what_we_write(tmp_path, skip, arch):
    """circuit-tracer's own loader (its cache reader, as the attribution benchmark uses it) reads the files
    `save_circuit_tracer` writes, and its transcoders compute ours. Needs a Python with circuit-tracer installed
    (benchmarks/attribution.py builds one): FEATURELENS_CIRCUIT_TRACER_PYTHON=path/to/python."""
    import os
    import subprocess

    python = os.environ.get("FEATURELENS_CIRCUIT_TRACER_PYTHON")
    if not python:
        pytest.skip("set FEATURELENS_CIRCUIT_TRACER_PYTHON to a Python with circuit-tracer installed")
    tset = random_set(skip=skip, arch=arch)
    save_circuit_tracer(tset, tmp_path / "ct", model_name="google/gemma-3-270m")
    x = torch.randn(7, D)
    torch.save(x, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    r = subprocess.run([python, "-c", CIRCUIT_TRACER_LOADS, str(tmp_path / "ct"), str(tmp_path / "x.pt"),
                        str(tmp_path / "out.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    theirs = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        for layer in tset.layers:
            f = tset[layer].encode(x)
            torch.testing.assert_close(theirs[f"f{layer}"], f)
            torch.testing.assert_close(theirs[f"y{layer}"], tset[layer].decode(f, x))


@pytest.mark.parametrize("skip,arch", [(True, "topk"), (False, "topk"), (True, "jumprelu"), (False, "relu")])
def test_circuit_tracer_round_trip_transcoder_set(tmp_path, skip, arch):
    import yaml
    from safetensors import safe_open

    tset = random_set(skip=skip, arch=arch)
    save_circuit_tracer(tset, tmp_path / "ct", model_name="google/gemma-3-270m")
    config = yaml.safe_load((tmp_path / "ct" / "config.yaml").read_text())
    assert config["model_kind"] == "transcoder_set" and config["model_name"] == "google/gemma-3-270m"
    # circuit-tracer runs TransformerLens, where the MLP input after the norm weight is mlp.hook_in
    assert config["feature_input_hook"] == "mlp.hook_in" and config["feature_output_hook"] == "hook_mlp_out"
    assert len(config["transcoders"]) == 3 and (config.get("k") == 4) == (arch == "topk")
    with safe_open(config["transcoders"][1], "pt") as f:  # circuit-tracer's orientation: W_enc [d_sae, d_model]
        assert tuple(f.get_slice("W_enc").get_shape()) == (20, D)
        assert ("W_skip" in f.keys()) == skip
        assert ("activation_function.threshold" in f.keys()) == (arch == "jumprelu")
        # only what circuit-tracer's strict load_state_dict accepts (TopK's k is in config.yaml, not here)
        assert set(f.keys()) <= CIRCUIT_TRACER_LAYER_KEYS
    back = load_dictionary(tmp_path / "ct")
    assert isinstance(back, TranscoderSet) and back.layers == [0, 1, 2] and back[0].cfg.arch == arch
    _same_outputs(tset, back)
    # a moved directory still reads (paths fall back to the files beside config.yaml)
    (tmp_path / "ct").rename(tmp_path / "moved")
    _same_outputs(tset, load_circuit_tracer(tmp_path / "moved"))


@pytest.mark.parametrize("arch,skip", [("batchtopk", False), ("jumprelu", True), ("relu", False)])
def test_circuit_tracer_and_own_round_trip_clt(tmp_path, arch, skip):
    clt = random_clt(arch=arch, skip=skip, k=4 if arch == "batchtopk" else None)
    if skip:
        with pytest.warns(UserWarning, match="does not read skip"):
            save_circuit_tracer(clt, tmp_path / "ct")
    else:
        save_circuit_tracer(clt, tmp_path / "ct")
    names = sorted(p.name for p in (tmp_path / "ct").iterdir())
    assert "W_dec_2.safetensors" in names and "W_enc_0.safetensors" in names
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ct" / "W_dec_1.safetensors"), "pt") as f:
        assert tuple(f.get_slice("W_dec_1").get_shape()) == (24, 2, D)
    back = load_dictionary(tmp_path / "ct")
    assert isinstance(back, CrossLayerTranscoder)
    _same_outputs(clt, back)
    save_clt(clt, tmp_path / "own")
    _same_outputs(clt, load_dictionary(tmp_path / "own"))


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_name_the_file_or_layer(tmp_path, tiny):
    # a topk CLT has no exact circuit-tracer form
    with pytest.raises(InputError, match="batchtopk"):
        save_circuit_tracer(random_clt(arch="topk", k=3, skip=False), tmp_path / "x")
    # a layer's file missing from a circuit-tracer directory
    save_circuit_tracer(random_set(), tmp_path / "ct")
    (tmp_path / "ct" / "layer_1.safetensors").unlink()
    with pytest.raises(MissingFileError, match="layer 1's file .*layer_1.safetensors is missing"):
        load_dictionary(tmp_path / "ct")
    # a CLT file missing a layer
    clt = random_clt(arch="jumprelu", skip=False)
    save_circuit_tracer(clt, tmp_path / "clt")
    (tmp_path / "clt" / "W_dec_2.safetensors").unlink()
    with pytest.raises(MissingFileError, match=r"W_dec_2.safetensors: missing: layer 2"):
        load_dictionary(tmp_path / "clt")
    from safetensors.torch import load_file, save_file

    save_clt(clt, tmp_path / "own")
    t = load_file(str(tmp_path / "own" / "clt_weights.safetensors"))
    del t["W_dec_1"]
    save_file(t, str(tmp_path / "own" / "clt_weights.safetensors"))
    with pytest.raises(CorruptDictionaryError, match=r"clt_weights.safetensors: layer 1 is missing"):
        load_dictionary(tmp_path / "own")
    # a skip transcoder read as a plain one
    tset = random_set(skip=True)
    fl.save_dictionary(tset[0], tmp_path / "tc0")
    import json

    meta = json.loads((tmp_path / "tc0" / "featurelens.json").read_text())
    meta["config"]["skip"] = False
    (tmp_path / "tc0" / "featurelens.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptDictionaryError, match=r"tc0/sae_weights.safetensors: holds W_skip .* says no skip"):
        load_dictionary(tmp_path / "tc0")
    # mismatched d_model; layers the model lacks
    wide = CrossLayerTranscoder(CLTConfig(layers=[0, 1], d_in=D + 4, d_sae=8, arch="topk", k=2))
    with pytest.raises(InputError, match=r"layer 0: .* width 20 .* d_model=16"):
        fl.evaluate_dictionary(tiny, wide, contexts=torch.ones(2, 5, dtype=torch.long), progress=False)
    deep = CrossLayerTranscoder(CLTConfig(layers=[2, 3], d_in=D, d_sae=8, arch="topk", k=2))
    with pytest.raises(DictionaryModelMismatchError, match="layer 3, but tiny-random has 3 layers"):
        check_fits(tiny, deep)
    with pytest.raises(CLTLayerError, match=r"no layer 7; its layers are \[2, 3\]"):
        deep.encode_layer(7, torch.zeros(D))
    with pytest.raises(CLTLayerError, match=r"layers \[3\] are missing"):
        deep.reconstruct({2: torch.zeros(1, D)})
    with pytest.raises(InputError, match="loss must be one of"):
        TrainConfig(loss="l1")


def test_reads_gemma_scope_2_clt_and_gemma_scope_transcoders_listed_by_circuit_tracer(tmp_path):
    import numpy as np
    import yaml
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(3)
    n, d_sae = 3, 12
    raw = []
    for i in range(n):  # Gemma Scope 2's per-layer CLT files: w_dec covers every layer, only >= i is used
        t = {"w_enc": torch.randn(D, d_sae, generator=g), "w_dec": torch.randn(d_sae, n, D, generator=g),
             "b_enc": torch.randn(d_sae, generator=g), "b_dec": torch.randn(D, generator=g),
             "threshold": torch.rand(d_sae, generator=g), "affine_skip_connection": torch.randn(D, D, generator=g)}
        (tmp_path / "gs2" / f"layer_{i}").mkdir(parents=True)
        save_file(t, str(tmp_path / "gs2" / f"layer_{i}" / "params.safetensors"))
        raw.append(t)
    clt = load_dictionary(tmp_path / "gs2")
    assert isinstance(clt, CrossLayerTranscoder) and clt.layers == [0, 1, 2] and clt.cfg.arch == "jumprelu"
    xs = {i: torch.randn(5, D, generator=g) for i in range(n)}
    for L, y in clt.reconstruct(xs).items():
        expected = raw[L]["b_dec"] + xs[L] @ raw[L]["affine_skip_connection"]
        for l in range(L + 1):
            pre = xs[l] @ raw[l]["w_enc"] + raw[l]["b_enc"]
            expected = expected + (pre * (pre > raw[l]["threshold"])) @ raw[l]["w_dec"][:, L]
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)

    # circuit-tracer's Gemma Scope config: a list of params.npz (W_enc [d_model, d_sae], as SAELens)
    paths = []
    for i in range(2):
        f = tmp_path / "gs" / f"layer_{i}" / "params.npz"
        f.parent.mkdir(parents=True)
        np.savez(f, W_enc=np.random.randn(D, 10).astype("float32"), W_dec=np.random.randn(10, D).astype("float32"),
                 b_enc=np.zeros(10, "float32"), b_dec=np.ones(D, "float32"), threshold=np.full(10, 0.1, "float32"))
        paths.append(str(f))
    (tmp_path / "gs" / "config.yaml").write_text(yaml.safe_dump({
        "model_kind": "transcoder_set", "model_name": "google/gemma-2-2b", "feature_input_hook": "ln2.hook_normalized",
        "feature_output_hook": "hook_mlp_out", "transcoders": paths}))
    tset = load_dictionary(tmp_path / "gs")
    assert isinstance(tset, TranscoderSet) and tset.layers == [0, 1] and tset[1].cfg.arch == "jumprelu"
    assert tset[1].hook_name_out == "blocks.1.hook_mlp_out" and tset.cfg.model_name == "google/gemma-2-2b"
    w = np.load(paths[1])
    x = torch.randn(3, D)
    pre = x @ torch.from_numpy(w["W_enc"])
    torch.testing.assert_close(tset[1](x), (pre * (pre > 0.1)) @ torch.from_numpy(w["W_dec"]) + 1.0)


@pytest.mark.slow
def test_cli_trains_and_evaluates_a_clt_on_gemma(gemma, tmp_path, capsys):
    from featurelens.cli import main

    out = tmp_path / "clt"
    rc = main(["train", "-m", "gemma-3-270m", "--clt", "--layers", "0,1", "--width", "64", "--k", "4", "--tokens",
               "1024", "--batch-tokens", "256", "--reuse", "2", "--loss", "normalized_mse", "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert "CLT" in capsys.readouterr().out
    clt = load_dictionary(out)
    assert isinstance(clt, CrossLayerTranscoder) and clt.layers == [0, 1] and clt.cfg.arch == "batchtopk"
    assert clt.stats["train_config"]["reuse"] == 2 and clt.stats["train_config"]["loss"] == "normalized_mse"
    rc = main(["eval", str(out), "--tokens", "300", "--ce-contexts", "1"])
    rows = [ln.split("│")[1].strip() for ln in capsys.readouterr().out.splitlines() if ln.count("│") > 3]
    assert rc == 0 and rows[-3:] == ["0", "1", "all"]
    rc = main(["train", "-m", "gemma-3-270m", "--transcoder", "--no-skip", "--layers", "3", "--width", "64",
               "--k", "4", "--tokens", "512", "--batch-tokens", "256", "--out", str(tmp_path / "plain")])
    assert rc == 0 and load_dictionary(tmp_path / "plain")[3].W_skip is None
    assert main(["train", "--clt", "--transcoder", "--out", str(tmp_path / "z")]) == 2
    assert "give one of --hook" in capsys.readouterr().err


def test_a_transcoder_set_for_another_d_model_is_refused_naming_the_layer(tiny):
    wide = random_set(skip=True)
    cfg = DictionaryConfig(d_in=D + 8, d_sae=8, arch="topk", k=2, transcoder=True, d_out=D + 8,
                           hook_name="blocks.2.ln2.hook_normalized", hook_name_out="blocks.2.hook_mlp_out")
    tset = TranscoderSet({0: wide[0], 2: SparseDictionary(cfg)})
    with pytest.raises(InputError, match=r"layer 2: .*width 24 .*d_model=16"):
        fl.evaluate_dictionary(tiny, tset, contexts=torch.ones(2, 5, dtype=torch.long), progress=False)


def test_fit_affine_recovers_an_affine_map_and_leaves_unspanned_directions_alone():
    from featurelens.dictionaries.losses import fit_affine

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, D, generator=g)
    x[:, -1] = 3.0  # a direction the data never varies in: nothing tells the fit what to do with it
    A, b = torch.randn(8, D, generator=g), torch.randn(8, generator=g)
    A[:, -1] = 0
    W, c = fit_affine(x, x @ A.T + b)
    assert torch.allclose(W[:, :-1], A[:, :-1], rtol=3e-3, atol=1e-4)  # the ridge shrinks by about 0.1%
    assert float(W[:, -1].abs().max()) < 1e-3  # no gain where the data gave no evidence (the ridge)
    assert torch.allclose(x @ W.T + c, x @ A.T + b, rtol=1e-2, atol=2e-2)


def _skip_learner(skip_lr_scale, tokens=6000, device=None, **options):
    """A skip transcoder learning y = x A^T + b + relu(x) B (an affine part and a sparse nonlinear one)."""
    from featurelens.dictionaries.batches import iterate_tensors
    from featurelens.dictionaries.learner import Learner

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3000, D, generator=g) * torch.linspace(0.05, 2.0, D)  # badly conditioned, like MLP inputs
    A, B = torch.randn(D, D, generator=g), torch.randn(D, D, generator=g) * 0.3
    y = x @ A.T + 5.0 + torch.relu(x - 1.0) @ B
    tcfg = TrainConfig(arch="topk", k=4, width=32, tokens=tokens, batch_size=500, skip=True, init_tokens=1000,
                       skip_lr_scale=skip_lr_scale, seed=0, **options)
    cfg = DictionaryConfig(d_in=D, d_sae=32, arch="topk", k=4, transcoder=True, skip=True,
                           hook_name="blocks.0.ln2.hook_normalized", hook_name_out="blocks.0.hook_mlp_out")
    learner = Learner("tc", cfg, tcfg, device=device)
    batches = iterate_tensors(x, 500, cfg.hook_name, y, cfg.hook_name_out, seed=0)
    return learner, batches, tcfg, x, y


def test_a_skip_transcoder_starts_at_the_least_squares_map_and_keeps_it_by_default():
    from featurelens.dictionaries.losses import fit_affine

    torch.manual_seed(0)
    learner, batches, tcfg, x, y = _skip_learner(skip_lr_scale=0.0)
    run_training([learner], batches, tcfg, None, progress=False, stop_after_steps=1)
    tc = learner.export()
    first = next(iter(batches(0)))  # the run initialized from the first init_tokens rows: two batches
    second = next(iter(batches(500)))
    x0 = torch.cat([first[tc.hook_name], second[tc.hook_name]])
    W, _ = fit_affine(x0 * learner.scale_in, torch.cat([first[tc.hook_name_out], second[tc.hook_name_out]])
                      * learner.scale_out)
    assert torch.allclose(tc.W_skip, W * learner.scale_in / learner.scale_out, rtol=1e-4, atol=1e-4)
    skip_after_one = tc.W_skip.clone()
    run_training([learner], batches, tcfg, None, progress=False)
    tc = learner.export()
    assert torch.equal(tc.W_skip, skip_after_one)  # skip_lr_scale 0: the features learn the rest
    with torch.no_grad():
        fvu = float((tc(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        linear = x @ tc.W_skip.T + tc.b_dec
        fvu_linear = float((linear - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < fvu_linear < 0.02, (fvu, fvu_linear)  # the affine part explains most; the features add to it


def test_untrained_features_start_quiet_beside_the_skip():
    """With the encoder at full scale, the random initial features add noise larger than everything the least-squares
    skip leaves to explain, and a short run does not remove it; skip_encoder_scale (0.1) starts them quiet."""
    fvus = {}
    for scale in (1.0, 0.1):
        torch.manual_seed(0)
        learner, batches, tcfg, x, y = _skip_learner(0.0, tokens=30_000, skip_encoder_scale=scale)
        run_training([learner], batches, tcfg, None, progress=False)
        tc = learner.export()
        with torch.no_grad():
            fvus[scale] = float((tc(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvus[0.1] < 0.01 < 0.1 < fvus[1.0], fvus


def test_skip_lr_scale_lets_the_skip_move_and_is_validated():
    torch.manual_seed(0)
    learner, batches, tcfg, _, _ = _skip_learner(skip_lr_scale=1.0, tokens=2000)
    run_training([learner], batches, tcfg, None, progress=False, stop_after_steps=1)
    before = learner.sae.W_skip.detach().clone()
    run_training([learner], batches, tcfg, None, progress=False)
    assert not torch.equal(learner.sae.W_skip.detach(), before)
    for bad in (-1.0, float("nan"), True, "0"):
        for name in ("skip_lr_scale", "skip_encoder_scale"):
            with pytest.raises(InputError, match=name):
                TrainConfig(**{name: bad})
    with pytest.raises(InputError, match="init_tokens"):
        TrainConfig(init_tokens=0)
    with pytest.raises(InputError, match="skip_init"):
        TrainConfig(skip_init="random")


def test_a_skip_clt_starts_each_layer_at_its_least_squares_map():
    from featurelens.dictionaries.losses import fit_affine

    batches, data = synthetic_stream()
    torch.manual_seed(0)
    tcfg = TrainConfig(arch="topk", k=4, width=32, tokens=2000, batch_size=500, skip=True, init_tokens=1000)
    learner = CLTLearner("clt", CLTConfig(layers=[0, 1, 2], d_in=D, d_sae=32, arch="topk", k=4, skip=True), tcfg)
    run_training([learner], batches, tcfg, None, progress=False)
    for i in range(N_LAYERS):
        x = data[f"blocks.{i}.ln2.hook_normalized"][:1000] * learner.scale_in[i]
        y = data[f"blocks.{i}.hook_mlp_out"][:1000] * learner.scale_out[i]
        W, _ = fit_affine(x, y)
        assert torch.allclose(learner.clt.W_skip[i].detach(), W, rtol=1e-4, atol=1e-4)


def test_a_skip_transcoder_run_stopped_midway_resumes_to_the_same_result(tmp_path):
    torch.manual_seed(0)
    ref, batches, tcfg, _, _ = _skip_learner(0.0, tokens=8000)
    run_training([ref], batches, tcfg, None, progress=False)
    torch.manual_seed(0)
    first, batches, tcfg, _, _ = _skip_learner(0.0, tokens=8000)
    tcfg.checkpoint_every = 3
    run_training([first], batches, tcfg, tmp_path, progress=False, stop_after_steps=7)
    torch.manual_seed(0)
    second, batches, tcfg, _, _ = _skip_learner(0.0, tokens=8000)
    tcfg.checkpoint_every = 3
    res = run_training([second], batches, tcfg, tmp_path, resume=True, progress=False)
    assert res.resumed_from == 6 and res.steps == 16  # the resumed run does not fit its skip again
    for a, b in zip(ref.sae.parameters(), second.sae.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_skip_transcoder_trains_on_cuda_from_the_same_least_squares_start():
    out = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        learner, batches, tcfg, x, y = _skip_learner(0.0, tokens=30_000, device=device)
        run_training([learner], batches, tcfg, None, progress=False)
        tc = learner.export()
        with torch.no_grad():
            fvu = float((tc(x) - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        out[device] = (tc.W_skip, fvu)
    assert torch.allclose(out["cpu"][0], out["cuda"][0], rtol=1e-4, atol=1e-4)  # the same float64 fit on either
    assert out["cuda"][1] < 0.01 and out["cpu"][1] < 0.01, out


# ----------------------------------------------------------------------------------------------- one protocol, one splice
def test_both_kinds_of_transcoders_implement_the_one_protocol():
    from featurelens.dictionaries import Transcoders

    tset, clt = random_set(), random_clt()
    assert isinstance(tset, Transcoders) and isinstance(clt, Transcoders)
    assert not isinstance(tset[0], Transcoders)  # one transcoder is a dictionary, not a model's transcoders
    for tc in (tset, clt):
        assert isinstance(tc.d_sae, int) and tc.model_name == "tiny-random"  # d_sae: a property on both
        for layer in tc.layers:
            assert tc.encoder(layer).shape == (D, tc.d_sae)
            assert tc.decoder(layer).shape == (tc.d_sae, len(tc.output_layers(layer)), D)
    assert tset.describe() == "per-layer transcoders+skip (3 layers, width 20)"
    assert clt.describe() == "CrossLayerTranscoder (3 layers)"


@pytest.mark.parametrize("kind", ["set", "clt"])
def test_one_splice_for_transcoders_live_kept_and_frozen_errors(tiny, kind):
    """splice_hooks on a model's transcoders: keep_error without an edit changes nothing; an edit moves each output
    layer by exactly the edited features' decoder rows; frozen errors recorded on the same tokens reproduce the
    model; no error term replaces every MLP output by the reconstruction."""
    from featurelens.dictionaries import splice_hooks

    tc = random_set() if kind == "set" else random_clt()
    toks = torch.randint(2, 50, (1, 9), generator=torch.Generator().manual_seed(3))
    names = [tc.input_hook(l) for l in tc.layers] + [tc.output_hook(l) for l in tc.layers]
    with torch.no_grad():
        clean_logits, cache = tiny.run_with_cache(toks, names_filter=lambda n: n in names)
        same = tiny.run_with_hooks(toks, fwd_hooks=splice_hooks(tc, keep_error=True))
        assert torch.equal(same, clean_logits)
        # ablate feature 5 of layer 0 at position 4: layer 0's own output moves by -a * its decoder row there
        x0 = cache[tc.input_hook(0)][0]
        a = float(tc.encode_layer(0, x0)[4, 5])
        seen: dict[str, torch.Tensor] = {}

        def ablate(f: torch.Tensor) -> torch.Tensor:
            f[:, 4, 5] = 0.0
            return f

        def keep(act: torch.Tensor, hook) -> None:
            seen[hook.name] = act.clone()

        hooks = splice_hooks(tc, keep_error=True, edit={0: ablate}, outputs=[0])
        tiny.run_with_hooks(toks, fwd_hooks=hooks + [(tc.output_hook(0), keep)])
        delta = seen[tc.output_hook(0)][0] - cache[tc.output_hook(0)][0]
        torch.testing.assert_close(delta[4], -a * tc.decoder(0)[5, 0])
        assert torch.equal(delta[:4], torch.zeros_like(delta[:4]))
        # frozen errors: the recorded error terms give back the clean run
        recon = tc.reconstruct({l: cache[tc.input_hook(l)][0] for l in tc.layers})
        errors = {L: cache[tc.output_hook(L)][0] - recon[L] for L in recon}
        frozen = tiny.run_with_hooks(toks, fwd_hooks=splice_hooks(tc, keep_error=False, errors=errors))
        torch.testing.assert_close(frozen, clean_logits, rtol=1e-4, atol=1e-4)
        # no error term: the outputs are the reconstruction of the (spliced) model's own inputs
        watch = [(tc.input_hook(l), keep) for l in tc.layers] + [(tc.output_hook(2), keep)]
        tiny.run_with_hooks(toks, fwd_hooks=splice_hooks(tc, keep_error=False) + watch)
        spliced_recon = tc.reconstruct({l: seen[tc.input_hook(l)][0] for l in tc.layers})
        torch.testing.assert_close(seen[tc.output_hook(2)][0], spliced_recon[2])
    with pytest.raises(InputError, match="for a model's transcoders"):
        splice_hooks(tc[0] if kind == "set" else random_set()[0], keep_error=False, outputs=[0])
    with pytest.raises(InputError, match="pass one"):
        splice_hooks(tc, keep_error=True, errors=errors)


# ----------------------------------------------------------------------------------------------- response matching
def _response_error(model, tset, layers, contexts, scale=0.05):
    """Median over rows of |transcoder's response - MLP's response|^2 / |MLP's response|^2, features held."""
    hooks = [f"blocks.{layer}.ln2.hook_normalized" for layer in layers]
    _, cache = model.run_with_cache(contexts, names_filter=hooks)
    g = torch.Generator().manual_seed(5)
    errs = []
    for layer, h in zip(layers, hooks):
        x = cache[h][:, 1:].reshape(-1, cache[h].shape[-1])
        dx = scale * (x[torch.randperm(len(x), generator=g)] - x)
        blk = model.blocks[layer]
        dy = (blk.mlp_output(x + dx) - blk.mlp_output(x - dx)) / 2
        tc = tset[layer]
        with torch.no_grad():
            held = (tc.encode(x) > 0).float()
            response = ((dx @ tc.W_enc) * held) @ tc.W_dec + dx @ tc.W_skip.T
        moved = dy.pow(2).sum(-1) > 0  # a row paired with its own token (same input) has no probe
        errs.append(((response - dy).pow(2).sum(-1)[moved] / dy.pow(2).sum(-1)[moved]).median())
    return float(torch.stack(errs).mean())


def test_mlp_probes_are_the_mlps_response_and_resume_identically(tiny, contexts):
    from featurelens.dictionaries.batches import PROBE, model_batches, with_mlp_probes

    layers = [0, 2]
    hooks = [h for layer in layers for h in (f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out")]
    inner = model_batches(tiny, hooks, contexts, batch_size=64, epochs=1)
    probed = with_mlp_probes(inner, tiny, layers, hooks[0::2], hooks[1::2], scale=1e-3, batch_size=64, seed=3)
    batches = list(probed(0))
    b = batches[1]
    for layer in layers:
        h_in, h_out = f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
        x, dx, dy = b[h_in], b[PROBE + h_in], b[PROBE + h_out]
        assert dx.shape == x.shape and dy.shape == b[h_out].shape and dx.norm() > 0
        blk = tiny.blocks[layer]

        def mlp(v, blk=blk):
            out = blk.mlp(v, ForwardContext({}, {}))
            return blk.ln2_post(out, ForwardContext({}, {}), hook_normalized=False)

        _, jvp = torch.autograd.functional.jvp(mlp, (x,), (dx,))
        torch.testing.assert_close(dy, jvp, rtol=2e-2, atol=1e-4 * float(jvp.abs().max()))  # a small secant is the slope
        torch.testing.assert_close(blk.mlp_output(x), b[h_out], rtol=1e-4, atol=1e-5)  # what the hook recorded
    again = list(probed(64))  # resumed from the second batch: the same probes
    torch.testing.assert_close(again[0][PROBE + hooks[0]], batches[1][PROBE + hooks[0]])


def test_response_matching_trains_the_held_response_toward_the_mlps(tiny, contexts, tmp_path):
    """response_coefficient > 0 adds the transcoder's linear response (its selected features held, as a graph uses
    it) against the MLP's to the loss: steps on one batch lower that error, which output-only steps leave alone;
    train_transcoders records it, and a negative coefficient is refused."""
    from featurelens.dictionaries.batches import PROBE, model_batches, with_mlp_probes
    from featurelens.dictionaries.learner import Learner
    from featurelens.dictionaries.losses import encode_for_training

    h_in, h_out = "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"
    inner = model_batches(tiny, [h_in, h_out], contexts, batch_size=256, epochs=1)
    batch = next(iter(with_mlp_probes(inner, tiny, [1], [h_in], [h_out], scale=0.05, batch_size=256)(0)))
    d = tiny.cfg.d_model
    errors = {}
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        cfg = DictionaryConfig(d_in=d, d_sae=32, arch="topk", k=4, transcoder=True, d_out=d, skip=True,
                               hook_name=h_in, hook_name_out=h_out)
        lrn = Learner("l1", cfg, TrainConfig(arch="topk", k=4, width=32, tokens=10_000, batch_size=256, skip=True,
                                             response_coefficient=coef, init_tokens=256))
        lrn.initialize([batch])
        x, y = batch[h_in], batch[h_out]
        probe = (batch[PROBE + h_in], batch[PROBE + h_out])

        def response_error() -> float:
            x_n = x * lrn.scale_in
            enc = encode_for_training("topk", 4, x_n, None, lrn.sae.W_enc, lrn.sae.b_enc, None, lrn.tcfg, None)
            with torch.no_grad():
                return float(lrn._response_loss(enc, probe, d))

        start = response_error()
        for _ in range(150):
            lrn.step(x, y, 2e-3, 1.0, probe if coef else None)
        errors[coef] = (start, response_error())
    assert errors[1.0][1] < 0.8 * errors[1.0][0], errors
    assert errors[1.0][1] < 0.8 * errors[0.0][1], errors
    tset = fl.train_transcoders(tiny, layers=[1], k=4, width=32, tokens=400, batch_size=100, contexts=contexts,
                                progress=False, out=tmp_path / "tc", response_coefficient=1.0)
    assert "response_fvu" in tset[1].stats["final_train_metrics"]
    assert tset[1].stats["train_config"]["response_coefficient"] == 1.0
    with pytest.raises(InputError, match="response_coefficient must be a number >= 0"):
        fl.train_transcoders(tiny, layers=[1], out=tmp_path / "bad", contexts=contexts, progress=False,
                             response_coefficient=-1)
    with pytest.raises(InputError, match="a cross-layer transcoder has no such MLP"):
        fl.train_clt(tiny, out=tmp_path / "bad-clt", contexts=contexts, progress=False, response_coefficient=1.0)
    with pytest.raises(InputError, match="an SAE has no such MLP"):
        fl.train_sae(tiny, "blocks.1.hook_resid_post", out=tmp_path / "bad-sae", contexts=contexts, progress=False,
                     response_coefficient=1.0)


def test_train_transcoders_interrupted_resumes_to_what_an_uninterrupted_run_trains(tiny, contexts, tmp_path,
                                                                                    monkeypatch):
    """Ctrl-C in the middle of train_transcoders (the model's stream, the reuse buffer, every layer): the rerun
    with resume=True continues from the checkpoint and ends where a run never stopped ends (the demo relies on it)."""
    from featurelens.dictionaries.learner import Learner
    from featurelens.interrupt import InterruptRequest

    kw = dict(layers="all", k=3, width=24, tokens=3000, batch_size=100, contexts=contexts, progress=False, reuse=2,
              reuse_buffer_tokens=400)
    straight = fl.train_transcoders(tiny, out=tmp_path / "straight", **kw)
    calls = {"n": 0}
    step = Learner.train_step

    def press_ctrl_c_at_step_12(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 12 * 3:  # the 12th step of the last of 3 layers
            monkeypatch.setattr(InterruptRequest, "requested", True)
        return step(self, *a, **k)

    with monkeypatch.context() as mp:
        mp.setattr(Learner, "train_step", press_ctrl_c_at_step_12)
        with pytest.raises(KeyboardInterrupt):
            fl.train_transcoders(tiny, out=tmp_path / "resumed", **kw)
    monkeypatch.setattr(InterruptRequest, "requested", False)
    resumed = fl.train_transcoders(tiny, out=tmp_path / "resumed", resume=True, **kw)
    assert resumed[0].stats["resumed_from_step"] == 12
    for layer in range(3):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "W_skip"):
            torch.testing.assert_close(getattr(resumed[layer], name), getattr(straight[layer], name),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["set", "clt"])
def test_layer_features_encode_as_the_replacement_model_and_write_its_whole_decoder(tmp_path, kind):
    """`layer_features(l)`, the form analysis and the web app take: a set's own transcoder; for a CLT a view that
    encodes exactly as the CLT and whose decoder is each feature's write summed over its output layers. On disk
    <clt dir>/layer_L loads that view, and an analysis of it lands in that folder."""
    tc = random_set() if kind == "set" else random_clt(arch="topk", k=5)
    x = torch.randn(7, D)
    for layer in tc.layers:
        view = tc.layer_features(layer)
        assert isinstance(view, SparseDictionary) and view.cfg.hook_name == tc.input_hook(layer)
        assert torch.equal(view.encode(x), tc.encode_layer(layer, x))
        torch.testing.assert_close(view.W_dec, tc.decoder(layer).sum(1))
    if kind == "set":
        assert tc.layer_features(1) is tc[1]
        return
    save_clt(tc, tmp_path / "clt")
    loaded = load_dictionary(tmp_path / "clt" / "layer_1")  # no such folder yet: the CLT's layer 1 all the same
    assert isinstance(loaded, SparseDictionary) and loaded.cfg.metadata["cross_layer_transcoder_layer"] == 1
    assert torch.equal(loaded.W_dec, tc.layer_features(1).W_dec) and Path(loaded.source) == tmp_path / "clt" / "layer_1"
    from featurelens.dictionaries.compat import dictionary_fingerprint, resolve_dictionary
    from featurelens.store import analysis_dir_for_path

    assert dictionary_fingerprint(loaded) == dictionary_fingerprint(load_dictionary(tmp_path / "clt").layer_features(1))
    _, where = resolve_dictionary(loaded)
    assert analysis_dir_for_path(where) == (tmp_path / "clt" / "layer_1" / "analysis").resolve()
    with pytest.raises(MissingFileError, match="has no layer 7; its layers are \\[0, 1, 2\\]"):
        load_dictionary(tmp_path / "clt" / "layer_7")
    with pytest.raises(CLTLayerError, match="no layer 9"):
        tc.layer_features(9)


def test_saes_trained_on_one_stream_equal_each_trained_alone_and_resume_together(tiny, contexts, tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]
    kw = dict(arch="topk", k=3, width=24, tokens=1200, batch_size=100, contexts=contexts, progress=False)
    alone = [fl.train_sae(tiny, h, out=tmp_path / f"alone-{i}", **kw) for i, h in enumerate(hooks)]
    outs = {h: tmp_path / f"together-{i}" for i, h in enumerate(hooks)}
    from featurelens.dictionaries import train as train_mod

    real = train_mod.run_training

    def stopping(*a, **k):  # stop after 3 steps, as Ctrl-C would, leaving a checkpoint
        k["stop_after_steps"] = 3
        real(*a, **k)
        raise KeyboardInterrupt

    train_mod.run_training = stopping
    try:
        with pytest.raises(KeyboardInterrupt):
            fl.train_saes(tiny, outs, checkpoint_every=1, **kw)
    finally:
        train_mod.run_training = real
    assert any((outs[hooks[0]] / "checkpoints").glob("step-*.pt"))  # the run's checkpoints: in the first directory
    assert not (outs[hooks[1]] / "checkpoints").exists()
    together = fl.train_saes(tiny, outs, resume=True, **kw)
    for a, t, h in zip(alone, together, hooks):
        assert t.cfg.hook_name == h and t.stats["resumed_from_step"] == 3
        for name, p in a.state_dict().items():  # the same initial weights, rows and steps
            torch.testing.assert_close(t.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=f"{h}: {name}")
        assert torch.equal(load_dictionary(outs[h]).W_dec, t.W_dec)
    assert not (outs[hooks[0]] / "checkpoints").exists()
    with pytest.raises(InputError, match="already holds a trained dictionary"):
        fl.train_saes(tiny, outs, **kw)
    with pytest.raises(InputError, match="an out directory of its own"):
        fl.train_saes(tiny, {hooks[0]: tmp_path / "x", hooks[1]: tmp_path / "x"}, **kw)


def test_dictionaries_evaluated_together_get_the_figures_each_gets_alone(tiny, contexts):
    tset = random_set(skip=True, arch="topk", seed=3)
    saes = {}
    for i, hook in enumerate(["blocks.0.hook_resid_post", "blocks.2.hook_resid_post"]):
        torch.manual_seed(10 + i)
        sae = SparseDictionary(DictionaryConfig(d_in=D, d_sae=24, arch="topk", k=4, hook_name=hook,
                                                model_name="tiny-random"))
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape) * 0.3)
        saes[f"sae {i}"] = sae.eval()
    clt = random_clt(arch="jumprelu")
    kw = dict(contexts=contexts[:6], tokens=300, ce_contexts=3, progress=False)
    together = fl.evaluate_dictionaries(tiny, {"set": tset, **saes, "clt": clt}, per_layer_ce=False, **kw)
    assert list(together) == ["set", "sae 0", "sae 1", "clt"]
    alone = {"set": fl.evaluate_dictionary(tiny, tset, per_layer_ce=False, **kw),
             "clt": fl.evaluate_dictionary(tiny, clt, per_layer_ce=False, **kw),
             **{name: fl.evaluate_dictionary(tiny, sae, **kw) for name, sae in saes.items()}}
    for name in ("set", "clt"):
        assert set(together[name]) == set(alone[name]) == {0, 1, 2, "all"}
    pairs = [(f"{name} {key}", together[name][key], alone[name][key])
             for name in ("set", "clt") for key in alone[name]]
    pairs += [(name, together[name], alone[name]) for name in saes]
    for what, got, want in pairs:
        for field, value in want.to_dict().items():
            # nan_ok: a figure an evaluation does not fill in (CE of a layer whose CE was not measured)
            assert got.to_dict()[field] == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (what, field)
    assert together["sae 1"].ce_loss_recovered != pytest.approx(together["sae 0"].ce_loss_recovered)
