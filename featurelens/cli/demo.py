"""`featurelens demo`: the main job, from nothing to a fully analysed model in the web app."""

from __future__ import annotations

import argparse

from . import common
from .serve import add_server_args


def register(sub: argparse._SubParsersAction) -> None:
    from ..pipeline.demo import STEP_NAMES

    p = sub.add_parser("demo", help="the main job: convert, train, evaluate, analyse, graph, then serve the web app",
                       description="Build everything the web app shows on the embedded default (Gemma 3 270M and "
                                   "the embedded corpus): skip transcoders for every layer, residual-stream SAEs, "
                                   "their metrics, every feature's dashboard, attribution graphs with faithfulness "
                                   "checks; then serve it. Run it again to reuse what is done; an interrupted run "
                                   "resumes where it stopped.")
    p.add_argument("--quick", action="store_true", help="a small budget: about 10 minutes on 2 CPU cores")
    p.add_argument("--budget-scale", type=float, default=1.0, metavar="FACTOR",
                   help="multiply every token budget (and the graphs' feature rows) by this, e.g. 8 on a GPU")
    p.add_argument("--replacement", choices=("transcoders", "clt"), default="transcoders",
                   help="the replacement model the graphs use: per-layer skip transcoders (default) or one cross-layer "
                        "transcoder (trained on half the rows; more faithful to the real model, see docs/benchmarks.md)")
    common.add(p, "device")
    p.add_argument("--force", action="append", default=[], choices=STEP_NAMES, metavar="STEP",
                   help=f"redo this step even if it is done, and the steps that build on it (repeatable): "
                        f"{', '.join(STEP_NAMES)}")
    p.add_argument("--no-serve", action="store_true", help="stop after the last step instead of serving the web app")
    add_server_args(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..pipeline import run_demo

    report = run_demo(quick=args.quick, scale=args.budget_scale, replacement=args.replacement, device=args.device,
                      force=args.force)
    print(report.summary(), flush=True)
    if args.no_serve:
        return 0
    from .serve import serve

    return serve(args.host, args.port, device=args.device)
