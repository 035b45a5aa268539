"""Finding features: by meaning (concept search over labels and snippets), by text (what fires on it), and by
output token (what pushes it up through the logit lens)."""

from .concept import EmptyQueryError, SearchHit, concept_search, ensure_embeddings, feature_documents, feature_texts
from .embed import Embedder, MiniLMEmbedder, embedder_available, get_embedder
from .inference import PromoteHit, TextHit, TextSearchResult, search_promotes, search_text
from .lexical import BM25

__all__ = ["BM25", "Embedder", "EmptyQueryError", "MiniLMEmbedder", "PromoteHit", "SearchHit", "TextHit",
           "TextSearchResult", "concept_search", "embedder_available", "ensure_embeddings", "feature_documents",
           "feature_texts", "get_embedder", "search_promotes", "search_text"]
