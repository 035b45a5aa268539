"""`featurelens train` (SAEs and transcoders) and `featurelens eval PATH`."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    from ..dictionaries.sae import ARCHITECTURES
    from ..models.loader import DEFAULT_MODEL

    p = sub.add_parser("train", help="train a sparse autoencoder on a hook, or per-layer transcoders",
                       description="Train a sparse dictionary on a model's activations and save it in SAELens's "
                                   "layout. Progress shows live L0 and explained variance; checkpoints allow --resume.")
    common.add_model(p, default=DEFAULT_MODEL, dtype=False)
    common.add(p, "hook", note="(train an SAE on this hook; several, comma-separated, train one SAE each on one "
                               "pass of the model, each in its own directory under --out)")
    p.add_argument("--transcoder", action="store_true",
                   help="train transcoders blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out instead")
    common.add(p, "layers", note="(transcoder layers; default all)")
    p.add_argument("--clt", action="store_true",
                   help="train a cross-layer transcoder: layer L's features write to the MLP outputs of L and every "
                        "later layer (--width is features per layer, default 2048; --arch default batchtopk)")
    p.add_argument("--skip", action=argparse.BooleanOptionalAction, default=None,
                   help="transcoders: an affine skip from the MLP input to its output, started at the least-squares "
                        "fit (default on for --transcoder, off for --clt); --no-skip trains plain transcoders")
    p.add_argument("--skip-lr-scale", type=float, default=None,
                   help="the skip's learning rate relative to --lr (default 0: it stays at its least-squares start)")
    p.add_argument("--response-coefficient", type=float, default=None,
                   help="--transcoder: also train each transcoder's response to a small perturbation of its input "
                        "(its active features held, as an attribution graph uses it) toward the MLP's, with this "
                        "weight (default 0: outputs only; costs two more MLP passes per row and twice the --reuse "
                        "buffer's memory)")
    p.add_argument("--loss", default=None, choices=("mse", "normalized_mse"),
                   help="reconstruction loss (default mse; normalized_mse weighs each token by its target's norm)")
    p.add_argument("--reuse", type=common.count, default=None,
                   help="serve each token's activations this many times from an in-memory bfloat16 shuffle buffer "
                        "(default 1: every step on fresh tokens)")
    p.add_argument("--arch", default=None, choices=ARCHITECTURES, help="architecture (default topk; batchtopk for --clt)")
    p.add_argument("-k", "--k", type=common.count, default=None, help="active latents per token for topk / batchtopk (default 32)")
    p.add_argument("--width", type=common.count, default=None, help="dictionary size (default 8192; transcoders 4096)")
    common.add(p, "tokens", note="(training tokens; default 2M, transcoders and CLTs 1M)")
    common.add(p, "out", note="(the dictionary's directory; default under the data directory)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default depends on --arch)")
    p.add_argument("--batch-tokens", type=common.count, default=None, metavar="N",
                   help="tokens per training step, a hyperparameter (default 4096; 1024 for --transcoder, which "
                        "benchmarks/transcoders.py measured better)")
    p.add_argument("--l1-coefficient", type=float, default=None, help="relu: L1 penalty")
    p.add_argument("--l0-coefficient", type=float, default=None, help="jumprelu: L0 penalty")
    common.add(p, "corpus", default="nlp-corpus", note="(default nlp-corpus)")
    common.add(p, "ctx_len", default=128, note="(default 128)")
    p.add_argument("--checkpoint-steps", type=common.count, default=None, metavar="STEPS",
                   help="training steps between checkpoints (default: a checkpoint every 10 minutes)")
    common.add(p, "seed", default=0, note="(default 0)")
    p.add_argument("--shards", type=common.count, default=None,
                   help="data shards the corpus is dealt into (default: the number of torchrun ranks); a run "
                        "resumes on any number of ranks that divides it. --batch-tokens and --tokens must be "
                        "multiples of it")
    common.add(p, "autocast", note="(the dictionary trains in float32 either way)")
    p.add_argument("--shard", default="data", choices=("data", "layers"),
                   help="under torchrun: split the corpus over the ranks (data, default) or, for --transcoder, give "
                        "each rank a contiguous run of the layers, trained over the whole stream (layers; at most "
                        "one rank per layer, resumed on as many ranks)")
    p.add_argument("--from-cache", default=None, metavar="DIR",
                   help="read activations (and their contexts) from an activation cache written by "
                        "`featurelens cache-activations` instead of running the model over --corpus")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    common.add(p, "overwrite", note="(discards what --out holds)")
    p.add_argument("--eval", action="store_true", help="evaluate the result afterwards (as `featurelens eval`)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("cache-activations", help="write a model's activations to an activation cache for training",
                       description="Compute activations at the hooks a training run reads (an SAE's --hook, or "
                                   "the MLP inputs and outputs of --layers with --mlp) over the corpus's training split and write them as "
                                   "sharded safetensors with a manifest; under torchrun the ranks write the shards "
                                   "in parallel. Train on it with `featurelens train --from-cache DIR`.")
    common.add_model(p, default=DEFAULT_MODEL, dtype=False)
    common.add(p, "hook", note="(an SAE's hook; several, comma-separated)")
    p.add_argument("--mlp", action="store_true",
                   help="the MLP inputs and outputs of --layers: what `train --transcoder` and `train --clt` read")
    common.add(p, "layers", note="(with --mlp; default all)")
    common.add(p, "tokens", default=1_000_000, note="(default 1M)")
    common.add(p, "corpus", default="nlp-corpus", note="(default nlp-corpus)")
    common.add(p, "ctx_len", default=128, note="(default 128)")
    common.add(p, "autocast", note="(activations are stored in --cache-dtype)")
    p.add_argument("--cache-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype the activations are stored in (default float32)")
    common.add(p, "out", note="(required: the cache, a directory or an fsspec URL such as s3://bucket/acts)")
    p.set_defaults(func=cmd_cache_activations)

    p = sub.add_parser("eval", help="L0, explained variance, CE loss recovered, dead/dense features of a dictionary")
    p.add_argument("path", help="a dictionary directory (ours or SAELens's), a transcoder set, or a params.npz")
    common.add_model(p, default="the one the dictionary was trained on", dtype=False)
    common.add(p, "tokens", default=100_000, note="(held-out tokens for L0 / FVU / dead / dense; default 100k)")
    p.add_argument("--ce-contexts", type=common.count, default=32, help="held-out contexts for CE loss (0 skips)")
    common.add(p, "corpus", default="nlp-corpus", note="(its test split; default nlp-corpus)")
    common.add(p, "ctx_len", default=128, note="(default 128)")
    common.add(p, "hook", note="(instead of the dictionary's own, e.g. for a Gemma Scope file)")
    common.add(p, "json")
    p.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    from .. import distributed

    if sum(map(bool, (args.transcoder, args.hook, args.clt))) > 1:
        raise InputError("give one of --hook (an SAE), --transcoder (per-layer transcoders) or --clt (a cross-layer "
                         "transcoder)")
    if not args.transcoder and not args.hook and not args.clt:
        raise InputError("give --hook HOOK (e.g. blocks.6.hook_resid_post) to train an SAE, --transcoder, or --clt")
    if args.hook:
        _hooks(args.hook)  # a malformed list is refused before the model loads
    if args.shard == "layers" and not args.transcoder:
        raise InputError(f"--shard layers puts a transcoder set's layers on different ranks; "
                         f"{'a CLT couples its layers' if args.clt else 'an SAE has a single hook'}, so it is trained "
                         f"data parallel (--shard data)")
    options = {k: v for k, v in (("l1_coefficient", args.l1_coefficient), ("l0_coefficient", args.l0_coefficient),
                                 ("loss", args.loss), ("reuse", args.reuse),
                                 ("skip_lr_scale", args.skip_lr_scale), ("autocast", args.autocast),
                                 ("response_coefficient", args.response_coefficient)) if v is not None}
    arch = args.arch or ("batchtopk" if args.clt else "topk")
    batch_size = args.batch_tokens or (1024 if args.transcoder else 4096)
    settings = dict(arch=arch, k=args.k, out=args.out, lr=args.lr, batch_size=batch_size, source=args.corpus,
                  ctx_len=args.ctx_len, resume=args.resume, overwrite=args.overwrite, seed=args.seed,
                  checkpoint_every=args.checkpoint_steps, **options)
    distributed.init_from_env(args.device)  # under torchrun: one rank of a data-parallel run
    settings.update(progress=distributed.is_main(), shards=args.shards, from_cache=args.from_cache)
    model = common.load_model(args)
    if not distributed.is_main():  # the other ranks train along and say nothing
        with contextlib.redirect_stdout(io.StringIO()):
            _train(args, model, settings)
        return 0
    return _train(args, model, settings)


def _train(args: argparse.Namespace, model: Any, settings: dict[str, Any]) -> int:
    from ..dictionaries import train_clt, train_saes, train_transcoders

    if args.clt:
        result: Any = train_clt(model, layers=args.layers or "all", width=args.width or 2048, tokens=args.tokens or 1_000_000,
                           skip=bool(args.skip), **settings)
        saved = [Path(result.source)]
        print(f"saved {result!r} to {saved[0]}")
        _print_train_summary("CLT", result.stats)
    elif args.transcoder:
        result = train_transcoders(model, layers=args.layers or "all", width=args.width or 4096, tokens=args.tokens or 1_000_000,
                                   skip=True if args.skip is None else args.skip, shard=args.shard, **settings)
        first = next(iter(result))
        saved = [Path(first.source).parent]
        print(f"saved {len(result)} transcoders (layers {result.layers}) to {saved[0]}")
        for layer, tc in result.items():
            _print_train_summary(f"layer {layer}", tc.stats)
    else:
        if args.skip:
            raise InputError("--skip is for transcoders")
        hooks = _hooks(args.hook)
        base = settings.pop("out")
        # one hook: --out is its directory; several: one directory each under --out
        outs = {h: Path(base).expanduser() / h if base and len(hooks) > 1 else base for h in hooks}
        saes = train_saes(model, outs, width=args.width or 8192, tokens=args.tokens or 2_000_000, **settings)
        for hook, sae in zip(hooks, saes):
            print(f"saved {sae!r} to {sae.source}")
            _print_train_summary(hook, sae.stats)
        result = saes[0] if len(saes) == 1 else dict(zip(hooks, saes))
        saved = [Path(sae.source) for sae in saes]
    if args.eval and settings["progress"]:  # rank 0 (or the only process) evaluates
        _report(_evaluate(model, result, args.ctx_len, args.corpus, 100_000, 32), as_json=False)
    else:
        print("evaluate it with: " + "; ".join(f"featurelens eval {d}" for d in saved))
    return 0


def _hooks(text: str) -> list[str]:
    """--hook's hook names (comma-separated)."""
    hooks = [h.strip() for h in text.split(",")]
    if not all(hooks) or len(set(hooks)) != len(hooks):
        raise InputError(f"--hook {text!r}: give hook names separated by commas, each once (e.g. "
                         f"blocks.4.hook_resid_post,blocks.8.hook_resid_post)")
    return hooks


def cmd_cache_activations(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..data import load_contexts, write_activation_cache
    from ..dictionaries.protocol import TRANSCODER_IN, TRANSCODER_OUT

    if bool(args.hook) == bool(args.mlp):
        raise InputError("give --hook HOOK (an SAE's activations) or --mlp (MLP inputs and outputs, for transcoders "
                         "and CLTs)")
    if not args.out:
        raise InputError("give --out DIR: where to write the activation cache")
    distributed.init_from_env(args.device)
    model = common.load_model(args)
    if args.hook:
        hooks = _hooks(args.hook)
    else:
        layers = args.layers if args.layers not in (None, "all") else range(model.cfg.n_layers)
        hooks = [h for layer in layers for h in (TRANSCODER_IN.format(layer), TRANSCODER_OUT.format(layer))]
    main = distributed.is_main()
    contexts = load_contexts(model, args.corpus, args.ctx_len, "train", progress=main)
    n = min(len(contexts), -(-args.tokens // args.ctx_len))
    m = write_activation_cache(model, hooks, contexts[:n], args.out, dtype=args.cache_dtype, corpus=str(args.corpus),
                               progress=main, autocast=args.autocast)
    if main:
        print(f"cached {m['n_tokens']:,} tokens ({m['n_contexts']:,} contexts x {m['ctx_len']}) at {len(hooks)} "
              f"hook(s) in {m['n_shards']} shard(s) at {args.out}; train on it with --from-cache {args.out}")
    return 0


def _print_train_summary(name: str, stats: dict[str, Any]) -> None:
    m = stats.get("final_train_metrics", {})
    print(f"  {name}: {stats.get('tokens_trained', 0):,} tokens, {stats.get('steps', 0)} steps; "
          f"last steps L0 {m.get('l0', math.nan):.1f}, explained variance {1 - m.get('fvu', math.nan):.3f}, "
          f"dead {m.get('dead', math.nan):.1%}")


def _evaluate(model: Any, dictionary: Any, ctx_len: int, source: str, tokens: int, ce_contexts: int) -> Any:
    """A dictionary's figures; for {name: dictionary} (several SAEs), each one's, measured on shared passes."""
    from ..dictionaries import evaluate_dictionaries, evaluate_dictionary

    evaluate = evaluate_dictionaries if isinstance(dictionary, dict) else evaluate_dictionary
    return evaluate(model, dictionary, tokens=tokens, ce_contexts=ce_contexts, source=source, ctx_len=ctx_len)


def cmd_eval(args: argparse.Namespace) -> int:
    from ..dictionaries import load_dictionary

    dictionary = load_dictionary(args.path, hook_name=args.hook, device=common.device(args))
    model = common.load_model(args, dictionary)
    _report(_evaluate(model, dictionary, args.ctx_len, args.corpus, args.tokens, args.ce_contexts), args.json)
    return 0


_ROWS = (("L0", "l0", "{:.1f}"), ("explained variance", "explained_variance", "{:.4f}"), ("FVU", "fvu", "{:.4f}"),
         ("dead features", "dead_fraction", "{:.2%}"), ("dense features (>10%)", "dense_fraction", "{:.2%}"),
         ("CE loss clean", "ce_clean", "{:.4f}"), ("CE loss spliced", "ce_spliced", "{:.4f}"),
         ("CE loss zero-ablated", "ce_zero_ablation", "{:.4f}"), ("CE loss recovered", "ce_loss_recovered", "{:.2%}"),
         ("KL(clean || spliced)", "kl_div", "{:.4f}"), ("eval tokens", "eval_tokens", "{:,}"),
         ("CE tokens", "ce_tokens", "{:,}"))


def _report(result: Any, as_json: bool) -> None:
    from rich.table import Table

    results = result if isinstance(result, dict) else {"": result}
    if as_json:
        print(json.dumps({str(k): v.to_dict() for k, v in results.items()} if isinstance(result, dict)
                         else result.to_dict(), indent=2))
        return
    first = next(iter(results.values()))
    if len(results) == 1:  # one dictionary: a metric per row
        table = Table()
        table.add_column("metric")
        table.add_column("value", justify="right")
        for label, attr, fmt in _ROWS:
            table.add_row(label, _cell(getattr(first, attr), fmt))
    else:  # transcoders: a layer per row (and "all" spliced in together), the main metrics as columns
        table = Table(caption=f"{first.eval_tokens:,} tokens; CE loss over {first.ce_tokens:,} tokens; "
                              f"CE clean {first.ce_clean:.4f}")
        table.add_column("layer" if all(isinstance(k, int) or k == "all" for k in results) else "hook")
        wide = {"l0": "L0", "explained_variance": "expl. var.", "dead_fraction": "dead", "dense_fraction": "dense",
                "ce_spliced": "CE spliced", "ce_zero_ablation": "CE zeroed", "ce_loss_recovered": "CE recov.",
                "kl_div": "KL"}
        rows = [r for r in _ROWS if r[1] in wide]
        for _, attr, _ in rows:
            table.add_column(wide[attr], justify="right")
        for key, m in results.items():
            table.add_row(str(key), *(_cell(getattr(m, attr), fmt) for _, attr, fmt in rows))
    common.console().print(table)


def _cell(value: Any, fmt: str) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else fmt.format(value)
