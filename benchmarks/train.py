"""SAE training speed: featurelens against SAELens on the same cached activations, in one run.

    python benchmarks/train.py [--hook blocks.6.hook_resid_post] [--width 8192] [--k 32] [--batch-size 4096]
                               [--steps 20] [--warmup-steps 3] [--tokens 65536] [--threads N]
                               [--saelens-venv DIR] [--acts FILE] [--skip-saelens] [--json out.json]

1. Caches `--tokens` activations of the hook (the embedded model over the corpus's training split, BOS left
   out) into a safetensors file, once.
2. Trains a TopK SAE (k, width, Adam, AuxK on dead latents) on batches drawn from that file, first with
   featurelens, then with SAELens's own trainer (`SAETrainer` + `TopKTrainingSAE`) in a separate virtual
   environment, since SAELens cannot be installed next to this project (it pins TransformerLens < 4). The
   script creates that environment on first use (python -m venv; pip install torch==2.13.0 sae-lens) unless
   --saelens-venv names one.
3. Times both the same way: the moment each batch is requested; tokens/s over the steps after --warmup-steps.
   Prints tokens/s for each and the ratio. featurelens picks latents with a bfloat16 encoder pass where bfloat16
   matmuls are fast (AVX512-BF16 / AMX CPUs); a second featurelens row shows the all-float32 speed.

On a machine shared with other jobs, pass --threads 1: two OpenMP threads competing with another busy process
slow every small kernel down several times, which measures the neighbours rather than the trainers.

Both run on the CPU with the same torch version and thread count. SAELens runs with its defaults
(dense activations, rescale_acts_by_decoder_norm) and, as a second row, use_sparse_activations=True (which, with
sae-lens 6.54 and torch 2.13 on the CPU, fails in its backward pass; the row then says so).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SAELENS_SCRIPT = r'''
import json, sys, time, torch
from safetensors.torch import load_file
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
x = load_file(a["acts"])["x"]
stamps = []
def provider():
    g = torch.Generator().manual_seed(0)
    while True:
        stamps.append(time.perf_counter())
        yield x[torch.randint(0, len(x), (a["batch_size"],), generator=g)]
steps = a["steps"] + a["warmup_steps"]
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=a["width"], k=a["k"],
                                            use_sparse_activations=a["sparse"]))
cfg = SAETrainerConfig(total_training_samples=(steps) * a["batch_size"], train_batch_size_samples=a["batch_size"],
                       lr=a["lr"], lr_end=a["lr"] / 10, device="cpu")
SAETrainer(cfg, sae, provider()).fit()
stamps.append(time.perf_counter())
w = a["warmup_steps"]
print(json.dumps({"tokens_per_s": a["steps"] * a["batch_size"] / (stamps[w + a["steps"]] - stamps[w])}))
'''


def cache_activations(model_name: str, hook: str, tokens: int, path: Path) -> None:
    import featurelens as fl
    from featurelens.dictionaries import model_batches
    from safetensors.torch import save_file

    model = fl.load_model(model_name)
    contexts = fl.load_contexts(model, split="train", progress=False)
    contexts = contexts[torch.randperm(len(contexts), generator=torch.Generator().manual_seed(0))]
    contexts = contexts[: tokens // (contexts.shape[1] - 1) + 2]
    parts, n = [], 0
    for batch in model_batches(model, [hook], contexts, 4096, epochs=1)(0):
        parts.append(batch[hook])
        n += len(batch[hook])
    save_file({"x": torch.cat(parts)[:tokens].contiguous()}, str(path))


def featurelens_speed(x: torch.Tensor, args: argparse.Namespace, select_dtype: str = "auto") -> float:
    from featurelens.dictionaries import DictionaryConfig, Learner, TrainConfig, run_training

    steps = args.steps + args.warmup_steps
    tcfg = TrainConfig(arch="topk", width=args.width, k=args.k, tokens=steps * args.batch_size,
                       batch_size=args.batch_size, lr=args.lr, select_dtype=select_dtype)
    learner = Learner("sae", DictionaryConfig(d_in=x.shape[1], d_sae=args.width, arch="topk", k=args.k,
                                              hook_name=args.hook), tcfg)
    stamps: list[float] = []

    def batches(_: int):
        g = torch.Generator().manual_seed(0)
        while True:
            stamps.append(time.perf_counter())
            yield {args.hook: x[torch.randint(0, len(x), (args.batch_size,), generator=g)]}

    run_training([learner], batches, tcfg, None, progress=False)
    stamps.append(time.perf_counter())
    w = args.warmup_steps
    return args.steps * args.batch_size / (stamps[w + args.steps] - stamps[w])


def saelens_python(args: argparse.Namespace) -> Path:
    venv = Path(args.saelens_venv).expanduser() if args.saelens_venv else None
    if venv is None:
        from featurelens.paths import sub_dir

        venv = sub_dir("bench") / "saelens-venv"
    py = venv / "bin" / "python"
    if not py.is_file():
        print(f"creating a virtual environment for SAELens in {venv} (once)...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "sae-lens"], check=True)
    return py


def saelens_speed(py: Path, acts: Path, args: argparse.Namespace, sparse: bool) -> float:
    payload = json.dumps({"acts": str(acts), "width": args.width, "k": args.k, "batch_size": args.batch_size,
                          "steps": args.steps, "warmup_steps": args.warmup_steps, "lr": args.lr,
                          "threads": torch.get_num_threads(), "sparse": sparse})
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([str(py), "-c", SAELENS_SCRIPT, payload], capture_output=True, text=True, env=env)
    if out.returncode:
        errors = [ln for ln in out.stderr.splitlines() if re.match(r"^\w+(Error|Exception):", ln)]
        raise RuntimeError(errors[-1][:200] if errors else f"the SAELens run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["tokens_per_s"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--hook", default="blocks.6.hook_resid_post")
    ap.add_argument("--width", type=int, default=8192)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup-steps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=65_536, help="activations to cache and sample batches from")
    ap.add_argument("--acts", default=None, help="a safetensors file with cached activations under 'x' [n, d]")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--saelens-venv", default=None, help="an existing virtual environment with sae-lens installed")
    ap.add_argument("--skip-saelens", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    tmp = tempfile.TemporaryDirectory()
    acts = Path(args.acts) if args.acts else Path(tmp.name) / "acts.safetensors"
    if not acts.is_file():
        print(f"caching {args.tokens:,} activations of {args.hook}...", file=sys.stderr, flush=True)
        cache_activations(args.model, args.hook, args.tokens, acts)
    x = load_file(str(acts))["x"]
    print(f"cached activations: {tuple(x.shape)}; TopK k={args.k}, width {args.width}, batch {args.batch_size}, "
          f"{args.steps} timed steps after {args.warmup_steps}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    from featurelens.dictionaries.kernels import bf16_matmul_is_fast

    rows = {"featurelens": featurelens_speed(x, args)}
    how = "bfloat16 selection" if bf16_matmul_is_fast("cpu") else "float32: this CPU has no fast bfloat16"
    print(f"featurelens ({how})".ljust(34) + f"{rows['featurelens']:>10,.0f} tokens/s", flush=True)
    if bf16_matmul_is_fast("cpu"):
        rows["featurelens (float32 selection)"] = featurelens_speed(x, args, "float32")
        print(f"featurelens (float32 selection)   {rows['featurelens (float32 selection)']:>10,.0f} tokens/s", flush=True)
    if not args.skip_saelens:
        py = saelens_python(args)
        for name, sparse in (("SAELens", False), ("SAELens (use_sparse_activations)", True)):
            try:
                rows[name] = saelens_speed(py, acts, args, sparse)
            except RuntimeError as e:  # on the CPU, SAELens's sparse mode fails in backward (aten::view on SparseCPU)
                print(f"{name:33s}     failed: {str(e)[:150]}", flush=True)
                continue
            print(f"{name:33s} {rows[name]:>10,.0f} tokens/s   featurelens / this = "
                  f"{rows['featurelens'] / rows[name]:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "tokens_per_s": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
