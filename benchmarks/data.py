"""Data pipeline timings: tokenizing + packing the default corpus, and activation throughput of the store.

    python benchmarks/data.py [--contexts 256] [--hook blocks.6.hook_resid_post] [--threads N]

Prints (1) tokenize + pack of the whole default corpus into a fresh data directory, next to the plain
`tokenizer(texts)` call over the same texts (what a datasets.map-style pipeline does), and (2) tokens/s of
ActivationStore for one hook, next to the bare forward pass over the same contexts (the store's overhead).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import featurelens as fl
from featurelens import paths
from featurelens.data import corpus, iter_texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--hook", default="blocks.6.hook_resid_post")
    ap.add_argument("--contexts", type=int, default=256, help="contexts of 128 tokens for the activation timing")
    ap.add_argument("--model-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = fl.load_model(args.model)
    source = corpus.nlp_corpus_path(progress=False)  # resolved in the real data dir, so the temp one re-tokenizes only
    print(f"torch threads: {torch.get_num_threads()}; corpus: {source}")

    with tempfile.TemporaryDirectory() as tmp:
        before = paths._override
        paths.set_data_dir(tmp)
        try:
            t0 = time.perf_counter()
            every = fl.load_contexts(model, str(source), 128, split="all", progress=False)
            t_pack = time.perf_counter() - t0
        finally:
            paths._override = before
    texts = list(iter_texts(source))
    t0 = time.perf_counter()
    n_plain = 0
    for i in range(0, len(texts), 2000):
        n_plain += sum(len(x) for x in model.tokenizer(texts[i:i + 2000], add_special_tokens=False)["input_ids"])
    t_plain = time.perf_counter() - t0
    n_tok = int((every[:, 1:] != model.cfg.bos_token_id).sum())
    print(f"tokenize + pack {len(texts):,} documents -> {len(every):,} contexts ({n_tok:,} tokens): {t_pack:.1f}s "
          f"(read, tokenize, pack, write); plain tokenizer(texts) call: {t_plain:.1f}s ({n_plain:,} tokens); "
          f"ratio {t_plain / t_pack:.2f}x")

    ctx = every[: args.contexts]
    store = fl.ActivationStore(model, args.hook, ctx, model_batch_size=args.model_batch_size, progress=False)
    stop = store.stop_at_layer
    with torch.inference_mode():  # warm-up
        model.run_with_cache(ctx[:2], names_filter=[args.hook], stop_at_layer=stop)
    t0 = time.perf_counter()
    rows = sum(len(b[args.hook]) for b in store)
    t_store = time.perf_counter() - t0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ctx), args.model_batch_size):
            model.run_with_cache(ctx[i:i + args.model_batch_size], names_filter=[args.hook], stop_at_layer=stop)
    t_fwd = time.perf_counter() - t0
    n = ctx.numel()
    print(f"ActivationStore {args.hook} (stop_at_layer={stop}), {len(ctx)} contexts x 128: {rows:,} rows (BOS dropped) "
          f"in {t_store:.1f}s = {n / t_store:,.0f} tokens/s; bare forward passes: {t_fwd:.1f}s = {n / t_fwd:,.0f} "
          f"tokens/s; store / forward time {t_store / t_fwd:.2f}x")


if __name__ == "__main__":
    main()
