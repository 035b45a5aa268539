"""What the tests build, in one place: tiny random models and dictionaries, and a tiny data directory for the web app.

- Tiny models of every supported family as `transformers` models with random weights (`FAMILIES`, `_build`:
  the HF model and ours on the same weights), for the exactness tests against `transformers`.
- Tiny featurelens models (`tiny_model`) with random per-layer and cross-layer transcoders (`tiny_transcoders`,
  `tiny_clt`), for attribution.
- The web app's data directory (below):

A 2-layer random Llama with a byte-level BPE tokenizer trained here on made-up sentences (some of them HTML- and
script-like, as the real corpus has), a TopK SAE trained on it and analyzed, per-layer transcoders, and a saved
attribution graph in circuit-tracer's format over those transcoders. Built in a few seconds, nothing downloaded.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import featurelens as fl
from featurelens.dictionaries.clt import CLTConfig, CrossLayerTranscoder
from featurelens.dictionaries.sae import DictionaryConfig, SparseDictionary, TranscoderSet
from featurelens.engine.config import ModelConfig
from featurelens.engine.hooked import HookedTransformer


def _transformers() -> Any:
    import transformers  # slow to import: only the tests that build HF models pay for it

    return transformers


# --------------------------------------------------------------------------- tiny HF models, one per family
VOCAB = 96
BATCH, SEQ = 2, 40
WINDOW = 7  # tiny sliding window: SEQ and every generation run well past it

# --------------------------------------------------------------------------- tiny configs, one per family

_LLAMA_COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
    pad_token_id=0,
)


def _gemma() -> Any:  # Gemma 1: (1 + w) norms, sqrt(d_model) embedding scale, MQA, head_dim != d_model / heads
    return _transformers().GemmaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=256, rope_theta=500.0, rms_norm_eps=1e-6,
        hidden_act="gelu_pytorch_tanh",
    )


def _gemma2() -> Any:  # soft-capped scores and logits (small caps so they bind), alternating sliding windows
    return _transformers().Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, query_pre_attn_scalar=24,
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0, sliding_window=WINDOW, rope_theta=1000.0,
    )


def _gemma3() -> Any:  # sliding + global layers with two rope bases (global one linearly scaled), qk-norm
    return _transformers().Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, max_position_embeddings=256, query_pre_attn_scalar=20,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 50.0},
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10_000.0},
        },
    )


def _llama() -> Any:  # SmolLM2-like: tied embeddings, GQA
    return _transformers().LlamaConfig(**_LLAMA_COMMON, tie_word_embeddings=True, rope_theta=1000.0)


def _llama3_untied() -> Any:  # llama3 rope scaling whose three frequency bands all occur at head_dim 16
    return _transformers().LlamaConfig(
        **_LLAMA_COMMON, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 10_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    )


def _qwen2() -> Any:  # biases on q, k, v (not on o)
    return _transformers().Qwen2Config(**_LLAMA_COMMON, tie_word_embeddings=False, rope_theta=2000.0)


def _qwen2_sliding() -> Any:  # use_sliding_window: layers from max_window_layers on slide
    return _transformers().Qwen2Config(
        **_LLAMA_COMMON, tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1,
    )


def _qwen3() -> Any:  # qk-norm, head_dim (24) != d_model / heads (16)
    return _transformers().Qwen3Config(**_LLAMA_COMMON, head_dim=24, tie_word_embeddings=True, rope_theta=3000.0)


def _gpt2() -> Any:  # learned positions, LayerNorm with bias, Conv1D weights, biases everywhere
    return _transformers().GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128, activation_function="gelu_new",
        bos_token_id=1, eos_token_id=2,
    )


FAMILIES: dict[str, tuple[Callable[[], Any], str]] = {
    "gemma": (_gemma, "GemmaForCausalLM"),
    "gemma2": (_gemma2, "Gemma2ForCausalLM"),
    "gemma3_text": (_gemma3, "Gemma3ForCausalLM"),
    "llama": (_llama, "LlamaForCausalLM"),
    "llama3_untied": (_llama3_untied, "LlamaForCausalLM"),
    "qwen2": (_qwen2, "Qwen2ForCausalLM"),
    "qwen2_sliding": (_qwen2_sliding, "Qwen2ForCausalLM"),
    "qwen3": (_qwen3, "Qwen3ForCausalLM"),
    "gpt2": (_gpt2, "GPT2LMHeadModel"),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random and far from its default: norm weights around 1 (or around 0.5 for Gemma's
    1 + w), biases non-zero, matrices scaled by 1/sqrt(fan_in) so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in name or ".ln_" in name:
                p.copy_(0.5 + 0.3 * r if p.dim() == 1 and name.endswith("weight") else 0.2 * r)
            elif p.dim() == 1:  # biases
                p.copy_(0.3 * r)
            elif "embed_tokens" in name or "wte" in name or "lm_head" in name:
                p.copy_(r)
            elif "wpe" in name:
                p.copy_(0.5 * r)
            else:  # nn.Linear is [out, in]; GPT-2's Conv1D is [in, out]
                fan_in = p.shape[0] if type(model).__name__.startswith("GPT2") else p.shape[1]
                p.copy_(r / math.sqrt(fan_in))


def _build(family: str) -> tuple[str, Any, fl.HookedTransformer]:
    make_config, cls_name = FAMILIES[family]
    hf_cfg = make_config()
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = getattr(_transformers(), cls_name)(hf_cfg).eval()
    _randomize(hf, seed=len(family))
    if not hf_cfg.to_dict().get("tie_word_embeddings", True) and hasattr(hf, "lm_head"):
        assert hf.lm_head.weight.data_ptr() != hf.get_input_embeddings().weight.data_ptr()
    ours = fl.from_transformers(hf)
    return family, hf, ours


def _tokens(seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, seq), generator=g)


# --------------------------------------------------------------------------- tiny featurelens models and transcoders
TOKENS = torch.tensor([1, 5, 7, 9, 11, 13, 2, 4, 21, 8])
D = 32


def tiny_model(kind: str = "gemma3", seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    common = dict(n_layers=3, d_model=D, n_heads=4, n_kv_heads=2, d_head=8, d_mlp=48, d_vocab=50, n_ctx=64,
                  bos_token_id=1)
    if kind == "gemma3":
        cfg = ModelConfig(architecture="gemma3", post_attn_norm=True, post_mlp_norm=True, qk_norm=True,
                          embed_scale=D**0.5, act_fn="gelu_tanh", rope_local_base=100.0, sliding_window=4,
                          layer_types=["sliding", "global", "sliding"], **common)
    else:
        cfg = ModelConfig(architecture="llama", **common)
    model = HookedTransformer(cfg, name=f"tiny-{kind}")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".w"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.2)
    return model.to(torch.float64)


def tiny_transcoders(model: HookedTransformer, skip: bool = False, layers=None, seed: int = 1) -> TranscoderSet:
    torch.manual_seed(seed)
    out = {}
    for layer in layers if layers is not None else range(model.cfg.n_layers):
        cfg = DictionaryConfig(d_in=D, d_sae=64, arch="topk", k=6, transcoder=True, skip=skip, dtype="float64",
                               hook_name=f"blocks.{layer}.ln2.hook_normalized",
                               hook_name_out=f"blocks.{layer}.hook_mlp_out", model_name=model.name)
        tc = SparseDictionary(cfg)
        with torch.no_grad():
            tc.b_enc.normal_(0, 0.1)
            tc.b_dec.normal_(0, 0.1)
            if skip:
                tc.W_skip.normal_(0, 0.1)
        out[layer] = tc
    return TranscoderSet(out)


def tiny_clt(model: HookedTransformer, skip: bool = True, seed: int = 2) -> CrossLayerTranscoder:
    torch.manual_seed(seed)
    clt = CrossLayerTranscoder(CLTConfig(layers=[0, 1, 2], d_in=D, d_sae=48, arch="topk", k=5, skip=skip,
                                         model_name=model.name, dtype="float64"))
    with torch.no_grad():
        for p in clt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return clt


# --------------------------------------------------------------------------- the web app's data directory

MODEL = "tiny-llama"
SAE_ID = f"{MODEL}~sae"
TC_ID = f"{MODEL}~transcoders"
GRAPH_ID = "demo~tiny-prompt"
HOOK = "blocks.1.hook_resid_post"
PROMPT = "The cat sat on the mat and"
HOSTILE = '<img src=x onerror="window.__xss=1">'

_SUBJECTS = ["The cat", "A dog", "My friend", "The teacher", "Our neighbour", "The old man", "A small bird",
             "The president", "The film", "This book"]
_VERBS = ["sat on", "looked at", "walked to", "talked about", "read", "liked", "painted", "found", "lost", "wrote"]
_OBJECTS = ["the mat", "the river", "Paris", "a long letter", "the garden", "the window", "the market",
            "a red car", "the moon", "the house"]
_TAILS = ["and smiled.", "in the morning.", "before dinner.", "with great care.", "again and again.", "yesterday.",
          "for an hour.", "without a word."]
_MARKUP = ['<script>alert("x")</script> was in the page.', f"The comment said {HOSTILE} and nothing else.",
           "Use <b>bold</b> & <i>italic</i> tags.", "x < y && y > z is true.", "\"quoted\" and 'single' text."]


def sentences(n: int = 600, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
           for _ in range(n)]
    for i in range(0, n, 12):
        out[i] = _MARKUP[(i // 12) % len(_MARKUP)]
    return out


def _tokenizer(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def _contexts(model: Any, texts: list[str], ctx: int = 32) -> torch.Tensor:
    ids: list[int] = []
    for t in texts:
        ids += model.encode(" " + t, prepend_bos=False)
    n = len(ids) // (ctx - 1)
    rows = [[model.cfg.bos_token_id] + ids[i * (ctx - 1):(i + 1) * (ctx - 1)] for i in range(n)]
    return torch.tensor(rows, dtype=torch.long)


_BUILT: dict[str, tuple[Path, Any]] = {}


def shared_data(tmp_path_factory: Any) -> tuple[Path, Any]:
    """(data dir, tiny model), built once per test session (test_server.py and test_web.py share it), with
    featurelens' data directory pointed at it while building so that token caches land there too."""
    from featurelens import paths

    key = str(tmp_path_factory.getbasetemp())
    if key not in _BUILT:
        data = tmp_path_factory.mktemp("webdata")
        before = paths._override
        paths.set_data_dir(data)
        try:
            _BUILT[key] = (data, build(data))
        finally:
            paths._override = before
    return _BUILT[key]


def build(data: Path) -> Any:
    """Fill `data` (a featurelens data directory); returns the tiny model."""
    import transformers

    import featurelens as fl

    texts = sentences()
    mdir = data / "models" / MODEL
    tok = _tokenizer(texts)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(cfg)
    mdir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    model = fl.load_model(mdir)
    ctx = _contexts(model, texts)
    train, test = ctx[: len(ctx) * 3 // 4], ctx[len(ctx) * 3 // 4:]
    ddir = data / "dictionaries" / MODEL
    fl.train_sae(model, HOOK, arch="topk", k=4, width=96, tokens=12_000, batch_size=256, contexts=train,
                 out=ddir / "sae", progress=False)
    fl.analyze(model, ddir / "sae", test, n_tokens=None, batch_size=8, embed=False, progress=False, n_top=8,
               n_sample=16, window=(6, 2))
    fl.train_transcoders(model, "all", arch="topk", k=4, width=48, tokens=8_000, batch_size=256, contexts=train,
                         out=ddir / "transcoders", progress=False)
    # one transcoder layer analyzed: its features get dashboards (graph node cards) and densities (density slider)
    fl.analyze(model, ddir / "transcoders" / "layer_1", test, n_tokens=None, batch_size=8, embed=False,
               progress=False, n_top=8, n_sample=16, window=(6, 2))
    write_graph(data, model)
    return model


def write_graph(data: Path, model: Any) -> None:
    """A small graph over the transcoders' features, in circuit-tracer's files (nodes with real layer/feature ids)."""
    toks = model.to_str_tokens(PROMPT)
    L = model.cfg.n_layers
    rng = random.Random(1)
    nodes: list[dict[str, Any]] = []
    for p, t in enumerate(toks):
        nodes.append({"node_id": f"E_{p}_{p}", "feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
                      "jsNodeId": f"E_{p}-{p}", "clerp": f'Emb: "{t}"', "influence": None})
    for layer in range(L):
        for p in range(1, len(toks)):
            for f in rng.sample(range(48), 2):
                nodes.append({"node_id": f"{layer}_{f}_{p}", "feature": (layer + f) * (layer + f + 1) // 2 + f,
                              "layer": str(layer), "ctx_idx": p, "feature_type": "cross layer transcoder",
                              "jsNodeId": f"{layer}_{f}-0", "clerp": f"feature {f} {HOSTILE}" if f % 5 == 0 else "",
                              "influence": rng.random(), "activation": rng.random() * 3})
            nodes.append({"node_id": f"{layer}_-1_{p}", "feature": -1,
                          "layer": str(layer), "ctx_idx": p, "feature_type": "mlp reconstruction error",
                          "jsNodeId": f"{layer}_-1-{p}", "influence": rng.random()})
    last = len(toks) - 1
    for i, (tid, prob) in enumerate([(5, 0.6), (9, 0.3)]):
        nodes.append({"node_id": f"{L + 1}_{tid}_{last}", "feature": tid, "layer": str(L + 1), "ctx_idx": last,
                      "feature_type": "logit", "token_prob": prob, "is_target_logit": i == 0,
                      "jsNodeId": f"L_{tid}-{last}", "clerp": f'Output "{model.to_string([tid])}" (p={prob:.3f})'})
    def rank(n: dict[str, Any]) -> int:
        return -1 if n["layer"] == "E" else int(n["layer"])

    links = []
    for tgt in nodes:
        srcs = [s for s in nodes if rank(s) < rank(tgt) and s["ctx_idx"] <= tgt["ctx_idx"]
                and tgt["feature_type"] not in ("embedding", "mlp reconstruction error")]
        for s in rng.sample(srcs, min(4, len(srcs))):
            links.append({"source": s["node_id"], "target": tgt["node_id"], "weight": round(rng.uniform(-1, 1.5), 4)})
    graph = {"metadata": {"slug": "tiny-prompt", "scan": MODEL, "transcoder_list": [], "prompt_tokens": toks,
                          "prompt": PROMPT, "node_threshold": 0.8, "schema_version": 1,
                          "info": {"featurelens": {"transcoders": TC_ID, "model": MODEL}}},
             "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
             "nodes": nodes, "links": links}
    gdir = data / "graphs" / "demo"
    gdir.mkdir(parents=True, exist_ok=True)
    (gdir / "tiny-prompt.json").write_text(json.dumps(graph))
    (gdir / "graph-metadata.json").write_text(json.dumps({"graphs": [
        {"slug": "tiny-prompt", "scan": MODEL, "prompt_tokens": toks, "prompt": PROMPT, "title_prefix": ""}]}))


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, JSON data) of each event in a server-sent-events body."""
    out = []
    for chunk in text.split("\n\n"):
        name, payload = None, ""
        for line in chunk.splitlines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                payload += line[6:]
        if name:
            out.append((name, json.loads(payload)))
    return out


def synthetic_graph(n_nodes: int = 1000, n_links: int = 10_000, n_layers: int = 18, n_pos: int = 24,
                    seed: int = 0) -> dict[str, Any]:
    """A large random graph in circuit-tracer's format (for the explorer's drawing speed)."""
    rng = random.Random(seed)
    nodes = [{"node_id": f"E_{p}_{p}", "feature": p, "layer": "E", "ctx_idx": p, "feature_type": "embedding",
              "jsNodeId": f"E_{p}-{p}", "clerp": f"tok{p}"} for p in range(n_pos)]
    nodes += [{"node_id": f"{n_layers + 1}_{t}_{n_pos - 1}", "feature": t, "layer": str(n_layers + 1),
               "ctx_idx": n_pos - 1, "feature_type": "logit", "token_prob": 0.5 / (i + 1), "jsNodeId": f"L_{t}",
               "clerp": f'Output "t{t}"'} for i, t in enumerate(range(4))]
    i = 0
    while len(nodes) < n_nodes:
        layer, p = rng.randrange(n_layers), rng.randrange(1, n_pos)
        nodes.append({"node_id": f"{layer}_{i}_{p}", "feature": i, "layer": str(layer), "ctx_idx": p,
                      "feature_type": "cross layer transcoder", "jsNodeId": f"{layer}_{i}-0", "clerp": "",
                      "influence": rng.random(), "activation": rng.random()})
        i += 1
    ids = [n["node_id"] for n in nodes]
    # links run from an earlier layer to a later one, as in every attribution graph (scores need no cycles)
    rank = {n["node_id"]: -1 if n["layer"] == "E" else int(n["layer"]) for n in nodes}
    links, seen = [], set()
    while len(links) < n_links:
        s, t = sorted((rng.choice(ids), rng.choice(ids)), key=rank.__getitem__)
        if rank[s] < rank[t] and (s, t) not in seen:
            seen.add((s, t))
            links.append({"source": s, "target": t, "weight": rng.uniform(-1, 1)})
    toks = [f"tok{p}" for p in range(n_pos)]
    return {"metadata": {"slug": "synthetic", "scan": "synthetic", "transcoder_list": [], "prompt_tokens": toks,
                         "prompt": " ".join(toks)},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": nodes, "links": links}


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """`app` served by uvicorn on a free loopback port in a thread (a real HTTP server, as a browser or a load test
    needs); yields its base URL and stops the server on exit."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    end = time.time() + 30
    while not srv.started and time.time() < end:
        time.sleep(0.05)
    if not srv.started:
        raise RuntimeError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(30)


# The trained fixture (tests/conftest.py's `trained_sae` and `analyzed`): small enough to train in minutes on a laptop
# CPU, big enough for token-level concepts.
TRAINED = {"hook": "blocks.6.hook_resid_post", "arch": "topk", "k": 16, "width": 2048, "tokens": 150_000}
ANALYSIS_TOKENS = 32_768


def trained_sae(model: Any) -> Path:
    """The TRAINED SAE on `model` (Gemma 3 270M), cached in the data directory's test-fixtures/ (trained on first
    use, keyed by the training code too: a dictionary trained by older code must not stand in for what this code
    makes)."""
    import hashlib
    import os
    import shutil

    key = "-".join(str(v) for v in TRAINED.values()).replace(".", "_")
    code = hashlib.sha1()
    for name in ("dictionaries/train_config.py", "dictionaries/losses.py", "dictionaries/learner.py",
                 "dictionaries/loop.py", "dictionaries/sae.py", "dictionaries/autograd.py", "dictionaries/median.py",
                 "dictionaries/train.py", "dictionaries/batches.py", "data/activations.py"):
        code.update((Path(fl.__file__).parent / name).read_bytes())
    path = fl.data_dir() / "test-fixtures" / f"gemma-3-270m-sae-{key}-{code.hexdigest()[:10]}"
    if not (path / "cfg.json").is_file():
        # trained beside it and renamed into place: two test runs sharing .test-cache never see half a dictionary
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        fl.train_sae(model, TRAINED["hook"], arch=TRAINED["arch"], k=TRAINED["k"], width=TRAINED["width"],
                     tokens=TRAINED["tokens"], batch_size=1024, out=tmp, overwrite=True, progress=False)
        if path.exists() and not (path / "cfg.json").is_file():  # left by an older, interrupted run
            shutil.rmtree(path, ignore_errors=True)
        try:
            os.rename(tmp, path)
        except OSError:  # another run finished first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
    return path
