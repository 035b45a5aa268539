"""`featurelens graph-qk` (why a head attends from one position to another: its score as a sum over pairs of a
graph's nodes) and `featurelens graph-heads` (an edge of a graph split by attention head)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("graph-qk", help="a head's attention score at (query, key) as a sum over pairs of graph nodes")
    _graph_args(p)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--head", type=int, required=True, help="query head")
    p.add_argument("--query", type=int, required=True, help="query position (negative counts from the end)")
    p.add_argument("--key", type=int, required=True, help="key position (negative counts from the end)")
    p.add_argument("-n", "--top", type=int, default=10, help="pairs and single-side terms to list (default 10)")
    p.set_defaults(func=cmd_qk)

    p = sub.add_parser("graph-heads", help="an edge of a graph split by attention head, layer by layer")
    _graph_args(p)
    p.add_argument("source", help="source node id, e.g. E_6037_3 or 3_87_4")
    p.add_argument("target", help="target node id, e.g. 6_231_5 or a logit node 19_9079_5")
    p.add_argument("-n", "--top", type=int, default=8, help="heads to list (default 8)")
    p.add_argument("--check", type=int, default=0, metavar="N",
                   help="path-patch the N strongest heads in the frozen and the real model (faithfulness)")
    p.set_defaults(func=cmd_heads)


def _graph_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="a graph JSON written by `featurelens graph`")
    p.add_argument("-m", "--model", default=None, help="model (default: the one recorded in the graph)")
    p.add_argument("--transcoders", default=None, metavar="DIR", help="default: the ones recorded in the graph")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _circuits(args: argparse.Namespace) -> Any:
    from ..attribution import load_graph
    from ..attribution.heads import circuits_for

    g = load_graph(args.file)
    model = transcoders = None
    if args.model or args.dtype != "float32" or args.device:
        from ..models.loader import load_model

        name = args.model or g.model_name
        if not name:
            raise InputError("the graph does not name its model: pass -m")
        model = load_model(name, dtype=args.dtype, device=args.device)
    if args.transcoders:
        from ..dictionaries import load_dictionary

        transcoders = load_dictionary(args.transcoders)
    return circuits_for(g, model, transcoders)


def cmd_qk(args: argparse.Namespace) -> int:
    from ..attribution.qk import qk_decomposition

    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    circuits = _circuits(args)
    P = circuits.graph.n_pos
    q, k = (x + P if x < 0 else x for x in (args.query, args.key))
    r = qk_decomposition(circuits, args.layer, args.head, q, k, top=args.top)
    print(json.dumps(r.to_dict(), indent=2) if args.json else r.summary())
    return 0


def cmd_heads(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    from ..attribution.heads import head_path_check

    if args.check < 0:
        raise InputError(f"--check must be >= 0, got {args.check}")
    circuits = _circuits(args)
    split = circuits.edge_heads(args.source, args.target)
    checks = [head_path_check(circuits, args.source, args.target, layer, h.head) for layer, h in split.top(args.check)]
    if args.json:
        print(json.dumps({**split.to_dict(), "checks": [vars(c) for c in checks]}, indent=2))
        return 0
    print(split.summary(args.top))
    for s in split.layers:
        print(f"  layer {s.layer}: bypass {s.bypass:+.4g}, through attention {s.through:+.4g}")
    for c in checks:
        print(c.summary())
    return 0
