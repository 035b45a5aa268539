"""The `featurelens` command line. Each subcommand lives in its own module and registers itself here.

Errors: featurelens's own errors (`featurelens.errors.FeaturelensError` and its subclasses: an unknown model or hook,
a corrupt file, a bad feature index, ...) print as one line and exit with status 2. Anything else is a bug: its
traceback is shown (exit status 1). `--debug` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from typing import Callable

from .. import paths
from ..errors import FeaturelensError
from . import common

# Modules that define `register(subparsers)`; each adds its subcommands with a `func(args) -> int` default.
_COMMAND_MODULES = ("models", "interventions", "train", "analysis", "serve", "graph", "attention", "demo")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    # allow_abbrev=False everywhere: an abbreviation would mean whichever option it happens to prefix in that command
    parser = argparse.ArgumentParser(prog="featurelens", description="Offline mechanistic interpretability.",
                                     allow_abbrev=False)
    common.add(parser, "data_dir")
    common.add(parser, "debug")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{mod}").register(sub)
    for command in sub.choices.values():
        command.allow_abbrev = False
        # the global options also work after the command (`featurelens serve --data-dir DIR`), with the same meaning;
        # SUPPRESS keeps a value given before the command when none is given after it
        common.add(command, "data_dir", default=argparse.SUPPRESS)
        common.add(command, "debug", default=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0 ok, 1 a bug, 2 bad input or usage, 130 interrupted).

    >>> main(["next-token", "The capital of France is", "-n", "3"])  # doctest: +SKIP
    0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed the usage error (or --help)
        return e.code if isinstance(e.code, int) else 2
    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        if getattr(args, "device", None) is not None:  # every command that runs a model: stop before any work
            from ..device import check_device

            check_device(args.device)
        return func(args) or 0
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("interrupted", file=sys.stderr)
        return 130
    except FeaturelensError as e:
        if args.debug:
            traceback.print_exc()
        print(f"featurelens: error: {e}", file=sys.stderr)
        return 2
    except Exception:
        traceback.print_exc()
        print("featurelens: this is a bug in featurelens (the traceback above says where); please report it",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
