"""The replacement protocol: what a model's MLP transcoders offer to attribution, metrics, interventions and the server.

Two kinds implement it natively: `TranscoderSet` (one transcoder per layer, `sae.py`) and `CrossLayerTranscoder`
(`clt.py`). Features of source layer l read `input_hook(l)`; what they write to output layer L is
`decoder(l)[:, output_layers(l).index(L), :]`, so the reconstruction of `output_hook(L)` is

    sum over sources l reaching L of  encode_layer(l, x_l) @ decoder(l)[:, j(L), :]  +  b_dec_out(L)  (+ skip_out(L, x_L))

A single SAE or transcoder (`SparseDictionary`) is not a `Transcoders`: telling the two apart is
``isinstance(d, Transcoders)``, the one test every caller uses.

Shapes: D_in = input width, D_out = output width, S = features per layer (`decoder(l).shape[0]`), O = number of output
layers of a source layer.
"""

from __future__ import annotations

import abc
from typing import Any, Mapping

import torch

# The hooks a model's MLP transcoders read and write by default ("{}" = layer): the MLP's input after its norm, and
# the MLP's output.
TRANSCODER_IN = "blocks.{}.ln2.hook_normalized"
TRANSCODER_OUT = "blocks.{}.hook_mlp_out"


class Transcoders(abc.ABC):
    """A model's transcoders as one replacement for its MLPs (see the module docstring)."""

    @property
    @abc.abstractmethod
    def layers(self) -> list[int]:
        """Source layers, ascending (model layer numbers)."""

    @property
    @abc.abstractmethod
    def d_sae(self) -> int:
        """Features per layer (the same for every layer; a set whose layers differ raises and names them)."""

    @property
    @abc.abstractmethod
    def model_name(self) -> str:
        """The model the transcoders were trained on ("" when unknown)."""

    @abc.abstractmethod
    def input_hook(self, layer: int) -> str:
        """The hook layer `layer`'s features read."""

    @abc.abstractmethod
    def output_hook(self, layer: int) -> str:
        """The hook reconstructed at output layer `layer`."""

    @abc.abstractmethod
    def output_layers(self, layer: int) -> list[int]:
        """The output layers source layer `layer`'s features write to, ascending (just [layer] for a per-layer set)."""

    @abc.abstractmethod
    def encoder(self, layer: int) -> torch.Tensor:
        """[D_in, S]: pre-activation = x @ encoder(layer) + b_enc (transcoders never subtract b_dec first)."""

    @abc.abstractmethod
    def pre_activation(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s pre-activations [..., S] of its input x [..., D_in]."""

    @abc.abstractmethod
    def encode_layer(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s feature activations [..., S] of its input x [..., D_in]."""

    @abc.abstractmethod
    def decoder(self, layer: int) -> torch.Tensor:
        """[S, O, D_out]: what each feature of `layer` writes to each of `output_layers(layer)`."""

    @abc.abstractmethod
    def skip_out(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The affine skip's contribution [..., D_out] at output layer `layer` from its input x, or None."""

    @abc.abstractmethod
    def b_dec_out(self, layer: int) -> torch.Tensor:
        """The bias [D_out] added at output layer `layer`."""

    @abc.abstractmethod
    def reconstruct(self, inputs: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{output layer: reconstruction} from {source layer: input}."""

    @abc.abstractmethod
    def layer_features(self, layer: int) -> "Any":
        """Layer `layer`'s features as one dictionary (a `SparseDictionary` reading `input_hook(layer)`), the form
        analysis, dashboards, search and steering take. What its `W_dec` holds is in each class's docstring."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line for graph metadata and messages, e.g. "per-layer transcoders+skip (18 layers, width 4096)"."""

    # ----------------------------------------------------------------- derived from the above
    def all_output_layers(self) -> list[int]:
        """Every layer some feature writes to, ascending."""
        return sorted({L for l in self.layers for L in self.output_layers(l)})

    def decode_layers(self, features: Mapping[int, torch.Tensor], inputs: Mapping[int, torch.Tensor] | None = None,
                      outputs: "set[int] | None" = None) -> dict[int, torch.Tensor]:
        """{L: reconstruction of output layer L} from already-encoded {source layer: features [..., S]}: decoder
        contributions (sparse, see `decode_contributions`), plus each output's bias, plus its skip where `inputs`
        holds that layer's input. `outputs` limits which output layers are computed (default: all reached)."""
        out: dict[int, torch.Tensor] = {}
        for l, f in features.items():
            wanted = [(j, L) for j, L in enumerate(self.output_layers(l)) if outputs is None or L in outputs]
            if not wanted:
                continue
            W = self.decoder(l)
            if len(wanted) < W.shape[1]:
                W = W[:, [j for j, _ in wanted]]
            for (_, L), part in zip(wanted, decode_contributions(f, W)):
                out[L] = out[L] + part if L in out else part
        for L in list(out):
            out[L] = out[L] + self.b_dec_out(L)
            skip = self.skip_out(L, inputs[L]) if inputs is not None and L in inputs else None
            if skip is not None:
                out[L] = out[L] + skip
        return out


def decode_contributions(f: torch.Tensor, W: torch.Tensor) -> list[torch.Tensor]:
    """Features f [..., S] times a decoder W [S, O, D_out] -> O tensors [..., D_out].

    A sparse decode: only each row's non-zero features are read (an embedding bag over at most the row's non-zero
    count), so a cross-layer transcoder costs in proportion to L0, not to the width.
    """
    import torch.nn.functional as F

    lead, d_sae = f.shape[:-1], f.shape[-1]
    n_out, d_out = W.shape[1], W.shape[2]
    flat = f.reshape(-1, d_sae).to(W.dtype)
    nnz = int((flat != 0).sum(1).max()) if flat.numel() else 0
    if nnz == 0 or nnz * 4 > d_sae:  # dense enough that a matmul is cheaper
        out = flat @ W.reshape(d_sae, n_out * d_out)
    else:
        vals, idx = flat.abs().topk(nnz, dim=-1, sorted=False)
        vals = flat.gather(1, idx)
        out = F.embedding_bag(idx, W.reshape(d_sae, n_out * d_out), per_sample_weights=vals, mode="sum")
    out = out.view(*lead, n_out, d_out)
    return [out[..., j, :] for j in range(n_out)]
