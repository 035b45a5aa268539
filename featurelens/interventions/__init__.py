"""Interventions: steer, clamp and ablate features; patch activations to test causal hypotheses.

- `steering`: `Steer`, `Clamp`, `Ablate`, `steering_vector`, `compare_generations`, and the hooks behind
  `model.steer(...)` and `model.generate(..., interventions=[...])`.
- `patching`: `activation_patching`, `attribution_patching` and the metrics `logit_diff`, `answer_prob`.
- `plots`: `save_heatmap` (PNG and JSON).
"""

from .patching import Metric, activation_patching, answer_prob, attribution_patching, logit_diff, patching_labels
from .plots import save_heatmap
from .steering import (
    Ablate,
    Clamp,
    GenerationComparison,
    Intervention,
    Steer,
    SteeringVector,
    compare_generations,
    feature_max_activation,
    intervention_hooks,
    steering_vector,
)

__all__ = [
    "Ablate", "Clamp", "GenerationComparison", "Intervention", "Metric", "Steer", "SteeringVector",
    "activation_patching", "answer_prob", "attribution_patching", "compare_generations", "feature_max_activation",
    "intervention_hooks", "logit_diff", "patching_labels", "save_heatmap", "steering_vector",
]
