"""Sparse dictionaries: architectures, training, resume, format, metrics. Mostly synthetic data; a few tests on Gemma."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import featurelens as fl
from featurelens.dictionaries import (
    CorruptDictionaryError, DictionaryConfig, Learner, SparseDictionary, TrainConfig, iterate_tensors,
    load_dictionary, reconstruction_metrics, run_training, save_dictionary,
)
from featurelens.dictionaries.autograd import SelectedEncode, sparse_decode
from featurelens.dictionaries.losses import lr_factor


# ----------------------------------------------------------------------------------------------- synthetic data
def sparse_data(n=40_000, d=64, n_feat=128, k_true=4, seed=0):
    """x = sum of a few of n_feat unit directions with random magnitudes, plus a constant offset."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_feat, d, generator=g)
    feats /= feats.norm(dim=1, keepdim=True)
    p = torch.rand(n_feat, generator=g) * 0.9 + 0.1
    p = p / p.sum() * k_true
    acts = (torch.rand(n, n_feat, generator=g) < p).float() * (torch.rand(n, n_feat, generator=g) + 0.5)
    return acts @ feats + 0.5 * torch.randn(d, generator=g), feats


@pytest.fixture(scope="module")
def data():
    return sparse_data()


@pytest.fixture(autouse=True)
def one_thread(request):
    """Synthetic tests run many small ops; on a shared machine one thread beats two threads waiting on each other."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_synthetic(x, arch, tokens=300_000, width=256, batch_size=1024, y=None, out=None, **kw):
    torch.manual_seed(0)
    tcfg = TrainConfig(arch=arch, width=width, tokens=tokens, batch_size=batch_size, **kw)
    transcoder = y is not None
    cfg = DictionaryConfig(d_in=x.shape[1], d_sae=width, arch=arch, k=tcfg.k, hook_name="in", transcoder=transcoder,
                           d_out=y.shape[1] if transcoder else None, hook_name_out="out" if transcoder else None,
                           skip=tcfg.skip)
    learner = Learner("d", cfg, tcfg)
    res = run_training([learner], iterate_tensors(x, batch_size, "in", y, "out"), tcfg, out, progress=False)
    return learner, res


def recovered(feats, sae, cos=0.9):
    sims = feats @ (sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)).T
    return float((sims.max(1).values > cos).float().mean())


# ----------------------------------------------------------------------------------------------- architectures
def test_topk_recovers_ground_truth_features(data):
    x, feats = data
    learner, _ = train_synthetic(x, "topk", k=8)
    sae = learner.export()
    m = reconstruction_metrics(sae, [{"in": x[:10_000]}])
    assert m.explained_variance > 0.9
    assert m.l0 <= 8
    assert recovered(feats, sae) > 0.95
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(256), atol=1e-5)  # saved rows are unit-norm


# the sparsity coefficients suit this data's scale (each true feature carries a large share of the variance)
@pytest.mark.parametrize("arch,kw", [("relu", {"l1_coefficient": 1.0}), ("jumprelu", {"l0_coefficient": 1.0}),
                                     ("batchtopk", {"k": 4})])
def test_other_architectures_train(data, arch, kw):
    x, feats = data
    sae0 = SparseDictionary(DictionaryConfig(d_in=64, d_sae=256, arch=arch, k=kw.get("k"), hook_name="in"))
    learner, res = train_synthetic(x, arch, **kw)
    sae = learner.export()
    before = reconstruction_metrics(sae0, [{"in": x[:10_000]}])
    after = reconstruction_metrics(sae, [{"in": x[:10_000]}])
    assert after.mse < 0.3 * before.mse
    assert after.explained_variance > 0.7
    assert recovered(feats, sae) > 0.9
    if arch == "batchtopk":  # inference uses the learned threshold; L0 lands near k
        assert 2.5 < after.l0 < 6
    else:
        assert after.l0 < 20


def test_topk_encode_keeps_k_and_decodes():
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=64, arch="topk", k=5))
    x = torch.randn(3, 7, 16)
    f = sae.encode(x)
    assert f.shape == (3, 7, 64) and ((f > 0).sum(-1) <= 5).all() and (f >= 0).all()
    assert sae.decode(f).shape == (3, 7, 16)
    assert torch.allclose(sae(x), sae.decode(f))


def test_sparse_kernels_match_dense_autograd():
    torch.manual_seed(0)
    B, d, m, k = 32, 12, 40, 5
    x, y = torch.randn(B, d, dtype=torch.float64), torch.randn(B, d, dtype=torch.float64)
    W_enc = torch.randn(m, d, dtype=torch.float64).T.requires_grad_()
    b_enc, b_dec = torch.randn(m, dtype=torch.float64, requires_grad=True), torch.randn(d, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(m, d, dtype=torch.float64, requires_grad=True)
    pre = (x - b_dec) @ W_enc + b_enc
    vals, idx = pre.detach().topk(k, sorted=False)
    f = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx).relu())
    dense = ((f @ W_dec + b_dec - y) ** 2).sum()
    acts = SelectedEncode.apply(x, b_dec, W_enc, b_enc, idx, vals).relu()
    sparse = ((sparse_decode(acts, idx, W_dec) + b_dec - y) ** 2).sum()
    params = [W_enc, b_enc, b_dec, W_dec]
    for g1, g2 in zip(torch.autograd.grad(dense, params), torch.autograd.grad(sparse, params)):
        assert torch.allclose(g1, g2, atol=1e-9)


def test_bfloat16_selection_picks_the_float32_latents():
    """Training may pick TopK latents with a bfloat16 encoder pass (fast on AVX512-BF16 / AMX CPUs), then compute
    their values in float32. The choice must match float32's on almost every row, and where it does not, the
    latents swapped must be near-ties at the k-th place (within bfloat16's rounding), not different features."""
    from featurelens.dictionaries.losses import encode_for_training

    x, feats = sparse_data(n=4096, d=64, n_feat=128, k_true=4, seed=3)
    x = x - x.mean(0)
    x = x * (64 ** 0.5 / x.norm(dim=1).mean())  # training's units: mean norm sqrt(d_in)
    g = torch.Generator().manual_seed(0)
    width, k = 512, 16
    W_enc = torch.cat([feats.T, 0.3 * torch.randn(64, width - 128, generator=g)], 1)  # [d_in, width]
    b_enc = 0.1 * torch.randn(width, generator=g)
    tcfg = TrainConfig(arch="topk", width=width, k=k)

    def chosen(dtype):
        enc = encode_for_training("topk", k, x, None, W_enc, b_enc, None, tcfg, dtype)
        return torch.zeros(len(x), width, dtype=torch.bool).scatter_(1, enc.idx, True), enc

    f32, _ = chosen(None)
    bf16, enc = chosen(torch.bfloat16)
    same_rows = (f32 == bf16).all(1).float().mean().item()
    overlap = (f32 & bf16).sum().item() / f32.sum().item()
    print(f"bfloat16 selection: identical latent sets on {same_rows:.1%} of rows, {overlap:.2%} of latents")
    assert same_rows > 0.85 and overlap > 0.99  # seeded data: 91% and 99.5% here
    pre = x @ W_enc + b_enc  # float32
    kth = pre.topk(k, dim=1).values[:, -1:]  # [n, 1]
    swapped_in = bf16 & ~f32
    tol = 2 ** -7 * (x.abs() @ W_enc.abs() + b_enc.abs())  # bfloat16's rounding bound on each pre-activation
    assert bool(((kth - pre).abs() <= 2 * tol)[swapped_in].all())
    # the values of the chosen latents are float32's, not bfloat16's
    vals = enc.acts.detach()
    torch.testing.assert_close(vals, pre.gather(1, enc.idx).relu(), atol=1e-5, rtol=1e-5)


def test_transcoder_with_skip_learns_linear_plus_sparse():
    torch.manual_seed(1)
    x, feats = sparse_data(n=20_000, d=32, n_feat=64, seed=3)
    A = torch.randn(32, 24) / 32**0.5
    y = x @ A + torch.relu(x @ torch.randn(32, 24) / 32**0.5)  # a linear part and a non-linear part
    plain, _ = train_synthetic(x, "topk", k=8, width=128, y=y)
    skip, _ = train_synthetic(x, "topk", k=8, width=128, y=y, skip=True)
    tc = skip.export()
    assert tc.W_skip is not None and tc.W_skip.shape == (24, 32)
    ev = {name: reconstruction_metrics(l.export(), [{"in": x[:5000], "out": y[:5000]}]).explained_variance
          for name, l in (("plain", plain), ("skip", skip))}
    assert ev["skip"] > 0.9 and ev["skip"] >= ev["plain"] - 0.01


def test_fold_decoder_norms_keeps_the_function():
    torch.manual_seed(0)
    sae = SparseDictionary(DictionaryConfig(d_in=16, d_sae=32, arch="jumprelu"))
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) * 3 + 0.1)
        sae.threshold.copy_(torch.rand(32) * 0.3)
        sae.b_dec.copy_(torch.randn(16))
    x = torch.randn(100, 16)
    before = sae(x)
    sae.fold_decoder_norms()
    assert torch.allclose(sae(x), before, atol=1e-5)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)


# ----------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kw,msg", [
    ({"arch": "topk", "k": 0}, "k must be a positive integer"),
    ({"arch": "topk", "k": 300, "width": 256}, "must not exceed the width"),
    ({"arch": "topk", "width": 0}, "width must be a positive integer"),
    ({"arch": "topk", "width": -5}, "width must be a positive integer"),
    ({"arch": "sparse"}, "unknown architecture"),
    ({"arch": "relu", "k": 8}, "k applies to topk and batchtopk"),
    ({"arch": "topk", "lr": -1.0}, "lr must be a positive number"),
    ({"arch": "topk", "tokens": 0}, "tokens must be a positive integer"),
])
def test_bad_training_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_lr_schedule_warms_up_and_decays():
    assert lr_factor(0.0, 0.05, 0.2) < 0.01
    assert lr_factor(0.5, 0.05, 0.2) == 1.0
    assert lr_factor(0.9, 0.05, 0.2) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.05, 0.2) == 0.0


# ----------------------------------------------------------------------------------------------- resume
def _interrupting(batches, after):
    def gen(tokens_seen):
        for i, b in enumerate(batches(tokens_seen)):
            if i == after:
                raise KeyboardInterrupt
            yield b
    return gen


def _resumable_learner(steps, checkpoint_every):
    """A small TopK learner, the same each time it is made: for runs compared before and after an interruption."""
    torch.manual_seed(0)
    tcfg = TrainConfig(arch="topk", width=128, k=8, tokens=steps * 512, batch_size=512,
                       checkpoint_every=checkpoint_every)
    return Learner("d", DictionaryConfig(d_in=64, d_sae=128, arch="topk", k=8, hook_name="in"), tcfg), tcfg


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path, data):
    x, _ = data

    def learner():
        return _resumable_learner(steps=60, checkpoint_every=10)

    ref, tcfg = learner()
    run_training([ref], iterate_tensors(x, 512, "in"), tcfg, None, progress=False)

    first, tcfg = learner()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C during step 36: checkpoints at 10, 20, 30 were written
        run_training([first], _interrupting(iterate_tensors(x, 512, "in"), 35), tcfg, tmp_path, progress=False)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*.pt"))
    assert ckpts == ["step-00000020.pt", "step-00000030.pt"]  # the last two are kept, none half-written
    assert not list((tmp_path / "checkpoints").glob(".*tmp*"))

    second, tcfg = learner()
    res = run_training([second], iterate_tensors(x, 512, "in"), tcfg, tmp_path, resume=True, progress=False)
    assert res.resumed_from == 30 and res.steps == 60 and res.tokens == 60 * 512
    for a, b in zip(ref.sae.parameters(), second.sae.parameters()):
        assert torch.allclose(a, b, atol=1e-6)  # same result as the uninterrupted run


def test_ctrl_c_finishes_the_step_and_checkpoints_it(tmp_path, data, sigint_default):
    import signal

    x, _ = data

    def learner():
        return _resumable_learner(steps=50, checkpoint_every=1000)

    def sigint_at(batches, at):  # a real SIGINT, as a terminal's Ctrl-C sends, while batch `at` is being fetched
        def gen(tokens_seen):
            for i, b in enumerate(batches(tokens_seen)):
                if i == at:
                    signal.raise_signal(signal.SIGINT)
                yield b
        return gen

    ref, tcfg = learner()
    run_training([ref], iterate_tensors(x, 512, "in"), tcfg, None, progress=False)
    first, tcfg = learner()
    with pytest.raises(KeyboardInterrupt):
        run_training([first], sigint_at(iterate_tensors(x, 512, "in"), 22), tcfg, tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*.pt")] == ["step-00000023.pt"]  # nothing lost
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    second, tcfg = learner()
    res = run_training([second], iterate_tensors(x, 512, "in"), tcfg, tmp_path, resume=True, progress=False)
    assert res.resumed_from == 23 and res.steps == 50
    for a, b in zip(ref.sae.parameters(), second.sae.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_damaged_latest_checkpoint_falls_back(tmp_path, data):
    x, _ = data
    tcfg = TrainConfig(arch="topk", width=64, k=4, tokens=30 * 256, batch_size=256, checkpoint_every=10)
    lrn = Learner("d", DictionaryConfig(d_in=64, d_sae=64, arch="topk", k=4, hook_name="in"), tcfg)
    run_training([lrn], iterate_tensors(x, 256, "in"), tcfg, tmp_path, progress=False, stop_after_steps=25)
    (tmp_path / "checkpoints" / "step-00000020.pt").write_bytes(b"garbage")
    lrn2 = Learner("d", DictionaryConfig(d_in=64, d_sae=64, arch="topk", k=4, hook_name="in"), tcfg)
    with pytest.warns(UserWarning, match="step-00000020.pt: unreadable checkpoint"):
        res = run_training([lrn2], iterate_tensors(x, 256, "in"), tcfg, tmp_path, resume=True, progress=False)
    assert res.resumed_from == 10 and res.steps == 30


def test_resume_refuses_other_settings(tmp_path, data):
    x, _ = data
    tcfg = TrainConfig(arch="topk", width=64, k=4, tokens=20 * 256, batch_size=256, checkpoint_every=5)
    lrn = Learner("d", DictionaryConfig(d_in=64, d_sae=64, arch="topk", k=4, hook_name="in"), tcfg)
    run_training([lrn], iterate_tensors(x, 256, "in"), tcfg, tmp_path, progress=False, stop_after_steps=6)
    other = TrainConfig(arch="topk", width=64, k=8, tokens=20 * 256, batch_size=256)
    lrn2 = Learner("d", DictionaryConfig(d_in=64, d_sae=64, arch="topk", k=8, hook_name="in"), other)
    with pytest.raises(ValueError, match="k: checkpoint 4, now 8"):
        run_training([lrn2], iterate_tensors(x, 256, "in"), other, tmp_path, resume=True, progress=False)


# ----------------------------------------------------------------------------------------------- format
KINDS = {
    "relu": dict(arch="relu"),
    "topk": dict(arch="topk", k=6),
    "jumprelu": dict(arch="jumprelu"),
    "batchtopk": dict(arch="batchtopk", k=6),
    "transcoder_topk": dict(arch="topk", k=6, transcoder=True, hook_name_out="blocks.1.hook_mlp_out"),
    "transcoder_relu_skip": dict(arch="relu", transcoder=True, d_out=20, skip=True, hook_name_out="blocks.1.hook_mlp_out"),
    "transcoder_jumprelu_skip": dict(arch="jumprelu", transcoder=True, skip=True, hook_name_out="blocks.1.hook_mlp_out"),
}
SAELENS_ARCH = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu",
                "transcoder_topk": "topk", "transcoder_relu_skip": "skip_transcoder",
                "transcoder_jumprelu_skip": "jumprelu_skip_transcoder"}


def _random_dictionary(**kw):
    torch.manual_seed(0)
    sae = SparseDictionary(DictionaryConfig(d_in=24, d_sae=48, hook_name="blocks.1.hook_resid_post",
                                            model_name="gemma-3-270m", **kw))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
        if sae.threshold is not None:
            sae.threshold.copy_(torch.rand(48) * 0.3)
    return sae


@pytest.mark.parametrize("kind", list(KINDS))
def test_save_load_round_trip_is_bit_exact(tmp_path, kind):
    sae = _random_dictionary(**KINDS[kind])
    save_dictionary(sae, tmp_path / kind, stats={"note": "hello"})
    cfg = json.loads((tmp_path / kind / "cfg.json").read_text())
    assert cfg["architecture"] == SAELENS_ARCH[kind]
    for key in ("d_in", "d_sae", "dtype", "device", "hook_name", "model_name", "apply_b_dec_to_input",
                "normalize_activations"):
        assert key in cfg
    if cfg["architecture"] == "topk":
        assert cfg["k"] == 6
    back = load_dictionary(tmp_path / kind)
    assert back.cfg == sae.cfg and back.stats == {"note": "hello"}
    for (n1, p1), (n2, p2) in zip(sae.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = torch.randn(10, 24)
    assert torch.equal(sae(x), back(x))
    # without featurelens.json the same dictionary comes back from cfg.json alone (as from a SAELens file)
    (tmp_path / kind / "featurelens.json").unlink()
    plain = load_dictionary(tmp_path / kind)
    assert torch.equal(plain(x), sae(x))
    assert plain.cfg.hook_name_out == sae.cfg.hook_name_out


def test_reads_saelens_6_config(tmp_path):
    sae = _random_dictionary(arch="topk", k=6)
    save_dictionary(sae, tmp_path / "d")
    (tmp_path / "d" / "featurelens.json").unlink()
    (tmp_path / "d" / "cfg.json").write_text(json.dumps({  # what SAELens 6 writes
        "d_in": 24, "d_sae": 48, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none", "k": 6, "rescale_acts_by_decoder_norm": False,
        "architecture": "topk", "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.1.hook_resid_post",
                                             "model_name": "gemma-3-270m"}}))
    back = load_dictionary(tmp_path / "d")
    assert back.cfg.hook_name == "blocks.1.hook_resid_post" and back.cfg.k == 6
    x = torch.randn(4, 24)
    assert torch.equal(back(x), sae(x))


def test_reads_gemma_scope_files(tmp_path):
    import numpy as np
    from safetensors.torch import save_file

    sae = _random_dictionary(arch="jumprelu", apply_b_dec_to_input=False)
    params = {k: p.detach().numpy() for k, p in sae.named_parameters()}
    d = tmp_path / "gemma-scope-2b-pt-res" / "layer_7" / "width_16k" / "average_l0_40"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", **params)
    back = load_dictionary(d)  # the directory, or the file itself
    assert back.cfg.hook_name == "blocks.7.hook_resid_post" and back.cfg.arch == "jumprelu"
    x = torch.randn(4, 24)
    assert torch.allclose(back(x), sae(x))
    # Gemma Scope 2: params.safetensors with lower-case names, a config.json naming HF hook points
    tc = _random_dictionary(arch="jumprelu", transcoder=True, skip=True, hook_name_out="x")
    d2 = tmp_path / "gs2" / "transcoder" / "layer_3_width_16k_l0_small"
    d2.mkdir(parents=True)
    t = {k.lower(): p.detach().contiguous() for k, p in tc.named_parameters() if k != "W_skip"}
    t["affine_skip_connection"] = tc.W_skip.detach().T.contiguous()
    save_file(t, str(d2 / "params.safetensors"))
    (d2 / "config.json").write_text(json.dumps({
        "architecture": "jump_relu", "model_name": "gemma-v3-270m-pt",
        "hf_hook_point_in": "model.layers.3.pre_feedforward_layernorm.output",
        "hf_hook_point_out": "model.layers.3.post_feedforward_layernorm.output", "affine_connection": True}))
    back = load_dictionary(d2)
    assert (back.cfg.hook_name, back.cfg.hook_name_out) == ("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    assert torch.allclose(back(x), tc(x), atol=1e-6)


def test_corrupt_or_missing_files_name_the_file(tmp_path):
    sae = _random_dictionary(arch="topk", k=6)
    path = save_dictionary(sae, tmp_path / "d")
    weights = path / "sae_weights.safetensors"
    good = weights.read_bytes()

    weights.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(CorruptDictionaryError, match="sae_weights.safetensors"):
        load_dictionary(path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="sae_weights.safetensors"):
        load_dictionary(path)
    weights.write_bytes(good)

    meta = (path / "featurelens.json").read_text()
    (path / "featurelens.json").write_text("{not json")
    with pytest.raises(CorruptDictionaryError, match=r"featurelens.json: not valid JSON"):
        load_dictionary(path)
    (path / "featurelens.json").unlink()
    cfg = json.loads((path / "cfg.json").read_text())
    (path / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 99}))
    with pytest.raises(CorruptDictionaryError, match=r"sae_weights.safetensors: W_enc has shape \[24, 48\]"):
        load_dictionary(path)
    (path / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_in"}))
    with pytest.raises(CorruptDictionaryError, match="cfg.json: missing key 'd_in'"):
        load_dictionary(path)
    with pytest.raises(FileNotFoundError, match="no such dictionary"):
        load_dictionary(tmp_path / "nowhere")
    (path / "featurelens.json").write_text(meta)


def test_saves_are_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves the previous dictionary whole and no temporary files."""
    sae = _random_dictionary(arch="topk", k=6)
    path = save_dictionary(sae, tmp_path / "d")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    import safetensors.torch as st

    def crash(*a, **k):
        Path(a[1]).write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", crash)
    other = _random_dictionary(arch="topk", k=6)
    with torch.no_grad():
        other.W_enc.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_dictionary(other, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    monkeypatch.undo()
    assert torch.equal(load_dictionary(path).W_enc, sae.W_enc)


# ----------------------------------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_train_sae_on_gemma_and_ce_loss_recovered(gemma, tmp_path):
    train = fl.load_contexts(gemma, split="train", progress=False)[:48]
    test = fl.load_contexts(gemma, split="test", progress=False)[:16]
    hook = "blocks.4.hook_resid_post"
    # one pass over ~5,900 tokens in small batches with a high rate: a tiny SAE, but a real one
    sae = fl.train_sae(gemma, hook, arch="topk", k=16, width=512, tokens=5800, batch_size=128, lr=5e-3,
                       out=tmp_path / "sae", contexts=train, progress=False)
    assert sae.cfg.d_in == gemma.cfg.d_model and sae.stats["tokens_trained"] >= 5800
    back = fl.load_dictionary(tmp_path / "sae")
    assert back.cfg.hook_name == hook and back.cfg.model_name == gemma.name
    assert not (tmp_path / "sae" / "checkpoints").exists()
    m = fl.evaluate_dictionary(gemma, back, contexts=test, tokens=1500, ce_contexts=2, progress=False)
    print(m.to_dict())
    assert m.eval_tokens == 1500 and m.l0 <= 16
    assert 0.5 < m.explained_variance <= 1
    assert m.ce_clean < m.ce_spliced < m.ce_zero_ablation
    assert 0.5 < m.ce_loss_recovered <= 1.0 and m.kl_div > 0
    with pytest.raises(ValueError, match="already holds a trained dictionary"):
        fl.train_sae(gemma, hook, k=16, width=512, tokens=5800, out=tmp_path / "sae", contexts=train, progress=False)


@pytest.mark.slow
def test_train_transcoders_on_gemma_one_stream(gemma, tmp_path, capsys):
    train = fl.load_contexts(gemma, split="train", progress=False)[:24]
    tset = fl.train_transcoders(gemma, layers=[1, 2], arch="topk", k=8, width=256, tokens=2048, batch_size=512,
                                out=tmp_path / "tc", contexts=train, progress=False)
    assert tset.layers == [1, 2]
    back = fl.load_dictionary(tmp_path / "tc")
    assert isinstance(back, fl.TranscoderSet) and back.layers == [1, 2]
    assert back[2].cfg.hook_name == "blocks.2.ln2.hook_normalized"
    assert back[2].cfg.hook_name_out == "blocks.2.hook_mlp_out"
    assert torch.equal(back[1].W_dec, tset[1].W_dec)
    test = fl.load_contexts(gemma, split="test", progress=False)[:4]
    res = fl.evaluate_dictionary(gemma, back, contexts=test, tokens=400, ce_contexts=1, progress=False)
    assert set(res) == {1, 2, "all"}
    assert res[1].eval_tokens == 400 and res[1].l0 <= 8 and res["all"].ce_spliced > res["all"].ce_clean
    assert res[1].ce_clean == res[2].ce_clean == res["all"].ce_clean  # one clean pass, shared
    from featurelens.cli.train import _report

    _report(res, as_json=False)  # what `featurelens eval` prints: a row per layer, then all spliced together
    rows = [ln.split("│")[1].strip() for ln in capsys.readouterr().out.splitlines() if ln.count("│") > 3]
    assert rows[-3:] == ["1", "2", "all"]


@pytest.mark.slow
def test_bad_hook_and_sizes_on_gemma(gemma, tmp_path):
    with pytest.raises(fl.UnknownHookError, match="did you mean blocks.6.hook_resid_post"):
        fl.train_sae(gemma, "blocks.6.hook_resid_pots", out=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="k=9000 must not exceed the width 8192"):
        fl.train_sae(gemma, "blocks.6.hook_resid_post", k=9000, out=tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="layers must lie in 0..17"):
        fl.train_transcoders(gemma, layers=[3, 18], out=tmp_path / "y", progress=False)


@pytest.mark.slow
def test_ctrl_c_in_train_sae_on_the_corpus_then_train_resume(gemma, tmp_path, monkeypatch, capsys, sigint_default):
    """The real data path: train_sae streams the embedded corpus through the model; a real SIGINT arrives while the
    model computes the activations; `featurelens train --resume` then finishes the same dictionary that an
    uninterrupted run makes."""
    import signal

    from featurelens.cli import main

    hook, steps, batch = "blocks.2.hook_resid_post", 6, 256
    kw = dict(arch="topk", k=8, width=128, tokens=steps * batch, batch_size=batch)
    ref = fl.train_sae(gemma, hook, out=tmp_path / "ref", progress=False, **kw)

    forward_passes = 0

    def ctrl_c(act, hook):  # Ctrl-C as a terminal sends it, in the middle of computing a batch of activations
        nonlocal forward_passes
        forward_passes += 1
        if forward_passes == 1:
            signal.raise_signal(signal.SIGINT)

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with gemma.hooks(fwd_hooks=[(hook, ctrl_c)]):
            fl.train_sae(gemma, hook, out=out, progress=False, **kw)
    assert forward_passes >= 1
    saved = sorted(p.name for p in (out / "checkpoints").glob("step-*.pt"))
    assert len(saved) == 1 and not (out / "cfg.json").exists()  # the finished step was saved, nothing more
    step = int(saved[0][len("step-"):-len(".pt")])
    assert 1 <= step < steps

    monkeypatch.setattr("featurelens.models.loader.load_model", lambda name, **kw: gemma)
    rc = main(["train", "-m", "gemma-3-270m", "--hook", hook, "-k", "8", "--width", "128", "--tokens",
               str(steps * batch), "--batch-tokens", str(batch), "--out", str(out), "--resume"])
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert f"resuming from step-{step:08d}.pt" in printed.out + printed.err
    back = fl.load_dictionary(out)
    for name, a in ref.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], a, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_cli_train_and_eval(gemma, tmp_path, capsys):
    from featurelens.cli import main

    out = tmp_path / "cli-sae"
    rc = main(["train", "-m", "gemma-3-270m", "--hook", "blocks.2.hook_resid_post", "--arch", "topk", "--k", "8",
               "--width", "256", "--tokens", "2_048", "--batch-tokens", "512", "--out", str(out)])
    assert rc == 0 and (out / "cfg.json").is_file()
    assert "explained variance" in capsys.readouterr().out
    rc = main(["eval", str(out), "--tokens", "1000", "--ce-contexts", "1", "--json"])
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("{"):])
    assert rc == 0 and metrics["eval_tokens"] == 1000 and metrics["l0"] <= 8 and "ce_loss_recovered" in metrics
    assert main(["train", "--hook", "blocks.2.hook_resid_post", "--k", "0", "--out", str(tmp_path / "z")]) == 2
    assert "k must be a positive integer" in capsys.readouterr().err

    # several hooks: one SAE each on one pass of the model, in <--out>/<hook>; each the one trained alone
    both = tmp_path / "both"
    rc = main(["train", "-m", "gemma-3-270m", "--hook", "blocks.1.hook_resid_post, blocks.2.hook_resid_post",
               "--arch", "topk", "--k", "8", "--width", "256", "--tokens", "2_048", "--batch-tokens", "512",
               "--out", str(both)])
    printed = capsys.readouterr().out
    assert rc == 0 and sorted(p.name for p in both.iterdir()) == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert printed.count("explained variance") == 2 and f"featurelens eval {both / 'blocks.2.hook_resid_post'}" in printed
    alone, joint = fl.load_dictionary(out), fl.load_dictionary(both / "blocks.2.hook_resid_post")
    for name, a in alone.state_dict().items():
        torch.testing.assert_close(joint.state_dict()[name], a, rtol=1e-5, atol=1e-6, msg=name)
    for bad in ("blocks.1.hook_resid_post,,blocks.2.hook_resid_post", "blocks.1.hook_resid_post,blocks.1.hook_resid_post"):
        assert main(["train", "--hook", bad, "--out", str(tmp_path / "z")]) == 2
        assert "give hook names separated by commas, each once" in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


# ----------------------------------------------------------------------------------------------- splicing
def _splice_dictionary(transcoder: bool = False, skip: bool = False, seed: int = 0) -> SparseDictionary:
    kw = dict(transcoder=True, d_out=12, skip=skip, hook_name="blocks.1.ln2.hook_normalized",
              hook_name_out="blocks.1.hook_mlp_out") if transcoder else dict(hook_name="blocks.1.hook_resid_post")
    d = SparseDictionary(DictionaryConfig(d_in=10, d_sae=32, arch="relu", **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return d


def _run(hooks, acts):
    """Call splice hooks as the engine would (in forward order), on activations {hook: [b, p, n]}."""
    from types import SimpleNamespace

    out = dict(acts)
    for name, fn in hooks:
        r = fn(out[name], SimpleNamespace(name=name, past=0, positions=None))
        if r is not None:
            out[name] = r
    return out


def test_splice_replaces_by_the_reconstruction_where_asked():
    from featurelens.dictionaries import splice_hooks

    d = _splice_dictionary()
    x = torch.randn(2, 5, 10)
    where = torch.ones(2, 5, dtype=torch.bool)
    where[:, 0] = False  # e.g. BOS
    with torch.no_grad():
        y = _run(splice_hooks(d, keep_error=False, where=where), {d.hook_name: x})[d.hook_name]
        torch.testing.assert_close(y[:, 1:], d(x[:, 1:]))
    assert torch.equal(y[:, 0], x[:, 0])
    assert torch.equal(_run(splice_hooks(d, keep_error=True), {d.hook_name: x})[d.hook_name], x)  # nothing to do


@pytest.mark.parametrize("skip", [False, True])
def test_splice_with_an_edit_keeps_the_error_and_reads_a_transcoders_input(skip):
    from featurelens.dictionaries import splice_hooks

    tc = _splice_dictionary(transcoder=True, skip=skip)
    x, y = torch.randn(2, 5, 10), torch.randn(2, 5, 12)

    def edit(f):
        f[..., 3], f[..., 7] = 4.0, 0.0
        return f

    with torch.no_grad():
        f = tc.encode(x)
        f_set = edit(f.clone())
        out = _run(splice_hooks(tc, keep_error=True, edit=edit), {tc.hook_name: x, tc.hook_name_out: y})
        assert torch.equal(out[tc.hook_name], x)  # the input hook is only read
        # error kept: y' - decode(f') == y - decode(f)
        torch.testing.assert_close(out[tc.hook_name_out] - tc.decode(f_set, x), y - tc.decode(f, x))
        alone = _run(splice_hooks(tc, keep_error=False, edit=edit), {tc.hook_name: x, tc.hook_name_out: y})
        torch.testing.assert_close(alone[tc.hook_name_out], tc.decode(f_set, x))
    with pytest.raises(RuntimeError, match="did not run before"):
        _run(splice_hooks(tc, keep_error=False)[1:], {tc.hook_name_out: y})
