"""The engine on the embedded models: exactness against transformers, the hook API, generation, bad input."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import featurelens as fl
from featurelens.models.loader import EMBEDDED, cache_dir_for

TEXT = ("The Eiffel Tower is located in the city of Paris, which is famous for its food, art and history. "
        "Many tourists visit every year, and the museums are full in summer.")


def _hf_from_gguf(gguf: Path):
    pytest.importorskip("accelerate")  # transformers needs it to read GGUF files
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("name,fixture", [("gemma-3-270m", "gemma"), ("smollm2-135m", "smollm")])
def test_logits_match_transformers_on_same_weights(name, fixture, request):
    """The oracle: transformers dequantizes the same GGUF file its own way and runs its own forward pass."""
    model = request.getfixturevalue(fixture)
    hf = _hf_from_gguf(EMBEDDED[name].locate())
    tokens = model.to_tokens([TEXT, TEXT[:60]], padding_side="right")
    with torch.inference_mode():
        ours = model(tokens[:1])
        theirs = hf(tokens[:1]).logits
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-3, f"{name}: max abs logit difference {diff}"
    assert ours.shape == (1, tokens.shape[1], model.cfg.d_vocab)


def test_gemma_answers_paris(gemma):
    logits = gemma("The Eiffel Tower is located in the city of")
    assert gemma.to_string([int(logits[0, -1].argmax())]) == " Paris"
    out = gemma.generate("The Eiffel Tower is located in the city of", max_new_tokens=3, temperature=0.0,
                         return_new_only=True)
    assert out.startswith(" Paris")


def test_run_with_cache_indexing_and_shapes(gemma):
    cfg = gemma.cfg
    logits, cache = gemma.run_with_cache("The capital of France is", names_filter=lambda n: n.endswith("hook_resid_post"))
    n_tok = len(gemma.to_str_tokens("The capital of France is"))
    assert len(cache) == cfg.n_layers
    assert cache["resid_post", 6].shape == (1, n_tok, cfg.d_model)
    assert cache["resid_post", 6] is cache["blocks.6.hook_resid_post"]
    # the last layer's residual, normed and unembedded, is the logits
    final = torch.nn.functional.rms_norm(cache["resid_post", cfg.n_layers - 1], (cfg.d_model,), gemma.net.ln_final.w, cfg.norm_eps)
    torch.testing.assert_close(final @ gemma.W_U, logits, atol=1e-3, rtol=1e-4)

    _, full = gemma.run_with_cache("The capital of France is")
    assert set(full) == set(gemma.hook_names)
    assert full["pattern", 3].shape == (1, cfg.n_heads, n_tok, n_tok)
    assert full["blocks.2.attn.hook_k"].shape == (1, n_tok, cfg.n_kv_heads, cfg.d_head)
    assert full["z", 0].shape == (1, n_tok, cfg.n_heads, cfg.d_head)
    assert full["blocks.0.mlp.hook_post"].shape == (1, n_tok, cfg.d_mlp)
    torch.testing.assert_close(full["pattern", 3].sum(-1), torch.ones(1, cfg.n_heads, n_tok))
    # residual bookkeeping: resid_post = resid_mid + mlp_out = resid_pre + attn_out + mlp_out
    torch.testing.assert_close(full["resid_post", 4], full["resid_pre", 4] + full["attn_out", 4] + full["mlp_out", 4])
    torch.testing.assert_close(full["resid_pre", 5], full["resid_post", 4])
    with pytest.raises(KeyError, match="not cached"):
        cache["blocks.3.hook_mlp_out"]


def test_stop_at_layer_computes_nothing_later(gemma):
    seen: list[str] = []
    record = lambda x, hook: seen.append(hook.name)  # noqa: E731
    resid, cache = gemma.run_with_cache("Hello world", names_filter="blocks.5.hook_resid_post", stop_at_layer=6,
                                        fwd_hooks=[(lambda n: n.endswith("hook_resid_pre"), record)])
    assert list(cache) == ["blocks.5.hook_resid_post"]
    assert seen == [f"blocks.{i}.hook_resid_pre" for i in range(6)]
    torch.testing.assert_close(resid, cache["resid_post", 5])


def test_hooks_replace_activations_and_are_removed(gemma):
    prompt = "The capital of France is"
    clean = gemma(prompt)
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    ablated = gemma.run_with_hooks(prompt, fwd_hooks=[("blocks.3.hook_mlp_out", zero)])
    assert (ablated - clean).abs().max() > 1e-2
    with gemma.hooks(fwd_hooks=[("blocks.3.hook_mlp_out", zero)]):
        torch.testing.assert_close(gemma(prompt), ablated)
        # hooks stay on for generation, too
        steered = gemma.generate(prompt, max_new_tokens=5, temperature=0.0)
    torch.testing.assert_close(gemma(prompt), clean)  # and are gone afterwards
    assert isinstance(steered, str)
    with pytest.raises(ValueError, match="expected a tensor of shape"):
        gemma.run_with_hooks(prompt, fwd_hooks=[("blocks.1.hook_resid_post", lambda x, h: x[:, :1])])


def test_gradients_flow_through_hooks(gemma):
    store = {}

    def grab(x, hook):
        x = x.detach().requires_grad_(True)
        store["x"] = x
        return x

    logits = gemma.run_with_hooks("The capital of France is", fwd_hooks=[("blocks.4.hook_resid_pre", grab)])
    logits[0, -1, gemma.to_single_token(" Paris")].backward()
    g = store["x"].grad
    assert g is not None and g.shape == store["x"].shape and g.abs().sum() > 0


def test_explicit_attention_path_matches_fast_path(gemma):
    tokens = gemma.to_tokens(TEXT)
    fast = gemma(tokens)
    slow = gemma.run_with_hooks(tokens, fwd_hooks=[(lambda n: n.endswith("hook_pattern"), lambda x, h: None)])
    torch.testing.assert_close(slow, fast, atol=1e-4, rtol=1e-4)


def test_generation_batched_greedy_matches_single_and_seed_reproduces(gemma):
    prompts = ["The capital of France is", "One, two, three, four,"]
    batched = gemma.generate(prompts, max_new_tokens=8, temperature=0.0)
    singles = [gemma.generate(p, max_new_tokens=8, temperature=0.0) for p in prompts]
    assert batched == singles
    a = gemma.generate(prompts[0], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    b = gemma.generate(prompts[0], max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    assert a == b
    # greedy decoding with the KV cache equals argmax over full forward passes
    tokens = gemma.to_tokens(prompts[1])
    out = gemma.generate(tokens, max_new_tokens=6, temperature=0.0, stop_at_eos=False)
    ref = tokens
    for _ in range(6):
        ref = torch.cat([ref, gemma(ref)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ref)


def test_stop_tokens_end_generation(gemma):
    first = gemma.generate("The capital of France is", max_new_tokens=1, temperature=0.0, return_new_only=True)
    stop = gemma.to_single_token(first) if first else None
    out = gemma.generate(gemma.to_tokens("The capital of France is"), max_new_tokens=10, temperature=0.0,
                         stop_tokens=[stop], return_new_only=True)
    assert out.shape[1] == 1


def test_unknown_hook_name_suggests_nearest(gemma):
    with pytest.raises(fl.UnknownHookError, match="blocks.6.hook_resid_post"):
        gemma.run_with_hooks("hi", fwd_hooks=[("blocks.6.hook_resid_pots", lambda x, h: None)])
    with pytest.raises(fl.UnknownHookError, match="did you mean"):
        gemma.run_with_cache("hi", names_filter="blocks.99.hook_resid_post")


def test_empty_prompt_and_bad_tokens_refused(gemma):
    with pytest.raises(fl.EmptyPromptError):
        gemma("")
    with pytest.raises(fl.EmptyPromptError):
        gemma.generate([], max_new_tokens=3)
    with pytest.raises(ValueError, match="token ids must lie"):
        gemma(torch.tensor([[1, gemma.cfg.d_vocab + 5]]))
    with pytest.raises(ValueError, match="stop_at_layer"):
        gemma("hi", stop_at_layer=99)


def test_unknown_model_lists_known_names():
    with pytest.raises(fl.UnknownModelError, match="gemma-3-270m"):
        fl.load_model("gemma-9000")


def test_corrupt_files_are_named(tmp_path, gemma):
    gguf = EMBEDDED["gemma-3-270m"].locate()
    truncated = tmp_path / "broken.gguf"
    truncated.write_bytes(gguf.read_bytes()[:100_000])
    with pytest.raises(fl.CorruptFileError, match="broken.gguf"):
        fl.load_model(str(truncated))
    not_gguf = tmp_path / "text.gguf"
    not_gguf.write_text("hello")
    with pytest.raises(fl.CorruptFileError, match="text.gguf"):
        fl.load_model(str(not_gguf))
    # a local HF directory whose safetensors file is cut short
    d = tmp_path / "hfdir"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama", "hidden_size": 8, "num_attention_heads": 2, '
                                   '"num_hidden_layers": 1, "intermediate_size": 16, "vocab_size": 32}')
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    with pytest.raises(fl.CorruptFileError, match="model.safetensors"):
        fl.load_model(str(d))


def test_corrupt_cache_is_reported_not_silently_used(tmp_path, monkeypatch, gemma):
    real_config = (cache_dir_for("gemma-3-270m") / "config.json").read_text()
    monkeypatch.setenv("FEATURELENS_HOME", str(tmp_path))
    d = cache_dir_for("gemma-3-270m")
    assert tmp_path in d.parents
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(real_config)
    (d / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(fl.CorruptFileError, match="model.safetensors"):
        fl.load_model("gemma-3-270m")
    assert (d / "model.safetensors").read_bytes() == b"junk"  # reported, not silently overwritten


def test_cached_load_is_fast(gemma):
    # The fixture already converted the model; a second load reads only the cache. CPU time, not wall
    # time, so other jobs on a shared machine do not decide the result (wall time on a quiet 2-core machine: ~3 s).
    t0 = time.process_time()
    fl.load_model("gemma-3-270m")
    assert time.process_time() - t0 < 5.0


def test_cli_next_token_and_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "featurelens", *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    ok = run("next-token", "-m", "gemma-3-270m", "The Eiffel Tower is located in the city of", "--json", "-k", "3")
    assert ok.returncode == 0, ok.stderr
    assert '" Paris"' in ok.stdout
    bad = run("generate", "-m", "nope", "hi")
    assert bad.returncode == 2 and "Known names" in bad.stderr and "Traceback" not in bad.stderr
    empty = run("generate", "")
    assert empty.returncode == 2 and "empty prompt" in empty.stderr
