"""Sparse dictionaries: SAEs (ReLU, TopK, BatchTopK, JumpReLU) and transcoders; training, metrics, SAELens format.

Modules: `sae` (the dictionaries), `train` (`train_sae`, `train_transcoders`) over `batches` (activation streams)
and `training` (the loop; `autograd` and `median` are its pieces), `metrics`, `format` (SAELens layout), `splice`
(a dictionary spliced into a model), `compat` (does a dictionary fit a model), `logit_lens`.

>>> import featurelens as fl
>>> model = fl.load_model("gemma-3-270m")
>>> sae = fl.train_sae(model, hook="blocks.6.hook_resid_post", arch="topk", k=32, width=8192, out="~/sae-l6")
>>> sae = fl.load_dictionary("~/sae-l6")
>>> fl.evaluate_dictionary(model, sae).ce_loss_recovered
"""

from .batches import model_batches
from .circuit_tracer_format import load_circuit_tracer, save_circuit_tracer
from .clt import CLTConfig, CrossLayerTranscoder, load_clt, save_clt, train_clt
from .compat import DictionaryModelMismatchError, check_compatible
from .format import CorruptDictionaryError, load_dictionary, save_dictionary, save_transcoder_set
from .replacement import Replacement, evaluate_replacement
from .metrics import DictionaryMetrics, evaluate_dictionary, reconstruction_metrics, splice_metrics
from .sae import (ARCHITECTURES, DictionaryConfig, FeatureIndexError, LayerError, SparseDictionary, TranscoderSet,
                  check_feature_index)
from .splice import splice_hooks
from .train import train_sae, train_transcoders
from .training import Learner, TrainConfig, iterate_tensors, run_training

__all__ = [
    "CLTConfig", "CrossLayerTranscoder", "evaluate_replacement", "load_circuit_tracer", "load_clt",
    "save_circuit_tracer", "save_clt", "train_clt",
    "ARCHITECTURES", "CorruptDictionaryError", "DictionaryConfig", "DictionaryMetrics", "DictionaryModelMismatchError",
    "FeatureIndexError", "LayerError", "Learner", "SparseDictionary", "TrainConfig", "TranscoderSet", "check_compatible",
    "check_feature_index", "evaluate_dictionary", "iterate_tensors", "load_dictionary", "model_batches",
    "reconstruction_metrics", "run_training", "save_dictionary", "save_transcoder_set", "splice_hooks",
    "splice_metrics", "train_sae", "train_transcoders",
]
