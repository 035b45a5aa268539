"""`TrainConfig`: how to train a dictionary (architecture, width, k, tokens, learning rate and schedule, sparsity
and AuxK coefficients, skip-transcoder starts, batch reuse, checkpoints), checked when made."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ..engine.errors import InputError
from .sae import ARCHITECTURES

DEFAULT_LR = {"topk": 2e-3, "batchtopk": 2e-3, "relu": 1e-3, "jumprelu": 1e-3}
LOSSES = ("mse", "normalized_mse")


@dataclass
class TrainConfig:
    """How to train; everything a checkpoint must agree with to be resumed, plus knobs that may change."""

    arch: str = "topk"
    width: int = 8192
    k: int | None = None  # topk / batchtopk (default 32)
    tokens: int = 2_000_000
    batch_size: int = 4096
    lr: float | None = None  # default: DEFAULT_LR[arch]
    warmup: float = 0.05  # fraction of tokens
    decay: float = 0.2  # fraction of tokens
    adam_betas: tuple[float, float] = (0.9, 0.999)
    offset_lr_scale: float = 10.0
    l1_coefficient: float = 0.5  # relu, in units of the normalized activations (mean norm sqrt(d))
    l0_coefficient: float = 0.05  # jumprelu, same units
    sparsity_warmup: float = 0.05
    jumprelu_bandwidth: float = 0.05
    jumprelu_init_threshold: float = 0.5  # used when init_l0 is 0
    init_l0: float = 64.0  # relu / jumprelu: initial biases / thresholds make latents fire on ~init_l0 per token
    batchtopk_threshold_rate: float = 0.01
    aux_coefficient: float = 1 / 32
    aux_k: int | None = None  # default d_in // 2
    dead_tokens: int | None = None  # default min(10M, max(tokens // 5, 10 batches))
    normalize: bool = True
    select_dtype: str = "auto"  # topk / batchtopk: dtype of the encoder pass that picks latents ("auto": bfloat16
    #                             where its matmuls are fast, else float32); chosen latents' values are float32
    skip: bool = False  # transcoders: linear skip connection
    loss: str = "mse"  # "mse", or "normalized_mse": each token's error relative to its target's norm (see
    #                    reconstruction_loss), so that heavy-tailed MLP outputs do not dominate
    reuse: int = 1  # serve each token's activations this many times (from an in-memory shuffle buffer): the forward
    #                 pass is the expensive part, so reuse > 1 trades fresh tokens for steps
    reuse_buffer_tokens: int = 65536  # rows held (as bfloat16) by that buffer
    init_tokens: int = 16384  # a skip transcoder's least-squares start (with its scales and b_dec) is fitted on this
    #                           many first rows, read before the first step and then trained on like any others
    skip_init: str = "least_squares"  # a skip's start: "least_squares" (fit_affine) or "zero" (the earlier recipe,
    #                                   kept for comparison: Adam from zero, which collapses all-layers replacement)
    skip_encoder_scale: float = 0.1  # a skip transcoder's encoder starts at this times the decoder's transpose: the
    #                                  untrained features then add little noise to the least-squares start
    skip_lr_scale: float = 0.0  # the skip's rate relative to lr; 0 keeps it at its least-squares start, which
    #                             holds up better when every layer is replaced at once (benchmarks/transcoders.py)
    response_coefficient: float = 0.0  # transcoders: weight of a second loss, the transcoder's response to a small
    #                                    perturbation of its input (its features' activity held, as an attribution
    #                                    graph linearises it) against the MLP's (batches.with_mlp_probes), relative
    #                                    to the reconstruction loss; 0 trains on outputs alone
    response_scale: float = 0.05  # the perturbation: this times the difference between two rows' inputs
    autocast: bool | None = None  # the model's forward pass under bfloat16 autocast (dtypes.forward_autocast);
    #                               None: on for a float32 model on CUDA, off elsewhere. Dictionaries train in float32
    checkpoint_every: int | None = None  # steps; default: every CHECKPOINT_SECONDS of training
    shards: int = 1  # data shards: the corpus's contexts are dealt into this many streams, each giving batch_size /
    #                  shards rows of every step; the ranks of a data-parallel run hold equal numbers of them. The
    #                  rows a run sees depend on it, not on the number of ranks (so a run may resume on other ranks)
    seed: int = 0

    # fields a resumed run must share with its checkpoint
    STRUCTURAL = ("arch", "width", "k", "normalize", "skip", "seed", "reuse", "reuse_buffer_tokens", "shards")

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise InputError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.k is None and self.arch in ("topk", "batchtopk"):
            self.k = 32
        if self.k is not None and self.arch not in ("topk", "batchtopk"):
            raise InputError(f"k applies to topk and batchtopk, not {self.arch} (its sparsity comes from "
                             f"{'l1_coefficient' if self.arch == 'relu' else 'l0_coefficient'})")
        _positive_int("width", self.width)
        _positive_int("tokens", self.tokens)
        _positive_int("batch_size", self.batch_size)
        if self.k is not None:
            _positive_int("k", self.k)
            if self.k > self.width:
                raise InputError(f"k={self.k} must not exceed the width {self.width}")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.arch]
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise InputError(f"lr must be a positive number, got {self.lr!r}")
        for name in ("warmup", "decay", "sparsity_warmup"):
            if not 0 <= getattr(self, name) < 1:
                raise InputError(f"{name} is a fraction of the tokens in [0, 1), got {getattr(self, name)!r}")
        if self.checkpoint_every is not None:
            _positive_int("checkpoint_every", self.checkpoint_every)
        if self.select_dtype not in ("auto", "float32", "bfloat16"):
            raise InputError(f"select_dtype must be auto, float32 or bfloat16, got {self.select_dtype!r}")
        if self.loss not in LOSSES:
            raise InputError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        _positive_int("shards", self.shards)
        for name in ("batch_size", "tokens"):
            if getattr(self, name) % self.shards:
                raise InputError(f"{name} ({getattr(self, name)}) must be a multiple of shards ({self.shards}): every "
                                 f"data shard gives an equal part of each step")
        _positive_int("reuse", self.reuse)
        _positive_int("reuse_buffer_tokens", self.reuse_buffer_tokens)
        _positive_int("init_tokens", self.init_tokens)
        if self.skip_init not in ("least_squares", "zero"):
            raise InputError(f"skip_init must be least_squares or zero, got {self.skip_init!r}")
        for name in ("skip_lr_scale", "skip_encoder_scale", "response_coefficient", "response_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InputError(f"{name} must be a number >= 0, got {v!r}")
        self.adam_betas = tuple(self.adam_betas)  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive_int(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise InputError(f"{name} must be a positive integer, got {v!r}")
