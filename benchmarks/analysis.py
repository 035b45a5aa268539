"""Feature analysis speed: where the time of `featurelens analyze` goes, and whether the dictionary's own work
(encoding + top-k bookkeeping) costs less than the model forward it needs.

    python benchmarks/analysis.py [--dictionary DIR] [--width 8192] [--k 32] [--hook blocks.6.hook_resid_post]
                                  [--tokens 500000] [--batch-size 16] [--threads N] [--no-embed] [--json out.json]
                                  [--out DIR]

Without --dictionary it builds a TopK SAE of the given width and k on the hook whose features are real activations
(see `exemplar_dictionary`): the cost of every stage depends on the width, k, token count and how many features
fire, not on what they mean; pass a trained dictionary to measure exactly that one. It runs the whole analysis (stream, dashboards, labels, search embeddings) into a
temporary directory over the held-out split of the embedded corpus, then prints the breakdown:

  model forward     the model run up to the hook (stop_at_layer = hook layer + 1)
  encoding          the dictionary's encoder on every token
  bookkeeping       per-feature top-k contexts, quantile sample, density, histogram, co-firing counts
  checkpoints       saving the streaming state (resumability)
  logit lens / decoder similarity / writing / labels / embeddings   the per-feature stages after the stream

and the ratio (encoding + bookkeeping) / model forward, which the analysis aims to keep below 1.

There is no reference implementation to race in the same run: SAEDashboard and Neuronpedia's pipeline need
SAELens + TransformerLens (which cannot be installed next to this project's transformers) and a model hub.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import torch


def exemplar_dictionary(fl, model, hook: str, width: int, k: int):
    """A TopK SAE whose features are `width` real activations of the train split (centred, unit length): every
    token fires the k exemplars nearest to it, so, as in a trained dictionary (and unlike random directions, of
    which a few hundred win every token), most features fire on some part of the corpus."""
    from featurelens.dictionaries import DictionaryConfig, SparseDictionary

    torch.manual_seed(0)
    ctx = fl.load_contexts(model, "nlp-corpus", ctx_len=128, split="train", progress=False)
    ctx = ctx[torch.randperm(len(ctx))[: max(1, 2 * width // 127)]]
    with torch.inference_mode():
        _, cache = model.run_with_cache(ctx, names_filter=[hook], stop_at_layer=model.hook_spec(hook).stop_layer)
    x = cache[hook][:, 1:].reshape(-1, model.cfg.d_model).float()  # BOS left out
    x = x[torch.randperm(len(x))[:width]]
    mean = x.mean(0)
    dirs = torch.nn.functional.normalize(x - mean, dim=1)
    sae = SparseDictionary(DictionaryConfig(d_in=model.cfg.d_model, d_sae=width, arch="topk", k=k, hook_name=hook,
                                            model_name=model.name))
    with torch.no_grad():
        sae.W_dec.copy_(dirs)
        sae.W_enc.copy_(dirs.T)
        sae.b_dec.copy_(mean)
    return sae


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dictionary", default=None, help="a trained dictionary directory (default: a random TopK SAE)")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--hook", default="blocks.6.hook_resid_post")
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=500_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-embed", action="store_true", help="skip the search embeddings")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--out", default=None, help="keep the analysis in this directory (default: a temporary one); "
                                                "it must not hold a finished analysis")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import featurelens as fl
    model = fl.load_model(args.model)
    if args.dictionary:
        sae = fl.load_dictionary(args.dictionary)
    else:
        sae = exemplar_dictionary(fl, model, args.hook, args.width, args.k)
    print(f"{model.name} {sae.cfg.hook_name}, dictionary width {sae.cfg.d_sae}, {args.tokens:,} tokens, "
          f"{torch.get_num_threads()} torch threads", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or tmp
        t0 = time.perf_counter()
        res = fl.analyze(model, sae, None, n_tokens=args.tokens, batch_size=args.batch_size, out=out,
                         embed=not args.no_embed, progress=True)
        total = time.perf_counter() - t0
        t = res.timings
        n_live = int((res.store.column("n_fires") > 0).sum())
        res.close()
    stream = t.model_forward + t.encoding + t.bookkeeping
    ratio = (t.encoding + t.bookkeeping) / max(t.model_forward, 1e-9)
    rows = [("model forward", t.model_forward), ("encoding", t.encoding), ("top-k bookkeeping", t.bookkeeping),
            ("checkpoints", t.checkpointing), ("logit lens", t.logit_lens), ("decoder similarity", t.similarity),
            ("writing (store)", t.writing), ("labels", t.labels), ("embeddings", t.embedding)]
    print(f"\n{'stage':<22}{'seconds':>10}{'ms / 1k tokens':>16}")
    for name, s in rows:
        print(f"{name:<22}{s:>10.1f}{1000 * s / max(t.tokens, 1) * 1000:>16.1f}")
    print(f"{'total (wall)':<22}{total:>10.1f}")
    print(f"\nstream: {t.tokens:,} tokens in {stream:.1f}s ({t.tokens / max(stream, 1e-9):,.0f} tokens/s); "
          f"dictionary work / model forward = {ratio:.2f} (goal < 1); {n_live:,} of {sae.cfg.d_sae:,} features fired")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": model.name, "hook": sae.cfg.hook_name, "width": sae.cfg.d_sae, "tokens": t.tokens,
                       "threads": torch.get_num_threads(), "timings": t.as_dict(), "total_s": round(total, 2),
                       "dictionary_over_forward": round(ratio, 4), "live_features": n_live}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
