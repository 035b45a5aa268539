"""Steering, clamping, ablation, activation and attribution patching on the embedded Gemma 3 270M."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import featurelens as fl

pytestmark = pytest.mark.slow

CLEAN, CORRUPT = "The Eiffel Tower is in", "The Colosseum is in"
PROMPT = CLEAN
HOOK = "blocks.12.hook_resid_post"


class ToyDictionary:
    """A stand-in sparse dictionary: tied unit-norm directions, ReLU encoder (x @ W_dec.T)."""

    def __init__(self, directions: torch.Tensor, hook_name: str, model_name: str = "gemma-3-270m",
                 max_activations: torch.Tensor | None = None):
        self.W_dec = directions / directions.norm(dim=-1, keepdim=True)  # [d_sae, d_in]
        self.b_dec = torch.zeros(directions.shape[1])
        self.cfg = SimpleNamespace(hook_name=hook_name, model_name=model_name, d_sae=directions.shape[0])
        if max_activations is not None:
            self.max_activations = max_activations

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu((x - self.b_dec) @ self.W_dec.T)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec


def promoting_direction(model, token: int) -> torch.Tensor:
    """A direction whose logit lens (through the final norm's weight) promotes `token`."""
    return model.W_U[:, token] * model.net.ln_final.w


@pytest.fixture(scope="module")
def paris(gemma):
    return gemma.to_single_token(" Paris")


@pytest.fixture(scope="module")
def sae(gemma, paris):
    """Feature 0 promotes " Paris"; 15 random features. Stored max activation of feature 0: 200."""
    g = torch.Generator().manual_seed(0)
    dirs = torch.cat([promoting_direction(gemma, paris)[None], torch.randn(15, gemma.cfg.d_model, generator=g)])
    return ToyDictionary(dirs, HOOK, max_activations=torch.cat([torch.tensor([200.0]), torch.full((15,), 10.0)]))


def next_prob(model, prompt: str, token: int) -> float:
    with torch.inference_mode():
        return float(model(prompt)[0, -1].softmax(-1)[token])


# --------------------------------------------------------------------------- steering
def test_feature_logit_lens_promotes_its_token(gemma, sae, paris):
    lens = (sae.W_dec[0] * gemma.net.ln_final.w) @ gemma.W_U
    assert paris in lens.topk(10).indices.tolist()


def test_steering_raises_and_ablation_lowers_next_token_probability(gemma, sae, paris):
    p0 = next_prob(gemma, PROMPT, paris)
    with fl.steer(gemma, sae, {0: 20.0}):  # relative: 20 x the stored max activation 200 along the direction
        p_steer = next_prob(gemma, PROMPT, paris)
    with fl.steer(gemma, [fl.Ablate(sae, 0)]):
        p_ablate = next_prob(gemma, PROMPT, paris)
    print(f"P(' Paris'): default {p0:.4f}, steered {p_steer:.4f}, ablated {p_ablate:.6f}")
    assert 0.02 < p0 < 0.5
    assert p_steer > p0 + 0.2 and p_steer > 2 * p0
    assert p_ablate < p0 / 10
    with fl.steer(gemma, sae, {0: -20.0}):  # a negative strength suppresses
        assert next_prob(gemma, PROMPT, paris) < p0 / 10
    assert next_prob(gemma, PROMPT, paris) == pytest.approx(p0, rel=1e-5)  # hooks are gone after the block


def test_relative_and_absolute_strength(sae):
    rel = fl.Steer(sae, 0, 2.0)
    assert rel.mode == "relative" and rel.coefficient == pytest.approx(400.0)
    ab = fl.Steer(sae, 0, 2.0, mode="absolute")
    assert ab.mode == "absolute" and ab.coefficient == pytest.approx(2.0)
    assert fl.Steer(sae, 0, 2.0, max_activation=7.0).coefficient == pytest.approx(14.0)
    bare = ToyDictionary(sae.W_dec.clone(), HOOK)  # no stored statistics
    with pytest.warns(UserWarning, match="no known maximum activation"):
        fallback = fl.Steer(bare, 0, 3.0)
    assert fallback.mode == "absolute" and fallback.coefficient == pytest.approx(3.0) and "absolute" in fallback.note


def test_clamp_keeps_the_reconstruction_error(gemma, sae):
    with torch.inference_mode():
        _, cache = gemma.run_with_cache(PROMPT, names_filter=HOOK, stop_at_layer=13)
        with fl.steer(gemma, [fl.Clamp(sae, {3: 50.0, 5: 0.0})]):  # both from one encoding
            _, clamped = gemma.run_with_cache(PROMPT, names_filter=HOOK, stop_at_layer=13)
    x, y = cache[HOOK][0], clamped[HOOK][0]
    f = sae.encode(x)
    f_set = f.clone()
    f_set[:, 3], f_set[:, 5] = 50.0, 0.0
    err_before = x - sae.decode(f)
    err_after = y - sae.decode(f_set)
    torch.testing.assert_close(err_after, err_before, atol=1e-2, rtol=1e-5)  # activations are ~1e4 in size
    with torch.inference_mode(), fl.steer(gemma, [fl.Clamp(sae, 3, 50.0)]):
        _, single = gemma.run_with_cache(PROMPT, names_filter=HOOK, stop_at_layer=13)
    # With a tied unit-norm encoder a single clamped feature reads back exactly where it was active (where it
    # was not, the ReLU hid a negative pre-activation that the encoder sees again); two non-orthogonal ones would not.
    active = f[:, 3] > 0
    assert 0 < int(active.sum())
    read = sae.encode(single[HOOK][0])[:, 3]
    assert read[active].tolist() == pytest.approx([50.0] * int(active.sum()), abs=1e-2)


def test_generation_interventions_and_positions(gemma, sae, paris):
    kw = dict(max_new_tokens=3, temperature=0.0, return_new_only=True)
    default = gemma.generate(PROMPT, **kw)
    steered = gemma.generate(PROMPT, interventions=[fl.Steer(sae, 0, 60.0)], **kw)
    assert steered.startswith(" Paris") and steered.count("Paris") >= 2 and steered != default
    with fl.steer(gemma, sae, {0: 60.0}, positions="generated"):
        late = gemma.generate(PROMPT, **kw)
    # the first new token is predicted at the prompt's last position, which "generated" leaves alone
    first_default = gemma.to_str_tokens(default, prepend_bos=False)[0]
    assert late.startswith(first_default) and "Paris" in late[len(first_default):]
    assert gemma.generate(PROMPT, interventions=[fl.Steer(sae, 0, 60.0, positions="prompt")], **kw).startswith(" Paris")
    # explicit token positions: only the last prompt position matters for the next token
    last = gemma.to_tokens(PROMPT).shape[1] - 1
    p0 = next_prob(gemma, PROMPT, paris)
    with fl.steer(gemma, sae, {0: 20.0}, positions=[last]):
        assert next_prob(gemma, PROMPT, paris) > p0 + 0.2
    with fl.steer(gemma, sae, {0: 20.0}, positions=[1]):
        assert abs(next_prob(gemma, PROMPT, paris) - p0) < 0.1
    batch = gemma.generate([PROMPT, "Hello"], interventions=[fl.Steer(sae, 0, 60.0)], **kw)  # left-padded batch
    assert all(text.startswith(" Paris") for text in batch)


def test_steering_can_leave_bos_alone(gemma, sae):
    """steer_bos=False leaves BOS (the attention sink) unsteered wherever padding puts it; the default steers it."""
    rows = [gemma.encode(PROMPT), gemma.encode("Hello")]
    tokens, mask = gemma.pad(rows, "left")
    bos = tokens == gemma.cfg.bos_token_id  # [2, p]: BOS sits at a different index in each row
    assert bos.sum() == 2 and not bool(bos[:, 0].all())
    deltas = {}
    for steer_bos in (False, True):
        with torch.inference_mode():
            _, clean = gemma.run_with_cache(tokens, attention_mask=mask, names_filter=HOOK)
            with fl.steer(gemma, sae, {0: 5.0}, steer_bos=steer_bos):
                _, steered = gemma.run_with_cache(tokens, attention_mask=mask, names_filter=HOOK)
        deltas[steer_bos] = (steered[HOOK] - clean[HOOK]).float().norm(dim=-1)  # [2, p]
    real = mask.bool() & ~bos
    assert bool((deltas[False][bos] == 0).all()) and bool((deltas[False][real] > 0).all())
    assert bool((deltas[True][bos] > 0).all())
    assert fl.Steer(sae, 0, 1.0).steer_bos and "steer_bos=False" in repr(fl.Steer(sae, 0, 1.0, steer_bos=False))


def test_compare_generations_is_reproducible(gemma, sae):
    a = fl.compare_generations(gemma, "I think the weather today is", [fl.Steer(sae, 0, 40.0)], max_new_tokens=5, seed=3)
    b = fl.compare_generations(gemma, "I think the weather today is", [fl.Steer(sae, 0, 40.0)], max_new_tokens=5, seed=3)
    assert a.to_dict() == b.to_dict()
    assert a.default != a.steered and "Paris" in a.steered
    assert "default:" in str(a) and "steered:" in str(a)


def test_steering_vector_is_a_difference_of_means(gemma, paris):
    hook = ("resid_post", 10)
    a, b = ["I love Paris", "Paris in the spring"], ["I love Rome", "Rome in the spring"]
    vec = fl.steering_vector(gemma, a, b, hook, reduce="last")
    assert vec.hook_name == "blocks.10.hook_resid_post" and vec.vector.shape == (gemma.cfg.d_model,)
    with torch.inference_mode():
        acts = [gemma.run_with_cache(p, names_filter=vec.hook_name, stop_at_layer=11)[1][vec.hook_name][0, -1]
                for p in a + b]
    torch.testing.assert_close(vec.vector, (acts[0] + acts[1]) / 2 - (acts[2] + acts[3]) / 2, atol=1e-2, rtol=1e-4)
    mean_vec = fl.steering_vector(gemma, a, b, hook)  # mean over positions (BOS left out)
    assert mean_vec.vector.shape == vec.vector.shape and not torch.allclose(mean_vec.vector, vec.vector)
    p0 = next_prob(gemma, "My favourite city is", paris)
    with fl.steer(gemma, vec, 2.0):
        assert next_prob(gemma, "My favourite city is", paris) > p0


# --------------------------------------------------------------------------- the real SparseDictionary
@pytest.fixture(scope="module")
def real_sae(sae):
    import featurelens.dictionaries as dicts
    cfg = dicts.DictionaryConfig(d_in=640, d_sae=16, arch="relu", hook_name=HOOK, model_name="gemma-3-270m")
    real = dicts.SparseDictionary(cfg)
    with torch.no_grad():
        real.W_dec.copy_(sae.W_dec)
        real.W_enc.copy_(sae.W_dec.T)
        real.b_enc.zero_()
        real.b_dec.zero_()
    return real


def test_real_dictionary_steers_like_the_stand_in(gemma, sae, real_sae, paris):
    for make in (lambda d: fl.Steer(d, 0, 4000.0, mode="absolute"), lambda d: fl.Ablate(d, 0)):
        with fl.steer(gemma, [make(sae)]):
            want = next_prob(gemma, PROMPT, paris)
        with fl.steer(gemma, [make(real_sae)]):
            assert next_prob(gemma, PROMPT, paris) == pytest.approx(want, rel=1e-3, abs=1e-6)


def test_transcoder_clamp_reads_input_and_writes_output(gemma):
    import featurelens.dictionaries as dicts
    read, write = "blocks.5.ln2.hook_normalized", "blocks.5.hook_mlp_out"
    cfg = dicts.DictionaryConfig(d_in=640, d_sae=8, arch="relu", transcoder=True, hook_name=read,
                                 hook_name_out=write, model_name="gemma-3-270m")
    tc = dicts.SparseDictionary(cfg)
    with torch.no_grad():
        tc.b_enc.fill_(0.5)  # some features fire
    with torch.inference_mode():
        _, base = gemma.run_with_cache(PROMPT, names_filter=[read, write], stop_at_layer=6)
        with fl.steer(gemma, [fl.Clamp(tc, 2, 5.0), fl.Steer(tc, 1, 3.0, mode="absolute")]):
            _, moved = gemma.run_with_cache(PROMPT, names_filter=[read, write], stop_at_layer=6)
        f2 = tc.encode(base[read])[..., 2]
    torch.testing.assert_close(moved[read], base[read])  # the input hook is only read
    expect = base[write] + (5.0 - f2)[..., None] * tc.W_dec[2] + 3.0 * tc.W_dec[1]
    torch.testing.assert_close(moved[write], expect.detach(), atol=1e-3, rtol=1e-4)


# --------------------------------------------------------------------------- patching
@pytest.fixture(scope="module")
def resid_grids(gemma):
    metric = fl.logit_diff(" Paris", " Rome")
    exact = fl.activation_patching(gemma, CLEAN, CORRUPT, metric, hook="resid_pre", batch_size=54)
    approx = fl.attribution_patching(gemma, CLEAN, CORRUPT, metric, hook="resid_pre")
    return exact, approx


def logit_diffs(model):
    p, r = model.to_single_token(" Paris"), model.to_single_token(" Rome")
    with torch.inference_mode():
        return [float(lg[0, -1, p] - lg[0, -1, r]) for lg in (model(CLEAN), model(CORRUPT))]


def test_patching_final_residual_recovers_the_full_logit_difference(gemma):
    clean_ld, corrupt_ld = logit_diffs(gemma)
    assert clean_ld > 0 > corrupt_ld
    last = gemma.cfg.n_layers - 1
    grid = fl.activation_patching(gemma, CLEAN, CORRUPT, fl.logit_diff(" Paris", " Rome"), hook="resid_post", layers=[last])
    print(f"clean {clean_ld:.4f}, corrupt {corrupt_ld:.4f}, patched resid_post L{last} last pos {float(grid[0, -1]):.4f}")
    assert grid[0, -1] == pytest.approx(clean_ld, abs=1e-3)
    torch.testing.assert_close(grid[0, :-1], torch.full((grid.shape[1] - 1,), corrupt_ld), atol=1e-3, rtol=0)
    # (normalize=True is checked through the command line test below)


def test_resid_pre_grid_and_attribution_correlation(gemma, resid_grids):
    exact, approx = resid_grids
    clean_ld, corrupt_ld = logit_diffs(gemma)
    n_pos = gemma.to_tokens(CLEAN).shape[1]
    assert exact.shape == approx.shape == (gemma.cfg.n_layers, n_pos)
    # positions before the first differing token carry identical activations: patching them changes nothing
    torch.testing.assert_close(exact[:, :2], torch.full_like(exact[:, :2], corrupt_ld), atol=1e-3, rtol=0)
    torch.testing.assert_close(approx[:, :2], torch.full_like(approx[:, :2], corrupt_ld), atol=1e-3, rtol=0)
    # the last layer's resid_pre at the last position gets most but not all back (its attention reads the corrupt tokens)
    recovered = (float(exact[-1, -1]) - corrupt_ld) / (clean_ld - corrupt_ld)
    assert 0.9 < recovered < 1.0 + 1e-3
    # The comparison is over the cells where the prompts' activations differ: elsewhere both methods give the corrupt
    # value exactly, and those free agreements would inflate the correlation.
    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(gemma.cfg.n_layers)]
    with torch.inference_mode():
        caches = [gemma.run_with_cache(p, names_filter=names)[1] for p in (CLEAN, CORRUPT)]
    differ = torch.stack([(caches[0][n][0] - caches[1][n][0]).norm(dim=-1) > 1e-4 for n in names])  # [layers, pos]
    assert not differ[:, :2].any() and differ[:, 2:].any(0).all()  # before the first differing token: identical
    assert int(differ.sum()) >= exact.numel() // 2
    r = float(torch.corrcoef(torch.stack([exact[differ], approx[differ]]))[0, 1])
    print(f"attribution vs activation patching (resid_pre, {int(differ.sum())} cells where the prompts differ): "
          f"Pearson r = {r:.3f}")
    assert r > 0.8


def test_batched_patching_matches_a_single_hooked_run(gemma, resid_grids):
    exact, _ = resid_grids
    layer, pos = 5, 3
    name = f"blocks.{layer}.hook_resid_pre"
    p, r = gemma.to_single_token(" Paris"), gemma.to_single_token(" Rome")
    with torch.inference_mode():
        _, cache = gemma.run_with_cache(CLEAN, names_filter=name, stop_at_layer=layer + 1)

        def patch(x, hook):
            x = x.clone()
            x[:, pos] = cache[name][:, pos]
            return x

        lg = gemma.run_with_hooks(CORRUPT, fwd_hooks=[(name, patch)])
    assert exact[layer, pos] == pytest.approx(float(lg[0, -1, p] - lg[0, -1, r]), abs=1e-3)


def test_head_patching(gemma):
    metric = fl.logit_diff(" Paris", " Rome")
    exact = fl.activation_patching(gemma, CLEAN, CORRUPT, metric, hook="z", layers=[17], batch_size=3)  # 2 batches
    approx = fl.attribution_patching(gemma, CLEAN, CORRUPT, metric, hook="z", layers=[17])
    assert exact.shape == approx.shape == (1, gemma.cfg.n_heads)
    name, head = "blocks.17.attn.hook_z", 2
    p, r = gemma.to_single_token(" Paris"), gemma.to_single_token(" Rome")
    with torch.inference_mode():
        _, cache = gemma.run_with_cache(CLEAN, names_filter=name)

        def patch(x, hook):
            x = x.clone()
            x[:, :, head] = cache[name][:, :, head]
            return x

        lg = gemma.run_with_hooks(CORRUPT, fwd_hooks=[(name, patch)])
    assert exact[0, head] == pytest.approx(float(lg[0, -1, p] - lg[0, -1, r]), abs=1e-3)
    torch.testing.assert_close(approx, exact, atol=0.5, rtol=0)  # heads near the output are close to linear


def test_answer_prob_metric_and_heatmap_files(gemma, tmp_path):
    grid = fl.activation_patching(gemma, CLEAN, CORRUPT, fl.answer_prob(" Paris"), hook="mlp_out", layers=[17])
    assert grid.shape == (1, 6) and bool(((grid >= 0) & (grid <= 1)).all())
    # any function of the logits works as a metric (it sees all positions' logits)
    paris, rome = gemma.to_single_token(" Paris"), gemma.to_single_token(" Rome")
    custom = fl.activation_patching(gemma, CLEAN, CORRUPT, lambda lg: lg[:, -1, paris] - lg[:, -1, rome],
                                    hook="resid_post", layers=[17])
    builtin = fl.activation_patching(gemma, CLEAN, CORRUPT, fl.logit_diff(paris, rome), hook="resid_post", layers=[17])
    torch.testing.assert_close(custom, builtin, atol=1e-3, rtol=1e-5)
    paths = fl.save_heatmap(grid, tmp_path / "h", row_labels=["L17"], title="t")
    assert paths["png"].stat().st_size > 0 and paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text())["values"] == grid.tolist()


# --------------------------------------------------------------------------- bad input
def test_bad_inputs(gemma, sae):
    with pytest.raises(TypeError, match="strength must be a number"):
        fl.Steer(sae, 0, "lots")
    with pytest.raises(TypeError, match="clamp value must be a number"):
        fl.Clamp(sae, 0, None)
    with pytest.raises(IndexError, match="out of range.*16 features"):
        fl.Steer(sae, 16, 1.0)
    with pytest.raises(IndexError, match="out of range"):
        fl.Ablate(sae, -1)
    with pytest.raises(fl.FeatureIndexError, match="a feature index is an integer, got 'seven'"):
        fl.Steer(sae, "seven", 1.0)
    assert fl.Steer(sae, "3", 1.0).feature == 3  # as typed on a command line
    assert fl.Ablate(sae, torch.tensor(5)).feature == 5
    with pytest.raises(ValueError, match="positions"):
        fl.Steer(sae, 0, 1.0, positions="middle")
    other_model = ToyDictionary(sae.W_dec.clone(), HOOK, model_name="smollm2-135m")
    with pytest.raises(ValueError, match="made for model 'smollm2-135m'"):
        gemma.generate(PROMPT, max_new_tokens=1, interventions=[fl.Ablate(other_model, 0)])
    with pytest.raises(fl.UnknownHookError):
        with fl.steer(gemma, ToyDictionary(sae.W_dec.clone(), "blocks.40.hook_resid_post"), {0: 1.0},
                      mode="absolute"):
            pass
    with pytest.raises(ValueError, match="writes to blocks.12.hook_resid_post"):
        fl.Steer(sae, 0, 1.0, hook="blocks.3.hook_resid_post")
    wrong_width = ToyDictionary(torch.randn(4, 640), "blocks.3.attn.hook_z")  # z is 4 heads x 256 = 1024 wide
    with pytest.raises(ValueError, match="width 640.*width 1024"):
        with fl.steer(gemma, wrong_width, {0: 1.0}, mode="absolute"):
            gemma("Hi")
    with pytest.raises(ValueError, match=r"same number of tokens(.|\n)*'osseum'(.|\n)*' Louvre'"):
        fl.activation_patching(gemma, "The Colosseum is in", "The Louvre is in", fl.logit_diff(" Paris", " Rome"))
    with pytest.raises(ValueError, match="cannot patch hook"):
        fl.attribution_patching(gemma, CLEAN, CORRUPT, fl.logit_diff(" Paris", " Rome"), hook="resid_sideways")
    with pytest.raises(ValueError, match="not one"):
        fl.activation_patching(gemma, CLEAN, CORRUPT, fl.answer_prob(" Parisian Eiffel"), layers=[0])


# --------------------------------------------------------------------------- command line
def test_cli_patch_writes_png_and_json(gemma, tmp_path, monkeypatch, capsys):
    from featurelens.cli import main

    monkeypatch.setattr("featurelens.models.loader.load_model", lambda name, **kw: gemma)
    out = tmp_path / "patch"
    rc = main(["patch", "--clean", CLEAN, "--corrupt", CORRUPT, "--answer", " Paris", "--wrong", " Rome",
               "--site", "resid_post", "--layers", "17", "--out", str(out)])  # normalized by default
    assert rc == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["values"][0][-1] == pytest.approx(1.0, abs=1e-4) and data["rows"] == ["L17"]
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    rc = main(["patch", "--clean", "The Colosseum is in", "--corrupt", "The Louvre is in", "--answer", " Paris",
               "--out", str(out)])
    assert rc == 2 and "same number of tokens" in capsys.readouterr().err


def test_cli_steer_end_to_end(gemma, real_sae, tmp_path, monkeypatch, capsys):
    from featurelens.cli import main
    from featurelens.dictionaries import save_dictionary

    monkeypatch.setattr("featurelens.models.loader.load_model", lambda name, **kw: gemma)
    path = save_dictionary(real_sae, tmp_path / "sae", stats={"max_activation": [200.0] + [10.0] * 15})
    rc = main(["steer", str(path), PROMPT, "--feature", "0:+20", "--ablate", "3", "--max-new-tokens", "3",
               "--temperature", "0", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["steered"].startswith(" Paris") and out["default"] != out["steered"]
    assert "x max act 200" in out["interventions"][0]
    assert main(["steer", str(path), PROMPT, "--feature", "99:+2"]) == 2
    assert "feature 99 is out of range" in capsys.readouterr().err
    real_sae.cfg.model_name = "smollm2-135m"
    try:
        other = save_dictionary(real_sae, tmp_path / "other")
    finally:
        real_sae.cfg.model_name = "gemma-3-270m"
    assert main(["steer", str(other), PROMPT, "--feature", "0:+2", "--mode", "absolute"]) == 2
    assert "made for model 'smollm2-135m'" in capsys.readouterr().err


def test_strength_sweep_moves_the_output_and_measures_fluency(gemma, real_sae, tmp_path, monkeypatch, capsys):
    from featurelens.cli import main
    from featurelens.dictionaries import save_dictionary

    rows = fl.sweep_strengths(gemma, real_sae, {0: 4000.0}, PROMPT, [0, 1], mode="absolute", max_new_tokens=3,
                              temperature=0)
    assert [r.strength for r in rows] == [0.0, 1.0]
    assert rows[0].text == gemma.generate(PROMPT, max_new_tokens=3, temperature=0, return_new_only=True)
    assert rows[1].text.startswith(" Paris") and rows[0].text != rows[1].text
    # perplexity under the unsteered model: the unsteered greedy text is the model's own best guess
    assert all(r.perplexity >= 1 for r in rows) and rows[0].perplexity < rows[1].perplexity
    assert fl.continuation_perplexities(gemma, [PROMPT], [rows[0].text])[0] == pytest.approx(rows[0].perplexity, rel=1e-4)
    from featurelens.engine.errors import InputError

    with pytest.raises(InputError):
        fl.sweep_strengths(gemma, real_sae, 0, PROMPT, [])

    monkeypatch.setattr("featurelens.models.loader.load_model", lambda name, **kw: gemma)
    path = save_dictionary(real_sae, tmp_path / "sae")
    assert main(["steer", str(path), PROMPT, "--feature", "0:4000", "--mode", "absolute", "--sweep", "0,1",
                 "--max-new-tokens", "3", "--temperature", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in out["rows"]] == [r.text for r in rows]
    assert main(["steer", str(path), PROMPT, "--feature", "0:1", "--sweep", "a,b"]) == 2
    assert "comma-separated numbers" in capsys.readouterr().err
    assert main(["steer", str(path), PROMPT, "--ablate", "1", "--sweep", "1"]) == 2
    assert "--sweep" in capsys.readouterr().err
