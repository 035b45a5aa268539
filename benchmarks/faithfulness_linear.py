"""Which linear model predicts a feature ablation? The graph's prediction against first-order predictions made in
other linearisations of the same prompt, each compared with the measured tiers (a), (b), (c) of `check_graph`.

    python benchmarks/faithfulness_linear.py --data-dir DIR --transcoders DIR [-k 5] [--max-feature-nodes 256]
        [--held-out N] [--drop-layers 0]

Each prediction is the gradient of the target with respect to a gate on every feature's activation (one backward
pass per prompt), times -1 for an ablation:

* graph: the graph's total effect (`check.total_effects`), as `check_graph` reports it;
* frozen: the replacement model with attention and norms frozen (what the graph linearises; equals "graph");
* norms linearised: the replacement model with attention frozen and every norm live, i.e. the RMS norm's Jacobian
  at the recorded point in place of its frozen scale (a lever of issue 25);
* norms and attention linearised: the replacement model with nothing frozen;
* real model, attention frozen / real model: the real MLPs in place of the transcoders (the feature's contribution
  gated in the MLP outputs it writes; `check.gradient_effects` is the second).

The prompts are benchmarks/faithfulness.py's: the demo's, traced to their answers, and the held-out ones. Output:
sign agreement / Spearman per prediction and tier, pooled, and split into layer-0 features and later ones.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def replacement_gradient(model: Any, rep: Any, rec: Any, u: Any, hold: dict, *, freeze_norms: bool,
                         freeze_attention: bool) -> dict:
    """{layer: [P, S]} d target / d gate in the replacement model (errors frozen, transcoders live, the active
    features the graph left out held), with norms and attention frozen or live."""
    import torch

    from featurelens.dictionaries.splice import splice_hooks

    gates = {l: torch.ones_like(rec.acts[l], requires_grad=True) for l in rep.layers}
    frozen = lambda x, hook: rec.frozen[hook.name].to(x.dtype)  # noqa: E731
    hooks = [(nm, frozen) for nm in rec.frozen
             if (freeze_attention and nm.endswith("hook_pattern")) or (freeze_norms and nm.endswith("hook_scale"))]

    def gate_for(l: int) -> Any:
        def edit(a: torch.Tensor) -> torch.Tensor:
            if l in hold:
                a = torch.where(hold[l], rec.acts[l].to(a.dtype), a)
            return a * gates[l]
        return edit

    hooks += splice_hooks(rep, keep_error=False, errors=rec.errors, edit={l: gate_for(l) for l in rep.layers})
    final: list = []
    hooks.append(("ln_final.hook_normalized", lambda x, hook: final.append(x[0, -1])))
    with torch.enable_grad():
        model.run_with_hooks(rec.tokens[None], fwd_hooks=hooks)
        grads = torch.autograd.grad(final[-1] @ u, [gates[l] for l in rep.layers], allow_unused=True)
    return {l: (g if g is not None else torch.zeros_like(gates[l])) for l, g in zip(rep.layers, grads)}


def real_gradient_attention_frozen(model: Any, rep: Any, rec: Any, u: Any) -> dict:
    from featurelens.attribution.check import gradient_effects

    pattern = [(nm, lambda x, hook: rec.frozen[hook.name].to(x.dtype)) for nm in rec.frozen
               if nm.endswith("hook_pattern")]
    with model.hooks(pattern):
        return gradient_effects(model, rep, rec, u)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", required=True, help="featurelens data directory holding the model")
    ap.add_argument("--transcoders", required=True, help="a transcoder set directory")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("-k", type=int, default=5, help="features ablated per prompt (most influential first)")
    ap.add_argument("--max-feature-nodes", type=int, default=256)
    ap.add_argument("--held-out", type=int, default=None, help="how many held-out prompts to use (default all)")
    ap.add_argument("--drop-layers", default="", help="comma-separated layers whose transcoders are left out")
    args = ap.parse_args()

    import torch

    import featurelens as fl
    from attention_circuits import gemm_gflops
    from faithfulness import HELD_OUT, without_layers
    from featurelens import paths
    from featurelens.attribution import attribute, check_graph
    from featurelens.attribution.attribute import prompt_tokens
    from featurelens.attribution.check import _Tiers, agreement, gradient_effects, target_direction
    from featurelens.attribution.replacement import check_transcoders, record
    from featurelens.pipeline.demo import ANSWERS, PROMPTS

    paths.set_data_dir(args.data_dir)
    model = fl.load_model(args.model)
    tc = fl.load_dictionary(args.transcoders)
    if args.drop_layers:
        tc = without_layers(tc, args.drop_layers, model.cfg.n_layers)
    held = HELD_OUT if args.held_out is None else HELD_OUT[: args.held_out]
    prompts = [(p, ANSWERS.get(p)) for p in PROMPTS] + [(p, None) for p in held]
    print(f"{len(prompts)} prompts, {args.k} ablations each; transcoders {args.transcoders} "
          f"(left out: {args.drop_layers or 'none'}); float32 GEMM {gemm_gflops():.0f} GFLOP/s", flush=True)
    names = ["graph", "frozen", "norms linearised", "norms and attention linearised", "real, attention frozen",
             "real model"]
    rows: list[dict] = []
    t0 = time.perf_counter()
    for p, target in prompts:
        g = attribute(model, tc, p, max_feature_nodes=args.max_feature_nodes, progress=False, target=target)
        if g.n_features == 0:
            continue
        r = check_graph(g, model, tc, k=args.k)
        rep = check_transcoders(model, tc)
        rec = record(model, rep, prompt_tokens(model, torch.tensor(g.tokens)))
        u = target_direction(model, g).to(rec.final.dtype)
        hold = _Tiers(model, rep, rec, u, first=1 if g.bos else 0, graph_features=g.features).hold
        grads = {
            "frozen": replacement_gradient(model, rep, rec, u, hold, freeze_norms=True, freeze_attention=True),
            "norms linearised": replacement_gradient(model, rep, rec, u, hold, freeze_norms=False,
                                                     freeze_attention=True),
            "norms and attention linearised": replacement_gradient(model, rep, rec, u, hold, freeze_norms=False,
                                                                   freeze_attention=False),
            "real, attention frozen": real_gradient_attention_frozen(model, rep, rec, u),
            "real model": gradient_effects(model, rep, rec, u),
        }
        order = g.node_influence()[: g.n_features].argsort(descending=True)[: args.k].tolist()
        for f, fc in zip(order, r.features):
            layer, pos, idx = g.features[f].tolist()
            row = {"layer": layer, "graph": fc.predicted_total, "a": fc.measured_a, "b": fc.measured_b,
                   "c": fc.measured}
            row.update({n: -float(gr[layer][pos, idx]) for n, gr in grads.items()})
            rows.append(row)
    print(f"{len(rows)} ablations in {time.perf_counter() - t0:.0f} s; sign agreement / Spearman of each prediction "
          f"with each measured tier")
    for part, keep in (("all", lambda r: True), ("layer-0 features", lambda r: r["layer"] == 0),
                       ("later features", lambda r: r["layer"] > 0)):
        rs = [r for r in rows if keep(r)]
        if not rs:
            continue
        print(f"\n{part} ({len(rs)} ablations)\n  {'prediction':<32}" + "".join(f"{'(' + t + ')':>18}" for t in "abc"))
        for n in names:
            cells = [agreement([r[n] for r in rs], [r[t] for r in rs]) for t in "abc"]
            print(f"  {n:<32}" + "".join(f"{a.sign_agreement:>10.0%} / {a.spearman:5.2f}" for a in cells))


if __name__ == "__main__":
    main()
