"""`SparseDictionary`: one module for sparse autoencoders and transcoders.

A dictionary reads an activation x (d_in) at one hook and writes a reconstruction (d_out) of an activation
at a hook: the same hook for an SAE, another one for a transcoder (e.g. the MLP's input -> the MLP's output).

    pre = (x - b_dec [SAE with apply_b_dec_to_input]) @ W_enc + b_enc      [..., d_sae]
    f   = act(pre)                                                          [..., d_sae] sparse, >= 0
    out = f @ W_dec + b_dec  (+ x @ W_skip.T for a transcoder with a skip)  [..., d_out]

Architectures (`act`):

* ``relu``      ReLU; trained with an L1 penalty.
* ``topk``      keep each token's k largest pre-activations (ReLU'd), zero the rest.
* ``batchtopk`` trained keeping the k * batch largest over a whole batch; at inference a learned threshold
                (the running minimum of the kept activations) replaces the batch, exactly as JumpReLU: the file
                says ``architecture: jumprelu``, so SAELens reads it too.
* ``jumprelu``  pre * (pre > threshold) with a learned per-feature threshold.

Tensor shapes follow SAELens: W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_enc [d_sae], b_dec [d_out],
threshold [d_sae] (jumprelu / batchtopk), W_skip [d_out, d_in].

Decoder norms: training keeps every decoder row at unit norm (gradients are projected and rows renormalized
after each step), so a feature's activation is the length of what it writes. Dictionaries trained elsewhere may
not be; `fold_decoder_norms()` rescales any dictionary to unit rows without changing what it computes.
Input normalization: training scales activations by a constant so their mean norm is sqrt(d_in); the constant
is folded into the weights when the dictionary is saved, so a saved dictionary always reads raw activations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from ..dtypes import DTYPES
from ..engine.errors import FeaturelensError, InputError
from .protocol import Transcoders

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
_DTYPES = DTYPES  # the names a DictionaryConfig.dtype may take


def sparse_activation(arch: str, pre: torch.Tensor, k: int | None = None,
                      threshold: torch.Tensor | None = None) -> torch.Tensor:
    """The inference-time activation of an architecture on pre-activations [..., d_sae] (shared by every
    dictionary kind: SAEs, transcoders, cross-layer transcoders).

    >>> sparse_activation("topk", torch.tensor([[3.0, -1.0, 2.0]]), k=1)
    tensor([[3., 0., 0.]])
    """
    if arch == "relu":
        return pre.relu()
    if arch == "topk":
        vals, idx = pre.topk(k, dim=-1, sorted=False)  # type: ignore[arg-type]
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    # jumprelu, and batchtopk at inference: keep what clears the (learned) threshold
    return pre * (pre > threshold)


class FeatureIndexError(FeaturelensError, IndexError, ValueError):
    """A feature index outside a dictionary, or not an integer (an IndexError, and a ValueError so that the CLI
    reports it as bad input)."""


class LayerError(InputError, KeyError):
    """A layer a transcoder set or cross-layer transcoder does not have (or a model lacks); the message names it."""


def check_feature_index(index: Any, n_features: int, where: str = "") -> int:
    """`index` as an int in [0, n_features), accepting ints, numpy integers, 0-d tensors and digit strings (from a
    command line or URL); anything else raises FeatureIndexError naming the value and the valid range.

    >>> check_feature_index("12", 8192)
    12
    """
    value = index.item() if isinstance(index, torch.Tensor) and index.numel() == 1 else index
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise FeatureIndexError(f"a feature index is an integer, got {index!r} ({type(index).__name__})")
    idx = value.__index__()
    if not 0 <= idx < n_features:
        raise FeatureIndexError(f"feature {idx} is out of range: this dictionary{f' ({where})' if where else ''} "
                                f"has {n_features:,} features (0 to {n_features - 1:,})")
    return idx


class ConfigBase:
    """What the dataclass configs of dictionaries (`DictionaryConfig`, `CLTConfig`) share: the torch dtype, whether
    the activation has a threshold, and plain-dict round trips (unknown keys, e.g. from SAELens files, ignored)."""

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]  # type: ignore[attr-defined]

    @property
    def has_threshold(self) -> bool:
        return self.arch in ("jumprelu", "batchtopk")  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Any) -> Any:
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class DictionaryConfig(ConfigBase):
    """Shape and kind of a dictionary; what cfg.json says (see `formats/saelens.py`)."""

    d_in: int
    d_sae: int
    arch: str = "topk"
    k: int | None = None  # topk: latents per token; batchtopk: mean latents per token in a batch
    transcoder: bool = False
    d_out: int | None = None  # transcoders: width of the output hook (defaults to d_in)
    skip: bool = False  # transcoders: a linear skip connection W_skip
    hook_name: str = ""
    hook_name_out: str | None = None  # transcoders: the hook the dictionary reconstructs
    model_name: str = ""
    apply_b_dec_to_input: bool | None = None  # default: True for SAEs, False for transcoders
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)  # anything else (training stats, provenance)

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise InputError(f"unknown architecture {self.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        for name in ("d_in", "d_sae"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InputError(f"{name} must be a positive integer, got {v!r}")
        if self.arch in ("topk", "batchtopk"):
            if self.k is None or isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0:
                raise InputError(f"{self.arch} needs k, a positive integer, got {self.k!r}")
            if self.k > self.d_sae:
                raise InputError(f"k={self.k} is larger than the dictionary width {self.d_sae}")
        if self.d_out is None:
            self.d_out = self.d_in
        elif not self.transcoder and self.d_out != self.d_in:
            raise InputError(f"an SAE reconstructs its input: d_out={self.d_out} must equal d_in={self.d_in}")
        if self.skip and not self.transcoder:
            raise InputError("a skip connection (W_skip) is only for transcoders")
        if self.apply_b_dec_to_input is None:
            self.apply_b_dec_to_input = not self.transcoder
        if self.apply_b_dec_to_input and self.transcoder:
            raise InputError("apply_b_dec_to_input makes no sense for a transcoder (b_dec lives in the output space)")
        if self.dtype not in _DTYPES:
            raise InputError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")


class SparseDictionary(nn.Module):
    """A sparse autoencoder or transcoder (see the module docstring for the maths and conventions).

    >>> sae = SparseDictionary(DictionaryConfig(d_in=640, d_sae=8192, arch="topk", k=32, hook_name="blocks.6.hook_resid_post"))
    >>> f = sae.encode(x)          # [..., 8192], at most 32 non-zero per token
    >>> x_hat = sae.decode(f)      # [..., 640]
    >>> x_hat = sae(x)             # both
    """

    def __init__(self, cfg: DictionaryConfig, device: str | torch.device | None = None):
        super().__init__()
        self.cfg = cfg
        dt, d_in, d_sae, d_out = cfg.torch_dtype, cfg.d_in, cfg.d_sae, cfg.d_out
        kw = {"dtype": dt, "device": device}
        # Decoder rows: random unit directions; encoder: the decoder's transpose (when shapes allow).
        W_dec = torch.randn(d_sae, d_out, **kw)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        W_enc = W_dec.T.clone() if d_out == d_in else torch.randn(d_in, d_sae, **kw) / d_in**0.5
        # Stored latent-major (W_enc.T contiguous): each latent's encoder vector is one contiguous row, which makes
        # the sparse gradient updates of training cheap. Shape and values are SAELens's [d_in, d_sae].
        self.W_enc = nn.Parameter(W_enc.T.contiguous().T)
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **kw))
        self.W_dec = nn.Parameter(W_dec)
        self.b_dec = nn.Parameter(torch.zeros(d_out, **kw))
        if cfg.has_threshold:
            self.threshold = nn.Parameter(torch.zeros(d_sae, **kw))
        else:
            self.register_parameter("threshold", None)
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_out, d_in, **kw))
        else:
            self.register_parameter("W_skip", None)

    # ----------------------------------------------------------------- properties
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        return self.cfg.d_out  # type: ignore[return-value]

    @property
    def hook_name(self) -> str:
        return self.cfg.hook_name

    @property
    def hook_name_out(self) -> str:
        """The hook this dictionary reconstructs (its own input hook for an SAE)."""
        return self.cfg.hook_name_out or self.cfg.hook_name

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def __repr__(self) -> str:
        c = self.cfg
        kind = "transcoder" + ("+skip" if c.skip else "") if c.transcoder else "SAE"
        k = f", k={c.k}" if c.k is not None else ""
        hooks = f"{c.hook_name} -> {c.hook_name_out}" if c.transcoder else c.hook_name
        return f"SparseDictionary({c.arch} {kind}, d_in={c.d_in}, d_sae={c.d_sae}{k}, hook={hooks!r})"

    # ----------------------------------------------------------------- forward pieces
    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.d_in:
            raise InputError(f"expected activations with last dimension d_in={self.d_in}, got shape {tuple(x.shape)}")
        x = x.to(self.dtype)
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's affine map before the sparsifying activation: [..., d_in] -> [..., d_sae]."""
        return self._input(x) @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The inference-time activation for this architecture."""
        return sparse_activation(self.cfg.arch, pre, self.cfg.k, self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of activations x [..., d_in]."""
        return self.activation(self.pre_activation(x))

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction [..., d_out] from feature activations; a transcoder with a skip needs its input x too."""
        out = f.to(self.dtype) @ self.W_dec + self.b_dec
        if self.W_skip is not None:
            if x is None:
                raise InputError("this transcoder has a skip connection: call decode(f, x) with its input x")
            out = out + x.to(self.dtype) @ self.W_skip.T
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f, x), f

    # ----------------------------------------------------------------- reparametrizations (function unchanged)
    @torch.no_grad()
    def fold_decoder_norms(self) -> "SparseDictionary":
        """Rescale so decoder rows have unit norm; feature activations scale by the old norms.

        TopK selection is by pre-activation, so for topk this is exact only when all norms are equal (always
        the case for dictionaries trained here, whose rows are unit already); other dictionaries are refused.
        """
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)  # an all-zero row stays zero
        if self.cfg.arch == "topk" and not torch.allclose(norms, norms[0].expand_as(norms), rtol=1e-4):
            raise InputError("cannot fold unequal decoder norms into a topk dictionary without changing its output")
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        if self.threshold is not None:
            self.threshold.mul_(norms)
        return self

    @torch.no_grad()
    def fold_activation_scale(self, scale_in: float, scale_out: float | None = None) -> "SparseDictionary":
        """Turn a dictionary trained on (scale_in * x -> scale_out * y) into one on raw (x -> y).

        Feature activations keep their values; afterwards call `fold_decoder_norms` to express them in raw units.
        """
        s_in = float(scale_in)
        s_out = s_in if scale_out is None else float(scale_out)
        # SAE: pre = (s x - b) W + c = (x - b/s)(s W) + c, and b_dec -> b_dec / s serves both roles.
        self.W_enc.mul_(s_in)
        self.W_dec.div_(s_out)
        self.b_dec.div_(s_out)
        if self.W_skip is not None:
            self.W_skip.mul_(s_in / s_out)
        return self


class TranscoderSet(nn.Module, Transcoders):
    """One transcoder per layer of a model (MLP input -> MLP output), as `train_transcoders` makes them; it
    implements the replacement protocol (`protocol.Transcoders`).

    >>> tset = fl.load_dictionary("~/tc")
    >>> tset[6].encode(x)        # layer 6's transcoder
    >>> tset.layers              # [0, 1, ..., 17]
    """

    def __init__(self, transcoders: dict[int, SparseDictionary], n_layers_model: int | None = None):
        super().__init__()
        if not transcoders:
            raise ValueError("a transcoder set needs at least one transcoder")
        for layer, tc in transcoders.items():
            if not tc.cfg.transcoder:
                raise ValueError(f"layer {layer}: {tc!r} is an SAE, not a transcoder")
        self._by_layer = nn.ModuleDict({str(layer): tc for layer, tc in sorted(transcoders.items())})
        self.n_layers_model = n_layers_model  # the model's layer count where known (trainers and loaders set it)

    @property
    def layers(self) -> list[int]:
        return [int(k) for k in self._by_layer]

    def __getitem__(self, layer: int) -> SparseDictionary:
        try:
            return self._by_layer[str(layer)]  # type: ignore[return-value]
        except KeyError:
            raise LayerError(f"no transcoder for layer {layer}; this set has layers {self.layers}") from None

    def __contains__(self, layer: object) -> bool:
        return str(layer) in self._by_layer

    def __len__(self) -> int:
        return len(self._by_layer)

    def __iter__(self):  # type: ignore[override]
        return iter(self._by_layer.values())

    def layer_features(self, layer: int) -> SparseDictionary:
        """Layer `layer`'s transcoder itself (`self[layer]`)."""
        return self[layer]

    def items(self) -> list[tuple[int, SparseDictionary]]:
        return [(int(k), v) for k, v in self._by_layer.items()]  # type: ignore[misc]

    def __repr__(self) -> str:
        first = next(iter(self._by_layer.values()), None)
        return f"TranscoderSet(layers={self.layers}, each {first!r})"

    # ----------------------------------------------------------------- the replacement protocol
    @property
    def d_sae(self) -> int:
        widths = {tc.d_sae for tc in self}
        if len(widths) != 1:
            raise ValueError(f"the transcoders of this set differ in width ({sorted(widths)}); use set[layer].d_sae")
        return widths.pop()

    @property
    def cfg(self) -> DictionaryConfig:
        """The first layer's config (model name, architecture): what the set has in common."""
        return next(iter(self)).cfg

    @property
    def model_name(self) -> str:
        return self.cfg.model_name or ""

    def input_hook(self, layer: int) -> str:
        return self[layer].hook_name

    def output_hook(self, layer: int) -> str:
        return self[layer].hook_name_out

    def output_layers(self, layer: int) -> list[int]:
        self[layer]  # noqa: B018 -- raises KeyError naming the layers this set has
        return [layer]

    def encoder(self, layer: int) -> torch.Tensor:
        return self[layer].W_enc

    def pre_activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self[layer].pre_activation(x)

    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return self[layer].encode(x)

    def decoder(self, layer: int) -> torch.Tensor:
        return self[layer].W_dec[:, None, :]

    def skip_out(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        tc = self[layer]
        return None if tc.W_skip is None else x.to(tc.dtype) @ tc.W_skip.T

    def b_dec_out(self, layer: int) -> torch.Tensor:
        return self[layer].b_dec

    def reconstruct(self, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{layer: MLP output estimate [..., d_out]} from {layer: MLP input [..., d_in]} (each layer on its own)."""
        return {layer: self[layer](x) for layer, x in inputs.items()}

    def describe(self) -> str:
        first = next(iter(self))
        skip = "+skip" if first.W_skip is not None else ""
        return f"per-layer transcoders{skip} ({len(self)} layers, width {first.cfg.d_sae})"
