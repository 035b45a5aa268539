"""Faithfulness of attribution graphs, tier by tier, over the demo's prompts and held-out ones.

    python benchmarks/faithfulness.py --transcoders DIR [--model NAME] [-k 10] [--max-feature-nodes 256]
        [--scale 0] [--replacements trained,random,skip] [--json out.json]

For each prompt `fl.attribute` builds the graph (the demo's prompts traced to their answers, as the demo traces
them; the held-out prompts, which the demo does not use, to their most likely next token), then `check_graph` edits
the graph's k most influential features one at a time (multiplies the activation by --scale; 0 ablates) in three
models: (a) the local replacement model (attention, norms and errors frozen, transcoders live), (b) attention
frozen, (c) the real model. Pooled over every edit of every prompt it prints, per tier, sign agreement, Spearman and
Pearson between predicted total effect and measured change of the target, with and without the edits that pushed
other features across their thresholds in (a), and the mean faithfulness score of the graphs; beside the graph's
prediction, the real model's own gradient (its first-order prediction of each edit), and both split into layer-0
features and later ones.

--replacements also scores the same prompts on two broken replacement models built from the transcoders: "random"
(each layer's encoder and decoder replaced by Gaussian ones of the same scale; skip and biases kept) and "skip"
(decoders zeroed: only the skip connection is left), to see whether the score tells them from trained transcoders.

Without --transcoders the transcoders are the ones benchmarks/attribution.py trains and caches.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# prompts the demo does not use (featurelens.pipeline.demo.PROMPTS), traced to their most likely next token
HELD_OUT = [
    # facts
    "The capital of Japan is",
    "The largest planet in the solar system is",
    "The chemical symbol for gold is",
    "Michael Jordan played the sport of",
    "The capital of Italy is",
    # arithmetic and sequences
    "3 + 5 =",
    "10 - 4 =",
    "One, two, three, four,",
    "Monday, Tuesday, Wednesday,",
    "January, February, March,",
    # opposites
    'The opposite of "hot" is "',
    'The opposite of "up" is "',
    'The opposite of "happy" is "',
    "The opposite of black is",
    # subject-verb agreement
    "The keys to the cabinet",
    "The dog that chased the cats",
    "The teachers in the school",
    "The author of the books",
    "My friends from the city",
    "The girl with the red shoes",
    # other
    "She poured herself a cup of",
    "The cat sat on the",
]


def replacement(transcoders: Any, kind: str, seed: int = 0) -> Any:
    """The trained transcoders, or a broken copy: random features, or the skip connection alone."""
    import torch

    if kind == "trained":
        return transcoders
    broken = copy.deepcopy(transcoders)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, tc in broken.items():
            if kind == "random":
                for W in (tc.W_enc, tc.W_dec):
                    W.copy_(torch.randn(W.shape, generator=g, dtype=W.dtype) * W.std())
            elif kind == "skip":
                tc.W_dec.zero_()
            else:
                raise SystemExit(f"unknown replacement {kind!r}: trained, random or skip")
    return broken


def without_layers(transcoders: Any, layers: str, n_layers: int) -> Any:
    """The transcoder set less the layers named in `layers` ("0" or "0,1"): their MLP outputs become error nodes."""
    from featurelens.dictionaries.sae import TranscoderSet

    dropped = {int(x) for x in layers.split(",")}
    return TranscoderSet({l: tc for l, tc in transcoders.items() if l not in dropped}, n_layers_model=n_layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transcoders", default=None, help="a transcoder set directory (default: the benchmark's)")
    ap.add_argument("--train-tokens", type=int, default=200_000, help="as benchmarks/attribution.py")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--data-dir", default=None, help="featurelens data directory holding the model")
    ap.add_argument("-k", type=int, default=10, help="features edited per prompt (most influential first)")
    ap.add_argument("--scale", type=float, default=0.0, help="multiply each activation by this (0 ablates)")
    ap.add_argument("--max-feature-nodes", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--replacements", default="trained", help="comma-separated: trained, random, skip")
    ap.add_argument("--held-out", type=int, default=len(HELD_OUT), help="how many held-out prompts to use")
    ap.add_argument("--json", default=None, help="also write the per-edit numbers here")
    ap.add_argument("--drop-layers", default="", help="comma-separated layers whose transcoders are left out (their "
                    "whole MLP output becomes an error node), e.g. 0 to keep layer 0 exact")
    args = ap.parse_args()

    import torch

    import featurelens as fl
    from attention_circuits import gemm_gflops
    from attribution import load_or_train_transcoders
    from featurelens.attribution import attribute, check_graph
    from featurelens.attribution.check import agreement, pool
    from featurelens.pipeline.demo import ANSWERS, PROMPTS

    if args.data_dir:
        from featurelens import paths

        paths.set_data_dir(args.data_dir)
    model = fl.load_model(args.model)
    transcoders, path = load_or_train_transcoders(model, args)
    if args.drop_layers:
        transcoders = without_layers(transcoders, args.drop_layers, model.cfg.n_layers)
        print(f"left out the transcoders of layers {args.drop_layers}: their MLP outputs are error nodes")
    prompts = [(p, ANSWERS.get(p), "demo") for p in PROMPTS] + [(p, None, "held-out") for p in HELD_OUT[: args.held_out]]
    print(f"model {model.name}; transcoders {path}; {len(prompts)} prompts ({len(PROMPTS)} of the demo's), "
          f"{args.k} edits each, scale {args.scale:g}; torch threads {torch.get_num_threads()}, float32 GEMM "
          f"{gemm_gflops():.0f} GFLOP/s at the start", flush=True)
    out: dict[str, Any] = {"transcoders": str(path), "k": args.k, "scale": args.scale, "replacements": {}}
    for kind in args.replacements.split(","):
        tcs = replacement(transcoders, kind.strip())
        t = time.perf_counter()
        results = []
        where_of: dict[str, str] = {}
        for p, target, where in prompts:
            g = attribute(model, tcs, p, max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size,
                          progress=False, target=target)
            if g.n_features == 0:
                continue
            results.append((p, check_graph(g, model, tcs, k=args.k, scale=args.scale)))
            where_of[p] = where
            r = results[-1][1]
            print(f"  {p[:44]!r:<48} -> {r.target!r:<10} score {r.score:.2f}  " + "  ".join(
                f"({t}) sign {a.sign_agreement:.0%} spearman {a.spearman:.2f}" for t, a in r.tiers.items()), flush=True)
        rep = pool(results)
        scores = [r.score for _, r in results if r.score == r.score]
        by_set = {s: pool([(p, r) for p, r in results if where_of[p] == s]) for s in ("demo", "held-out")}
        print(f"\n== {kind}: {time.perf_counter() - t:.0f} s, GEMM now {gemm_gflops():.0f} GFLOP/s")
        print(rep.summary())
        for s, r in by_set.items():
            if r.per_prompt:
                print(f"  {s} prompts only: " + "; ".join(
                    f"({t}) sign {a.sign_agreement:.0%} spearman {a.spearman:.3f}" for t, a in r.tiers.items()))
        feats = [f for _, r in results for f in r.features]
        for name, keep in (("layer-0 features", lambda f: f.node_id.startswith("0_")),
                           ("later features", lambda f: not f.node_id.startswith("0_"))):
            part = [f for f in feats if keep(f)]
            if part:
                print(f"  {name} ({len(part)} edits): " + "; ".join(
                    f"({t}) graph {agreement([f.predicted_total for f in part], [f.tier(t) for f in part]).spearman:.3f}"
                    f" gradient {agreement([f.predicted_gradient for f in part], [f.tier(t) for f in part]).spearman:.3f}"
                    for t in rep.tiers) + " (Spearman)")
        if scores:
            print(f"  mean faithfulness score {sum(scores) / len(scores):.3f} over {len(scores)} graphs")
        out["replacements"][kind] = {
            "tiers": {t: a.as_dict() for t, a in rep.tiers.items()},
            "tiers_no_crossing": {t: a.as_dict() for t, a in rep.tiers_no_crossing.items()},
            "gradient_tiers": {t: a.as_dict() for t, a in rep.gradient_tiers.items()},
            "mean_score": sum(scores) / len(scores) if scores else None,
            "prompts": [{"prompt": p, **r.to_info()} for p, r in results]}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
