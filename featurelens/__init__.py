"""featurelens: offline mechanistic interpretability on real language models.

>>> import featurelens as fl
>>> model = fl.load_model("gemma-3-270m")
>>> logits, cache = model.run_with_cache("The capital of France is")
"""

from .engine.config import ModelConfig
from .engine.hooked import EmptyPromptError, HookedTransformer
from .engine.hooks import ActivationCache, HookPoint, UnknownHookError
from .models.gguf import CorruptFileError
from .models.loader import DEFAULT_MODEL, UnknownModelError, from_transformers, list_models, load_model
from .paths import data_dir, set_data_dir

from .version import __version__

__all__ = [
    "ActivationCache", "CorruptFileError", "DEFAULT_MODEL", "EmptyPromptError", "HookPoint", "HookedTransformer",
    "ModelConfig", "UnknownHookError", "UnknownModelError", "data_dir", "from_transformers", "list_models",
    "load_model", "set_data_dir",
]

# Interventions: steering, clamping, ablation, activation and attribution patching.
from .interventions import (  # noqa: E402
    Ablate, Clamp, GenerationComparison, Metric, Steer, SteeringVector, activation_patching, answer_prob,
    attribution_patching, compare_generations, intervention_hooks, logit_diff, save_heatmap, steer, steering_vector,
)
from .interventions import (SweepRow, continuation_perplexities, score_label_effects, steerable_search,  # noqa: E402
                            sweep_strengths)

__all__ += [
    "Ablate", "Clamp", "GenerationComparison", "Metric", "Steer", "SteeringVector", "activation_patching",
    "answer_prob", "attribution_patching", "compare_generations", "intervention_hooks", "logit_diff",
    "save_heatmap", "steer", "steering_vector", "SweepRow", "continuation_perplexities", "sweep_strengths",
    "steerable_search", "score_label_effects",
]

# Data: text corpora, packed contexts, activation streams (and their on-disk cache).
from .data import (  # noqa: E402
    DEFAULT_CORPUS, ActivationStore, CacheMismatchError, CorpusError, iter_texts, load_contexts, open_source,
)

__all__ += [
    "ActivationStore", "CacheMismatchError", "CorpusError", "DEFAULT_CORPUS", "iter_texts", "load_contexts",
    "open_source",
]

# Sparse dictionaries: SAEs and transcoders (train, evaluate, save and load in SAELens's layout).
from .dictionaries import (  # noqa: E402
    CorruptDictionaryError, DictionaryConfig, DictionaryMetrics, SparseDictionary, TranscoderSet,
    evaluate_dictionaries, evaluate_dictionary, load_dictionary, save_dictionary, train_sae, train_saes,
    train_transcoders,
)
from .dictionaries import (  # noqa: E402  (cross-layer transcoders, circuit-tracer's layout)
    CLTConfig, CrossLayerTranscoder, load_circuit_tracer, save_circuit_tracer, train_clt,
)

__all__ += ["CLTConfig", "CrossLayerTranscoder", "load_circuit_tracer", "save_circuit_tracer", "train_clt"]
__all__ += [
    "CorruptDictionaryError", "DictionaryConfig", "DictionaryMetrics", "SparseDictionary", "TranscoderSet",
    "evaluate_dictionaries", "evaluate_dictionary", "load_dictionary", "save_dictionary", "train_sae", "train_saes",
    "train_transcoders",
]

# Feature analysis: dashboards, logit lens, labels, and search by concept, text and output token.
from .analysis import (  # noqa: E402
    AutoExplainer, ChatExplainer, DictionaryAnalysis, DictionaryModelMismatchError, Explainer, ExplainerError,
    FeatureDashboard, FeatureIndexError, NotAnalyzedError, analyze, explain, open_analysis, score_labels,
)
from .search import EmptyQueryError  # noqa: E402

__all__ += [
    "AutoExplainer", "ChatExplainer", "DictionaryAnalysis", "DictionaryModelMismatchError", "EmptyQueryError",
    "Explainer", "ExplainerError", "FeatureDashboard", "FeatureIndexError", "NotAnalyzedError", "analyze", "explain",
    "open_analysis", "score_labels",
]

# Attribution graphs: a prompt's path from tokens through transcoder features to its next token.
from .attribution import AttributionGraph, attribute, feature_intervention, load_graph, save_graph  # noqa: E402

__all__ += ["AttributionGraph", "attribute", "feature_intervention", "load_graph", "save_graph"]

# The main job: from nothing to a fully analysed, browsable model. Loaded on first use: the pipeline sits above
# the server in the layers, and the server imports this package.
__all__ += ["DemoBudget", "run_demo"]


def __getattr__(name: str):
    if name in ("DemoBudget", "run_demo"):
        import importlib

        return getattr(importlib.import_module(f"{__name__}.pipeline"), name)
    raise AttributeError(f"module 'featurelens' has no attribute {name!r}")
