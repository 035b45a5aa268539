"""What the subcommands share: the options used by more than one command, argument types, loading the model a
command works on, and a console that prints text as it is.

One flag, one meaning: every option that more than one command takes is defined once in `OPTIONS` (its spellings,
destination, type and meaning), and commands add it with `add(parser, key)`, choosing only its default and a note of
their own. A command-specific option must not reuse a spelling from `OPTIONS`. tests/cli/test_cli.py walks the real
parser and holds every command to this.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InputError


def count(text: str) -> int:
    """Integers with underscores or a k/M/B suffix: 2_000_000, 2M, 500k."""
    t = text.strip().replace("_", "").replace(",", "")
    mult = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(t[-1:].lower(), 1)
    try:
        return int(float(t[:-1]) * mult) if mult > 1 else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def layer_list(text: str) -> list[int] | None:
    """'all' -> None (every layer); '0,3,6' -> [0, 3, 6]."""
    if text.strip().lower() == "all":
        return None
    try:
        layers = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated layers, e.g. 0,6,12; got {text!r}") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"expected 'all' or comma-separated layers, e.g. 0,6,12; got {text!r}")
    return layers


@dataclass(frozen=True)
class Option:
    """An option shared by several commands: its spellings, destination, type and meaning."""

    flags: tuple[str, ...]
    dest: str
    meaning: str
    type: Callable[[str], Any] | None = None
    action: "str | type[argparse.Action] | None" = None
    metavar: str | None = None


OPTIONS: dict[str, Option] = {o.dest: o for o in (
    Option(("--data-dir",), "data_dir", "where artifacts live (default $FEATURELENS_HOME or ~/.cache/featurelens)",
           metavar="DIR"),
    Option(("--debug",), "debug", "show the full traceback of every error", action="store_true"),
    Option(("-m", "--model"), "model", "the model: a name, a .gguf file or a Hugging Face directory", metavar="MODEL"),
    Option(("--dtype",), "dtype", "the model's weights: float32 or bfloat16"),
    Option(("--device",), "device", "cpu or cuda (default: cpu)"),
    Option(("--autocast",), "autocast", "run the model's forward pass under bfloat16 autocast (default: on with "
                                        "--device cuda for a float32 model, off on the cpu)",
           action=argparse.BooleanOptionalAction),
    Option(("--db",), "db", "a PostgreSQL database (postgresql://[user[:password]@][host][:port]/database)",
           metavar="URL"),
    Option(("--slug",), "slug", "the graph's name in its set"),
    Option(("--json",), "json", "print machine-readable JSON instead of tables", action="store_true"),
    Option(("--out",), "out", "where to write the result", metavar="PATH"),
    Option(("--overwrite",), "overwrite", "start over, replacing what an earlier run wrote", action="store_true"),
    Option(("--corpus",), "corpus", "the text: nlp-corpus (the embedded corpus, or the file in $FEATURELENS_CORPUS), "
                                    "a .txt/.jsonl/.parquet file, or hf:name[:config][:split]"),
    Option(("--tokens",), "tokens", "token budget: how many tokens of the corpus to read", type=count),
    Option(("--ctx-len",), "ctx_len", "tokens per context", type=count),
    Option(("--batch-size",), "batch_size", "how many go through the model at once: memory and speed only, the "
                                            "results stay the same", type=count),
    Option(("-n", "--rows"), "rows", "how many rows to list", type=count),
    Option(("--max-new-tokens",), "max_new_tokens", "tokens to generate after the prompt", type=count),
    Option(("--temperature",), "temperature", "sampling temperature, 0 = greedy", type=float),
    Option(("--top-p",), "top_p", "nucleus sampling: sample from the most likely tokens that make up this much "
                                  "probability", type=float),
    Option(("--seed",), "seed", "random seed", type=int),
    Option(("--transcoders",), "transcoders", "the transcoders: a transcoder set or cross-layer transcoder "
                                              "directory", metavar="PATH"),
    Option(("--layer",), "layer", "one layer of the model, by number", type=int),
    Option(("--layers",), "layers", "which layers: all, or a comma-separated list such as 0,6,12", type=layer_list),
    Option(("--hook",), "hook", "a hook name, e.g. blocks.6.hook_resid_post"),
    Option(("--host",), "host", "address to bind"),
    Option(("--port",), "port", "port to serve on", type=int),
    Option(("--ablate-top",), "ablate_top", "measure a graph's faithfulness by ablating its N most influential "
                                            "features (local replacement, attention frozen, real model)", type=count,
           metavar="N"),
)}


def add(p: argparse.ArgumentParser, key: str, *, default: Any = None, note: str = "",
        old: tuple[str, ...] = ()) -> argparse.Action:
    """Add the shared option `key` to a command. `note` says what it means for this command (its default, say);
    `old` are earlier spellings still accepted where they are unambiguous."""
    o = OPTIONS[key]
    kw: dict[str, Any] = {"dest": o.dest, "default": default, "help": o.meaning + (f" {note}" if note else "")}
    if o.action:
        kw.update(action=o.action, default=False if default is None and o.action == "store_true" else default)
    else:
        kw.update(type=o.type, metavar=o.metavar)
    action = p.add_argument(*o.flags, *old, **kw)
    action.shared = key  # type: ignore[attr-defined]  # what the parser-walking test checks
    return action


def add_model(p: argparse.ArgumentParser, *, default: str, dtype: bool = True, device: bool = True) -> None:
    """-m/--model (with --dtype and --device). `default` names where the model comes from when -m is not given."""
    add(p, "model", note=f"(default: {default})")
    if dtype:
        add(p, "dtype", default="float32", note="(default float32)")
    if device:
        add(p, "device")


def recorded_model(dictionary: Any) -> str:
    """The model a dictionary (an SAE, a transcoder, a transcoder set or a cross-layer transcoder) was trained on,
    as its files record it; "" when they do not say."""
    cfg = getattr(dictionary, "cfg", None)
    if cfg is None and getattr(dictionary, "layers", None):  # a transcoder set: its transcoders share one model
        cfg = getattr(dictionary[dictionary.layers[0]], "cfg", None)
    return str(getattr(cfg, "model_name", "") or "")


def load_model(args: argparse.Namespace, dictionary: Any = None, *, name: str | None = None) -> Any:
    """The model -m names; without -m, the one `dictionary` records (or the default model when the command has no
    dictionary). A dictionary that records no model needs -m. `name`, when given, is the model the command has
    already settled on (e.g. the one a graph file records), loaded with the command's --dtype and --device."""
    from ..models import loader

    name = name or args.model
    if name is None and dictionary is not None:
        name = recorded_model(dictionary)
        if not name:
            raise InputError("the dictionary does not say which model it was trained on; pass -m MODEL")
    return loader.load_model(name or loader.DEFAULT_MODEL, dtype=getattr(args, "dtype", "float32"),
                             device=getattr(args, "device", None))


def device(args: argparse.Namespace) -> str:
    """Where the command's dictionaries go: next to the model, on --device (default cpu)."""
    return getattr(args, "device", None) or "cpu"


def console() -> Any:
    """A rich console that prints user, corpus and model text as it is: no [markup], no :emoji: codes."""
    from rich.console import Console

    return Console(markup=False, emoji=False)
