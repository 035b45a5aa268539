"""SAE training, featurelens against SAELens, like with like: the same activations, batches, steps and dead window.

    python benchmarks/train.py [--hook blocks.6.hook_resid_post] [--width 8192] [--k 32] [--batch-size 4096]
                               [--steps 20] [--warmup-steps 3] [--tokens 65536] [--held-out 8192] [--repeats 3]
                               [--dead-window-steps 1000] [--threads N] [--saelens-venv DIR] [--acts FILE]
                               [--skip-saelens] [--json out.json]

1. Caches `--tokens` activations of the hook (the embedded model over the corpus's training split, BOS left out)
   into a safetensors file, once (or reads `--acts`). The last `--held-out` rows are never trained on.
2. Trains a TopK SAE (k, width, Adam, the same learning rate and warm-up / decay fractions) for
   `--warmup-steps + --steps` steps on the same batches (same seed) with featurelens and with SAELens's own trainer
   (`SAETrainer` + `TopKTrainingSAE`) in a separate virtual environment, since SAELens cannot be installed next to
   this project (it pins TransformerLens < 4). The script creates that environment on first use (python -m venv;
   pip install torch==<this torch> sae-lens) unless --saelens-venv names one.
3. Two pairs, each compared within one run:
     float32:  featurelens with float32 latent selection  vs  SAELens (autocast=False, its default)
     bfloat16: featurelens with bfloat16 latent selection vs  SAELens with its own autocast=True (bfloat16)
   Speed: tokens/s over the steps after the warm-up, timed from the moment each batch is requested.
   Quality at equal steps: explained variance (1 - FVU) and L0 of each trained SAE on the held-out rows.
4. AuxK (the dead-latent loss) is made comparable: a latent counts as dead after `--dead-window-steps` steps without
   firing in both trainers (featurelens `dead_tokens` = window x batch; SAELens `dead_feature_window` = window - 1,
   since it compares with `>`). When the whole run is shorter than the window, no latent can be dead yet and AuxK is
   inactive on both; the script prints which. Each trainer keeps its own AuxK coefficient.

Both run on the CPU with the same torch version and thread count, on activations scaled to mean norm sqrt(d_in):
featurelens does this inside training (and folds the scale back on export); SAELens's training runner does it with
normalize_activations="expected_average_only_in", and since its SAETrainer alone takes rows as given, the script
scales them before handing them over (Gemma's residual stream has norms in the hundreds; unscaled, SAELens's
defaults give a negative explained variance after 23 steps). Each trainer runs with its own defaults otherwise. On a machine shared with other jobs, pass --threads 1 (two OpenMP
threads competing with a busy neighbour measure the neighbour). A smoke run without the model or SAELens:

    python -c "import torch; from safetensors.torch import save_file; save_file({'x': torch.randn(6000, 64)}, '/tmp/a.st')"
    python benchmarks/train.py --acts /tmp/a.st --width 256 --k 8 --batch-size 256 --steps 4 --warmup-steps 1 \
        --held-out 1000 --skip-saelens
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

WARMUP_FRACTION, DECAY_FRACTION = 0.05, 0.2  # featurelens's defaults; SAELens gets the same in steps

SAELENS_SCRIPT = r'''
import json, sys, time, torch
from safetensors.torch import load_file
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
a = json.loads(sys.argv[1])
torch.set_num_threads(a["threads"])
dev = a.get("device", "cpu")
x = load_file(a["acts"])["x"].to(dev)
train, held = x[: len(x) - a["held_out"]], x[len(x) - a["held_out"]:]
# Dataset-wide scaling to mean norm sqrt(d_in), as featurelens does and as SAELens's own training runner does with
# normalize_activations="expected_average_only_in"; SAETrainer alone takes the rows as given. FVU is scale-free.
scale = x.shape[1] ** 0.5 / float(train.norm(dim=-1).mean())
train, held = train * scale, held * scale
stamps = []
def provider():
    g = torch.Generator().manual_seed(0)
    while True:
        if dev != "cpu":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        yield train[torch.randint(0, len(train), (a["batch_size"],), generator=g).to(dev)]
steps = a["steps"] + a["warmup_steps"]
torch.manual_seed(0)
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=a["width"], k=a["k"]))
cfg = SAETrainerConfig(total_training_samples=steps * a["batch_size"], train_batch_size_samples=a["batch_size"],
                       lr=a["lr"], lr_end=a["lr"] * 1e-3, lr_warm_up_steps=a["lr_warm_up_steps"],
                       lr_decay_steps=a["lr_decay_steps"], dead_feature_window=a["dead_feature_window"],
                       autocast=a["autocast"], device=dev)
trainer = SAETrainer(cfg, sae, provider())
trainer.fit()
if dev != "cpu":
    torch.cuda.synchronize()
stamps.append(time.perf_counter())
w = a["warmup_steps"]
sae.eval()
with torch.no_grad():
    f = sae.encode(held)
    err = (sae.decode(f) - held).pow(2).sum()
    var = (held - held.mean(0)).pow(2).sum()
dead = int((trainer.n_forward_passes_since_fired > cfg.dead_feature_window).sum()) \
    if hasattr(trainer, "n_forward_passes_since_fired") else None
print(json.dumps({"tokens_per_s": a["steps"] * a["batch_size"] / (stamps[w + a["steps"]] - stamps[w]),
                  "fvu": float(err / var), "l0": float((f > 0).float().sum(-1).mean()), "dead_at_end": dead}))
'''


def cache_activations(model_name: str, hook: str, tokens: int, path: Path) -> None:
    import featurelens as fl
    from featurelens.dictionaries import model_batches
    from safetensors.torch import save_file

    model = fl.load_model(model_name)
    contexts = fl.load_contexts(model, split="train", progress=False)
    contexts = contexts[torch.randperm(len(contexts), generator=torch.Generator().manual_seed(0))]
    contexts = contexts[: tokens // (contexts.shape[1] - 1) + 2]
    parts = []
    for batch in model_batches(model, [hook], contexts, 4096, epochs=1)(0):
        parts.append(batch[hook])
    save_file({"x": torch.cat(parts)[:tokens].contiguous()}, str(path))


def quality(encode, decode, held: torch.Tensor) -> dict[str, float]:
    """Explained variance and L0 on held-out rows [n, d] (FVU = squared error / variance around the mean)."""
    with torch.no_grad():
        f = encode(held)
        fvu = float((decode(f) - held).pow(2).sum() / (held - held.mean(0)).pow(2).sum())
    return {"fvu": fvu, "l0": float((f > 0).float().sum(-1).mean())}


def train_featurelens(x: torch.Tensor, held: torch.Tensor, args: argparse.Namespace, select_dtype: str) -> dict:
    from featurelens.dictionaries import DictionaryConfig, Learner, TrainConfig, run_training

    steps = args.steps + args.warmup_steps
    tcfg = TrainConfig(arch="topk", width=args.width, k=args.k, tokens=steps * args.batch_size,
                       batch_size=args.batch_size, lr=args.lr, select_dtype=select_dtype, warmup=WARMUP_FRACTION,
                       decay=DECAY_FRACTION, dead_tokens=args.dead_window_steps * args.batch_size)
    torch.manual_seed(0)
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
    sae = learner.export()
    dead = int((learner.since_fired >= learner.dead_tokens).sum()) if hasattr(learner, "since_fired") else None
    return {"tokens_per_s": args.steps * args.batch_size / (stamps[w + args.steps] - stamps[w]),
            **quality(sae.encode, sae.decode, held), "dead_at_end": dead}


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


def train_saelens(py: Path, acts: Path, args: argparse.Namespace, autocast: bool, device: str = "cpu") -> dict:
    steps = args.steps + args.warmup_steps
    payload = json.dumps({"acts": str(acts), "width": args.width, "k": args.k, "batch_size": args.batch_size,
                          "steps": args.steps, "warmup_steps": args.warmup_steps, "lr": args.lr,
                          "threads": torch.get_num_threads(), "autocast": autocast, "held_out": args.held_out,
                          "lr_warm_up_steps": round(WARMUP_FRACTION * steps),
                          "lr_decay_steps": round(DECAY_FRACTION * steps),
                          "dead_feature_window": args.dead_window_steps - 1, "device": device})
    env = {**os.environ, "TQDM_DISABLE": "1", "WANDB_MODE": "disabled"}
    out = subprocess.run([str(py), "-c", SAELENS_SCRIPT, payload], capture_output=True, text=True, env=env)
    if out.returncode:
        errors = [ln for ln in out.stderr.splitlines() if re.match(r"^\w+(Error|Exception):", ln)]
        raise RuntimeError(errors[-1][:200] if errors else f"the SAELens run failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _row(name: str, r: dict) -> str:
    return (f"{name:44s} {r['tokens_per_s']:>10,.0f} tokens/s   explained variance {1 - r['fvu']:.4f}   "
            f"L0 {r['l0']:.1f}")


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
    ap.add_argument("--tokens", type=int, default=65_536, help="activations to cache (training + held-out rows)")
    ap.add_argument("--held-out", type=int, default=8192, help="last rows of the cache, for explained variance only")
    ap.add_argument("--dead-window-steps", type=int, default=1000,
                    help="steps without firing after which a latent is dead (AuxK), in both trainers (default 1000, "
                         "SAELens's default)")
    ap.add_argument("--repeats", type=int, default=1, help="runs; the table shows medians and each run's ratio")
    ap.add_argument("--acts", default=None, help="a safetensors file with cached activations under 'x' [n, d]")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--saelens-venv", default=None, help="an existing virtual environment with sae-lens installed")
    ap.add_argument("--skip-saelens", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dead_window_steps < 1:
        ap.error("--dead-window-steps must be at least 1")
    from safetensors.torch import load_file

    tmp = tempfile.TemporaryDirectory()
    acts = Path(args.acts) if args.acts else Path(tmp.name) / "acts.safetensors"
    if not acts.is_file():
        print(f"caching {args.tokens:,} activations of {args.hook}...", file=sys.stderr, flush=True)
        cache_activations(args.model, args.hook, args.tokens, acts)
    x = load_file(str(acts))["x"].float()
    if not 0 < args.held_out < len(x):
        ap.error(f"--held-out must lie in 1..{len(x) - 1} (the cache has {len(x)} rows)")
    train, held = x[: len(x) - args.held_out], x[len(x) - args.held_out:]
    steps = args.steps + args.warmup_steps
    print(f"activations: {len(train):,} training rows, {len(held):,} held out, d={x.shape[1]}; TopK k={args.k}, "
          f"width {args.width}, batch {args.batch_size}, {steps} steps ({args.steps} timed after {args.warmup_steps}); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if steps <= args.dead_window_steps:
        print(f"AuxK: inactive on both (a latent is dead after {args.dead_window_steps} steps without firing; the run "
              f"has {steps})")
    else:
        print(f"AuxK: active on both once a latent has not fired for {args.dead_window_steps} steps")
    from featurelens.device import bf16_matmul_is_fast

    if not bf16_matmul_is_fast("cpu"):
        print("note: this CPU has no fast bfloat16 matmuls; the bfloat16 rows measure emulated bfloat16 on both sides")
    pairs = (("float32", "float32", False), ("bfloat16", "bfloat16", True))
    py = None if args.skip_saelens else saelens_python(args)
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):
        for label, select_dtype, autocast in pairs:
            ours = train_featurelens(train, held, args, select_dtype)
            runs.setdefault(f"featurelens {label}", []).append(ours)
            print(_row(f"[run {rep + 1}] featurelens, {label} latent selection", ours), flush=True)
            if py is None:
                continue
            name = f"SAELens {label}"
            try:
                theirs = train_saelens(py, acts, args, autocast)
            except RuntimeError as e:
                print(f"[run {rep + 1}] {name}: failed: {str(e)[:150]}", flush=True)
                continue
            theirs["ratio"] = ours["tokens_per_s"] / theirs["tokens_per_s"]
            runs.setdefault(name, []).append(theirs)
            print(_row(f"[run {rep + 1}] SAELens, autocast={autocast}", theirs)
                  + f"   featurelens / SAELens = {theirs['ratio']:.2f}x", flush=True)

    print(f"\nmedians of {args.repeats} run(s), quality after {steps} steps on {len(held):,} held-out rows:")
    print(f"{'trainer':28s} {'tokens/s':>10s}  {'expl. var.':>10s}  {'L0':>6s}  featurelens / SAELens (each run)")
    summary = {}
    for name, rs in runs.items():
        med = {key: statistics.median(r[key] for r in rs) for key in ("tokens_per_s", "fvu", "l0")}
        ratios = [r["ratio"] for r in rs if "ratio" in r]
        med["ratios"] = ratios
        summary[name] = med
        tail = (f"{statistics.median(ratios):.2f}x ({', '.join(f'{q:.2f}x' for q in ratios)})" if ratios else "")
        print(f"{name:28s} {med['tokens_per_s']:>10,.0f}  {1 - med['fvu']:>10.4f}  {med['l0']:>6.1f}  {tail}")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "runs": runs, "medians": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
