"""How far can one layer's skip transcoder go, and what does a dense network reach on the same tokens?

    python benchmarks/transcoder_ceiling.py --layer 15 --fresh 480k --rows 2M --variants 1024:32,4096:64,8192:64 \
        --dense 4096

Collects one layer's (MLP input, MLP output) rows of Gemma 3 270M from the embedded corpus, BOS left out (--fresh
training tokens, --test held-out tokens, bfloat16 in memory), then trains on those very rows, each for --rows rows
(so every token is seen rows / fresh times):

* skip transcoders (TopK, the library's trainer and its default recipe: least-squares skip, AuxK), one per
  --variants entry WIDTH:K;
* with --dense H, a dense ReLU network of H hidden units on top of the same least-squares affine skip, trained
  with Adam on the plain MSE: no sparsity at all, a ceiling for what any dictionary of that size reaches with this
  many tokens and steps.

Prints explained variance on the held-out rows, L0, the dead fraction and the training seconds per variant, as a
markdown table (--json FILE also writes it). Why it exists: the late layers' transcoders stay well below 0.8
explained variance at the demo's budget, and this tells whether the sparsity or the data budget is what holds them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import featurelens as fl  # noqa: E402
from featurelens.cli.common import count  # noqa: E402
from featurelens.dictionaries.metrics import DictionaryMetrics, ReconstructionSums  # noqa: E402
from featurelens.dictionaries.sae import DictionaryConfig  # noqa: E402
from featurelens.dictionaries.batches import iterate_tensors  # noqa: E402
from featurelens.dictionaries.learner import Learner  # noqa: E402
from featurelens.dictionaries.train_config import TrainConfig  # noqa: E402
from featurelens.dictionaries.losses import fit_affine, lr_factor  # noqa: E402
from featurelens.dictionaries.loop import run_training  # noqa: E402


def collect(model, layer: int, split: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n rows of (MLP input after ln2, MLP output) of `layer` from `split`, BOS left out: ([n, d], [n, d]) bf16."""
    hook_in, hook_out = f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    # training shuffles the rows anyway (iterate_tensors), so the store needs no mixing buffer beyond one batch,
    # and so computes no more than a batch of rows beyond n
    store = fl.ActivationStore(model, [hook_in, hook_out], split=split, batch_size=4096, buffer_tokens=4096,
                               dtype=torch.bfloat16, seed=1, progress=False)
    if store.n_tokens < n:  # before any forward pass, and never a second epoch of the same tokens
        raise SystemExit(f"the {split} split has only {store.n_tokens:,} tokens besides BOS; asked for {n:,}")
    xs, ys = [], []
    with tqdm(total=n, desc=f"{split} rows", unit="tok") as bar:
        for batch in store.stream(n):
            xs.append(batch[hook_in])
            ys.append(batch[hook_out])
            bar.update(len(batch[hook_in]))
    return torch.cat(xs), torch.cat(ys)


def reconstruction(y: torch.Tensor, pairs) -> DictionaryMetrics:
    """Explained variance, L0 and dead fraction over (prediction, features) chunks of the held-out targets y."""
    sums, done = None, 0
    for pred, f in pairs:
        sums = sums or ReconstructionSums(y.shape[1], f.shape[1])
        sums.add(y[done:done + len(pred)], pred, f)
        done += len(pred)
    return sums.result()


def sparse_variant(layer: int, width: int, k: int, rows: int, batch_size: int, x, y, xt, yt) -> dict:
    hook_in, hook_out = f"blocks.{layer}.ln2.hook_normalized", f"blocks.{layer}.hook_mlp_out"
    tcfg = TrainConfig(arch="topk", k=k, width=width, tokens=rows, batch_size=batch_size, skip=True)
    cfg = DictionaryConfig(d_in=x.shape[1], d_sae=width, arch="topk", k=k, transcoder=True, d_out=y.shape[1],
                           skip=True, hook_name=hook_in, hook_name_out=hook_out)
    learner = Learner(f"layer_{layer}", cfg, tcfg)
    rows_bf16 = iterate_tensors(x, batch_size, hook_in, y, hook_out, seed=0)

    def batches(seen: int):
        for b in rows_bf16(seen):
            yield {h: v.float() for h, v in b.items()}

    t0 = time.perf_counter()
    run_training([learner], batches, tcfg, None, progress=True)
    seconds = time.perf_counter() - t0
    tc = learner.export()
    with torch.no_grad():
        m = reconstruction(yt, (tc.forward_with_features(xt[i:i + 4096]) for i in range(0, len(xt), 4096)))
    return {"variant": f"skip transcoder w{width} k{k}", "ev": m.explained_variance, "l0": m.l0,
            "dead": m.dead_fraction, "seconds": seconds}


def dense_variant(hidden: int, rows: int, batch_size: int, x, y, xt, yt, lr: float = 1e-3) -> dict:
    """A dense ReLU MLP on top of the least-squares skip, trained on the same rows: the no-sparsity ceiling."""
    torch.manual_seed(0)
    # unit mean-norm inputs and targets (what the transcoder trainer does too), so one lr fits every layer
    scale_in = x.shape[1] ** 0.5 / x.float().norm(dim=1).mean()
    scale_out = y.shape[1] ** 0.5 / y.float().norm(dim=1).mean()
    W_skip, b_skip = fit_affine(x[:16384].float() * scale_in, y[:16384].float() * scale_out)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, y.shape[1]))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = rows // batch_size
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in tqdm(range(steps), desc=f"dense {hidden}"):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb, yb = x[idx].float() * scale_in, y[idx].float() * scale_out
        loss = (xb @ W_skip.T + b_skip + net(xb) - yb).pow(2).sum(-1).mean()
        for group in opt.param_groups:  # constant, then linear decay over the last fifth (as the trainer does)
            group["lr"] = lr * lr_factor(step / steps, warmup=0.0, decay=0.2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        xs = xt * scale_in
        hidden_acts = net[1](net[0](xs))
        pred = (xs @ W_skip.T + b_skip + net[2](hidden_acts)) / scale_out
        m = reconstruction(yt, [(pred, hidden_acts)])
    return {"variant": f"dense ReLU {hidden} (no sparsity)", "ev": m.explained_variance, "l0": float(hidden),
            "dead": float("nan"), "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--fresh", type=count, default=480_000, help="training tokens collected (each used rows/fresh times)")
    ap.add_argument("--test", type=count, default=30_000, help="held-out tokens for explained variance")
    ap.add_argument("--rows", type=count, default=2_000_000, help="rows trained per variant")
    ap.add_argument("--variants", default="1024:32,4096:32,4096:64", help="skip transcoders WIDTH:K, comma-separated")
    ap.add_argument("--dense", type=count, default=0, help="also a dense ReLU network of this many hidden units")
    ap.add_argument("--batch-size", type=count, default=1024)
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()
    model = fl.load_model("gemma-3-270m")
    if not 0 <= args.layer < model.cfg.n_layers:
        raise SystemExit(f"--layer {args.layer}: Gemma 3 270M has layers 0-{model.cfg.n_layers - 1}")
    variants = [tuple(int(v) for v in s.split(":")) for s in args.variants.split(",") if s]
    t0 = time.perf_counter()
    xt, yt = (t.float() for t in collect(model, args.layer, "test", args.test))
    x, y = collect(model, args.layer, "train", args.fresh)
    collect_seconds = time.perf_counter() - t0
    results = []
    for width, k in variants:
        results.append(sparse_variant(args.layer, width, k, args.rows, args.batch_size, x, y, xt, yt))
    if args.dense:
        results.append(dense_variant(args.dense, args.rows, args.batch_size, x, y, xt, yt))
    print(f"\nlayer {args.layer}: {args.fresh:,} training tokens, {args.rows:,} rows per variant "
          f"(each token {args.rows / args.fresh:.1f} times), {args.test:,} held-out tokens; "
          f"collection {collect_seconds / 60:.1f} min")
    print("| variant | explained variance | L0 | dead | train s |\n|---|---|---|---|---|")
    for r in results:
        dead = "-" if r["dead"] != r["dead"] else f"{r['dead']:.1%}"
        print(f"| {r['variant']} | {r['ev']:.3f} | {r['l0']:.1f} | {dead} | {r['seconds']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "collect_seconds": collect_seconds,
                                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
