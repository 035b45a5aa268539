"""The engine on the embedded models: exactness against transformers, the hook API, generation, bad input."""

from __future__ import annotations

import shutil
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


@pytest.mark.slow  # loads the embedded models (by name, not through a fixture)
@pytest.mark.parametrize("name,fixture", [("gemma-3-270m", "gemma"), ("smollm2-135m", "smollm")])
def test_logits_match_transformers_on_same_weights(name, fixture, request):
    """The oracle: transformers dequantizes the same GGUF file its own way and runs its own forward pass. Compared
    on a left-padded batch (the first row unpadded) and on a sequence longer than Gemma 3's 512-token sliding window."""
    model = request.getfixturevalue(fixture)
    hf = _hf_from_gguf(EMBEDDED[name].locate())
    rows = [model.encode(TEXT), model.encode(TEXT[:60])]
    tokens, mask = model.pad(rows, side="left")
    assert mask[1].sum() < mask[0].sum() == tokens.shape[1]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers counts positions from the first real token only if told
    with torch.inference_mode():
        ours = model(tokens, attention_mask=mask)
        theirs = hf(tokens, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert ours.shape == (2, tokens.shape[1], model.cfg.d_vocab)
    diff = (ours - theirs)[real].abs().max().item()
    assert diff < 1e-3, f"{name}: max abs logit difference on the padded batch {diff}"

    window = model.cfg.sliding_window or 512
    n = window + 100
    body = rows[0][1:] * (n // len(rows[0]) + 1)
    long = torch.tensor([rows[0][:1] + body[: n - 1]])  # BOS, then the text over and over
    tail = n - window  # the positions whose sliding window cuts off the start
    last_logits = lambda: model.unembed(model(long, stop_at_layer=model.cfg.n_layers)[:, -tail:])  # noqa: E731
    with torch.inference_mode():
        ours, theirs = last_logits(), hf(long, logits_to_keep=tail).logits
    assert ours.shape == theirs.shape == (1, tail, model.cfg.d_vocab)
    diff = (ours - theirs).abs().max().item()
    assert diff < 1e-3, f"{name}: max abs logit difference on {n} tokens {diff}"
    sliding = [b.attn for b in model.blocks if b.attn.window is not None]
    if sliding:  # the window binds: without it the same comparison fails, so the check above can tell
        try:
            for attn in sliding:
                attn.window = None
            with torch.inference_mode():
                assert (last_logits() - theirs).abs().max() > 1e-2
        finally:
            for attn in sliding:
                attn.window = window


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


def test_docstring_examples_are_what_the_model_prints(gemma):
    """Every example in the HookedTransformer and hook-spec docstrings runs, and prints what the docstring says."""
    import doctest

    from featurelens.engine import hooked, hookspec

    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    n_examples = 0
    for module in (hooked, hookspec):
        for test in doctest.DocTestFinder().find(module, globs={"fl": fl, "torch": torch, "model": gemma}):
            n_examples += len(test.examples)
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
    assert n_examples >= 15


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


@pytest.mark.slow  # loads the embedded models (by name, not through a fixture)
def test_cli_next_token_and_errors():
    run = lambda *a: subprocess.run([sys.executable, "-m", "featurelens", *a], capture_output=True, text=True, timeout=300)  # noqa: E731
    ok = run("next-token", "-m", "gemma-3-270m", "The Eiffel Tower is located in the city of", "--json", "-n", "3")
    assert ok.returncode == 0, ok.stderr
    assert '" Paris"' in ok.stdout
    bad = run("generate", "-m", "nope", "hi")
    assert bad.returncode == 2 and "Known names" in bad.stderr and "Traceback" not in bad.stderr
    empty = run("generate", "")
    assert empty.returncode == 2 and "empty prompt" in empty.stderr


# --------------------------------------------------------------------------- GGUF metadata and the model cache
# Small synthetic files only: nothing here converts a real model.


def _write_gguf(path: Path, rope_base: object = 5000.0) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_uint32("llama.embedding_length", 8)
    w.add_uint32("llama.feed_forward_length", 16)
    w.add_uint32("llama.attention.head_count", 2)
    if isinstance(rope_base, str):
        w.add_string("llama.rope.freq_base", rope_base)
    else:
        w.add_float32("llama.rope.freq_base", rope_base)
    w.add_tensor("token_embd.weight", np.ones((32, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_field_that_cannot_be_read_names_the_key(tmp_path):
    from featurelens.models.gguf import _field, gguf_to_hf, open_gguf

    good = _write_gguf(tmp_path / "good.gguf")
    hf, _ = gguf_to_hf(good)
    assert hf["rope_theta"] == 5000.0 and hf["num_hidden_layers"] == 1
    reader = open_gguf(good)
    assert _field(reader, "llama.rope.scale_linear", 1.0, number=True) == 1.0  # absent optional key: the default

    # present but of the wrong kind: an error naming the key, never the default base of 1e4
    bad = _write_gguf(tmp_path / "bad.gguf", rope_base="ten thousand")
    with pytest.raises(fl.CorruptFileError, match=r"llama\.rope\.freq_base.*should be a number"):
        gguf_to_hf(bad)

    class Unreadable:  # a field whose bytes do not decode
        def contents(self):
            raise IndexError("index 7 is out of bounds")

    reader.fields["llama.rope.freq_base"] = Unreadable()
    with pytest.raises(fl.CorruptFileError, match=r"good\.gguf.*'llama\.rope\.freq_base' cannot be read"):
        _field(reader, "llama.rope.freq_base", 10_000.0, number=True)


def _tiny_cache(d: Path, source_id: str, fmt: int | None = None) -> fl.HookedTransformer:
    """A converted-model cache as _convert_gguf writes it (without the tokenizer), of a tiny random model."""
    import json

    from safetensors.torch import save_file

    from featurelens.models.loader import CACHE_FORMAT

    cfg = fl.ModelConfig(architecture="llama", n_layers=1, d_model=8, n_heads=2, n_kv_heads=1, d_head=4, d_mlp=16,
                         d_vocab=32)
    model = fl.HookedTransformer(cfg)
    g = torch.Generator().manual_seed(len(source_id))
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    meta = {"format": CACHE_FORMAT if fmt is None else fmt, "source": "src.gguf", "source_id": source_id,
            "config": cfg.to_dict()}
    (d / "config.json").write_text(json.dumps(meta))
    return model


def test_stale_or_foreign_cache_is_converted_again(tmp_path, monkeypatch, capsys):
    from featurelens.models import loader

    monkeypatch.setenv("FEATURELENS_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(loader, "_load_tokenizer", lambda path: None)
    src = tmp_path / "src.gguf"
    src.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    conversions: list[str] = []

    def convert(name, gguf_path, source_id, progress=True):  # stands in for dequantizing a real GGUF file
        conversions.append(source_id)
        d = loader.cache_dir_for(name)
        shutil.rmtree(d, ignore_errors=True)
        _tiny_cache(d, source_id)
        return d

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    load = lambda: loader._load_cached("tiny", lambda: src, lambda: loader.source_fingerprint(src), torch.float32, None)  # noqa: E731
    tokens = torch.tensor([[1, 2, 3]])
    d = loader.cache_dir_for("tiny")

    current = _tiny_cache(d, loader.source_fingerprint(src))
    torch.testing.assert_close(load()(tokens), current(tokens))  # a current cache is used as it is
    assert conversions == []

    src.write_bytes(b"GGUF" + bytes(reversed(range(256))) * 8)  # same size, other content: a foreign cache
    load()
    assert conversions == [loader.source_fingerprint(src)]
    assert f"{d} was converted from another file" in capsys.readouterr().out
    load()
    assert len(conversions) == 1  # the rebuilt cache is current

    _tiny_cache(d, loader.source_fingerprint(src), fmt=1)  # an older cache format: converted again too
    load()
    assert len(conversions) == 2 and "cache format 1" in capsys.readouterr().out

    (d / "config.json").write_text("{not json")  # unreadable: refused, naming the directory, and left alone
    with pytest.raises(fl.CorruptFileError, match=f"delete {d}"):
        load()
    assert len(conversions) == 2 and (d / "config.json").read_text() == "{not json"


def test_failed_conversion_leaves_no_temporary_directory(tmp_path, monkeypatch):
    from featurelens.models import loader

    monkeypatch.setenv("FEATURELENS_HOME", str(tmp_path / "home"))
    models = loader.cache_dir_for("x").parent
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)  # right magic bytes, nothing else
    slug = f"bad-{bad.stat().st_size}"
    orphan = models / f".{slug}.tmp-{2**22 + 1}"  # left by a conversion whose process was killed (no such pid)
    orphan.mkdir()
    with pytest.raises(fl.CorruptFileError, match="bad.gguf"):
        fl.load_model(str(bad))
    assert list(models.iterdir()) == []

    def interrupted(hf):
        raise KeyboardInterrupt

    monkeypatch.setattr(loader, "config_from_hf", interrupted)  # Ctrl-C in the middle of a conversion
    good = _write_gguf(tmp_path / "good.gguf")
    with pytest.raises(KeyboardInterrupt):
        fl.load_model(str(good))
    assert list(models.iterdir()) == []
