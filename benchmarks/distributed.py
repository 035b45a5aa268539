"""Data-parallel training under torchrun on this machine: rows/s on 1 rank against N ranks, and the bytes each rank
hands to the collectives per step (gradients, statistics, batchtopk's cut), for an SAE and a CLT on Gemma 3 270M.

    python benchmarks/distributed.py                          # SAE width 4096 and CLT width 128/layer, 1 vs 2 ranks
    python benchmarks/distributed.py --sae-width 16384 --tokens 32k --json out.json
    python benchmarks/distributed.py --kinds tc-layers   # transcoders for all 18 layers, --shard layers

Every run deals the contexts into the same 2 shards (TrainConfig.shards), so 1 and 2 ranks train on the same rows
and reach the same weights; each computes its activations from the model (no cache). 1 rank gets all the machine's
cores as torch threads, N ranks one each (what torchrun does). rows/s = tokens / the training loop's seconds
(forward passes included). The bytes are this module's count (`featurelens.distributed.comm_bytes`): the payload a
rank puts into all_reduce / all_gather / broadcast; a ring all-reduce moves about 2 (N - 1) / N times that over
each rank's link. `tc-layers` trains a transcoder set with its layers split over the ranks (shard="layers"): no
collective runs during training, only the final gather of the trained transcoders (counted in "all steps").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HOOK = "blocks.6.hook_resid_post"


def gemm_gflops() -> float:
    """float32 matrix-multiply throughput right now (the machine may be shared)."""
    import torch

    a, b = torch.randn(4096, 640), torch.randn(640, 4096)
    a @ b
    t = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 4096 * 640 * 4096 / (time.perf_counter() - t) / 1e9


def worker(args: argparse.Namespace) -> None:
    """One rank (or the only process): train, then rank 0 writes what it measured."""
    import torch

    import featurelens as fl
    from featurelens import distributed
    from featurelens.data import load_contexts

    distributed.init_from_env(args.device)
    model = fl.load_model("gemma-3-270m", device=args.device)
    ctx = load_contexts(model, "nlp-corpus", 128, "train", progress=False)
    ctx = ctx[: -(-args.tokens // 127) + 4]
    out = Path(tempfile.mkdtemp(prefix="fl-bench-dp-"))
    at_step: list[int] = []  # rank 0's bytes sent after each step: the steady per-step cost, without the start's

    def record(event: object) -> None:
        at_step.append(distributed.comm_bytes())

    common = dict(tokens=args.tokens, batch_size=args.batch, contexts=ctx, out=out / args.kind, progress=False,
                  shards=2, overwrite=True, on_progress=record)
    before = distributed.comm_bytes()
    if args.kind == "sae":
        d = fl.train_sae(model, HOOK, arch="topk", k=32, width=args.sae_width, **common)
        params = sum(p.numel() for p in d.parameters())
    elif args.kind == "tc-layers":
        d = fl.train_transcoders(model, "all", arch="topk", k=16, width=args.clt_width, shard="layers", **common)
        params = sum(p.numel() for p in d.parameters())
        d = d[d.layers[-1]]  # its stats and decoder below: the last layer's, trained on the last rank
    else:
        d = fl.train_clt(model, "all", arch="batchtopk", k=16, width=args.clt_width, **common)
        params = sum(p.numel() for p in d.parameters())
    sent = distributed.comm_bytes() - before
    if distributed.is_main():
        s = d.stats
        Path(args.result).write_text(json.dumps({
            "kind": args.kind, "ranks": distributed.world_size(), "threads": torch.get_num_threads(),
            "tokens": s["tokens_trained"], "steps": s["steps"], "seconds": s["train_seconds_last_session"],
            "rows_per_s": s["tokens_trained"] / max(s["train_seconds_last_session"], 1e-9),
            "bytes_per_step": sent / max(s["steps"], 1), "param_bytes": 4 * params,
            "steady_bytes_per_step": sorted(b - a for a, b in zip(at_step, at_step[1:]))[len(at_step) // 2 - 1]
            if len(at_step) > 2 else sent,
            "W_dec": d.W_dec[0].float().sum().item() if isinstance(d.W_dec, torch.nn.ParameterList)
            else d.W_dec.float().sum().item()}))


def run(kind: str, ranks: int, args: argparse.Namespace) -> dict:
    result = Path(tempfile.mktemp(suffix=".json"))
    cores = os.cpu_count() or 1
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads or max(1, cores // ranks))}
    tokens, batch = (args.tokens, args.batch) if kind == "sae" else (args.clt_tokens, args.clt_batch)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           __file__, "--worker", "--kind", kind, "--result", str(result), "--tokens", str(tokens),
           "--batch", str(batch), "--sae-width", str(args.sae_width), "--clt-width", str(args.clt_width),
           *(["--device", args.device] if args.device else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{kind} on {ranks} rank(s) failed:\n{done.stderr[-4000:]}")
    return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--kind", default="sae", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kinds", nargs="+", default=["sae", "clt"], choices=["sae", "clt", "tc-layers"])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--sae-width", type=int, default=4096)
    ap.add_argument("--clt-width", type=int, default=128, help="CLT features per layer (all 18 layers)")
    ap.add_argument("--clt-tokens", type=int, default=4096)
    ap.add_argument("--clt-batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: cores / ranks)")
    ap.add_argument("--device", default=None, help="cuda: one GPU per rank, nccl (default: cpu, gloo)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print(f"{os.cpu_count()} CPU cores (shared with other work), float32 matmul {gemm_gflops():.0f} GFLOP/s; "
          f"{args.tokens:,} tokens, batch {args.batch}, 2 data shards")
    rows = []
    for kind in args.kinds:
        for n in args.ranks:
            r = run(kind, n, args)
            rows.append(r)
            print(f"  {kind} on {n} rank(s): {r['rows_per_s']:,.0f} rows/s, {r['steady_bytes_per_step'] / 1e6:.3f} MB "
                  f"sent per step per rank (gradients {r['param_bytes'] / 1e6:.3f} MB)", flush=True)
    print("\n| dictionary | ranks | threads/rank | tokens | batch | rows/s | MB sent per step per rank "
          "(all steps / steady) | gradient MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        width = args.sae_width if r["kind"] == "sae" else f"{args.clt_width}/layer x 18 layers"
        batch = args.batch if r["kind"] == "sae" else args.clt_batch
        print(f"| {r['kind']} {width} | {r['ranks']} | {r['threads']} | {r['tokens']:,} | {batch} | "
              f"{r['rows_per_s']:,.0f} | {r['bytes_per_step'] / 1e6:.3f} / {r['steady_bytes_per_step'] / 1e6:.3f} | "
              f"{r['param_bytes'] / 1e6:.3f} |")
    for kind in args.kinds:
        same = {round(r["W_dec"], 3) for r in rows if r["kind"] == kind}
        print(f"{kind}: 1 and N ranks reached {'the same' if len(same) == 1 else 'DIFFERENT'} decoder sums {same}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
