"""Explanations: a short label per feature, from a pluggable `Explainer`, stored with its provenance.

The built-in `AutoExplainer` (provenance "auto:v3") needs no model and no network. It reads what a feature fires on
and what it promotes:

- **fires on**: the tokens at the maximum of its top examples, when a few of them recur (e.g. ``"film", "movie"``);
  plus a class when most of them share one (numbers, punctuation, capitalized words, line breaks, word pieces);
- **context**: words that recur in its top examples' windows and are rare in other features' windows (TF-IDF over
  features: a word scores by the fraction of the feature's top examples containing it times log(N / df));
- **promotes** (what it does): the whole words its logit lens pushes up most, after an arrow, so the label reads
  as "fires on X → makes the model say Y". Words that also occur in the feature's own top examples come first:
  a logit-lens word seen where the feature fires is less likely to be noise of the unembedding.

e.g. ``"film", "movie" | context: review, acting, plot → promotes: critics, buff``. `featurelens.analysis.scoring`
scores where a label says its feature fires; `fl.score_label_effects` (opt-in: it steers every feature) scores
what it says the feature promotes.

To plug in another explainer, subclass `Explainer`, give it a `provenance` such as "llm:my-model", and implement
`explain` (or `explain_batch`); then ``fl.explain(path, MyExplainer())`` labels every feature. `ChatExplainer`
(`featurelens.analysis.llm`) asks any OpenAI-compatible chat endpoint. With ``skip_labeled=True`` a run labels only
the features that have no label from that explainer yet (resuming an interrupted run). The current label of a
feature is the user's (`set_label`), else the newest one written.
"""

from __future__ import annotations

import math
import re
import sys
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ..engine.errors import InputError
from ..store import FeatureStore
from ..text import PROMOTES, STOPWORDS, promoted_words  # noqa: F401  (promoted_words: public here too)

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]{1,}")


@dataclass
class Example:
    """One example as an explainer sees it: token strings, the feature's activation on each, the key token."""

    tokens: list[str]
    acts: list[float]
    index: int  # position of the example's token (the max for top examples) within `tokens`
    act: float

    @property
    def token(self) -> str:
        return self.tokens[self.index]

    @property
    def text(self) -> str:
        return "".join(self.tokens)


@dataclass
class FeatureEvidence:
    """What an explainer may use about one feature."""

    index: int
    density: float
    max_act: float
    top_examples: list[Example] = field(default_factory=list)
    promotes: list[str] = field(default_factory=list)
    suppresses: list[str] = field(default_factory=list)
    # examples sampled across activation quantiles, lowest bin first (`index` is the sampled token)
    quantile_examples: list[Example] = field(default_factory=list)


class Explainer(ABC):
    """Turns a feature's evidence into a short label. Subclasses set `provenance` and implement `explain`."""

    provenance: str = "explainer"

    def fit(self, evidence: Sequence[FeatureEvidence]) -> None:  # noqa: B027 - optional hook
        """See every feature's evidence first (for statistics across features); optional."""

    @abstractmethod
    def explain(self, ev: FeatureEvidence) -> str | None:
        """A short label, or None to leave the feature unlabeled."""

    def explain_batch(self, evs: Sequence[FeatureEvidence]) -> list[str | None]:
        """Label several features (override to batch calls to a remote model)."""
        return [self.explain(ev) for ev in evs]


def _norm_token(s: str) -> str:
    t = s.strip()
    if not t:
        return "\\n" if "\n" in s else "␣"
    return t.lower() if t[:1].isalpha() else t


def _token_class(s: str, next_tok: str | None) -> str | None:
    t = s.strip()
    if not t:
        return "line breaks" if "\n" in s else "spaces"
    if any(c.isdigit() for c in t) and re.fullmatch(r"[\d.,:/%$-]+", t):
        return "numbers"
    if all(not c.isalnum() for c in t):
        return "punctuation"
    if t[0].isupper() and s.startswith(" "):
        return "capitalized words"
    if next_tok is not None and next_tok[:1].isalpha() and not next_tok.startswith(" ") and s[:1] in (" ", "▁"):
        return "word beginnings"
    return None


def _is_word_token(s: str) -> bool:
    t = s.strip()
    return s[:1] in (" ", "▁") and len(t) >= 2 and t.isascii() and t.isalpha()


class AutoExplainer(Explainer):
    """The built-in, model-free explainer (see the module docstring)."""

    provenance = "auto:v3"

    def __init__(self, n_examples: int = 20, n_tokens: int = 3, n_context: int = 3, n_promotes: int = 3):
        self.n_examples, self.n_tokens, self.n_context, self.n_promotes = n_examples, n_tokens, n_context, n_promotes
        self.df: Counter[str] = Counter()
        self.n_docs = 0

    @staticmethod
    def _words(ex: Example) -> set[str]:
        return {w.lower().strip("'-") for w in _WORD.findall(ex.text)} - STOPWORDS

    def fit(self, evidence: Sequence[FeatureEvidence]) -> None:
        self.df = Counter()
        self.n_docs = 0
        for ev in evidence:
            words: set[str] = set()
            for ex in ev.top_examples[: self.n_examples]:
                words |= self._words(ex)
            if words:
                self.df.update(words)
                self.n_docs += 1

    def explain(self, ev: FeatureEvidence) -> str | None:
        exs = ev.top_examples[: self.n_examples]
        if not exs:
            return "dead (never fired)"
        n = len(exs)
        # tokens at the maximum (counted case-insensitively, shown in their most common spelling)
        toks = Counter(_norm_token(ex.token) for ex in exs)
        spelling: dict[str, Counter[str]] = {}
        for ex in exs:
            spelling.setdefault(_norm_token(ex.token), Counter())[ex.token.strip() or _norm_token(ex.token)] += 1
        main = [t for t, c in toks.most_common(self.n_tokens) if c >= max(2, math.ceil(0.15 * n))]
        if not main and n <= 2:
            main = [toks.most_common(1)[0][0]]
        main = [spelling[t].most_common(1)[0][0] for t in main]
        classes = Counter(_token_class(ex.token, ex.tokens[ex.index + 1] if ex.index + 1 < len(ex.tokens) else None)
                          for ex in exs)
        cls, cls_n = classes.most_common(1)[0]
        # One word at nearly every maximum says more than its class: '"Paris"', not 'capitalized words ("Paris")'.
        one_word = cls in ("capitalized words", "word beginnings") and toks.most_common(1)[0][1] >= 0.8 * n
        parts = []
        head = ", ".join(f'"{t}"' for t in main)
        if cls is not None and cls_n >= 0.6 * n and not (one_word and head):
            head = f"{cls} ({head})" if head else cls
        if head:
            parts.append(head)
        # context words
        per_ex = [self._words(ex) for ex in exs]
        tf = Counter(w for ws in per_ex for w in ws)
        main_set = {m.strip().lower() for m in main}
        n_docs = max(self.n_docs, 1)
        scored = []
        for w, c in tf.items():
            if c < max(2, math.ceil(0.2 * n)) or w in main_set or len(w) < 3:
                continue
            idf = math.log((n_docs + 1) / (self.df.get(w, 0) + 1)) + 1.0
            scored.append(((c / n) * idf, w))
        scored.sort(reverse=True)
        ctx = [w for _, w in scored[: self.n_context]]
        if ctx:
            parts.append("context: " + ", ".join(ctx))
        # what it promotes: only when its top tokens read as words (whole words, not pieces of other scripts'
        # words: the logit lens of early-layer features is mostly such noise)
        wordlike = list(dict.fromkeys(s.strip().lower() for s in ev.promotes[:5] if _is_word_token(s)))
        does = ""
        if len(wordlike) >= 2:
            seen = set().union(*per_ex) if per_ex else set()
            prom = sorted(wordlike, key=lambda w: w not in seen)  # stable: logit-lens order within each group
            does = PROMOTES + ", ".join(prom[: self.n_promotes])
        return (" | ".join(parts) if parts else "(no clear pattern)") + does


# ----------------------------------------------------------------------------------------------- running
def evidence_from_store(store: FeatureStore, n_examples: int = 20, n_quantile: int = 20) -> list[FeatureEvidence]:
    """Every feature's evidence, read in one pass over the store: its first `n_examples` top examples and first
    `n_quantile` quantile examples (0 for none)."""
    strings = store.token_strings()
    rows = {r[0]: r for r in store.conn.execute("SELECT idx, density, max_act FROM features")}
    lens = {i: (up, down) for i, up, down in store.logit_lists()}
    out: dict[int, FeatureEvidence] = {
        i: FeatureEvidence(index=i, density=r[1], max_act=r[2],
                           promotes=[strings.get(t, "") for t, _ in lens.get(i, ([], []))[0]],
                           suppresses=[strings.get(t, "") for t, _ in lens.get(i, ([], []))[1]])
        for i, r in rows.items()}
    # One scan of the examples table, in its own (primary key) order: feature, kind, rank.
    cur = store.conn.execute(
        "SELECT feature, kind, pos, start, act, tokens, acts FROM examples "
        "WHERE (kind = 'top' AND rank < ?) OR (kind = 'quantile' AND rank < ?) ORDER BY feature, kind, rank",
        (int(n_examples), int(n_quantile)))
    for f, kind, pos, start, act, tok_blob, act_blob in cur:
        ev = out.get(f)
        if ev is None:
            continue
        toks = [strings.get(t, "") for t in np.frombuffer(tok_blob, dtype=np.int32).tolist()]
        acts = np.frombuffer(act_blob, dtype=np.float16).astype(np.float32).tolist()
        (ev.top_examples if kind == "top" else ev.quantile_examples).append(Example(toks, acts, pos - start, act))
    return [out[i] for i in sorted(out)]


def labeled_by(store: FeatureStore, provenance: str) -> set[int]:
    """The features that have a label from `provenance`."""
    return {f for (f,) in store.conn.execute("SELECT feature FROM labels WHERE provenance = ?", (provenance,))}


def explain_store(store: FeatureStore, explainer: Explainer, features: Iterable[int] | None = None,
                  batch: int = 512, progress: bool = True, *, skip_labeled: bool = False) -> int:
    """Label features with `explainer`, one transaction per batch; returns how many were labeled.

    With `skip_labeled`, features that already have a label from ``explainer.provenance`` are left alone, so a
    rerun after an interruption or a failed batch labels only the rest. A batch whose `explain_batch` raises
    stores nothing; the batches before it stay stored.
    """
    from tqdm.auto import tqdm

    if not isinstance(explainer, Explainer):
        raise TypeError(f"explainer must be an Explainer, got {type(explainer).__name__}")
    if batch <= 0:
        raise InputError(f"batch must be positive, got {batch}")
    evidence = evidence_from_store(store)
    explainer.fit(evidence)
    if features is not None:
        wanted = set(int(f) for f in features)
        evidence = [ev for ev in evidence if ev.index in wanted]
    if skip_labeled:
        done = labeled_by(store, explainer.provenance)
        evidence = [ev for ev in evidence if ev.index not in done]
    n = 0
    bar = tqdm(total=len(evidence), unit="feat", desc=f"labels ({explainer.provenance})", disable=not progress,
               file=sys.stderr, dynamic_ncols=True)
    try:
        for k in range(0, len(evidence), batch):
            part = evidence[k:k + batch]
            labels = explainer.explain_batch(part)
            rows = [(ev.index, explainer.provenance, lab) for ev, lab in zip(part, labels) if lab]
            with store.transaction():
                store.write_labels(rows)
            n += len(rows)
            bar.update(len(part))
    finally:
        bar.close()
    return n
