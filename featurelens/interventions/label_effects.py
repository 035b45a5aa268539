"""What a label says a feature does, checked by doing it: steer the feature and see whether the words its label
says it promotes ("... → promotes: dollars, million") become likelier.

`featurelens.analysis.scoring` scores where a label says its feature fires (an AUROC); this scores the other half
of the label. Each feature whose current label names promoted words (`promoted_words`) is steered at relative
`strength` on the steering check's probe prompts (`featurelens.search.steerable.PROBE_PROMPTS`), and its score is
the next-token probability of those words (every single-token spelling " word", " Word") steered over unsteered,
averaged over the prompts: above 1 the label's "promotes" is borne out, at or below 1 it is not. Stored in
`label_scores` with method EFFECT_METHOD (n_pos: the prompts, n_neg: the token ids scored), beside the AUROC.

Opt-in (one forward pass over the probe prompts per feature): `fl.analyze` does not run it.

>>> fl.score_label_effects(fl.open_analysis("~/sae-l6"), features=[12, 40])
>>> lens.store.label_scores(12, effects=True)
"""

from __future__ import annotations

from typing import Any, Iterable

from ..text import promoted_words
from ..engine.errors import InputError
from ..search.by_text import checked_model_and_dictionary
from ..search.steerable import PROBE_PROMPTS, next_token_probs, single_token_ids
from ..store import EFFECT_PREFIX
from .types import Steer

EFFECT_METHOD = f"{EFFECT_PREFIX}promotes:v1"


def score_label_effects(analysis: Any, features: Iterable[int] | None = None, strength: float = 1.0,
                        progress: bool = True) -> dict[int, float]:
    """Score what the current labels of `features` (default: every feature whose label names promoted words) say
    their features promote, by steering them (module docstring); feature -> score, also stored in the analysis
    when it is writable. Needs the analysis's model and dictionary."""
    from tqdm.auto import tqdm

    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or strength <= 0:
        raise InputError(f"strength must be a positive number, got {strength!r}")
    store = analysis.store
    labels = store.current_labels()
    wanted = sorted(labels) if features is None else [int(f) for f in features]
    unknown = [f for f in wanted if not 0 <= f < analysis.n_features]
    if unknown:
        raise InputError(f"no feature {unknown[0]}: the dictionary has {analysis.n_features} features")
    model, dictionary = checked_model_and_dictionary(analysis)
    max_act = store.column("max_act")
    clean = next_token_probs(model, PROBE_PROMPTS)
    scores: dict[int, float] = {}
    rows = []
    for f in tqdm(wanted, desc="label effects", unit="feature", disable=not progress, leave=False):
        label, provenance = labels.get(f, (None, None))
        ids = single_token_ids(model, promoted_words(label)) if label else []
        if not ids or float(max_act[f]) <= 0:
            continue  # the label claims nothing about what it promotes, or the feature never fired
        steer = Steer(dictionary, f, float(strength), max_activation=float(max_act[f]))
        steered = next_token_probs(model, PROBE_PROMPTS, steer.hooks(model))
        scores[f] = float(steered[ids].sum() / clean[ids].sum().clamp(min=1e-12))
        rows.append((f, provenance, EFFECT_METHOD, scores[f], len(PROBE_PROMPTS), len(ids)))
    if rows and not store.readonly:
        with store.transaction():
            store.write_label_scores(rows)
    return scores
