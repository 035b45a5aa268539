"""Is a graph faithful to the real model? Ablate its most influential features in the real, unfrozen model and compare
the measured change of the target logit with what the graph predicts.

Each ablation edits only the feature: the transcoders are spliced in with their error kept (`splice_hooks`,
keep_error=True) and the feature set to zero, so at each layer it writes to its decoder contribution (activation x
decoder vector) leaves the real MLP output, and attention, norms and every other MLP stay live. The graph predicts the change of the demeaned target logit as
the direct effect -A[logit, feature], and as the total effect through every path of the linearised graph
(features pass changes on with slope 1, errors and tokens stay put).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..dictionaries.splice import splice_hooks
from ..engine.errors import InputError
from .attribute import prompt_tokens
from .graph import AttributionGraph
from .replacement import check_transcoders, demeaned_unembedding


@dataclass
class FeatureCheck:
    node_id: str
    influence: float
    predicted_direct: float
    predicted_total: float
    measured: float


@dataclass
class CheckResult:
    target: str  # the target logit's token
    features: list[FeatureCheck]
    sign_agreement: float  # share of features whose predicted total effect has the measured sign
    correlation: float  # Pearson correlation of predicted total and measured effects
    correlation_direct: float
    lowers_target: float  # share of ablations that lowered the target logit

    def summary(self) -> str:
        lines = [f"faithfulness on target {self.target!r} ({len(self.features)} ablations in the real model):",
                 f"  sign agreement {self.sign_agreement:.0%}, correlation (total) {self.correlation:.3f}, "
                 f"(direct) {self.correlation_direct:.3f}, ablation lowers the target {self.lowers_target:.0%}",
                 f"  {'node':<18}{'influence':>10}{'direct':>10}{'total':>10}{'measured':>10}"]
        for f in self.features:
            lines.append(f"  {f.node_id:<18}{f.influence:>10.4f}{f.predicted_direct:>10.4f}{f.predicted_total:>10.4f}"
                         f"{f.measured:>10.4f}")
        return "\n".join(lines)


def _pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 2:
        return float("nan")
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    d = float(x.norm() * y.norm())
    return float(x @ y) / d if d > 0 else float("nan")


def total_effects(graph: AttributionGraph, logit_node: int) -> torch.Tensor:
    """[F] predicted change of the logit node when each feature is ablated, through all paths of the graph.

    Edge A[t, s] is scaled by the source's activation, so a change da_s of the source moves t by A[t, s] da_s / a_s.
    """
    F = graph.n_features
    A = graph.dense().double()
    acts = graph.activations.double().clamp_min(1e-12)
    M = A[:F, :F] / acts[None, :]  # feature -> feature, per unit of activation
    to_logit = A[logit_node, :F] / acts  # [F]
    # x[j, f]: change of feature j when f is ablated (-a_f at f itself); the graph is acyclic, so the series ends.
    x = -torch.diag(acts)
    cur = x
    for _ in range(graph.n_layers + 1):
        cur = M @ cur
        if not bool(cur.any()):
            break
        x = x + cur
    return to_logit @ x


@torch.no_grad()
def check_graph(graph: AttributionGraph, model: Any, transcoders: Any, k: int = 10) -> CheckResult:
    """Ablate the graph's k most influential features in the real model and compare with the graph's prediction."""
    g = graph.root
    if g.n_features == 0:
        raise InputError("the graph has no feature nodes to check")
    rep = check_transcoders(model, transcoders)
    tokens = prompt_tokens(model, torch.tensor(g.tokens))
    logit_node = g.logit_slice.start
    target_tok = int(g.logit_tokens[0])
    u = demeaned_unembedding(model, torch.tensor([target_tok], device=model.device))[0]
    infl = g.node_influence()[: g.n_features]
    order = infl.argsort(descending=True)[:k].tolist()
    A = g.dense()
    totals = total_effects(g, logit_node)

    final: list[torch.Tensor] = []

    def grab(x: torch.Tensor, hook: Any) -> None:
        final.append(x[0, -1])

    model.run_with_hooks(tokens[None], fwd_hooks=[("ln_final.hook_normalized", grab)])
    clean = float(final[-1] @ u)
    checks = []
    for f in order:
        layer, pos, idx = g.features[f].tolist()
        a = float(g.activations[f])

        def ablate(acts: torch.Tensor, pos: int = pos, idx: int = idx) -> torch.Tensor:
            acts[:, pos, idx] = 0.0
            return acts

        # the feature's own contribution (its activation in the graph x its decoder) leaves every output layer it
        # writes; the error and everything else stay live
        held = torch.zeros(1, len(g.tokens), rep.decoder(layer).shape[0], dtype=model.dtype, device=model.device)
        held[0, pos, idx] = a
        hooks = splice_hooks(rep, keep_error=True, edit={layer: ablate}, features={layer: held},
                             outputs=rep.output_layers(layer))
        hooks.append(("ln_final.hook_normalized", grab))
        model.run_with_hooks(tokens[None], fwd_hooks=hooks)
        measured = float(final[-1] @ u) - clean
        checks.append(FeatureCheck(g.node_id(f), float(infl[f]), -float(A[logit_node, f]), float(totals[f]), measured))
    pred = [c.predicted_total for c in checks]
    meas = [c.measured for c in checks]
    agree = [math.copysign(1, p) == math.copysign(1, m) for p, m in zip(pred, meas) if p != 0 and m != 0]
    return CheckResult(
        target=g.logit_strs[0], features=checks, sign_agreement=sum(agree) / max(len(agree), 1),
        correlation=_pearson(pred, meas), correlation_direct=_pearson([c.predicted_direct for c in checks], meas),
        lowers_target=sum(m < 0 for m in meas) / len(meas),
    )


@dataclass
class FaithfulnessReport:
    """`check_graph` over many prompts, pooled: every ablation of every prompt counts once."""

    per_prompt: list[tuple[str, CheckResult]]
    sign_agreement: float
    correlation: float
    correlation_direct: float
    lowers_target: float

    def summary(self) -> str:
        lines = [f"{len(self.per_prompt)} prompts, {sum(len(r.features) for _, r in self.per_prompt)} ablations: "
                 f"sign agreement {self.sign_agreement:.0%}, correlation (total) {self.correlation:.3f}, "
                 f"(direct) {self.correlation_direct:.3f}, ablation lowers the target {self.lowers_target:.0%}"]
        for prompt, r in self.per_prompt:
            lines.append(f"  {prompt[:40]!r:<44} -> {r.target!r:<12} sign {r.sign_agreement:.0%}  "
                         f"corr {r.correlation:.3f}")
        return "\n".join(lines)


def check_prompts(model: Any, transcoders: Any, prompts: list[str], k: int = 10, **attribute_kwargs: Any
                  ) -> FaithfulnessReport:
    """Attribute each prompt, ablate its graph's k most influential features in the real model, and pool the
    comparisons of predicted and measured target-logit changes.

    >>> rep = check_prompts(model, tc, ["The capital of France is", "2 + 2 =", "The opposite of hot is"])
    >>> print(rep.summary())
    """
    from .attribute import attribute

    if not prompts:
        raise InputError("no prompts to check")
    attribute_kwargs.setdefault("progress", False)
    results = []
    for p in prompts:
        g = attribute(model, transcoders, p, **attribute_kwargs)
        results.append((p if isinstance(p, str) else g.prompt, check_graph(g, model, transcoders, k=k)))
    feats = [f for _, r in results for f in r.features]
    pred = [f.predicted_total for f in feats]
    meas = [f.measured for f in feats]
    agree = [math.copysign(1, a) == math.copysign(1, b) for a, b in zip(pred, meas) if a != 0 and b != 0]
    return FaithfulnessReport(
        per_prompt=results, sign_agreement=sum(agree) / max(len(agree), 1), correlation=_pearson(pred, meas),
        correlation_direct=_pearson([f.predicted_direct for f in feats], meas),
        lowers_target=sum(m < 0 for m in meas) / max(len(meas), 1),
    )
