"""Text corpora, packed token contexts, and streams of model activations for training sparse dictionaries."""

from .activations import ActivationStore, CacheMismatchError, ShuffleBuffer
from .cache import CachedActivations, write_activation_cache
from .corpus import DEFAULT_CORPUS, CorpusError, CorpusNotFoundError, TextSource, iter_texts, open_source
from .tokens import (DEFAULT_CTX_LEN, build_contexts, content_mask, contexts_dir, load_contexts, pack, split_indices,
                     tokenize)

__all__ = [
    "CachedActivations", "write_activation_cache",
    "ActivationStore", "CacheMismatchError", "CorpusError", "CorpusNotFoundError", "DEFAULT_CORPUS", "DEFAULT_CTX_LEN",
    "ShuffleBuffer", "TextSource", "build_contexts", "content_mask", "contexts_dir", "iter_texts", "load_contexts",
    "open_source", "pack", "split_indices", "tokenize",
]
