"""What an attribution graph traces: the model's most likely next tokens (the default), chosen tokens, or the
difference of two tokens' logits (as circuit-tracer 0.4's attribution targets).

A target is written as

* a token: `" Paris"` (or its id); quotes are optional and keep leading spaces visible: `'" Paris"'`;
* several tokens: a list `[" Paris", " Rome"]`, or `'" Paris", " Rome"'` in one string;
* a logit difference: `'" Paris" - " London"'` (both quoted), or the tuple `(" Paris", " London")`.

Each token must be one token of the model's vocabulary. A difference is one logit node, whose vector is the
difference of the two unembedding vectors (the vocabulary mean cancels), so its edges say what moves the model
towards the first token and away from the second.

>>> fl.attribute(model, tc, "The capital of France is", target=" Paris")
>>> fl.attribute(model, tc, "The capital of France is", target='" Paris" - " London"')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.errors import InputError
from .replacement import demeaned_unembedding

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_DIFF = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"\s*-\s*"((?:[^"\\]|\\.)*)"\s*$')
_LIST = re.compile(r'^\s*"(?:[^"\\]|\\.)*"(?:\s*,\s*"(?:[^"\\]|\\.)*")+\s*$')


@dataclass(frozen=True)
class Target:
    """The logit nodes of a graph: `tokens` (one per node, in order), or with `minus` one node, tokens[0] - minus."""

    tokens: tuple[int, ...]
    strs: tuple[str, ...]
    minus: int | None = None
    minus_str: str | None = None

    @property
    def is_difference(self) -> bool:
        return self.minus is not None

    def label(self) -> str:
        if self.is_difference:
            return f'"{self.strs[0]}" - "{self.minus_str}"'
        return ", ".join(f'"{s}"' for s in self.strs)

    def vectors(self, model: Any) -> torch.Tensor:
        """[K, D]: the direction each logit node reads from the unembedding's input."""
        if self.is_difference:
            W_U = model.W_U
            return (W_U[:, self.tokens[0]] - W_U[:, self.minus])[None].contiguous()
        return demeaned_unembedding(model, torch.tensor(self.tokens, device=model.W_U.device))

    def node_strs(self) -> list[str]:
        """The logit nodes' names as graphs show them."""
        return [f"{self.strs[0]} - {self.minus_str}"] if self.is_difference else list(self.strs)

    def info(self) -> dict[str, Any]:
        """What the graph file's metadata records (`metadata.info.featurelens.target`)."""
        return {"label": self.label(), "tokens": list(self.tokens), "strs": list(self.strs), "minus": self.minus,
                "minus_str": self.minus_str}

    @classmethod
    def from_info(cls, info: Any) -> "Target | None":
        """The target a graph file records, or None (a file traced to the most likely tokens, or a foreign one)."""
        if not isinstance(info, dict) or not isinstance(info.get("tokens"), list) or not info["tokens"]:
            return None
        minus = info.get("minus")
        return cls(tuple(int(t) for t in info["tokens"]), tuple(str(s) for s in info.get("strs", [])),
                   None if minus is None else int(minus), info.get("minus_str"))


def _unquote(text: str) -> str:
    m = _QUOTED.fullmatch(text.strip())
    return re.sub(r"\\(.)", r"\1", m.group(1)) if m else text


def _token(model: Any, item: Any) -> tuple[int, str]:
    """One target token (text or id) -> (id, its text)."""
    if isinstance(item, bool):
        raise InputError(f"a target token is text or a token id, got {item!r}")
    if isinstance(item, int) or (isinstance(item, torch.Tensor) and item.numel() == 1):
        tid = int(item)
        if not 0 <= tid < model.cfg.d_vocab:
            raise InputError(f"target token id {tid} is outside the vocabulary [0, {model.cfg.d_vocab})")
        tok = getattr(model, "tokenizer", None)
        return tid, tok.decode([tid]) if tok is not None else f"<{tid}>"
    if not isinstance(item, str):
        raise InputError(f"a target token is text or a token id, got {type(item).__name__}")
    text = _unquote(item)
    if text == "":
        raise InputError("empty target: give the token to trace, e.g. target=\" Paris\"")
    if getattr(model, "tokenizer", None) is None:
        raise InputError("this model has no tokenizer: give the target as a token id")
    ids = model.encode(text, prepend_bos=False)
    if len(ids) != 1:
        parts = [model.tokenizer.decode([i]) for i in ids]
        raise InputError(f"target {text!r} is {len(ids)} tokens {parts}, not one token of the vocabulary; "
                         f"trace one of them (mind the leading space: ' Paris' and 'Paris' differ)")
    return ids[0], text


def parse_target(model: Any, spec: Any) -> Target:
    """A target as the user gave it (see the module docstring) -> `Target`; a clear error for anything else."""
    if isinstance(spec, Target):
        return spec
    if spec is None:
        raise InputError("no target given")
    if isinstance(spec, tuple) and len(spec) == 2:  # (plus, minus): a logit difference
        (a, sa), (b, sb) = _token(model, spec[0]), _token(model, spec[1])
        return _difference(a, sa, b, sb)
    if isinstance(spec, str):
        m = _DIFF.match(spec)
        if m:
            (a, sa), (b, sb) = _token(model, f'"{m.group(1)}"'), _token(model, f'"{m.group(2)}"')
            return _difference(a, sa, b, sb)
        if _LIST.match(spec):
            spec = [f'"{s}"' for s in _QUOTED.findall(spec)]
        else:
            spec = [spec]
    if isinstance(spec, torch.Tensor):
        spec = spec.flatten().tolist()
    if not isinstance(spec, (str, list, tuple, dict, set)):  # one token id (or something _token names as wrong)
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise InputError(f"a target is a token, a list of tokens or a logit difference '\"A\" - \"B\"', got {spec!r}")
    pairs = [_token(model, s) for s in spec]
    ids = [i for i, _ in pairs]
    if len(set(ids)) != len(ids):
        raise InputError(f"the target names a token twice: {[s for _, s in pairs]}")
    return Target(tuple(ids), tuple(s for _, s in pairs))


def _difference(a: int, sa: str, b: int, sb: str) -> Target:
    if a == b:
        raise InputError(f"a logit difference needs two different tokens, got {sa!r} twice")
    return Target((a,), (sa,), b, sb)
