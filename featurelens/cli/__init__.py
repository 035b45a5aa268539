"""The `featurelens` command line. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from .. import paths

# Modules that define `register(subparsers)`; each adds its subcommands with a `func(args) -> int` default.
_COMMAND_MODULES = ("models", "interventions", "train", "analysis")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="featurelens", description="Offline mechanistic interpretability.")
    parser.add_argument("--data-dir", help=f"where artifacts live (default ${paths.ENV_VAR} or ~/.cache/featurelens)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{mod}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_dir:
        paths.set_data_dir(args.data_dir)
    func: Callable[[argparse.Namespace], int] | None = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, TypeError) as e:
        # User errors (unknown model, bad hook, empty prompt, corrupt file): one clear line, no traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"featurelens: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
