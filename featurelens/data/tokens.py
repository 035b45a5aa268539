"""Tokenize and pack: documents -> fixed-length contexts [n, ctx_len], each starting with BOS.

Documents are tokenized without special tokens and concatenated with a separator token between them (BOS by
default, as SAELens does); the stream is cut into rows of ctx_len - 1 tokens and each row gets a BOS in front.
A separator that would open a row is dropped (the row's BOS already marks the break), and the tail shorter
than a row is dropped: no other document token is lost.

Every TEST_EVERY-th context (index % 20 == 19) is held out as the "test" split, the rest is "train": a fixed,
deterministic 5% spread over the whole corpus (a corpus sorted by topic still gets a representative test set).

Packed contexts are cached under <data dir>/tokens/<model>-<source hash>-<ctx_len>/contexts.safetensors.

>>> import featurelens as fl
>>> model = fl.load_model("gemma-3-270m")
>>> fl.load_contexts(model, "nlp-corpus", ctx_len=128, split="train").shape
torch.Size([15480, 128])
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from ..io import atomic_save, atomic_write_json
from ..paths import sub_dir
from .corpus import DEFAULT_CORPUS, CorpusError, TextSource, iter_texts, open_source
from ..engine.errors import InputError

DEFAULT_CTX_LEN = 128
TEST_EVERY = 20
SPLITS = ("train", "test", "all")
PACK_FORMAT = 1


# ----------------------------------------------------------------------------------------------- tokenizing
def tokenize(tokenizer: Any, texts: Iterable[str], batch_size: int = 2000) -> Iterator[list[list[int]]]:
    """Yield token ids per batch of texts, without special tokens; special-token strings in the text
    (a literal "<bos>" in a web page) stay text. Uses the fast tokenizer's batch encoder when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    it = iter(texts)
    while batch := list(itertools.islice(it, batch_size)):
        if backend is not None:
            before = backend.encode_special_tokens
            backend.encode_special_tokens = True
            try:
                ids = [e.ids for e in backend.encode_batch(batch, add_special_tokens=False)]
            finally:
                backend.encode_special_tokens = before
            yield ids
        else:
            yield tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]


class Packer:
    """Streams documents' token ids into rows [BOS, ctx_len - 1 tokens]; keeps the unfinished tail between calls."""

    def __init__(self, ctx_len: int, bos_id: int, sep_id: int | None):
        if ctx_len < 2:
            raise InputError(f"ctx_len must be at least 2 (BOS and one token), got {ctx_len}")
        self.ctx_len, self.bos_id, self.sep_id = ctx_len, bos_id, sep_id
        self._carry = np.empty(0, dtype=np.int32)
        self._carry_sep = np.empty(0, dtype=bool)
        self._started = False
        self.n_doc_tokens = 0

    def add(self, docs: Iterable[Sequence[int]]) -> np.ndarray:
        """Token ids of more documents -> the rows they complete, int32 [k, ctx_len]."""
        pieces, seps = [self._carry], [self._carry_sep]
        for doc in docs:
            if len(doc) == 0:
                continue
            if self.sep_id is not None and self._started:
                pieces.append(np.array([self.sep_id], dtype=np.int32))
                seps.append(np.ones(1, dtype=bool))
            pieces.append(np.asarray(doc, dtype=np.int32))
            seps.append(np.zeros(len(doc), dtype=bool))
            self._started = True
            self.n_doc_tokens += len(doc)
        flat, is_sep = np.concatenate(pieces), np.concatenate(seps)
        body, cur, starts = self.ctx_len - 1, 0, []
        while True:
            if cur < len(flat) and is_sep[cur]:
                cur += 1  # a separator opening a row: BOS already marks the break
                continue
            if len(flat) - cur < body:
                break
            starts.append(cur)
            cur += body
        self._carry, self._carry_sep = flat[cur:], is_sep[cur:]
        rows = np.empty((len(starts), self.ctx_len), dtype=np.int32)
        rows[:, 0] = self.bos_id
        if starts:
            idx = np.asarray(starts)[:, None] + np.arange(body)[None, :]
            rows[:, 1:] = flat[idx]
        return rows

    @property
    def dropped_tail(self) -> int:
        """Document tokens left over at the end (fewer than one row)."""
        return int((~self._carry_sep).sum())


def pack(docs: Iterable[Sequence[int]], ctx_len: int, bos_id: int, sep_id: int | None) -> torch.Tensor:
    """Token ids of documents -> contexts [n, ctx_len] (int64), each starting with BOS."""
    rows = Packer(ctx_len, bos_id, sep_id).add(docs)
    return torch.from_numpy(rows).long()


def split_indices(n: int, split: str, test_every: int = TEST_EVERY) -> torch.Tensor:
    """Indices of the contexts in a split: "test" is every test_every-th context, "train" the rest."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    idx = torch.arange(n)
    if split == "all":
        return idx
    is_test = idx % test_every == test_every - 1
    return idx[is_test] if split == "test" else idx[~is_test]


# ----------------------------------------------------------------------------------------------- the cache
def _separator_id(model: Any, separator: "str | int | None") -> int | None:
    if separator is None or isinstance(separator, int):
        return separator
    if separator == "bos":
        return model.cfg.bos_token_id
    if separator == "eos":
        if not model.cfg.eos_token_ids:
            raise InputError("this model has no EOS token; use separator='bos' or a token id")
        return model.cfg.eos_token_ids[0]
    raise InputError(f"separator must be 'bos', 'eos', a token id or None, got {separator!r}")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def contexts_dir(model: Any, source: "str | Path | TextSource | Sequence[str]" = DEFAULT_CORPUS,
                 ctx_len: int = DEFAULT_CTX_LEN, *, text_field: str = "text", separator: "str | int | None" = "bos",
                 max_texts: int | None = None) -> Path:
    """Where the packed contexts of (model, source, ctx_len, ...) are cached."""
    src = open_source(source, text_field)
    tok = model.tokenizer
    key = json.dumps([PACK_FORMAT, src.fingerprint(), model.name, type(tok).__name__, len(tok),
                      model.cfg.bos_token_id, _separator_id(model, separator), max_texts])
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return sub_dir("tokens") / f"{_slug(model.name)}-{digest}-{ctx_len}"


def build_contexts(model: Any, source: "str | Path | TextSource | Sequence[str]" = DEFAULT_CORPUS,
                   ctx_len: int = DEFAULT_CTX_LEN, *, text_field: str = "text", separator: "str | int | None" = "bos",
                   max_texts: int | None = None, rebuild: bool = False, progress: bool = True) -> Path:
    """Tokenize and pack a source into the cache (once); returns the contexts file. Written atomically."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if getattr(model, "tokenizer", None) is None:
        raise InputError("packing text needs a model with a tokenizer")
    if model.cfg.bos_token_id is None:
        raise InputError(f"{model.name} has no BOS token; contexts start with BOS")
    src = open_source(source, text_field, progress=progress)
    d = contexts_dir(model, src, ctx_len, text_field=text_field, separator=separator, max_texts=max_texts)
    out = d / "contexts.safetensors"
    if out.is_file() and not rebuild:
        return out
    t0 = time.time()
    packer = Packer(ctx_len, model.cfg.bos_token_id, _separator_id(model, separator))
    chunks, n_texts = [], 0
    bar = tqdm(desc=f"tokenizing {src.describe()}", unit=" docs", disable=not progress, file=sys.stderr)
    for ids in tokenize(model.tokenizer, iter_texts(src, limit=max_texts)):
        chunks.append(packer.add(ids))
        n_texts += len(ids)
        bar.update(len(ids))
    bar.close()
    rows = np.concatenate(chunks) if chunks else np.empty((0, ctx_len), dtype=np.int32)
    if len(rows) == 0:
        raise CorpusError(f"{src.describe()} has {packer.n_doc_tokens} tokens: too few for one context of "
                          f"{ctx_len}; use a smaller ctx_len or more text")
    seconds = time.time() - t0
    meta = {"format": PACK_FORMAT, "source": src.describe(), "spec": src.spec, "fingerprint": src.fingerprint(),
            "model": model.name, "ctx_len": ctx_len, "separator": repr(separator),
            "bos_token_id": model.cfg.bos_token_id,
            "max_texts": max_texts, "n_texts": n_texts, "n_doc_tokens": packer.n_doc_tokens,
            "dropped_tail_tokens": packer.dropped_tail, "n_contexts": len(rows), "test_every": TEST_EVERY,
            "seconds": round(seconds, 2)}
    d.mkdir(parents=True, exist_ok=True)
    atomic_save(out, lambda tmp: save_file({"tokens": torch.from_numpy(rows)}, str(tmp),
                                           metadata={k: str(v) for k, v in meta.items()}))
    atomic_write_json(d / "meta.json", meta)
    if progress:
        print(f"featurelens: packed {n_texts:,} documents ({packer.n_doc_tokens:,} tokens) into {len(rows):,} "
              f"contexts of {ctx_len} in {seconds:.1f}s -> {d}", file=sys.stderr, flush=True)
    return out


def load_contexts(model: Any, source: "str | Path | TextSource | Sequence[str]" = DEFAULT_CORPUS,
                  ctx_len: int = DEFAULT_CTX_LEN, split: str = "train", max_tokens: int | None = None, *,
                  text_field: str = "text", separator: "str | int | None" = "bos", max_texts: int | None = None,
                  rebuild: bool = False, progress: bool = True) -> torch.Tensor:
    """Packed contexts of a source for a model: token ids [n, ctx_len] (int64), each row starting with BOS.

    split: "train" (95%), "test" (every 20th context) or "all". max_tokens keeps the first
    max(1, max_tokens // ctx_len) contexts of the split. max_texts reads only the first documents of the source.
    Tokenized once, then read from the cache.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if split not in SPLITS:
        raise InputError(f"split must be one of {SPLITS}, got {split!r}")
    if max_tokens is not None and max_tokens <= 0:
        raise InputError(f"max_tokens must be positive, got {max_tokens}")
    path = build_contexts(model, source, ctx_len, text_field=text_field, separator=separator, max_texts=max_texts,
                          rebuild=rebuild, progress=progress)
    try:
        tokens = load_file(str(path))["tokens"]
    except (SafetensorError, OSError, KeyError) as e:  # a damaged cache file: it is only a cache, make it again
        print(f"featurelens: {path} is unreadable ({e}); packing again", file=sys.stderr, flush=True)
        path = build_contexts(model, source, ctx_len, text_field=text_field, separator=separator,
                              max_texts=max_texts, rebuild=True, progress=progress)
        tokens = load_file(str(path))["tokens"]
    tokens = tokens[split_indices(len(tokens), split)].long()
    if max_tokens is not None:
        tokens = tokens[: max(1, max_tokens // ctx_len)]
    return tokens


def content_mask(tokens: torch.Tensor, model: Any) -> torch.Tensor:
    """[..., p] bool: the tokens whose activations count, i.e. neither BOS (an attention sink with outlier
    activations) nor padding."""
    valid = torch.ones_like(tokens, dtype=torch.bool)
    for tid in (model.cfg.bos_token_id, model.cfg.pad_token_id):
        if tid is not None:
            valid &= tokens != tid
    return valid
