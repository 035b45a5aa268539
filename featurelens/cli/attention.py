"""`featurelens graph-qk` (why a head attends from one position to another: its score as a sum over pairs of a
graph's nodes) and `featurelens graph-heads` (an edge of a graph split by attention head)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import InputError
from . import common


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("graph-qk", help="a head's attention score at (query, key) as a sum over pairs of graph nodes")
    _graph_args(p)
    common.add(p, "layer", note="(here: the attention layer; required)").required = True
    p.add_argument("--head", type=int, required=True, help="query head")
    p.add_argument("--query", type=int, required=True, help="query position (negative counts from the end)")
    p.add_argument("--key", type=int, required=True, help="key position (negative counts from the end)")
    common.add(p, "rows", default=10, note="(here: pairs and single-side terms; default 10)")
    p.set_defaults(func=cmd_qk)

    p = sub.add_parser("graph-heads", help="an edge of a graph split by attention head, layer by layer")
    _graph_args(p)
    p.add_argument("source", help="source node id, e.g. E_6037_3 or 3_87_4")
    p.add_argument("target", help="target node id, e.g. 6_231_5 or a logit node 19_9079_5")
    common.add(p, "rows", default=8, note="(here: heads per layer; default 8)")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="path-patch the N strongest heads in the frozen and the real model (faithfulness)")
    p.set_defaults(func=cmd_heads)

    p = sub.add_parser("graph-attention", help="head splits and QK terms of a graph's strongest cross-position edges, "
                                                "saved beside the graph as <slug>.attention.json")
    _graph_args(p)
    p.add_argument("--edges", type=int, default=20, help="strongest cross-position edges to explain (default 20)")
    p.add_argument("--heads", type=int, default=5, help="heads kept per edge (default 5)")
    p.set_defaults(func=cmd_story)


def _graph_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a graph JSON written by `featurelens graph`")
    common.add_model(p, default="the one recorded in the graph")
    common.add(p, "transcoders", note="(default: the ones recorded in the graph)")
    common.add(p, "json")


def _circuits(args: argparse.Namespace) -> Any:
    from ..attribution import load_graph
    from ..attribution.heads import circuits_for

    g = load_graph(args.file)
    model = transcoders = None
    if args.model or args.dtype != "float32" or args.device:
        name = args.model or g.model_name
        if not name:
            raise InputError("the graph does not name its model: pass -m")
        model = common.load_model(args, name=name)
    if args.transcoders:
        from ..dictionaries import load_dictionary

        transcoders = load_dictionary(args.transcoders, device=common.device(args))
    return circuits_for(g, model, transcoders)


def cmd_qk(args: argparse.Namespace) -> int:
    from ..attribution.qk import qk_decomposition

    if args.rows < 1:
        raise InputError(f"-n/--rows must be >= 1, got {args.rows}")
    circuits = _circuits(args)
    P = circuits.graph.n_pos
    q, k = (x + P if x < 0 else x for x in (args.query, args.key))
    r = qk_decomposition(circuits, args.layer, args.head, q, k, top=args.rows)
    print(json.dumps(r.to_dict(), indent=2) if args.json else r.summary())
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    if args.rows < 1:
        raise InputError(f"-n/--rows must be >= 1, got {args.rows}")
    from ..attribution.heads import head_path_check

    if args.check < 0:
        raise InputError(f"--check must be >= 0, got {args.check}")
    circuits = _circuits(args)
    split = circuits.edge_heads(args.source, args.target)
    checks = [head_path_check(circuits, args.source, args.target, layer, h.head) for layer, h in split.top(args.check)]
    if args.json:
        print(json.dumps({**split.to_dict(), "checks": [vars(c) for c in checks]}, indent=2))
        return 0
    print(split.summary(args.rows))
    for s in split.layers:
        print(f"  layer {s.layer}: bypass {s.bypass:+.4g}, through attention {s.through:+.4g}")
    for c in checks:
        print(c.summary())
    return 0


def cmd_story(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..attribution.qk import attention_story, save_attention_story

    if args.edges < 1 or args.heads < 1:
        raise InputError(f"--edges and --heads must be >= 1, got {args.edges} and {args.heads}")
    circuits = _circuits(args)
    bar = tqdm(total=args.edges, desc="attention", unit="edge", leave=False)

    def step(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    story = attention_story(circuits, n_edges=args.edges, heads=args.heads, progress=step)
    bar.close()
    path = save_attention_story(args.file, story)
    if args.json:
        print(json.dumps(story, indent=2))
        return 0
    for e in story["edges"]:
        top = e["top_heads"][0]
        line = (f"{e['source']} -> {e['target']} ({e['edge']:+.3g}): head {top['layer']}.{top['head']} carries "
                f"{top['contribution']:+.3g}")
        if "qk" in e and e["qk"]["top_pairs"]:
            pair = e["qk"]["top_pairs"][0]
            line += f"; it attends there most for query {pair['query']} x key {pair['key']} ({pair['value']:+.3g})"
        print(line)
    print(f"wrote {path}")
    return 0
