"""Lexical search (BM25), the fallback for concept search when no embedding model is installed."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

from ..text import STOPWORDS

_TOKEN = re.compile(r"[a-z0-9]+")


def _stem(w: str) -> str:
    for suf in ("ies", "ing", "ed", "es", "s"):
        if len(w) > len(suf) + 3 and w.endswith(suf):
            return w[: -len(suf)] + ("y" if suf == "ies" else "")
    return w


def word_forms(w: str) -> set[str]:
    """`w` (lowercase) and the words it may be an inflection of: film/films/filmed/filming share "film",
    movie/movies share "movie", study/studies share "study". Two words are forms of one word when their sets meet."""
    out = {w}
    if len(w) > 3:
        for suf, repl in (("ies", ("y", "ie")), ("es", ("", "e")), ("s", ("",)), ("ed", ("", "e")), ("d", ("",)),
                          ("ing", ("", "e"))):
            if w.endswith(suf) and len(w) - len(suf) >= 3:
                out.update(w[: -len(suf)] + r for r in repl)
    return out


def query_words(query: str) -> list[str]:
    """The query's own content words (3 letters or more, not stopwords), in order, each once."""
    return list(dict.fromkeys(w for w in re.findall(r"[a-z]+", query.lower()) if len(w) >= 3 and w not in STOPWORDS))


def terms(text: str) -> list[str]:
    return [_stem(w) for w in _TOKEN.findall(text.lower()) if w not in STOPWORDS]


class BM25:
    """Okapi BM25 over a fixed set of documents."""

    def __init__(self, docs: Sequence[str], k1: float = 1.2, b: float = 0.75):
        self.k1, self.b = k1, b
        self.tf = [Counter(terms(d)) for d in docs]
        self.len = np.array([sum(c.values()) for c in self.tf], dtype=np.float64)
        self.avg = float(self.len.mean()) if len(self.len) else 0.0
        df: Counter[str] = Counter()
        for c in self.tf:
            df.update(c.keys())
        n = len(docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.postings: dict[str, list[int]] = {}
        for i, c in enumerate(self.tf):
            for t in c:
                self.postings.setdefault(t, []).append(i)

    def scores(self, query: str) -> np.ndarray:
        s = np.zeros(len(self.tf))
        norm = self.k1 * (1 - self.b + self.b * self.len / max(self.avg, 1e-9))
        for t in set(terms(query)):
            for i in self.postings.get(t, ()):
                f = self.tf[i][t]
                s[i] += self.idf[t] * f * (self.k1 + 1) / (f + norm[i])
        return s
