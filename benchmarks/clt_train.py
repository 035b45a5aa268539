"""Cross-layer transcoder (CLT) training speed against the per-layer skip transcoder set, in one process, on the
same activations.

    python benchmarks/clt_train.py [--rows 8192] [--steps 4] [--warmup-steps 1] [--repeats 3] [--width 1024]
                                   [--k 32] [--batch-size 1024] [--threads N] [--code DIR] [--profile]
                                   [--synthetic] [--acts FILE] [--json out.json]

1. Activations: every layer's MLP input and output (the pairs both kinds of transcoder learn) for --rows rows of
   Gemma 3 270M over the corpus's training split (`model_batches`, BOS left out), timed apart: `train_transcoders`
   and `train_clt` read the same stream, so the model's forward pass is a cost they share. --synthetic uses random
   rows of the same shapes instead (no model, no corpus: a quick run).
2. Optimisation only, the demo's recipe (TopK, affine skips started at least squares and kept there, batch 1024):
   the per-layer set (one `Learner` per layer) and the CLT (`CLTLearner`), each started from the same first rows,
   step through the same cached batches: --warmup-steps untimed, then --steps timed. Repeated --repeats times,
   alternating; prints rows/s of each, their ratio, and the medians.
3. The float32 matmul rate at the start and the end, since the machine may be shared.

--code DIR imports featurelens from DIR instead of this checkout (say a tree of an older commit from `git archive`),
so the same script measures the code before and after a change; --acts FILE keeps the activations between such
runs. --profile prints torch.profiler's table of one CLT
step. The model comes from the data directory ($FEATURELENS_HOME) and the corpus as `fl.load_contexts` finds it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--rows", type=int, default=8192, help="activation rows cached (the steps cycle through them)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps per repeat")
    ap.add_argument("--warmup-steps", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("-k", "--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--code", default=None, help="import featurelens from this directory")
    ap.add_argument("--synthetic", action="store_true", help="random activations of the model's shapes, no model")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--acts", default=None, metavar="FILE",
                    help="cache of the activations (safetensors): read when it exists, else written")
    ap.add_argument("--json", default=None, metavar="FILE")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.code).resolve() if args.code else Path(__file__).resolve().parents[1]))

    import torch

    import featurelens as fl
    from attention_circuits import gemm_gflops  # after featurelens: that module imports it too
    from featurelens.dictionaries.clt import CLTConfig
    from featurelens.dictionaries.learner import CLTLearner, Learner
    from featurelens.dictionaries.sae import DictionaryConfig
    from featurelens.dictionaries.train_config import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"featurelens from {Path(fl.__file__).parent.parent}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; float32 matmul {gemm_gflops():.0f} GFLOP/s at the start", flush=True)

    n_layers, d = 18, 640
    hooks_in = [f"blocks.{l}.ln2.hook_normalized" for l in range(n_layers)]
    hooks_out = [f"blocks.{l}.hook_mlp_out" for l in range(n_layers)]
    gen_s = None
    if args.acts and Path(args.acts).is_file():
        from safetensors.torch import load_file

        acts = load_file(args.acts)
        n_layers = sum(h.endswith("hook_mlp_out") for h in acts)
        d = acts[hooks_in[0]].shape[1]
        hooks_in, hooks_out = hooks_in[:n_layers], hooks_out[:n_layers]
        print(f"activations from {args.acts}", flush=True)
    elif args.synthetic:
        g = torch.Generator().manual_seed(0)
        acts = {h: torch.randn(args.rows, d, generator=g) for h in hooks_in + hooks_out}
    else:
        from featurelens.dictionaries import model_batches

        model = fl.load_model(args.model)
        n_layers, d = model.cfg.n_layers, model.cfg.d_model
        hooks_in, hooks_out = hooks_in[:n_layers], hooks_out[:n_layers]
        contexts = fl.load_contexts(model, split="train", progress=False)
        t0 = time.perf_counter()
        parts: dict[str, list] = {h: [] for h in hooks_in + hooks_out}
        got = 0
        # forward only the contexts the rows need (a chunk of the default size is 65k rows)
        chunk = args.rows // (contexts.shape[1] - 1) + 2
        for batch in model_batches(model, hooks_in + hooks_out, contexts, args.batch_size, epochs=1,
                                   chunk_contexts=chunk)(0):
            for h in parts:
                parts[h].append(batch[h].reshape(len(batch[h]), -1).float())
            got += len(batch[hooks_in[0]])
            if got >= args.rows:
                break
        acts = {h: torch.cat(v)[:args.rows].contiguous() for h, v in parts.items()}
        gen_s = time.perf_counter() - t0
        if args.acts:
            from safetensors.torch import save_file

            save_file(acts, args.acts)
        print(f"activations: {len(acts[hooks_in[0]]):,} rows of {2 * n_layers} hooks in {gen_s:.1f} s "
              f"({len(acts[hooks_in[0]]) / gen_s:,.0f} rows/s, the model's forward: shared by both)", flush=True)
    rows = len(acts[hooks_in[0]])
    n_batches = rows // args.batch_size
    batches = [{h: v[i * args.batch_size:(i + 1) * args.batch_size] for h, v in acts.items()} for i in range(n_batches)]

    tcfg = TrainConfig(arch="topk", k=args.k, width=args.width, tokens=600_000, batch_size=args.batch_size,
                       skip=True, init_tokens=rows)

    def per_layer_set() -> list:
        return [Learner(f"layer_{l}", DictionaryConfig(d_in=d, d_sae=args.width, arch="topk", k=args.k,
                                                       transcoder=True, skip=True, hook_name=hooks_in[l],
                                                       hook_name_out=hooks_out[l]), tcfg) for l in range(n_layers)]

    def clt() -> list:
        return [CLTLearner("clt", CLTConfig(layers=list(range(n_layers)), d_in=d, d_sae=args.width, arch="topk",
                                            k=args.k, skip=True), tcfg)]

    def run(make) -> float:
        """rows/s of the optimisation steps alone (the learners start from the same rows each time)."""
        torch.manual_seed(0)
        learners = make()
        for lrn in learners:
            lrn.initialize(batches)
        times = []
        for s in range(args.warmup_steps + args.steps):
            batch = batches[s % n_batches]
            t = time.perf_counter()
            for lrn in learners:
                lrn.train_step(batch, tcfg.lr, 1.0)
            times.append(time.perf_counter() - t)
        if args.profile and make is clt:
            from torch.profiler import profile

            with profile() as p:
                learners[0].train_step(batches[0], tcfg.lr, 1.0)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        return args.steps * args.batch_size / sum(times[args.warmup_steps:])

    results: dict[str, list[float]] = {"per-layer set": [], "CLT": []}
    for r in range(args.repeats):
        a = run(per_layer_set)
        b = run(clt)
        results["per-layer set"].append(a)
        results["CLT"].append(b)
        print(f"repeat {r + 1}: per-layer set {a:,.0f} rows/s, CLT {b:,.0f} rows/s, CLT {a / b:.2f}x slower; "
              f"matmul {gemm_gflops():.0f} GFLOP/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    ratio = statistics.median(a / b for a, b in zip(results["per-layer set"], results["CLT"]))
    print(f"median: per-layer set {med['per-layer set']:,.0f} rows/s, CLT {med['CLT']:,.0f} rows/s "
          f"(optimisation steps only), CLT {ratio:.2f}x slower; {n_layers} layers, width {args.width}, k {args.k}, "
          f"batch {args.batch_size}; float32 matmul {gemm_gflops():.0f} GFLOP/s at the end")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows_per_s": results, "median": med, "ratio": ratio,
                                               "activation_seconds": gen_s, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
