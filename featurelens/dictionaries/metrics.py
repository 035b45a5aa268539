"""How good is a dictionary: sparsity, reconstruction, and what splicing it into the model costs.

* L0: mean number of active features per token.
* FVU (fraction of variance unexplained) = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 over the evaluation
  tokens; explained variance = 1 - FVU. (y is the input for an SAE, the output hook for a transcoder.)
* Dead features: never active on the evaluation tokens; dense: active on more than `dense_threshold` of them.
* Spliced into the model (held-out contexts): next-token cross-entropy with the hook replaced by the
  dictionary's output, against the clean model and against zero-ablating the hook.
  CE loss recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean); KL = KL(clean || spliced) per token.
  BOS positions are left as they are in every run (dictionaries are trained without them); the prediction made
  at the first position (from BOS alone) is not counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Union

import torch
import torch.nn.functional as F

from .protocol import Transcoders
from .sae import SparseDictionary
from .splice import splice_hooks
from ..engine.errors import InputError


@dataclass
class DictionaryMetrics:
    l0: float = float("nan")
    explained_variance: float = float("nan")
    fvu: float = float("nan")
    mse: float = float("nan")  # per token, summed over dimensions
    dead_fraction: float = float("nan")
    dense_fraction: float = float("nan")
    eval_tokens: int = 0
    ce_clean: float = float("nan")
    ce_spliced: float = float("nan")
    ce_zero_ablation: float = float("nan")
    ce_loss_recovered: float = float("nan")
    kl_div: float = float("nan")  # KL(clean || spliced), nats per token
    kl_zero_ablation: float = float("nan")
    ce_tokens: int = 0
    feature_density: torch.Tensor | None = field(default=None, repr=False)  # fraction of eval tokens each fires on

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("feature_density")
        return d


class ReconstructionSums:
    """Running sums for L0, FVU, MSE and feature firing counts over (target, reconstruction, features) batches."""

    def __init__(self, d_out: int, d_sae: int):
        self.n, self.sse, self.l0_sum, self.sum_y2 = 0, 0.0, 0.0, 0.0
        self.sum_y = torch.zeros(d_out, dtype=torch.float64)
        self.fires = torch.zeros(d_sae, dtype=torch.long)

    def add(self, y: torch.Tensor, y_hat: torch.Tensor, f: torch.Tensor) -> None:
        """y, y_hat: [n, d_out]; f: [n, d_sae]."""
        active = f > 0
        self.n += len(y)
        self.sse += float((y_hat.double() - y.double()).pow(2).sum())
        self.l0_sum += float(active.sum())
        self.fires += active.sum(0).cpu()
        self.sum_y += y.double().sum(0).cpu()
        self.sum_y2 += float(y.double().pow(2).sum())

    def result(self, dense_threshold: float = 0.1) -> DictionaryMetrics:
        n = self.n
        if n == 0:
            raise InputError("no evaluation tokens")
        sst = self.sum_y2 - float(self.sum_y.pow(2).sum()) / n
        fvu = self.sse / max(sst, 1e-30)
        density = self.fires.double() / n
        return DictionaryMetrics(l0=self.l0_sum / n, explained_variance=1 - fvu, fvu=fvu, mse=self.sse / n,
                                 dead_fraction=float((self.fires == 0).double().mean()),
                                 dense_fraction=float((density > dense_threshold).double().mean()),
                                 eval_tokens=n, feature_density=density.float())


class ReconstructionAccumulator(ReconstructionSums):
    """`ReconstructionSums` of one dictionary, fed batches {hook: [n, d]}."""

    def __init__(self, dictionary: SparseDictionary):
        super().__init__(dictionary.d_out, dictionary.d_sae)
        self.dictionary = dictionary

    @torch.no_grad()
    def update(self, batch: Mapping[str, torch.Tensor]) -> None:
        dictionary = self.dictionary
        x, y = batch[dictionary.hook_name], batch[dictionary.hook_name_out]
        x, y = x.reshape(len(x), -1).to(dictionary.device), y.reshape(len(y), -1).to(dictionary.device)
        y_hat, f = dictionary.forward_with_features(x)
        self.add(y, y_hat, f)


def reconstruction_metrics(dictionary: SparseDictionary, batches: Iterable[Mapping[str, torch.Tensor]],
                           dense_threshold: float = 0.1) -> DictionaryMetrics:
    """L0, FVU / explained variance, MSE, dead and dense fractions over batches {hook: [n, d]}."""
    acc = ReconstructionAccumulator(dictionary)
    for batch in batches:
        acc.update(batch)
    return acc.result(dense_threshold)


def zero_ablation_hooks(hook_names: list[str], not_bos: torch.Tensor) -> list[tuple[str, Any]]:
    """Hooks that zero the dictionaries' output hooks at non-BOS positions (the baseline CE loss recovered is
    measured against)."""
    keep = not_bos[:, :, None]

    def zero(act: torch.Tensor, hook: Any) -> torch.Tensor:
        flat = act.reshape(act.shape[0], act.shape[1], -1)
        return torch.where(keep, torch.zeros_like(flat), flat).reshape(act.shape)

    return [(name, zero) for name in hook_names]


Spliced = Union[SparseDictionary, Transcoders, "tuple[Transcoders, list[int]]"]  # a transcoders' subset of outputs


def group_hooks(members: list[Spliced], not_bos: torch.Tensor, mode: str) -> list[tuple[str, Any]]:
    """The hooks of one group of `splice_metrics_groups`: mode "dictionary" splices every member in (no error term),
    "zero" zero-ablates what they write; BOS positions are left as they are. A member is a dictionary, a model's
    transcoders (every output layer replaced) or (transcoders, output layers) for some of them."""
    hooks: list[tuple[str, Any]] = []
    for member in members:
        d, outputs = member if isinstance(member, tuple) else (member, None)
        if mode == "zero":
            names = ([d.output_hook(L) for L in (d.all_output_layers() if outputs is None else sorted(outputs))]
                     if isinstance(d, Transcoders) else [d.hook_name_out])
            hooks += zero_ablation_hooks(names, not_bos)
        else:
            hooks += splice_hooks(d, keep_error=False, where=not_bos, outputs=outputs)
    return hooks


def _token_ce(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs at positions 1..p-2, CE of predicting tokens 2..p-1) -- the prediction from BOS is skipped."""
    logp = F.log_softmax(logits[:, 1:-1].float(), dim=-1)
    ce = -logp.gather(-1, tokens[:, 2:, None]).squeeze(-1)
    return logp, ce


@torch.no_grad()
def splice_metrics(model: Any, dictionaries: "SparseDictionary | list[SparseDictionary]", contexts: torch.Tensor,
                   batch_size: int = 2, progress: bool = False) -> dict[str, float]:
    """CE loss clean / spliced / zero-ablated, CE loss recovered and KL, over contexts [n, ctx] (BOS first).

    Several dictionaries are spliced in together (and zero-ablated together), e.g. all layers' transcoders.
    """
    dictionaries = [dictionaries] if isinstance(dictionaries, SparseDictionary) else list(dictionaries)
    return splice_metrics_groups(model, {None: dictionaries}, contexts, batch_size, progress)[None]


@torch.no_grad()
def splice_metrics_groups(model: Any, groups: dict[Any, list[Spliced]], contexts: torch.Tensor,
                          batch_size: int = 2, progress: bool = False) -> dict[Any, dict[str, float]]:
    """`splice_metrics` for several groups of dictionaries at once (members as in `group_hooks`): the clean pass is
    shared."""
    from tqdm.auto import tqdm

    if contexts.shape[1] < 3:
        raise InputError("contexts must hold at least 3 tokens")
    bos = model.cfg.bos_token_id
    tot = {g: {"spliced": 0.0, "zero": 0.0, "kl": 0.0, "kl_zero": 0.0} for g in groups}
    clean_total, count = 0.0, 0
    steps = range(0, len(contexts), batch_size)
    for i in tqdm(steps, desc="CE loss", disable=not progress, leave=False):
        tokens = contexts[i:i + batch_size].to(model.device)
        not_bos = tokens != bos if bos is not None else torch.ones_like(tokens, dtype=torch.bool)
        clean_logp, ce_clean = _token_ce(model(tokens), tokens)
        clean_total += float(ce_clean.sum())
        count += ce_clean.numel()
        for g, dictionaries in groups.items():
            for mode, key, kl_key in (("dictionary", "spliced", "kl"), ("zero", "zero", "kl_zero")):
                hooks = group_hooks(dictionaries, not_bos, mode)
                logp, ce = _token_ce(model.run_with_hooks(tokens, fwd_hooks=hooks), tokens)
                tot[g][key] += float(ce.sum())
                tot[g][kl_key] += float((clean_logp.exp() * (clean_logp - logp)).sum())
                del logp
        del clean_logp
    out = {}
    clean = clean_total / count
    for g, t in tot.items():
        ce = {k: v / count for k, v in t.items()}
        denom = ce["zero"] - clean
        out[g] = {"ce_clean": clean, "ce_spliced": ce["spliced"], "ce_zero_ablation": ce["zero"],
                  "ce_loss_recovered": (ce["zero"] - ce["spliced"]) / denom if abs(denom) > 1e-9 else float("nan"),
                  "kl_div": ce["kl"], "kl_zero_ablation": ce["kl_zero"], "ce_tokens": count}
    return out
