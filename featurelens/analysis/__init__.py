"""Feature analysis: dashboards (top and quantile examples, density, histogram, logit lens, similar and co-firing
features), automatic labels, and the analyzed dictionary you open to read them.

>>> import featurelens as fl
>>> fl.analyze(model, "~/sae-l6")                 # resumable, with progress bars
>>> fd = fl.open_dictionary("~/sae-l6")
>>> fd.feature(1234)                              # FeatureDashboard: HTML in Jupyter, .to_html("f.html")
>>> fd.search("film review"); fd.search_text("The Eiffel Tower is in Paris"); fd.search_promotes(" Paris")
"""

from .accumulate import Accumulator, AccumulatorConfig
from .dashboard import FeatureDashboard, TokenExample
from .explain import AutoExplainer, Example, Explainer, FeatureEvidence, explain
from .open import DictionaryAnalysis, FeatureIndexError, NotAnalyzedError, open_dictionary
from .run import AnalysisTimings, DictionaryModelMismatchError, analyze, check_compatible, logit_lens_weights

__all__ = ["Accumulator", "AccumulatorConfig", "AnalysisTimings", "AutoExplainer", "DictionaryAnalysis",
           "DictionaryModelMismatchError", "Example", "Explainer", "FeatureDashboard", "FeatureEvidence",
           "FeatureIndexError", "NotAnalyzedError", "TokenExample", "analyze", "check_compatible", "explain",
           "logit_lens_weights", "open_dictionary"]
