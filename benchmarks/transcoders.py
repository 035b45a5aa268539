"""Transcoders on the embedded default: training recipes, the default budget, and the replacement model as a whole.

    python benchmarks/transcoders.py --recipes quick --tokens 100k       # which recipe helps, at a small budget
    python benchmarks/transcoders.py --tokens 600k --ce-contexts 8       # the demo's budget: per-layer table
    python benchmarks/transcoders.py --clt --tokens 100k --ce-contexts 4 --no-linear-row   # a cross-layer transcoder

Each run trains skip transcoders for all 18 layers of Gemma 3 270M (`fl.train_transcoders`, or `fl.train_clt`)
into <data dir>/bench-transcoders/<tag>/ (reused when it is there), then evaluates them with
`fl.evaluate_dictionary`: per layer (L0, explained variance, KL spliced alone) and "all" (every MLP replaced at
once, no error terms: CE loss recovered against zero-ablating every MLP, and KL). It prints the wall time of the
training, tokens/s, and a markdown table; the default recipe gets a second row with its features removed (its
affine skips alone: the linear part of the replacement model). --json FILE also writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import featurelens as fl  # noqa: E402
from featurelens.cli.common import count  # noqa: E402
from featurelens.dictionaries import TrainConfig  # noqa: E402
from featurelens.paths import sub_dir  # noqa: E402

# Variants compared by --recipes, each against the first (the default recipe): (tag, options)
RECIPES = (
    ("default", {}),  # least-squares skip kept fixed, quiet encoder start, batch 1024
    ("adam-skip", {"skip_init": "zero", "skip_lr_scale": 1.0, "skip_encoder_scale": 1.0}),  # the earlier recipe
    ("ls-skip-trained", {"skip_lr_scale": 1.0, "skip_encoder_scale": 1.0}),
    ("ls-skip-fixed", {"skip_encoder_scale": 1.0}),
    ("batch4096", {"batch_size": 4096}),
    ("normalized_mse", {"loss": "normalized_mse"}),
    ("fresh", {"reuse": 1}),
    ("lr2x", {"lr_scale": 2.0}),
    ("k64", {"k": 64}),
)
QUICK_RECIPES = ("default", "adam-skip", "ls-skip-trained", "ls-skip-fixed")  # --recipes quick


def train_one(tag: str, args: argparse.Namespace, model, options: dict) -> tuple[object, float | None]:
    out = sub_dir("bench-transcoders") / tag
    options = dict(options)
    k = options.pop("k", args.k)
    batch_size = options.pop("batch_size", args.batch_size)
    lr_scale = options.pop("lr_scale", 1.0)
    reuse = options.pop("reuse", args.reuse)
    if (out / "featurelens.json").is_file() and not args.retrain:
        print(f"{tag}: reusing {out}", file=sys.stderr)
        return fl.load_dictionary(out), None
    lr = None if lr_scale == 1.0 else TrainConfig(arch=args.arch, k=k).lr * lr_scale
    t0 = time.perf_counter()
    if args.clt:
        d = fl.train_clt(model, width=args.width, tokens=args.tokens, k=k, arch=args.arch, batch_size=batch_size,
                         out=out, overwrite=True, lr=lr, reuse=reuse, skip=True, **options)
    else:
        d = fl.train_transcoders(model, layers="all", skip=True, arch=args.arch, k=k, width=args.width,
                                 tokens=args.tokens, batch_size=batch_size, out=out, overwrite=True, lr=lr,
                                 reuse=reuse, **options)
    return d, time.perf_counter() - t0


def without_features(d):
    """A copy of transcoders d whose features write nothing: the affine skip alone, the linear part of the recipe."""
    import copy

    d = copy.deepcopy(d)
    for W in ([tc.W_dec for tc in d] if hasattr(d, "__iter__") else list(d.W_dec)):
        W.data.zero_()
    return d


def evaluate(model, d, args: argparse.Namespace) -> dict:
    res = fl.evaluate_dictionary(model, d, tokens=args.eval_tokens, ce_contexts=args.ce_contexts,
                                 per_layer_ce=not args.recipes)  # recipes: only all layers spliced at once
    return {str(k): m.to_dict() for k, m in res.items()}


def row(tag: str, seconds: float | None, tokens: int, res: dict, features: bool = True) -> str:
    every = res["all"]
    layers = [v for k, v in res.items() if k != "all"]
    evs = [v["explained_variance"] for v in layers]
    l0 = f"{sum(v['l0'] for v in layers) / len(layers):.1f}" if features else "-"
    speed = f"{tokens / seconds:,.0f}" if seconds else "-"
    wall = f"{seconds / 60:.1f}" if seconds else "-"
    return (f"| {tag} | {wall} | {speed} | {l0} | {min(evs):.3f} | {sum(evs) / len(evs):.3f} | "
            f"{every['ce_spliced']:.3f} | {every['ce_loss_recovered']:.1%} | {every['kl_div']:.3f} |")


def per_layer_table(res: dict) -> str:
    layers = sorted((int(k), v) for k, v in res.items() if k != "all")
    head = "| layer | " + " | ".join(str(k) for k, _ in layers) + " |"
    sep = "|---|" + "---|" * len(layers)
    lines = [head, sep]
    for name, key, fmt in (("L0", "l0", "{:.1f}"), ("explained variance", "explained_variance", "{:.3f}"),
                           ("KL spliced alone", "kl_div", "{:.3f}")):
        cells = ["-" if v.get(key) is None or v[key] != v[key] else fmt.format(v[key]) for _, v in layers]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=count, default=2_000_000)
    ap.add_argument("--width", type=count, default=1024)
    ap.add_argument("-k", "--k", type=count, default=32)
    ap.add_argument("--arch", default="topk")
    ap.add_argument("--batch-size", type=count, default=1024)
    ap.add_argument("--reuse", type=count, default=4)
    ap.add_argument("--loss", default="mse", choices=("mse", "normalized_mse"))
    ap.add_argument("--clt", action="store_true", help="a cross-layer transcoder instead of per-layer ones")
    ap.add_argument("--recipes", nargs="?", const="quick", default=None, choices=("quick", "all"),
                    help="compare recipe variants against the default one (quick: " + ", ".join(QUICK_RECIPES)
                    + "; all: every one in RECIPES)")
    ap.add_argument("--eval-tokens", type=count, default=50_000)
    ap.add_argument("--ce-contexts", type=count, default=16, help="held-out contexts for CE / KL (each pair of "
                    "contexts costs 2 forwards per layer spliced alone, and 3 for all at once)")
    ap.add_argument("--no-linear-row", dest="linear_row", action="store_false",
                    help="skip the extra evaluation of the default recipe with its features removed")
    ap.add_argument("--retrain", action="store_true", help="train again even when the directory exists")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = fl.load_model("gemma-3-270m")
    kind = "clt" if args.clt else "skip"
    chosen = [r for r in RECIPES if args.recipes == "all" or r[0] in QUICK_RECIPES]
    one = "default" if args.loss == "mse" else args.loss
    variants = chosen if args.recipes else ((one, {"loss": args.loss}),)
    header = ("| recipe | train min | tok/s | mean L0 | min EV | mean EV | CE all spliced | CE recovered | KL all |\n"
              "|---|---|---|---|---|---|---|---|---|")
    lines, results = [], {}
    for name, options in variants:
        tag = f"{kind}-{args.arch}{args.k}-w{args.width}-b{args.batch_size}-r{args.reuse}-{args.tokens}-{name}"
        d, seconds = train_one(tag, args, model, options)
        res = evaluate(model, d, args)
        results[tag] = {"seconds": seconds, "options": options, "metrics": res}
        lines.append(row(name, seconds, args.tokens, res))
        if name == "default" and args.linear_row:
            lines.append(row("default, features removed (skip alone)", None, args.tokens,
                             evaluate(model, without_features(d), args), features=False))
        print("\n".join([header] + lines), flush=True)
        if not args.recipes:
            print(per_layer_table(res))
    first = next(iter(results.values()))["metrics"]["all"]
    print(f"CE clean {first['ce_clean']:.3f}, all MLPs zero-ablated {first['ce_zero_ablation']:.3f}; "
          f"{args.eval_tokens:,} eval tokens, {first['ce_tokens']:,} CE tokens")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
