"""The GPU path in one run: forward, attribution and SAE-training throughput, featurelens against the reference
libraries on the same device, with the ratios.

    python benchmarks/gpu.py                         # --device cuda
    python benchmarks/gpu.py --device cpu --small    # the same steps with a small budget (what the tests run)
    python benchmarks/gpu.py --build-references      # build circuit-tracer's and SAELens's environments first

1. Forward tokens/s: featurelens `model(tokens)` against `transformers`' Gemma3ForCausalLM built on the very same
   tensors (benchmarks/forward.py's `hf_twin`; the logits are checked to agree first), float32, and on CUDA also
   under bfloat16 autocast.
2. Attribution: `fl.attribute` over a prompt with a per-layer TopK transcoder set (trained once on this device, or
   --transcoders), against circuit-tracer's `attribute` on the same transcoders in its own environment
   (benchmarks/_circuit_tracer_env.py). That environment is built by benchmarks/attribution.py or
   --build-references; without it the row says so.
3. SAE training tokens/s: a TopK SAE on cached activations of one hook, featurelens's trainer against SAELens's
   `SAETrainer` (benchmarks/train.py's script, in its own environment: built by benchmarks/train.py or
   --build-references); without it the row says so.

Timings synchronize the device around every timed region and report medians; compare ratios from one run. The
float32 (and on CUDA bfloat16) matmul TFLOP/s printed first says what the device offered during the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _circuit_tracer_env as ctenv  # noqa: E402
import train as sae_bench  # noqa: E402

SMALL = dict(batch=1, seq=16, repeats=1, tc_width=64, tc_tokens=2048, tc_k=8, max_feature_nodes=16,
             sae_width=1024, sae_batch=256, sae_steps=4, sae_warmup=1)
FULL = dict(batch=32, seq=256, repeats=5, tc_width=2048, tc_tokens=1_000_000, tc_k=16, max_feature_nodes=None,
            sae_width=16384, sae_batch=4096, sae_steps=50, sae_warmup=5)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn: Callable[[], Any], dev: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `fn` over `repeats` runs after `warmup`, the device synchronized around each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_tflops(dev: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / timed(lambda: a @ b, dev, 3) / 1e12


# ----------------------------------------------------------------------------------------------- 1. forward
def bench_forward(model: Any, dev: torch.device, b: dict[str, Any]) -> dict[str, Any]:
    import forward

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, model.cfg.d_vocab, (b["batch"], b["seq"]), generator=g).to(dev)
    tokens[:, 0] = model.cfg.bos_token_id
    n_tok = tokens.numel()
    out: dict[str, Any] = {"tokens_per_batch": n_tok}
    with torch.inference_mode():
        out["featurelens_float32"] = n_tok / timed(lambda: model(tokens), dev, b["repeats"])
        try:
            hf, _ = forward.hf_twin(model)
        except ImportError as e:
            out["transformers"] = f"not available ({e})"
            return out
        diff = float((model(tokens[:1]).float() - hf(input_ids=tokens[:1]).logits.float()).abs().max())
        out["logit_max_abs_diff"] = diff
        if diff > 1e-3:
            out["transformers"] = f"void: the two compute different logits (max |diff| {diff:.2e})"
            return out
        out["transformers_float32"] = n_tok / timed(lambda: hf(input_ids=tokens), dev, b["repeats"])
        if dev.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out["featurelens_bf16_autocast"] = n_tok / timed(lambda: model(tokens), dev, b["repeats"])
                out["transformers_bf16_autocast"] = n_tok / timed(lambda: hf(input_ids=tokens), dev, b["repeats"])
    return out


# ----------------------------------------------------------------------------------------------- 2. attribution
def transcoders(model: Any, dev: torch.device, b: dict[str, Any], given: str | None) -> tuple[Any, Path]:
    import featurelens as fl
    from featurelens.paths import sub_dir

    if given:
        path = Path(given).expanduser()
        return fl.load_dictionary(path, device=dev), path
    path = sub_dir("bench-transcoders") / f"{model.name}-topk{b['tc_k']}-w{b['tc_width']}-{b['tc_tokens']}"
    if not (path / "featurelens.json").is_file():
        print(f"training {model.cfg.n_layers} transcoders (width {b['tc_width']}, {b['tc_tokens']:,} tokens) into "
              f"{path}, once", flush=True)
        fl.train_transcoders(model, "all", arch="topk", k=b["tc_k"], width=b["tc_width"], tokens=b["tc_tokens"],
                             batch_size=min(1024, b["tc_tokens"]), out=path, overwrite=True, progress=False)
    return fl.load_dictionary(path, device=dev), path


def bench_attribution(model: Any, dev: torch.device, b: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import featurelens as fl

    tset, path = transcoders(model, dev, b, args.transcoders)
    tokens = model.to_tokens(args.prompt)[0].tolist()
    out: dict[str, Any] = {"prompt_tokens": len(tokens), "transcoders": str(path)}
    run = lambda: fl.attribute(model, tset, tokens, max_feature_nodes=b["max_feature_nodes"],  # noqa: E731
                               batch_size=args.attr_batch, progress=False)
    out["featurelens_s"] = timed(run, dev, b["repeats"])
    if not ctenv.env_ready():
        out["circuit_tracer"] = (f"not available: its environment is not built ({ctenv.env_dir()}); "
                                 f"--build-references or python benchmarks/attribution.py builds it")
        return out
    if model.name not in ctenv.TL_NAMES:
        out["circuit_tracer"] = f"not available for {model.name} (TransformerLens knows {', '.join(ctenv.TL_NAMES)})"
        return out
    import attribution

    from featurelens.paths import sub_dir

    cpu_set = fl.load_dictionary(path)
    job = {"hf_dir": str(ctenv.export_hf_model(model.name)), "tl_name": ctenv.TL_NAMES[model.name],
           "transcoders": str(attribution.circuit_tracer_transcoders(cpu_set, path)), "tokens": tokens,
           "runs": b["repeats"], "batch_size": args.attr_batch, "max_feature_nodes": b["max_feature_nodes"],
           "max_n_logits": 10, "desired_logit_prob": 0.95, "json_dir": str(sub_dir("bench-graphs") / "gpu"),
           "slug": "gpu-benchmark", "scan": f"featurelens/{path.name}", "node_threshold": 0.8,
           "edge_threshold": 0.98, "threads": None, "device": str(dev)}
    try:
        res = ctenv.run_driver(ctenv.env_dir(), job, sub_dir("bench-runs") / "gpu-circuit-tracer")
    except ctenv.BenchmarkSetupError as e:
        out["circuit_tracer"] = f"failed: {e}"
        return out
    out["circuit_tracer_s"] = res["median_s"]
    return out


# ----------------------------------------------------------------------------------------------- 3. SAE training
def featurelens_sae(x: torch.Tensor, dev: torch.device, b: dict[str, Any], hook: str) -> float:
    from featurelens.dictionaries import DictionaryConfig, Learner, TrainConfig, run_training

    steps = b["sae_steps"] + b["sae_warmup"]
    tcfg = TrainConfig(arch="topk", width=b["sae_width"], k=32, tokens=steps * b["sae_batch"],
                       batch_size=b["sae_batch"], lr=2e-3)
    torch.manual_seed(0)
    learner = Learner("sae", DictionaryConfig(d_in=x.shape[1], d_sae=b["sae_width"], arch="topk", k=32,
                                              hook_name=hook), tcfg, device=dev)
    stamps: list[float] = []

    def batches(_: int):
        g = torch.Generator().manual_seed(0)
        while True:
            sync(dev)
            stamps.append(time.perf_counter())
            yield {hook: x[torch.randint(0, len(x), (b["sae_batch"],), generator=g).to(x.device)]}

    run_training([learner], batches, tcfg, None, progress=False)
    sync(dev)
    stamps.append(time.perf_counter())
    w = b["sae_warmup"]
    return b["sae_steps"] * b["sae_batch"] / (stamps[w + b["sae_steps"]] - stamps[w])


def saelens_python(args: argparse.Namespace) -> Path | None:
    from featurelens.paths import sub_dir

    venv = Path(args.saelens_venv).expanduser() if args.saelens_venv else sub_dir("bench") / "saelens-venv"
    py = venv / "bin" / "python"
    return py if py.is_file() else None


def bench_sae(model: Any, dev: torch.device, b: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    import featurelens as fl
    from featurelens.dictionaries import model_batches

    hook = f"blocks.{model.cfg.n_layers // 3}.hook_resid_post"
    rows = b["sae_batch"] * max(4, min(b["sae_steps"], 16))  # a pool the steps sample from
    contexts = fl.load_contexts(model, split="train", progress=False)
    contexts = contexts[: rows // (contexts.shape[1] - 1) + 2]
    x = torch.cat([bt[hook] for bt in model_batches(model, [hook], contexts, 4096, epochs=1)(0)])[:rows]
    x = x * (x.shape[1] ** 0.5 / x.norm(dim=-1).mean())  # what both trainers would see after normalizing
    out: dict[str, Any] = {"hook": hook, "width": b["sae_width"], "batch": b["sae_batch"], "steps": b["sae_steps"]}
    out["featurelens_tokens_per_s"] = featurelens_sae(x.to(dev), dev, b, hook)
    py = saelens_python(args)
    if py is None:
        out["saelens"] = ("not available: no SAELens environment (python benchmarks/train.py or --build-references "
                          "builds one; --saelens-venv names another)")
        return out
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as tmp:
        acts = Path(tmp) / "acts.safetensors"
        save_file({"x": x.cpu().contiguous()}, str(acts))
        ns = argparse.Namespace(width=b["sae_width"], k=32, batch_size=b["sae_batch"], steps=b["sae_steps"],
                                warmup_steps=b["sae_warmup"], lr=2e-3, held_out=min(1024, len(x) // 4),
                                dead_window_steps=1000)
        try:
            res = sae_bench.train_saelens(py, acts, ns, autocast=False, device=str(dev))
        except RuntimeError as e:
            out["saelens"] = f"failed: {e}"
            return out
    out["saelens_tokens_per_s"] = res["tokens_per_s"]
    return out


# ----------------------------------------------------------------------------------------------- report
def ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if isinstance(a, float) and isinstance(b, float) and b > 0 else "-"


def report(r: dict[str, Any]) -> None:
    f, a, s = r["forward"], r["attribution"], r["sae_training"]
    print(f"\n== {r['device_name']} ({r['device']}), torch {r['torch']}; matmul {r['matmul_tflops']}")
    print(f"forward, {f['tokens_per_batch']:,} tokens a batch (tokens/s; ratio featurelens / transformers):")
    for kind in ("float32", "bf16_autocast"):
        fl_, tf = f.get(f"featurelens_{kind}"), f.get(f"transformers_{kind}")
        if fl_ is not None:
            tf_txt = f"{tf:,.0f}" if isinstance(tf, float) else f.get("transformers", "-")
            print(f"  {kind:14s} featurelens {fl_:,.0f}   transformers {tf_txt}   ratio {ratio(fl_, tf)}")
    ct = a.get("circuit_tracer_s")
    print(f"attribution, {a['prompt_tokens']} prompt tokens: featurelens {a['featurelens_s']:.3f} s   circuit-tracer "
          f"{f'{ct:.3f} s' if ct else a.get('circuit_tracer')}   speed-up {ratio(ct, a['featurelens_s'])}")
    sl = s.get("saelens_tokens_per_s")
    print(f"SAE training, width {s['width']:,}, batch {s['batch']:,}: featurelens {s['featurelens_tokens_per_s']:,.0f} "
          f"tokens/s   SAELens {f'{sl:,.0f} tokens/s' if sl else s.get('saelens')}   ratio "
          f"{ratio(s['featurelens_tokens_per_s'], sl)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--small", action="store_true", help="a small budget (minutes on a CPU; what the tests run)")
    ap.add_argument("--transcoders", default=None, help="a transcoder set for attribution (default: train one)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--attr-batch", type=int, default=256, help="attribution's backward batch size")
    ap.add_argument("--saelens-venv", default=None)
    ap.add_argument("--build-references", action="store_true",
                    help="build circuit-tracer's and SAELens's environments (pip, once) before measuring")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args(argv)

    from featurelens.device import check_device
    from featurelens.errors import InputError

    try:
        dev = check_device(args.device) or torch.device("cpu")
    except InputError as e:
        print(f"benchmarks/gpu.py: {e}", file=sys.stderr)
        return 2
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if args.build_references:
        ctenv.ensure_env()
        sae_bench.saelens_python(argparse.Namespace(saelens_venv=args.saelens_venv))
    b = SMALL if args.small else FULL
    import featurelens as fl

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    n = 1024 if args.small else 4096
    tflops = {"float32": round(matmul_tflops(dev, torch.float32, n), 3)}
    if dev.type == "cuda":
        tflops["bfloat16"] = round(matmul_tflops(dev, torch.bfloat16, n), 1)
    print(f"device {dev} ({name}); {n}^3 matmul TFLOP/s {tflops}", flush=True)
    model = fl.load_model(args.model, device=dev)
    results: dict[str, Any] = {"device": str(dev), "device_name": name, "torch": torch.__version__,
                               "model": model.name, "budget": "small" if args.small else "full",
                               "matmul_tflops": tflops}
    results["forward"] = bench_forward(model, dev, b)
    print(f"forward: {results['forward']}", flush=True)
    results["attribution"] = bench_attribution(model, dev, b, args)
    print(f"attribution: {results['attribution']}", flush=True)
    results["sae_training"] = bench_sae(model, dev, b, args)
    print(f"SAE training: {results['sae_training']}", flush=True)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
