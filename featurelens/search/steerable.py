"""The concept side of a steering-checked search: which words say a concept, and how likely the model is to say
them next. The steering itself, and the re-ranking, are `featurelens.interventions.checked_search` (interventions
sit above search in the package's layers), which also reports the words steering raises most (`raised_words`).

The concept's words are the query's own and, beyond them, the candidates' evidence, not a word list: every word in
their labels, max-activating tokens and top snippets, embedded and kept when close to the query (CONCEPT_WORDS of
them at most, cosine >= MIN_WORD_COS).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import torch

from .concept import SearchHit

# Neutral openings on which candidates are steered; benchmarks/concepts.py measures steering on different ones.
PROBE_PROMPTS = ["The", "It was a long day, and", "Here is what I think:", "We talked for hours about",
                 "This is a story about", "So the next thing is"]
CONCEPT_WORDS = 12
PROMOTED_WORDS = 5  # words shown for what steering a feature promotes
MIN_WORD_COS = 0.35


def concept_words(query: str, hits: Sequence[SearchHit], embedder: Any, n: int = CONCEPT_WORDS,
                  min_cos: float | None = None) -> list[str]:
    """Words of the concept `query`: the query's own words first (`query_words`), then words drawn from the hits'
    labels, max tokens and snippets and the query words' other forms (`word_forms`), closest to the query first,
    kept at cosine >= min_cos (default MIN_WORD_COS). Without an embedder (None): the query's own words, and the
    hits' words that share a stem with one of them."""
    from .lexical import query_words, terms, word_forms

    own = query_words(query)
    if embedder is None:
        stems = set(terms(query))
        own = [w for w in own if terms(w) and terms(w)[0] in stems]
        found = {re.sub(r"[^a-z]", "", t.lower()) for h in hits for t in h.max_tokens}
        return list(dict.fromkeys(own + sorted(w for w in found if len(w) >= 3 and terms(w) and terms(w)[0] in stems)))[:n]
    min_cos = MIN_WORD_COS if min_cos is None else min_cos
    # a concept named in the plural ("trains") is said in the singular too; the cosine decides ("news" -> "new")
    words: set[str] = {f for w in own for f in word_forms(w)}
    for h in hits:
        for t in [*h.max_tokens, *" ".join(h.near_max).split(), *(h.label or "").split()]:
            w = re.sub(r"[^a-z]", "", t.lower())
            if len(w) >= 3:
                words.add(w)
    ordered = sorted(words - set(own))
    if not ordered:
        return own[:n]
    cos = embedder.encode(ordered) @ embedder.encode([query.strip()])[0]
    best = np.argsort(-cos, kind="stable")
    return (own + [ordered[i] for i in best if cos[i] >= min_cos])[:n]


def single_token_ids(model: Any, words: Sequence[str]) -> list[int]:
    """The vocabulary ids of " word" and " Word" for each word that is one token with its leading space."""
    ids = set()
    for w in words:
        for spelling in (" " + w, " " + w.capitalize()):
            toks = model.encode(spelling, prepend_bos=False)
            if len(toks) == 1:
                ids.add(int(toks[0]))
    return sorted(ids)


@torch.inference_mode()
def next_token_probs(model: Any, prompts: Sequence[str], hooks: Sequence = (), per_prompt: bool = False
                     ) -> torch.Tensor:
    """The model's next-token distribution after each prompt (with `hooks`), averaged over prompts: [vocab]; with
    per_prompt, each prompt's: [prompts, vocab]."""
    rows = [model.encode(p) for p in prompts]
    tokens, _ = model.pad(rows, "right")  # right padding: each row's last real token sees no pad
    last, batch = torch.tensor([len(r) - 1 for r in rows]), torch.arange(len(rows))
    # only the last position is unembedded: the unembedding is most of a small model's cost per token
    resid = model.run_with_hooks(tokens, fwd_hooks=list(hooks), stop_at_layer=model.cfg.n_layers)
    probs = model.unembed(resid[batch, last], fwd_hooks=list(hooks)).float().softmax(-1)  # [prompts, vocab]
    return probs if per_prompt else probs.mean(0)


def next_token_mass(model: Any, prompts: Sequence[str], token_ids: Sequence[int], hooks: Sequence = ()) -> float:
    """The probability the model gives `token_ids` as the next token after each prompt (with `hooks`), averaged."""
    return float(next_token_probs(model, prompts, hooks)[list(token_ids)].sum())


def raised_words(model: Any, steered: torch.Tensor, clean: torch.Tensor, n: int = PROMOTED_WORDS) -> list[str]:
    """The words whose next-token probability steering raised most (steered - clean), lowercased, each once: whole
    words only (a leading space and letters), not word pieces or punctuation."""
    out: list[str] = []
    for i in (steered - clean).argsort(descending=True)[:200].tolist():
        s = model.tokenizer.decode([i])
        w = s.strip().lower()
        if s.startswith(" ") and len(w) >= 3 and w.isalpha() and w not in out:
            out.append(w)
            if len(out) == n:
                break
    return out
