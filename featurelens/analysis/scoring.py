"""Label scores: how well a label predicts where its feature fires.

A label is a claim ("fires on film words"). We test it as a detection task: given the label, tell the contexts
where the feature fires from contexts where it does not, and report the AUROC (0.5: the label says nothing about
where it fires; 1: it tells them apart perfectly).

- **positives**: the feature's quantile examples (sampled across its whole activation range, so a label fitted to
  the strongest examples is also tested on weak ones), topped up with top examples when it fired too rarely;
- **negatives**: a shared pool of other features' examples (random windows where *something else* fires), leaving
  out windows that overlap one of the feature's own examples;
- each example is the window of SNIP_BEFORE tokens before its key token to SNIP_AFTER after;
- the reader: with the sentence-embedding model installed, cos(label, window) (method
  ``embedding-auroc:<model>:v1``); without it, the fraction of the label's words found in the window
  (``lexical-auroc:v1``).

Scores below UNCLEAR_BELOW mark the label as unclear: shown as such rather than as a confident name, and concept
search weighs such features down. The pool may contain windows where the feature fires unseen (its density times
the window length, a few percent for most features), which lowers a dense feature's score: fairly, since a label
of a dense feature predicts little.
"""

from __future__ import annotations

import re
import sys
from typing import Any, Iterable

import numpy as np

from ..store import UNCLEAR_BELOW, FeatureStore, is_clear
from ..text import STOPWORDS

SNIP_BEFORE, SNIP_AFTER = 8, 2
N_POS = 8  # positives per feature
N_NEG = 200  # shared negative pool
LEXICAL_METHOD = "lexical-auroc:v1"
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*")
_STRUCTURE = re.compile(r"\b(context|promotes):|[|→]")


def embedding_method(embedder: Any) -> str:
    return f"embedding-auroc:{embedder.name}:v1"


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counting half (Mann-Whitney U / n_pos n_neg)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("auroc needs at least one positive and one negative")
    both = np.concatenate([pos, neg])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    i = 0
    while i < len(both):  # average ranks over ties
        j = i
        while j + 1 < len(both) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def label_reading(label: str) -> str:
    """The label as a reader takes it: without the explainer's layout (quotes, '|', 'context:')."""
    return " ".join(_STRUCTURE.sub(" ", label).replace('"', "").split())


def _words(text: str) -> set[str]:
    return {w.lower() for w in _WORD.findall(text)} - STOPWORDS


def _window(strings: dict[int, str], e: dict[str, Any]) -> str:
    i = e["pos"] - e["start"]
    toks = e["tokens"][max(0, i - SNIP_BEFORE): i + 1 + SNIP_AFTER]
    return " ".join("".join(strings.get(t, "") for t in toks).split())


def score_labels(store: FeatureStore, embedder: Any = "auto", provenance: str | None = None,
                 features: Iterable[int] | None = None, n_pos: int = N_POS, n_neg: int = N_NEG, seed: int = 0,
                 batch: int = 256, progress: bool = True) -> int:
    """Score the labels in `store` (every label, or those of one `provenance`, or of `features`); returns how many.

    embedder: "auto" (the sentence-embedding model when installed, else the lexical reader), an `Embedder`, or None
    (lexical). Scores are written one transaction per batch of features, replacing older ones of the same method.

    >>> a = fl.open_analysis(path)
    >>> fl.score_labels(a.store)
    >>> a.feature(12).label_score
    """
    from tqdm.auto import tqdm

    if embedder == "auto":
        from ..search.embed import get_embedder

        embedder = get_embedder()
    method = embedding_method(embedder) if embedder is not None else LEXICAL_METHOD
    sql = "SELECT feature, provenance, label FROM labels"
    labels = [(f, p, lab) for f, p, lab in store.conn.execute(sql) if provenance is None or p == provenance]
    if features is not None:
        wanted = {int(f) for f in features}
        labels = [r for r in labels if r[0] in wanted]
    if not labels:
        return 0
    strings = store.token_strings()
    quant = store.examples_by_feature("quantile")
    top = store.examples_by_feature("top")

    def positives(f: int) -> list[dict[str, Any]]:
        q = quant.get(f, [])
        if len(q) > n_pos:  # evenly across the bins (they are stored lowest bin first)
            q = [q[int(i)] for i in np.linspace(0, len(q) - 1, n_pos)]
        return q + top.get(f, [])[: max(0, n_pos - len(q))]

    # the negative pool: one example each from up to n_neg random features
    rng = np.random.default_rng(seed)
    donors = sorted(set(quant) | set(top))
    pool = []
    for f in rng.permutation(donors)[: n_neg].tolist():
        exs = quant.get(f) or top.get(f)
        pool.append((f, exs[int(rng.integers(len(exs)))]))
    pool_text = [_window(strings, e) for _, e in pool]
    if embedder is not None:
        pool_vec = embedder.encode(pool_text)
    else:
        pool_words = [_words(t) for t in pool_text]

    n = 0
    bar = tqdm(total=len(labels), unit="label", desc=f"label scores ({method})", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    for k in range(0, len(labels), batch):
        part = labels[k:k + batch]
        pos_text = {f: [_window(strings, e) for e in positives(f)] for f, _, _ in part}
        if embedder is not None:
            vec = embedder.vectors([t for ts in pos_text.values() for t in ts] + [label_reading(lab) for _, _, lab in part])
        rows = []
        for f, p, lab in part:
            own: dict[int, list[int]] = {}
            for e in quant.get(f, []) + top.get(f, []):
                own.setdefault(e["ctx"], []).append(e["pos"])
            span = SNIP_BEFORE + SNIP_AFTER
            keep = [j for j, (g, e) in enumerate(pool) if g != f
                    and not any(abs(e["pos"] - q) <= span for q in own.get(e["ctx"], ()))]
            if not pos_text[f] or not keep:
                continue
            reading = label_reading(lab)
            if embedder is not None:
                q = vec[reading]
                s_pos = np.array([vec[t] @ q for t in pos_text[f]])
                s_neg = pool_vec[keep] @ q
            else:
                lw = _words(reading)
                frac = (lambda ws: len(ws & lw) / len(lw)) if lw else (lambda ws: 0.0)
                s_pos = np.array([frac(_words(t)) for t in pos_text[f]])
                s_neg = np.array([frac(pool_words[j]) for j in keep])
            rows.append((f, p, method, auroc(s_pos, s_neg), len(s_pos), len(s_neg)))
        if not store.readonly:
            with store.transaction():
                store.write_label_scores(rows)
        n += len(rows)
        bar.update(len(part))
    bar.close()
    return n


def scores_summary(store: FeatureStore) -> dict[str, Any]:
    """Mean score and the fraction of clear labels over the features whose current label has a score."""
    vals = [s for s, _ in store.current_label_scores().values()]
    if not vals:
        return {"n": 0}
    arr = np.array(vals)
    return {"n": len(vals), "mean": float(arr.mean()), "median": float(np.median(arr)),
            "clear_fraction": float((arr >= UNCLEAR_BELOW).mean())}

