"""`featurelens steer` (default and steered generations side by side) and `featurelens patch` (patching heatmaps)."""

from __future__ import annotations

import argparse
import json
import math
import time

from rich.table import Table
from rich.text import Text

from ..errors import InputError
from ..paths import sub_dir
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    from ..models.loader import DEFAULT_MODEL

    p = sub.add_parser("steer", help="generate with features steered, clamped or ablated, next to the default output")
    common.add_model(p, default="the one the dictionary was trained on")
    p.add_argument("path", help="a saved sparse dictionary (its directory, SAELens layout) or a transcoder set")
    p.add_argument("prompt", help="the text to continue")
    common.add(p, "layer", note="(here: which layer's transcoder, when PATH is a transcoder set)")
    p.add_argument("--feature", action="append", default=[], metavar="IDX:STRENGTH",
                   help="add STRENGTH x the feature's decoder direction, e.g. 1234:+8 or 77:-4 (repeatable)")
    p.add_argument("--clamp", action="append", default=[], metavar="IDX:VALUE",
                   help="hold the feature's activation at VALUE (repeatable)")
    p.add_argument("--ablate", action="append", default=[], metavar="IDX", help="clamp the feature to 0 (repeatable)")
    p.add_argument("--mode", choices=("relative", "absolute"), default="relative",
                   help="strength relative to the feature's max activation when known (default), or absolute")
    p.add_argument("--positions", choices=("all", "prompt", "generated"), default="all",
                   help="where to intervene: every position (default), the prompt's, or the generated tokens'")
    p.add_argument("--skip-bos", dest="steer_bos", action="store_false", help="leave the BOS token (the attention "
                   "sink) unsteered")
    p.add_argument("--sweep", default=None, metavar="S1,S2,...",
                   help="generate once per value, each --feature's strength multiplied by it (0 = unsteered), and "
                        "show each continuation's perplexity under the unsteered model, e.g. --sweep 0,0.5,1,2")
    common.add(p, "max_new_tokens", default=30, note="(default 30)")
    common.add(p, "temperature", default=0.7, note="(default 0.7)")
    common.add(p, "top_p")
    common.add(p, "seed", default=0, note="(default 0; the same seed drives both generations)")
    common.add(p, "json")
    p.set_defaults(func=cmd_steer)

    p = sub.add_parser("patch", help="activation (or attribution) patching heatmap, saved as PNG and JSON")
    common.add_model(p, default=DEFAULT_MODEL)
    p.add_argument("--clean", required=True, help='the prompt with the behaviour, e.g. "The Eiffel Tower is in"')
    p.add_argument("--corrupt", required=True, help='the same prompt with a few tokens changed, e.g. "The Colosseum is in"')
    p.add_argument("--answer", required=True, help='the clean answer token, e.g. " Paris"')
    p.add_argument("--wrong", default=None, help="the corrupt answer token; with it the metric is the logit "
                   "difference, without it the probability of --answer")
    p.add_argument("--site", default="resid_pre", choices=("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z"),
                   help="what to patch: an activation per layer x position, or z = single heads per layer "
                        "(default resid_pre)")
    common.add(p, "layers", note="(default all)")
    p.add_argument("--raw", action="store_true", help="show the metric itself instead of the normalized score "
                   "(0 = corrupt run, 1 = clean run; the default)")
    p.add_argument("--attribution", action="store_true", help="the gradient estimate (one forward+backward) instead")
    common.add(p, "batch_size", default=32, note="(patched runs; default 32)")
    common.add(p, "out", note="(PATH.png and PATH.json; default <data dir>/patching/patch-SITE-<time>)")
    common.add(p, "json")
    p.set_defaults(func=cmd_patch)


def _load_dictionary(path: str, layer: int | None, device: str = "cpu"):
    from ..dictionaries import TranscoderSet, load_dictionary

    sae = load_dictionary(path, device=device)
    if isinstance(sae, TranscoderSet):  # one transcoder per layer
        if layer is None:
            raise InputError(f"{path} holds transcoders for layers {sae.layers}: pick one with --layer")
        if layer not in sae:
            raise InputError(f"--layer {layer}: {path} has transcoders for layers {sae.layers}")
        return sae[layer]
    if layer is not None:
        raise InputError(f"--layer is for transcoder sets; {path} is a single dictionary at {sae.cfg.hook_name}")
    return sae


def parse_pair(spec: str, flag: str, what: str) -> tuple[int, float]:
    """"1234:+8" -> (1234, 8.0), with errors that name the flag."""
    idx, sep, value = spec.partition(":")
    if not sep:
        raise InputError(f"{flag} {spec!r}: expected IDX:{what.upper()}, e.g. 1234:+8")
    try:
        feature = int(idx)
    except ValueError:
        raise InputError(f"{flag} {spec!r}: feature index {idx!r} is not an integer") from None
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{flag} {spec!r}: {what} {value!r} is not a number") from None
    if not math.isfinite(number):
        raise InputError(f"{flag} {spec!r}: {what} must be finite")
    return feature, number


def cmd_steer(args: argparse.Namespace) -> int:
    import warnings

    from ..interventions import Ablate, Clamp, Steer, compare_generations

    steers = [parse_pair(s, "--feature", "strength") for s in args.feature]
    clamps = [parse_pair(s, "--clamp", "value") for s in args.clamp]
    ablations = []
    for s in args.ablate:
        try:
            ablations.append(int(s))
        except ValueError:
            raise InputError(f"--ablate {s!r}: feature index is not an integer") from None
    if not (steers or clamps or ablations):
        raise InputError("nothing to do: give at least one --feature IDX:STRENGTH, --clamp IDX:VALUE or --ablate IDX")
    sae = _load_dictionary(args.path, args.layer, common.device(args))
    if args.sweep is not None:
        return _steer_sweep(args, sae, steers, clamps or ablations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note travels with the result instead
        interventions = ([Steer(sae, f, s, mode=args.mode, positions=args.positions, steer_bos=args.steer_bos)
                          for f, s in steers]
                         + [Clamp(sae, f, v, positions=args.positions) for f, v in clamps]
                         + [Ablate(sae, f, positions=args.positions) for f in ablations])
    model = common.load_model(args, sae)
    result = compare_generations(model, args.prompt, interventions, max_new_tokens=args.max_new_tokens,
                                 seed=args.seed, temperature=args.temperature, top_p=args.top_p)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    console = common.console()
    table = Table(title=f"{args.prompt!r}  (seed {args.seed}, temperature {args.temperature})", show_lines=True)
    table.add_column("default", ratio=1, overflow="fold")
    table.add_column("steered", ratio=1, overflow="fold")
    table.add_row(result.default, result.steered)
    console.print(table)
    for line in result.interventions:
        console.print(f"  {line}", highlight=False)
    for note in result.notes:
        console.print(Text.assemble(("note:", "yellow"), f" {note}"), highlight=False)
    return 0


def _steer_sweep(args: argparse.Namespace, sae, steers: list[tuple[int, float]], others: list) -> int:
    import warnings

    from ..interventions import sweep_strengths

    if others:
        raise InputError("--sweep varies --feature strengths; it does not take --clamp or --ablate")
    if not steers:
        raise InputError("--sweep needs at least one --feature IDX:STRENGTH")
    try:
        values = [float(v) for v in args.sweep.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--sweep {args.sweep!r}: give comma-separated numbers, e.g. 0,0.5,1,2") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise InputError(f"--sweep {args.sweep!r}: give comma-separated finite numbers, e.g. 0,0.5,1,2")
    model = common.load_model(args, sae)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sweep = sweep_strengths(model, sae, dict(steers), args.prompt, values, mode=args.mode,
                                positions=args.positions, steer_bos=args.steer_bos,
                                max_new_tokens=args.max_new_tokens, seed=args.seed,
                                temperature=args.temperature, top_p=args.top_p)
    texts, ppl = [r.text for r in sweep], [r.perplexity for r in sweep]
    rows = [{"scale": v, "strengths": {f: s * v for f, s in steers}, "text": t, "perplexity": q}
            for v, t, q in zip(values, texts, ppl)]
    if args.json:
        print(json.dumps({"prompt": args.prompt, "mode": args.mode, "seed": args.seed, "rows": rows}, indent=2))
        return 0
    table = Table(title=f"{args.prompt!r}  (seed {args.seed}, temperature {args.temperature}, mode {args.mode})",
                  show_lines=True)
    table.add_column("strengths", justify="right")
    table.add_column("perplexity", justify="right")
    table.add_column("continuation", overflow="fold")
    for r in rows:
        what = ", ".join(f"{f}:{s:g}" for f, s in r["strengths"].items()) if r["scale"] else "unsteered"
        table.add_row(what, f"{r['perplexity']:.1f}", r["text"])
    common.console().print(table)
    return 0


def cmd_patch(args: argparse.Namespace) -> int:
    from ..interventions import (activation_patching, answer_prob, attribution_patching, logit_diff, patching_labels,
                                 save_heatmap)

    layers = args.layers
    model = common.load_model(args)
    metric = logit_diff(args.answer, args.wrong) if args.wrong is not None else answer_prob(args.answer)
    rows, cols = patching_labels(model, args.clean, args.corrupt, args.site, layers)  # checks lengths early
    m_clean, m_corrupt = metric.evaluate(model, args.clean), metric.evaluate(model, args.corrupt)
    normalize = not args.raw
    if args.attribution:
        scores = attribution_patching(model, args.clean, args.corrupt, metric, hook=args.site, layers=layers,
                                      normalize=normalize)
    else:
        scores = activation_patching(model, args.clean, args.corrupt, metric, hook=args.site, layers=layers,
                                     normalize=normalize, batch_size=args.batch_size, progress=True)
    kind = "attribution" if args.attribution else "activation"
    title = (f"{kind} patching of {args.site}: {metric!r}{' (0 = corrupt, 1 = clean)' if normalize else ''}\n"
             f"clean {args.clean!r} ({m_clean:.3g}) -> corrupt {args.corrupt!r} ({m_corrupt:.3g})")
    meta = {"kind": kind, "hook": args.site, "clean": args.clean, "corrupt": args.corrupt, "answer": args.answer,
            "wrong": args.wrong, "metric": repr(metric), "normalized": normalize, "clean_metric": m_clean,
            "corrupt_metric": m_corrupt, "model": model.name}
    out = args.out or str(sub_dir("patching") / f"patch-{args.site}-{time.strftime('%Y%m%d-%H%M%S')}")
    paths = save_heatmap(scores, out, row_labels=rows, col_labels=cols, title=title,
                         xlabel="head" if args.site == "z" else "position", ylabel="layer", meta=meta,
                         center=0.0 if normalize else m_corrupt)
    if args.json:
        print(json.dumps({**meta, "rows": rows, "cols": cols, "values": scores.tolist(),
                          "json": str(paths["json"]), "png": str(paths["png"]) if paths["png"] else None}, indent=1))
        return 0
    console = common.console()
    table = Table(title=title.replace("\n", "  "))
    table.add_column("layer")
    for c in cols:
        table.add_column(c, justify="right")
    center = 0.0 if normalize else m_corrupt
    lim = float((scores - center).abs().max()) or 1.0
    for r, row in zip(rows, scores.tolist()):
        cells = []
        for v in row:
            shade = int(40 + 180 * min(abs(v - center) / lim, 1.0))
            lo, hi = 255 - shade, 255 - shade // 2  # red below the centre, blue above, as in the PNG
            color = f"rgb({hi},{lo},{lo})" if v < center else f"rgb({lo},{lo},{hi})"
            cells.append(Text(f"{v:7.2f}", style=f"black on {color}"))
        table.add_row(r, *cells)
    console.print(table)
    console.print(f"wrote {paths['json']}" + (f" and {paths['png']}" if paths["png"] else " (no PNG: pip install matplotlib)"))
    return 0
