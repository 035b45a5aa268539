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

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "CorruptFileError", "DEFAULT_MODEL", "EmptyPromptError", "HookPoint", "HookedTransformer",
    "ModelConfig", "UnknownHookError", "UnknownModelError", "data_dir", "from_transformers", "list_models",
    "load_model", "set_data_dir",
]
