"""Sparse dictionaries: SAEs (ReLU, TopK, BatchTopK, JumpReLU) and transcoders; training, metrics, SAELens format.

Modules: `sae` (SAEs, transcoders, per-layer transcoder sets), `clt` (cross-layer transcoders), `protocol` (the
replacement protocol both kinds of transcoders implement), `train` (`train_sae`, `train_transcoders`, `train_clt`)
over `batches` (activation streams), `train_config` (`TrainConfig`), `learner` (dictionaries being trained), `losses` (a step's maths; `autograd` and
`median` are its pieces), `checkpoints` and `loop` (the run); `metrics`, `replacement` (transcoders replacing every
MLP at once) and `evaluate` (`evaluate_dictionary`); `formats` (every file layout, `load_dictionary` /
`save_dictionary`); `splice` (a dictionary spliced into a model), `compat` (does a dictionary fit a model),
`logit_lens`.

>>> import featurelens as fl
>>> model = fl.load_model("gemma-3-270m")
>>> sae = fl.train_sae(model, hook="blocks.6.hook_resid_post", arch="topk", k=32, width=8192, out="~/sae-l6")
>>> sae = fl.load_dictionary("~/sae-l6")
>>> fl.evaluate_dictionary(model, sae).ce_loss_recovered
"""

from .batches import iterate_tensors, model_batches
from .clt import CLTConfig, CrossLayerTranscoder
from .compat import DictionaryModelMismatchError, check_fits
from .evaluate import evaluate_dictionaries, evaluate_dictionary
from .formats import (CorruptDictionaryError, load_circuit_tracer, load_clt, load_dictionary, save_circuit_tracer,
                      save_clt, save_dictionary, save_transcoder_set)
from .learner import Learner
from .loop import run_training
from .metrics import DictionaryMetrics, reconstruction_metrics, splice_metrics
from .replacement import evaluate_replacement
from .protocol import Transcoders
from .sae import (ARCHITECTURES, DictionaryConfig, FeatureIndexError, LayerError, SparseDictionary, TranscoderSet,
                  check_feature_index)
from .splice import splice_hooks
from .train import train_clt, train_sae, train_saes, train_transcoders
from .train_config import TrainConfig

__all__ = [
    "CLTConfig", "CrossLayerTranscoder", "evaluate_replacement", "load_circuit_tracer", "load_clt",
    "save_circuit_tracer", "save_clt", "train_clt",
    "ARCHITECTURES", "CorruptDictionaryError", "DictionaryConfig", "DictionaryMetrics", "DictionaryModelMismatchError",
    "FeatureIndexError", "LayerError", "Learner", "SparseDictionary", "TrainConfig", "TranscoderSet", "Transcoders", "check_fits",
    "check_feature_index", "evaluate_dictionaries", "evaluate_dictionary", "iterate_tensors", "load_dictionary",
    "model_batches",
    "reconstruction_metrics", "run_training", "save_dictionary", "save_transcoder_set", "splice_hooks",
    "splice_metrics", "train_sae", "train_saes", "train_transcoders",
]
