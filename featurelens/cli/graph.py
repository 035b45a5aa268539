"""`featurelens graph` (an attribution graph of a prompt, written as circuit-tracer / Neuronpedia JSON),
`featurelens graph-check` (scores, top paths and faithfulness of a graph file) and `featurelens intervene`
(set or scale transcoder features at prompt positions)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from ..errors import FeaturelensError, InputError
from . import common

_FROM_TRANSCODERS = "the one the transcoders were trained on"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("graph", help="attribution graph of a prompt through transcoders (circuit-tracer JSON)")
    common.add_model(p, default=_FROM_TRANSCODERS)
    _path_and_prompt(p)
    common.add(p, "out", note="(the graph directory; default <data dir>/graphs)")
    common.add(p, "slug", note="(default: from the prompt)")
    p.add_argument("--max-feature-nodes", type=int, default=None, help="feature rows to compute (default: all active)")
    p.add_argument("--node-threshold", type=float, default=0.8, help="cumulative influence kept by pruning (0, 1]")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="cumulative edge influence kept (0, 1]")
    common.add(p, "batch_size", default=256, note="(target rows per backward pass; default 256)")
    p.add_argument("--no-cards", action="store_true", help="do not write feature cards")
    p.add_argument("--target", default=None, metavar="TOKEN",
                   help="trace this token instead of the most likely ones: ' Paris', several '\" Paris\", \" Rome\"' "
                        "or a logit difference '\" Paris\" - \" London\"' (each one token of the vocabulary)")
    common.add(p, "ablate_top", default=10, note="and save it in the graph's metadata (default 10; 0: do not)")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("graph-check", help="scores, top paths and faithfulness (ablations in the real model) of a graph")
    p.add_argument("file", help="a graph JSON written by `featurelens graph` (or circuit-tracer)")
    common.add_model(p, default="the one the graph records")
    common.add(p, "transcoders", note="(default: the ones the graph records)")
    common.add(p, "ablate_top", default=10, note="(default 10)")
    common.add(p, "rows", default=5, note="(top paths into the top logit; default 5)", old=("--paths",))
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("graph-push", help="put a graph file into a PostgreSQL database, where `featurelens serve "
                                          "--db` serves it (the later push of a set and slug replaces the earlier)")
    p.add_argument("file", help="a graph JSON (circuit-tracer / Neuronpedia format); stored byte for byte")
    common.add(p, "db", note="to store it in (required)")
    p.add_argument("--graph-set", dest="set_name", default="pushed", metavar="NAME",
                   help="the graph set it joins (default: pushed)")
    common.add(p, "slug", note="(default: the file's name without .json)")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("intervene", help="set or scale transcoder features at prompt positions; compare next tokens")
    common.add_model(p, default=_FROM_TRANSCODERS)
    _path_and_prompt(p)
    p.add_argument("--set", action="append", default=[], metavar="L:F@POS=VALUE",
                   help="set feature F of layer L at position POS to VALUE, e.g. 12:3071@5=0 (repeatable)")
    p.add_argument("--scale", action="append", default=[], metavar="L:F@POS=FACTOR",
                   help="multiply the feature's activation by FACTOR (repeatable; not with --set)")
    p.add_argument("--freeze-attention", action="store_true", help="hold attention patterns at the clean run's")
    p.add_argument("--direct-only", action="store_true",
                   help="hold every other feature at its clean value (direct effects only)")
    common.add(p, "max_new_tokens", default=0, note="(default 0; also continues the edited prompt greedily)")
    common.add(p, "rows", default=10, note="(next tokens; default 10)")
    p.set_defaults(func=cmd_intervene)


def _path_and_prompt(p: argparse.ArgumentParser) -> None:
    # PATH PROMPT, as every command that takes a dictionary; `--transcoders PATH PROMPT` reads the same
    p.add_argument("inputs", nargs="+", metavar="PATH PROMPT",
                   help="the transcoders (a transcoder set or cross-layer transcoder directory), then the prompt")
    common.add(p, "transcoders", note="(given as an option instead of PATH)")


def _split_inputs(args: argparse.Namespace) -> None:
    """Fill args.transcoders and args.prompt from `PATH PROMPT` or `--transcoders PATH PROMPT`."""
    given = list(args.inputs)
    if args.transcoders is None and len(given) == 2:
        args.transcoders, args.prompt = given
    elif args.transcoders is not None and len(given) == 1:
        args.prompt = given[0]
    else:
        raise InputError("give the transcoders' directory and then the prompt: PATH \"PROMPT\" "
                         "(or --transcoders PATH \"PROMPT\")")


_EDIT = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*@\s*(-?\d+)\s*=\s*(\S+)\s*$")


def parse_edit(text: str) -> tuple[int, int, int, float]:
    """"12:3071@5=0" -> (layer 12, position 5, feature 3071, value 0.0)."""
    m = _EDIT.match(text)
    if not m:
        raise InputError(f"cannot read {text!r}: write LAYER:FEATURE@POSITION=VALUE, e.g. 12:3071@5=0")
    try:
        value = float(m.group(4))
    except ValueError:
        raise InputError(f"{text!r}: {m.group(4)!r} is not a number") from None
    return int(m.group(1)), int(m.group(3)), int(m.group(2)), value


def _threshold(name: str, v: float) -> None:
    if not 0 < v <= 1:
        raise InputError(f"--{name} must be in (0, 1], got {v}")


def _load_transcoders(path: str, args: argparse.Namespace) -> Any:
    from ..dictionaries import Transcoders, load_dictionary

    p = Path(path).expanduser()
    tc = load_dictionary(p, device=common.device(args))
    if not isinstance(tc, Transcoders):
        raise InputError(f"{p} is a single dictionary; attribution needs a transcoder set or a cross-layer transcoder")
    return tc


def _analyses(transcoders: Any) -> dict[int, Any]:
    """Per-layer analyses of a transcoder set, where they exist (labels, examples and histograms for the cards)."""
    from ..analysis import open_analysis
    from ..dictionaries import TranscoderSet

    out: dict[int, Any] = {}
    if not isinstance(transcoders, TranscoderSet):
        return out
    for layer, tc in transcoders.items():
        try:
            out[layer] = open_analysis(tc)
        except (FeaturelensError, OSError):
            continue
    return out


def cmd_graph(args: argparse.Namespace) -> int:
    from ..attribution import attribute, check_graph, save_graph
    from ..attribution.replacement import check_transcoders
    from ..paths import sub_dir

    _split_inputs(args)
    _threshold("node-threshold", args.node_threshold)
    _threshold("edge-threshold", args.edge_threshold)
    if not args.prompt.strip():
        raise InputError("empty prompt: give the text to attribute")
    if args.ablate_top < 0:
        raise InputError(f"--ablate-top must be 0 or more, got {args.ablate_top}")
    transcoders = _load_transcoders(args.transcoders, args)
    model = common.load_model(args, transcoders)
    check_transcoders(model, transcoders)  # a mismatch is the error to show, before any note on layers
    missing = sorted(set(range(model.cfg.n_layers)) - set(transcoders.layers))
    if missing:
        print(f"note: layers {missing} have no transcoder: each of their MLP outputs is one error node")
    t0 = time.perf_counter()
    g = attribute(model, transcoders, args.prompt, max_feature_nodes=args.max_feature_nodes,
                  batch_size=args.batch_size, transcoders_path=str(Path(args.transcoders).expanduser().resolve()),
                  target=args.target)
    t_attr = time.perf_counter() - t0
    pruned = g.prune(args.node_threshold, args.edge_threshold)
    check = None
    if args.ablate_top and g.n_features:
        check = check_graph(g, model, transcoders, k=args.ablate_top)
        pruned.info["faithfulness"] = check.to_info()
    out = Path(args.out).expanduser() if args.out else sub_dir("graphs")
    path = save_graph(pruned, out, slug=args.slug, model=model, transcoders=transcoders,
                      analyses=None if args.no_cards else _analyses(transcoders), cards=not args.no_cards)
    s = g.scores
    print(f"{len(g.tokens)} tokens, {g.info['n_active_features']:,} active features, {g.n_features:,} feature rows; "
          f"attribution {t_attr:.1f} s")
    print(f"replacement score {s['replacement']:.3f}, completeness {s['completeness']:.3f}")
    what = "target" if "target" in g.info else "top next token"
    print(f"pruned to {pruned.n_features} features, {pruned.edges.shape[1]:,} edges; {what} "
          f"{g.logit_strs[0]!r} (p={float(g.logit_probs[0]):.3f})")
    if check is not None:
        print(check.summary())
    print(f"wrote {path}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..attribution import attribute, check_graph, load_graph
    from ..attribution.targets import Target

    for flag, n in (("--rows", args.rows), ("--ablate-top", args.ablate_top)):
        if n <= 0:
            raise InputError(f"{flag} must be positive, got {n}")
    g = load_graph(args.file)
    s = g.scores
    print(f"{args.file}: {g.prompt!r}, {g.n_features} features shown, {g.edges.shape[1]:,} edges")
    print(f"replacement score {s['replacement']:.3f}, completeness {s['completeness']:.3f} (unpruned graph)")
    saved = g.info.get("faithfulness")
    if isinstance(saved, dict) and saved.get("score") is not None:
        print(f"faithfulness saved with the graph: score {saved['score']:.2f} (measured again below)")
    print(f"top paths into {g.logit_strs[0]!r}:")
    for path in g.top_paths(None, k=args.rows):
        print(f"  {path.score:.4f}  " + " -> ".join(path.labels))
    model_name = args.model or g.model_name
    tc_path = args.transcoders or g.transcoders
    if not model_name or not tc_path or not Path(tc_path).expanduser().exists():
        raise InputError(f"faithfulness needs the model and transcoders: the graph names model {model_name!r} and "
                         f"transcoders {tc_path!r}; pass -m and --transcoders")
    transcoders = _load_transcoders(tc_path, args)
    model = common.load_model(args, name=model_name)
    full = attribute(model, transcoders, g.tokens, max_feature_nodes=g.info.get("n_feature_rows"),
                     target=Target.from_info(g.info.get("target")))
    sub = full.subgraph_scores([g.node_id(i) for i in range(g.n_features)])
    print(f"subgraph of the shown features: replacement {sub['replacement']:.3f}, completeness "
          f"{sub['completeness']:.3f}")
    print(check_graph(full, model, transcoders, k=args.ablate_top).summary())
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    import json

    from ..attribution.schema import validate_upload
    from ..store.graphs import put_graph

    if not args.db:
        raise InputError("say which database: --db postgresql://user@host/db")
    f = Path(args.file).expanduser()
    try:
        data = f.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read the graph file {f}: {e.strerror or e}") from None
    try:
        validate_upload(json.loads(data))  # only a graph the web app can open goes in
    except ValueError as e:
        raise InputError(f"{f} is not a graph JSON: {e}") from None
    slug = args.slug or f.name.removesuffix(".json")
    put_graph(args.db, args.set_name, slug, data)
    print(f"stored {f} ({len(data):,} bytes) as @pg.{args.set_name}~{slug}")
    return 0


def cmd_intervene(args: argparse.Namespace) -> int:
    from ..attribution import feature_intervention

    _split_inputs(args)
    if args.set and args.scale:
        raise InputError("use either --set or --scale in one call")
    if not args.set and not args.scale:
        raise InputError("nothing to do: give --set L:F@POS=VALUE or --scale L:F@POS=FACTOR")
    edits = [parse_edit(x) for x in (args.set or args.scale)]
    transcoders = _load_transcoders(args.transcoders, args)
    model = common.load_model(args, transcoders)
    r = feature_intervention(model, transcoders, args.prompt, edits, freeze_attention=args.freeze_attention,
                             direct_only=args.direct_only, mode="set" if args.set else "scale", top_k=args.rows,
                             max_new_tokens=args.max_new_tokens)
    for layer, pos, feat, old, new in r.edits:
        print(f"layer {layer} feature {feat} at position {pos}: {old:.4g} -> {new:.4g}")
    print(f"{'before':<30}{'after':<30}")
    for (s0, _, p0), (s1, _, p1) in zip(r.original_top_tokens, r.top_tokens):
        print(f"{f'{s0!r} {p0:.3f}':<30}{f'{s1!r} {p1:.3f}':<30}")
    if r.generation is not None:
        print(f"continuation before: {r.original_generation!r}")
        print(f"continuation after:  {r.generation!r}")
    return 0
