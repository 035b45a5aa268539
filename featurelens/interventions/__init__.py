"""Interventions: steer, clamp and ablate features; patch activations to test causal hypotheses.

- `types`: `Steer`, `Clamp`, `Ablate`, `SteeringVector`: what to change (each has `.hooks(model)`).
- `compile`: how they become forward hooks (`intervention_hooks`), through `featurelens.dictionaries.splice`.
- `steering`: `steer(model, ...)` (a context manager), `steering_vector`, `compare_generations`.
- `patching`: `activation_patching`, `attribution_patching` and the metrics `logit_diff`, `answer_prob`.
- `plots`: `save_heatmap` (PNG and JSON).
- `checked_search`: concept search whose best matches are checked by steering them (`steerable_search`).
- `label_effects`: scores what a label says its feature promotes, by steering it (`score_label_effects`).
"""

from .compile import intervention_hooks
from .patching import Metric, activation_patching, answer_prob, attribution_patching, logit_diff, patching_labels
from .plots import save_heatmap
from .steering import (GenerationComparison, SweepRow, as_interventions, compare_generations,
                       continuation_perplexities, steer, steering_vector, sweep_strengths)
from .checked_search import (rerank_analyses_by_steering, rerank_by_steering, steerable_search, steering_effects,
                             steering_ratios)
from .label_effects import EFFECT_METHOD, score_label_effects
from .types import Ablate, Clamp, Intervention, Steer, SteeringVector, feature_max_activation

__all__ = [
    "Ablate", "Clamp", "GenerationComparison", "Intervention", "Metric", "Steer", "SteeringVector",
    "activation_patching", "answer_prob", "as_interventions", "attribution_patching", "compare_generations",
    "feature_max_activation", "intervention_hooks", "logit_diff", "patching_labels", "save_heatmap", "steer",
    "steering_vector", "SweepRow", "continuation_perplexities", "sweep_strengths", "rerank_analyses_by_steering",
    "rerank_by_steering",
    "steerable_search", "steering_effects", "steering_ratios", "EFFECT_METHOD", "score_label_effects",
]
