"""Faithfulness of attribution graphs in the real model, over a fixed set of prompts.

    python benchmarks/faithfulness.py [--transcoders DIR] [-k 10] [--max-feature-nodes 1024] [--json out.json]

For each prompt (facts, arithmetic, opposites, subject-verb agreement): `fl.attribute` builds the graph on the
transcoders, then `check_graph` ablates the graph's k most influential features one at a time in the real,
unfrozen model (attention and norms live, every later layer recomputed) and measures the change of the target
(top) logit, demeaned as the graph's logit nodes are. Pooled over every ablation of every prompt, it prints how
often the sign the graph predicts (its total effect on the logit) is the sign measured, the correlation of
predicted and measured changes (total and direct-only predictions), and how often an ablation lowered the target.

The transcoders are `--transcoders DIR` or, by default, the ones benchmarks/attribution.py trains and caches
(18 TopK-16 width-2048 transcoders, `--train-tokens`), so both benchmarks describe the same graphs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PROMPTS = [
    # facts
    "The capital of France is",
    "The capital of Japan is",
    "The Eiffel Tower is located in the city of",
    "The largest planet in the solar system is",
    "The chemical symbol for gold is",
    "Michael Jordan played the sport of",
    # arithmetic
    "2 + 2 =",
    "3 + 5 =",
    "10 - 4 =",
    "One, two, three, four,",
    "Monday, Tuesday, Wednesday,",
    # opposites
    'The opposite of "small" is "',
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
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--transcoders", default=None, help="a transcoder set or CLT directory (default: the benchmark's)")
    ap.add_argument("--train-tokens", type=int, default=200_000, help="as benchmarks/attribution.py")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("-k", type=int, default=10, help="features ablated per prompt (most influential first)")
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the per-ablation numbers here")
    args = ap.parse_args()

    import featurelens as fl
    from attribution import load_or_train_transcoders
    from featurelens.attribution import check_prompts

    model = fl.load_model(args.model)
    transcoders, path = load_or_train_transcoders(model, args)
    print(f"model {model.name}; transcoders {path}; {len(PROMPTS)} prompts, {args.k} ablations each", flush=True)
    t = time.perf_counter()
    rep = check_prompts(model, transcoders, PROMPTS, k=args.k, max_feature_nodes=args.max_feature_nodes,
                        batch_size=args.batch_size)
    print(rep.summary())
    print(f"({time.perf_counter() - t:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "transcoders": str(path), "k": args.k, "sign_agreement": rep.sign_agreement,
            "correlation": rep.correlation, "correlation_direct": rep.correlation_direct,
            "lowers_target": rep.lowers_target,
            "prompts": [{"prompt": p, "target": r.target, "ablations": [vars(f) for f in r.features]}
                        for p, r in rep.per_prompt]}, indent=2))


if __name__ == "__main__":
    main()
