"""Hermetic exactness tests: a tiny random `transformers` model of every supported family, converted with
`featurelens.from_transformers`, must give the same logits, activations, padded logits and greedy generations.

Nothing is downloaded: every model is built from a config here with random (deliberately non-trivial) weights,
so a wrong norm offset, bias, rope base, window, scale or cap shows up as a logit difference.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

import featurelens as fl  # noqa: E402
from featurelens.engine.generate import generate_tokens  # noqa: E402
from featurelens.engine.hooks import BLOCK_HOOKS  # noqa: E402
from builders import (  # noqa: E402  the tiny configs of every family, shared with other tests
    BATCH, FAMILIES, SEQ, VOCAB, WINDOW, _LLAMA_COMMON, _build, _gemma, _gemma2, _gemma3, _gpt2, _llama, _llama3_untied, _qwen2, _qwen2_sliding, _qwen3, _randomize, _tokens,
)

TOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request) -> tuple[str, Any, fl.HookedTransformer]:
    """(family, HF model, our model) on the same random weights."""
    return _build(request.param)


def _hf_logits(hf: Any, tokens: torch.Tensor, **kw: Any) -> Any:
    with torch.no_grad():
        return hf(input_ids=tokens, use_cache=False, **kw)


# --------------------------------------------------------------------------- exactness against transformers


def test_config_is_what_the_family_needs(pair):
    family, hf, ours = pair
    cfg = ours.cfg
    if family in ("gemma2", "gemma3_text", "qwen2_sliding"):
        assert "sliding" in cfg.layer_types and "global" in cfg.layer_types and cfg.sliding_window == WINDOW
    if family != "gpt2":
        assert cfg.n_kv_heads < cfg.n_heads  # GQA / MQA really exercised
    if family == "llama3_untied":
        assert not cfg.tied_embeddings and not torch.equal(ours.net.W_U, ours.net.W_E)
    if family in ("gemma", "qwen3"):
        assert cfg.d_head * cfg.n_heads != cfg.d_model


def test_logits_match_transformers(pair):
    family, hf, ours = pair
    tokens = _tokens()
    expected = _hf_logits(hf, tokens).logits
    got = ours(tokens)
    assert got.shape == expected.shape == (BATCH, SEQ, VOCAB)
    assert expected.abs().max() > 1.0  # the test would be vacuous on near-zero logits
    diff = (got - expected).abs().max().item()
    assert diff < TOL, f"{family}: max abs logit diff {diff:.2e}"


def test_gemma2_softcaps_bind():
    _, _, ours = _build("gemma2")
    tokens = _tokens()
    logits = ours(tokens)
    assert logits.abs().max() > 0.8 * ours.cfg.final_softcap  # the final cap is reached, not idle
    _, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("attn.hook_attn_scores"))
    finite = [s[torch.isfinite(s)] for s in cache.values()]
    assert max(s.abs().max().item() for s in finite) > 0.8 * ours.cfg.attn_softcap


# --------------------------------------------------------------------------- run_with_cache


def _expected_shape(name: str, cfg: fl.ModelConfig, b: int, p: int) -> tuple[int, ...]:
    site = name.split(".", 2)[2] if name.startswith("blocks.") else name
    D, h, kv, d, M = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp
    if site.endswith("hook_scale"):
        return (b, p, 1)
    return {
        "attn.hook_q": (b, p, h, d), "attn.hook_rot_q": (b, p, h, d), "attn.hook_z": (b, p, h, d),
        "attn.hook_k": (b, p, kv, d), "attn.hook_v": (b, p, kv, d), "attn.hook_rot_k": (b, p, kv, d),
        "attn.hook_attn_scores": (b, h, p, p), "attn.hook_pattern": (b, h, p, p),
        "mlp.hook_pre": (b, p, M), "mlp.hook_pre_linear": (b, p, M), "mlp.hook_post": (b, p, M),
    }.get(site, (b, p, D))


def test_run_with_cache_every_hook(pair):
    family, hf, ours = pair
    cfg = ours.cfg
    tokens = _tokens(seed=1)
    logits, cache = ours.run_with_cache(tokens)

    # every documented site of every layer is there
    gemma_post = cfg.post_attn_norm
    for layer in range(cfg.n_layers):
        for site in BLOCK_HOOKS:
            present = f"blocks.{layer}.{site}" in cache
            optional = (site.startswith(("ln1_post", "ln2_post")) and not gemma_post) or (
                site == "mlp.hook_pre_linear" and not cfg.gated_mlp)
            assert present != optional, f"{family}: blocks.{layer}.{site} present={present}"
    assert ("hook_pos_embed" in cache) == (cfg.positional == "learned")
    assert set(cache) == set(ours.hook_names)
    for name, act in cache.items():
        assert tuple(act.shape) == _expected_shape(name, cfg, BATCH, SEQ), name

    # caching every hook (which takes the explicit norm and attention paths) changes nothing
    assert (logits - ours(tokens)).abs().max() < TOL

    # activations agree with transformers' hidden states and attention weights
    out = _hf_logits(hf, tokens, output_hidden_states=True, output_attentions=True)
    hs = out.hidden_states
    assert len(hs) == cfg.n_layers + 1
    assert (cache["resid_pre", 0] - hs[0]).abs().max() < TOL
    for layer in range(cfg.n_layers - 1):  # HF's last entry has the final norm applied
        diff = (cache["resid_post", layer] - hs[layer + 1]).abs().max() / hs[layer + 1].abs().max()
        assert diff < TOL, f"{family}: resid_post {layer} rel diff {diff:.2e}"
    for layer in range(cfg.n_layers):
        pattern = cache["pattern", layer]
        assert (pattern - out.attentions[layer]).abs().max() < TOL, f"{family}: pattern {layer}"
        assert torch.allclose(pattern.sum(-1), torch.ones(()), atol=1e-5)
        q, k = torch.arange(SEQ)[:, None], torch.arange(SEQ)[None, :]
        allowed = k <= q
        if cfg.layer_types[layer] == "sliding":
            allowed &= q - k < cfg.sliding_window
        assert (pattern[..., ~allowed] == 0).all()


def test_hook_spec_matches_what_the_forward_pass_produces(pair):
    """The hook-spec table (shape, width, per-token, stop layer) against the real activations of every hook."""
    family, hf, ours = pair
    tokens = _tokens(seed=1)
    _, cache = ours.run_with_cache(tokens)
    assert set(cache) == set(ours.hook_names)
    for name, act in cache.items():
        spec = ours.hook_spec(name)
        assert spec.name == name and spec.width == math.prod(spec.shape)
        if spec.per_token:
            assert tuple(act.shape) == (BATCH, SEQ, *spec.shape), name
        else:
            assert name.endswith(("hook_pattern", "hook_attn_scores"))
            assert tuple(act.shape) == (BATCH, *spec.shape, SEQ, SEQ), name
        if spec.stop_layer is None:  # needs the whole model
            assert name.startswith("ln_final.")
            continue
        fired: list[str] = []
        record = [(name, lambda x, hook: fired.append(hook.name))]
        short = tokens[:1, :6]
        ours.run_with_hooks(short, fwd_hooks=record, stop_at_layer=spec.stop_layer)
        assert fired == [name], f"{name}: not produced by {spec.stop_layer} blocks"
        if spec.stop_layer > 0:
            fired.clear()
            ours.run_with_hooks(short, fwd_hooks=record, stop_at_layer=spec.stop_layer - 1)
            assert fired == [], f"{name}: produced by fewer than {spec.stop_layer} blocks"
    assert ours.hook_spec(("z", 0)) == ours.hook_spec("blocks.0.attn.hook_z")
    with pytest.raises(fl.UnknownHookError, match="did you mean"):
        ours.hook_spec("blocks.0.hook_resid_psot")


def test_weight_views_reproduce_the_hooked_activations(pair):
    """TransformerLens-layout views of the fused weights: a manual attention and MLP from them give the cached
    q, k, v, scores, z, attention output and MLP activations."""
    family, hf, ours = pair
    cfg = ours.cfg
    L_, h, kv, d, D, M = cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_model, cfg.d_mlp
    assert ours.W_Q.shape == (L_, h, D, d) and ours.W_K.shape == ours.W_V.shape == (L_, kv, D, d)
    assert ours.W_O.shape == (L_, h, d, D) and ours.b_Q.shape == (L_, h, d) and ours.b_O.shape == (L_, D)
    assert ours.W_in.shape == (L_, D, M) and ours.W_out.shape == (L_, M, D)
    assert ours.blocks is ours.net.blocks and len(ours.blocks) == L_
    tokens = _tokens(seed=13)
    _, c = ours.run_with_cache(tokens)
    close = lambda a, b, what: torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=f"{family}: {what}")  # noqa: E731
    for L in range(L_):
        x = c[f"blocks.{L}.ln1.hook_normalized"]  # [b, p, D]
        for W, b, site in ((ours.W_Q, ours.b_Q, "q"), (ours.W_K, ours.b_K, "k"), (ours.W_V, ours.b_V, "v")):
            close(torch.einsum("bpD,hDd->bphd", x, W[L]) + b[L], c[site, L], f"hook_{site} {L}")
        group = h // kv
        rot_k = c["rot_k", L].repeat_interleave(group, dim=2)  # [b, p, h, d]
        scores = torch.einsum("bqhd,bkhd->bhqk", c["rot_q", L], rot_k) * cfg.q_scale
        if cfg.attn_softcap is not None:
            scores = torch.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
        finite = torch.isfinite(c["attn_scores", L])
        close(scores[finite], c["attn_scores", L][finite], f"scores {L}")
        v = c["v", L].repeat_interleave(group, dim=2)
        close(torch.einsum("bhqk,bkhd->bqhd", c["pattern", L], v), c["z", L], f"z {L}")
        out = torch.einsum("bphd,hdD->bpD", c["z", L], ours.W_O[L]) + ours.b_O[L]
        if cfg.post_attn_norm:  # Gemma 2/3: hook_attn_out is after the post-attention RMSNorm
            out = out * c[f"blocks.{L}.ln1_post.hook_scale"] * ours.blocks[L].ln1_post.w
        close(out, c["attn_out", L], f"attn_out {L}")
        x2 = c[f"blocks.{L}.ln2.hook_normalized"]
        if cfg.gated_mlp:
            close(x2 @ ours.W_gate[L] + ours.b_gate[L], c["pre", L], f"mlp gate {L}")
            close(x2 @ ours.W_in[L] + ours.b_in[L], c["pre_linear", L], f"mlp up {L}")
        else:
            close(x2 @ ours.W_in[L] + ours.b_in[L], c["pre", L], f"mlp in {L}")
        mlp_out = c["post", L] @ ours.W_out[L] + ours.b_out[L]
        if not cfg.post_mlp_norm:
            close(mlp_out, c["mlp_out", L], f"mlp_out {L}")


def test_unembed_pad_and_as_tokens(pair):
    family, hf, ours = pair
    tokens = _tokens(seed=14)
    logits = ours(tokens)
    resid = ours(tokens, stop_at_layer=ours.cfg.n_layers)
    torch.testing.assert_close(ours.unembed(resid), logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.unembed(resid[0, 3]), logits[0, 3], atol=1e-5, rtol=1e-5)  # any leading shape
    seen = []
    zeroed = ours.unembed(resid, fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: seen.append(x.shape) or 0 * x)])
    assert seen == [resid.shape] and zeroed.abs().max() == 0  # its hook is the unembedding's input
    with pytest.raises(fl.errors.InputError, match="residual stream"):
        ours.unembed(logits)

    pad = ours.cfg.pad_token_id if ours.cfg.pad_token_id is not None else 0
    padded, mask = ours.pad([[5, 6, 7], [8]], side="left")
    assert padded.tolist() == [[5, 6, 7], [pad, pad, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    padded, mask = ours.pad([[5, 6, 7], [8]])
    assert padded.tolist() == [[5, 6, 7], [8, pad, pad]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(fl.errors.InputError, match="side"):
        ours.pad([[5]], side="middle")
    with pytest.raises(fl.EmptyPromptError):
        ours.pad([[5], []])
    assert torch.equal(ours.as_tokens(tokens[0]), tokens[:1])
    with pytest.raises(fl.errors.InputError, match="token ids must lie"):
        ours.as_tokens(torch.tensor([[1, VOCAB]]))
    with pytest.raises(fl.errors.InputError, match="no tokenizer"):
        ours.as_tokens("text")


def test_hook_embed_is_before_the_embedding_scale(pair):
    """hook_embed holds rows of W_E; Gemma's sqrt(d_model) scale (and GPT-2's positions) come after it."""
    family, hf, ours = pair
    tokens = _tokens(seed=16)
    _, c = ours.run_with_cache(tokens, names_filter=["hook_embed", "blocks.0.hook_resid_pre"] + (
        ["hook_pos_embed"] if ours.cfg.positional == "learned" else []))
    assert torch.equal(c["hook_embed"], ours.W_E[tokens])
    expected = c["hook_embed"] * ours.cfg.embed_scale + (c["hook_pos_embed"] if "hook_pos_embed" in c else 0)
    torch.testing.assert_close(c["resid_pre", 0], expected)
    assert (ours.cfg.embed_scale == math.sqrt(ours.cfg.d_model)) == family.startswith("gemma")


class _ZeroAt:
    """An intervention as the engine sees one: anything with .hooks(model) -> [(name, fn)]."""

    def __init__(self, name: str):
        self.name, self.calls = name, 0

    def hooks(self, model):
        def zero(x, hook):
            self.calls += 1
            return torch.zeros_like(x)
        return [(self.name, zero)]


def test_generate_takes_duck_typed_interventions(pair):
    family, hf, ours = pair
    prompt = _tokens(seed=15, batch=1, seq=6)
    plain = ours.generate(prompt, max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    it = _ZeroAt(f"blocks.{ours.cfg.n_layers - 1}.hook_resid_post")  # zero residual: the logits lose the prompt
    steered = ours.generate(prompt, max_new_tokens=4, temperature=0.0, stop_at_eos=False, interventions=[it])
    assert it.calls == 4  # prefill and 3 decoding steps (the last token needs no further forward pass)
    with ours.hooks(it.hooks(ours)):
        expected = ours.generate(prompt, max_new_tokens=4, temperature=0.0, stop_at_eos=False)
    assert torch.equal(steered, expected)
    assert torch.equal(ours.generate(prompt, max_new_tokens=4, temperature=0.0, stop_at_eos=False), plain)
    assert not ours._persistent_hooks  # removed after that generation
    with pytest.raises(fl.errors.InputError, match=r"\.hooks\(model\)"):
        ours.generate(prompt, max_new_tokens=2, interventions=[object()])


def test_stop_at_layer_returns_residual(pair):
    family, hf, ours = pair
    tokens = _tokens(seed=2)
    _, full = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre"))
    # as in TransformerLens: block 1 never runs, so its hooks are not recorded; block 0's output is returned
    resid, cache = ours.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_post"), stop_at_layer=1)
    assert list(cache) == ["blocks.0.hook_resid_post"]
    assert torch.equal(cache["resid_post", 0], resid)
    assert torch.allclose(resid, full["resid_pre", 1], atol=1e-6)


# --------------------------------------------------------------------------- padding


def test_left_padding_matches_unpadded(pair):
    family, hf, ours = pair
    lengths = [SEQ - 13, SEQ]
    rows = [_tokens(seed=3 + i, batch=1, seq=n)[0] for i, n in enumerate(lengths)]
    tokens = torch.zeros(len(rows), SEQ, dtype=torch.long)
    mask = torch.zeros(len(rows), SEQ, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, SEQ - len(r):] = r
        mask[i, SEQ - len(r):] = 1
    padded = ours(tokens, attention_mask=mask)
    padded_explicit = ours.run_with_hooks(
        tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, hook: None)], attention_mask=mask)
    for i, r in enumerate(rows):
        alone = ours(r[None])[0]
        for got in (padded[i], padded_explicit[i]):
            diff = (got[SEQ - len(r):] - alone).abs().max().item()
            assert diff < TOL, f"{family}: row {i} padded vs alone {diff:.2e}"


# --------------------------------------------------------------------------- generation with the KV cache


def _greedy_no_cache(model: fl.HookedTransformer, row: list[int], n: int) -> list[int]:
    seq = list(row)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(row):]


def test_generate_with_kv_cache_matches_full_forwards(pair):
    family, hf, ours = pair
    n_new = 2 * WINDOW + 1  # decoding goes well past the sliding window
    prompt = _tokens(seed=5, batch=1, seq=5)
    out = ours.generate(prompt, max_new_tokens=n_new, temperature=0.0, stop_at_eos=False)
    assert out.shape == (1, 5 + n_new)
    assert torch.equal(out[0, :5], prompt[0])
    assert out[0, 5:].tolist() == _greedy_no_cache(ours, prompt[0].tolist(), n_new), family
    # the explicit attention path (a pattern hook stays on during decoding) uses the cache and windows the same way
    steps: list[int] = []
    with ours.hooks([("blocks.0.attn.hook_pattern", lambda x, hook: steps.append(x.shape[-1]))]):
        out_explicit = ours.generate(prompt, max_new_tokens=n_new, temperature=0.0, stop_at_eos=False)
    assert torch.equal(out_explicit, out)
    assert steps == list(range(5, 5 + n_new))  # one prefill, then one query against a growing cache per step


def test_batched_generation_with_padding_matches_each_prompt(pair):
    family, hf, ours = pair
    n_new = WINDOW + 3
    rows = [_tokens(seed=6, batch=1, seq=3)[0].tolist(), _tokens(seed=7, batch=1, seq=11)[0].tolist()]
    new = generate_tokens(ours, rows, max_new_tokens=n_new, temperature=0.0, top_p=None, top_k=None, seed=None,
                          stop_tokens=set())
    for row, got in zip(rows, new):
        assert got == _greedy_no_cache(ours, row, n_new), family
    with ours.hooks([(lambda n: n.endswith("attn.hook_pattern"), lambda x, hook: None)]):
        explicit = generate_tokens(ours, rows, max_new_tokens=n_new, temperature=0.0, top_p=None, top_k=None,
                                   seed=None, stop_tokens=set())
    assert explicit == new


def test_generation_matches_transformers_greedy(pair):
    family, hf, ours = pair
    prompt = _tokens(seed=8, batch=1, seq=4)
    n_new = WINDOW + 4
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(n_new):
            nxt = hf(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    out = ours.generate(prompt, max_new_tokens=n_new, temperature=0.0, stop_at_eos=False)
    assert torch.equal(out, seq), family


# --------------------------------------------------------------------------- explicit attention path


def test_explicit_attention_matches_sdpa(pair):
    family, hf, ours = pair
    tokens = _tokens(seed=9)
    fast = ours(tokens)
    seen: list[str] = []
    explicit = ours.run_with_hooks(
        tokens, fwd_hooks=[(lambda n: n.endswith("attn.hook_pattern"), lambda x, hook: seen.append(hook.name))])
    assert len(seen) == ours.cfg.n_layers
    diff = (fast - explicit).abs().max().item()
    assert diff < TOL, f"{family}: explicit vs SDPA {diff:.2e}"


# --------------------------------------------------------------------------- config variants and legacy configs


def _variant(config_cls: str, model_cls: str, **kw: Any) -> Callable[[], Any]:
    def build() -> Any:
        cfg = getattr(transformers, config_cls)(**kw)
        cfg._attn_implementation = "eager"
        return getattr(transformers, model_cls)(cfg)
    return build


def _gemma3_multimodal() -> Any:  # the Gemma 3 4B+ wrapper: language model under model.language_model
    cfg = transformers.Gemma3Config(
        text_config=_gemma3().to_dict(), mm_tokens_per_image=4,
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
    )
    cfg._attn_implementation = "eager"
    cfg.text_config._attn_implementation = "eager"
    return transformers.Gemma3ForConditionalGeneration(cfg)


_GPT2_SMALL = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
VARIANTS: dict[str, Callable[[], Any]] = {
    # Gemma 2/3 read hidden_activation literally: "gelu" is the exact GELU there (only Gemma 1 means tanh by it)
    "gemma2_exact_gelu": lambda: _variant("Gemma2Config", "Gemma2ForCausalLM", **{
        **_gemma2().to_dict(), "hidden_activation": "gelu"})(),
    "gemma1_legacy_gelu": _variant("GemmaConfig", "GemmaForCausalLM", vocab_size=VOCAB, hidden_size=64,
                                   intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, head_dim=16, hidden_act="gelu"),
    "llama_biases": _variant("LlamaConfig", "LlamaForCausalLM", **_LLAMA_COMMON, attention_bias=True, mlp_bias=True),
    "llama_gelu_tanh": _variant("LlamaConfig", "LlamaForCausalLM", **_LLAMA_COMMON, hidden_act="gelu_pytorch_tanh"),
    "qwen3_attention_bias": _variant("Qwen3Config", "Qwen3ForCausalLM", **_LLAMA_COMMON, head_dim=24,
                                     attention_bias=True),
    "gpt2_exact_gelu_unscaled": _variant("GPT2Config", "GPT2LMHeadModel", **_GPT2_SMALL, activation_function="gelu",
                                         scale_attn_weights=False),
    "gemma3_multimodal_wrapper": _gemma3_multimodal,
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_logits_match_transformers(variant):
    torch.manual_seed(0)
    hf = VARIANTS[variant]().eval()
    _randomize(hf, seed=11)
    ours = fl.from_transformers(hf)
    tokens = _tokens(seed=12)
    expected = _hf_logits(hf, tokens).logits
    diff = (ours(tokens) - expected).abs().max().item()
    assert diff < TOL, f"{variant}: max abs logit diff {diff:.2e}"


@pytest.mark.parametrize("hf_config, message", [
    ({**_GPT2_SMALL, "model_type": "gpt2", "activation_function": "relu"}, "activation 'relu'"),
    ({**_GPT2_SMALL, "model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True}, "inverse_layer_idx"),
    ({**_gemma3().to_dict(), "use_bidirectional_attention": True}, "bidirectional"),
    ({"model_type": "mistral"}, "not supported"),
])
def test_unsupported_configs_are_refused(hf_config, message):
    from featurelens.models.convert import UnsupportedModelError, config_from_hf

    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(hf_config)


_TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, max_position_embeddings=512)
# config.json files as found on the hub, written before transformers 5 (flat rope keys, no layer_types)
LEGACY = {
    "gemma3_270m": dict(_TINY, model_type="gemma3_text", num_hidden_layers=6, num_key_value_heads=1, head_dim=32,
                        query_pre_attn_scalar=32, rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=None,
                        sliding_window=16, hidden_activation="gelu_pytorch_tanh", use_bidirectional_attention=False,
                        layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    "gemma3_4b_text": dict(_TINY, model_type="gemma3_text", num_hidden_layers=7, num_key_value_heads=2, head_dim=32,
                           query_pre_attn_scalar=32, rope_theta=1e6, rope_local_base_freq=1e4,
                           rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window=16,
                           sliding_window_pattern=6, hidden_activation="gelu_pytorch_tanh"),
    "gemma2": dict(_TINY, model_type="gemma2", num_hidden_layers=4, num_key_value_heads=2, head_dim=16,
                   query_pre_attn_scalar=16, rope_theta=1e4, sliding_window=16, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh"),
    "gemma": dict(_TINY, model_type="gemma", num_hidden_layers=2, num_key_value_heads=1, head_dim=24,
                  hidden_act="gelu", hidden_activation=None, rope_theta=1e4),
    "llama3": dict(_TINY, model_type="llama", num_hidden_layers=2, num_key_value_heads=2, rope_theta=5e5,
                   rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 64, "rope_type": "llama3"},
                   tie_word_embeddings=True),
    "llama_linear_old_key": dict(_TINY, model_type="llama", num_hidden_layers=2,
                                 rope_scaling={"type": "linear", "factor": 2.0}),
    "qwen2": dict(_TINY, model_type="qwen2", num_hidden_layers=4, num_key_value_heads=2, rope_theta=1e6,
                  sliding_window=131072, use_sliding_window=False, max_window_layers=28, tie_word_embeddings=True),
    "qwen2_sliding": dict(_TINY, model_type="qwen2", num_hidden_layers=4, num_key_value_heads=2, rope_theta=1e6,
                          sliding_window=16, use_sliding_window=True, max_window_layers=2),
    "qwen3": dict(_TINY, model_type="qwen3", num_hidden_layers=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                  sliding_window=None, use_sliding_window=False, max_window_layers=28),
    "gpt2": dict(model_type="gpt2", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_ctx=64, n_positions=64,
                 activation_function="gelu_new", bos_token_id=1, eos_token_id=2),
}


@pytest.mark.parametrize("name", list(LEGACY))
def test_legacy_config_json_reads_as_transformers_reads_it(name):
    """A raw (pre-transformers-5) config.json converts to the same engine config as transformers' reading of it."""
    from featurelens.engine.model import rope_inv_freq
    from featurelens.models.convert import config_from_hf

    raw = LEGACY[name]
    ours = config_from_hf(dict(raw))
    oracle = config_from_hf(transformers.CONFIG_MAPPING[raw["model_type"]].from_dict(dict(raw)).to_dict())
    a, b = ours.to_dict(), oracle.to_dict()
    a.pop("rope_scaling"), b.pop("rope_scaling")  # same meaning, different spelling: compare the frequencies
    assert a == b
    if ours.positional == "rope":
        for layer in range(ours.n_layers):
            scaled = not (ours.layer_types[layer] == "sliding" and ours.rope_local_base is not None)
            assert torch.equal(rope_inv_freq(ours, ours.rope_base_for(layer), scaled),
                               rope_inv_freq(oracle, oracle.rope_base_for(layer), scaled)), layer
