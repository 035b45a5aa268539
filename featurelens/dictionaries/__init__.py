"""Sparse dictionaries: SAEs (ReLU, TopK, BatchTopK, JumpReLU) and transcoders; training, metrics, SAELens format.

>>> import featurelens as fl
>>> model = fl.load_model("gemma-3-270m")
>>> sae = fl.train_sae(model, hook="blocks.6.hook_resid_post", arch="topk", k=32, width=8192, out="~/sae-l6")
>>> sae = fl.load_dictionary("~/sae-l6")
>>> fl.evaluate_dictionary(model, sae).ce_loss_recovered
"""

from .api import model_batches, train_sae, train_transcoders
from .format import CorruptDictionaryError, load_dictionary, save_dictionary, save_transcoder_set
from .metrics import DictionaryMetrics, evaluate_dictionary, reconstruction_metrics, splice_metrics
from .sae import (ARCHITECTURES, DictionaryConfig, FeatureIndexError, SparseDictionary, TranscoderSet,
                  check_feature_index)
from .training import Learner, TrainConfig, iterate_tensors, run_training

__all__ = [
    "ARCHITECTURES", "CorruptDictionaryError", "DictionaryConfig", "DictionaryMetrics", "FeatureIndexError", "Learner",
    "SparseDictionary", "TrainConfig", "TranscoderSet", "check_feature_index", "evaluate_dictionary", "iterate_tensors",
    "load_dictionary", "model_batches", "reconstruction_metrics", "run_training", "save_dictionary",
    "save_transcoder_set", "splice_metrics", "train_sae", "train_transcoders",
]
