"""Feature analysis: dashboards (top and quantile examples, density, histogram, logit lens, similar and co-firing
features), automatic labels, and the analyzed dictionary you open to read them.

>>> import featurelens as fl
>>> fl.analyze(model, "~/sae-l6")                 # resumable, with progress bars
>>> fd = fl.open_analysis("~/sae-l6")
>>> fd.feature(1234)                              # FeatureDashboard: HTML in Jupyter, .to_html("f.html")
>>> fd.search("film review"); fd.search_text("The Eiffel Tower is in Paris"); fd.search_promotes(" Paris")

Modules: `build` (`analyze`, the stage machine) with its stages `contexts`, `stream` (and `SharedForward`: the model
run once for several dictionaries over the same contexts), `finalize` and `explain` (labels); `llm`
(`ChatExplainer`: labels from an OpenAI-compatible chat endpoint); `results` (`open_analysis`,
`DictionaryAnalysis`); `accumulate` (streaming statistics); `dashboard`.
"""

from ..dictionaries.compat import DictionaryModelMismatchError, check_fits
from ..dictionaries.logit_lens import logit_lens_weights
from ..dictionaries.sae import FeatureIndexError
from .accumulate import Accumulator, AccumulatorConfig
from .build import analyze
from .dashboard import FeatureDashboard, TokenExample
from .explain import AutoExplainer, Example, Explainer, FeatureEvidence
from .llm import ChatExplainer, ExplainerError
from .results import DictionaryAnalysis, NotAnalyzedError, explain, open_analysis
from .scoring import score_labels
from .stream import SharedForward
from .timings import AnalysisTimings

__all__ = ["Accumulator", "AccumulatorConfig", "AnalysisTimings", "AutoExplainer", "ChatExplainer",
           "DictionaryAnalysis", "DictionaryModelMismatchError", "Example", "Explainer", "ExplainerError",
           "FeatureDashboard", "FeatureEvidence", "FeatureIndexError", "NotAnalyzedError", "SharedForward", "TokenExample", "analyze",
           "check_fits", "explain", "logit_lens_weights", "open_analysis", "score_labels"]
