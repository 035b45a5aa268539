"""Finding features: by meaning (concept search over labels and snippets), by text (what fires on it), and by
output token (what pushes it up through the logit lens); `steerable` finds a concept's words for the steering check of
`featurelens.interventions.checked_search`.

These functions read an analysis (its store, model and dictionary); `featurelens.analysis.DictionaryAnalysis`
offers them as methods (`search`, `search_text`, `search_promotes`)."""

from .by_text import FeatureActivations, TextHit, TextSearchResult, feature_activations, search_text
from .by_token import PromoteHit, search_promotes, token_id
from .concept import EmptyQueryError, SearchHit, concept_search, ensure_embeddings, feature_documents, feature_texts
from .embed import Embedder, MiniLMEmbedder, embedder_available, get_embedder
from .lexical import BM25
from .steerable import PROBE_PROMPTS, concept_words, next_token_mass, next_token_probs, raised_words, single_token_ids

__all__ = ["BM25", "PROBE_PROMPTS", "Embedder", "EmptyQueryError", "FeatureActivations", "MiniLMEmbedder", "PromoteHit", "SearchHit", "TextHit",
           "TextSearchResult", "concept_search", "concept_words", "embedder_available", "ensure_embeddings",
           "feature_activations", "feature_documents", "feature_texts", "get_embedder", "next_token_mass", "next_token_probs", "raised_words", "search_promotes",
           "search_text", "single_token_ids", "token_id"]
