"""Is a graph faithful to the model? Ablate (or scale) its most influential features and compare the measured
change of the target logit with what the graph predicts, in three models side by side:

* tier (a), the local replacement model the graph describes: attention patterns and every norm scale frozen at the
  recorded pass, each layer's error held at its recorded value (a layer without a transcoder: its whole output),
  the transcoders live with their activation function (active features the graph left out, with max_feature_nodes,
  held at their recorded values, as the graph treats them). The graph is exact here for small perturbations; a whole
  ablation may push other features across their thresholds, which is counted (`crossings`).
* tier (b), attention frozen and everything else live: the real model with its attention patterns held (Neuronpedia's
  "frozen attention"); the feature's decoder contribution leaves the MLP output it writes, the error stays live.
* tier (c), the real model, all live (the same edit without frozen attention).

The graph predicts the change of the target as the total effect through every path of the linearised graph
(features pass changes on with slope 1, errors and tokens stay put), times (1 - scale): scale 0 is an ablation,
scale 0.99 a 1% nudge. The target is the graph's first logit node (a demeaned logit, or a logit difference when the
graph was traced to one).

Beside the graph's prediction each edit gets the real model's own first-order prediction (`predicted_gradient`: the
gradient of the target with respect to the feature's contribution to the MLP outputs it writes, all live, times the
change; attribution patching). It tells two failures apart: where the gradient agrees with (c) and the graph does
not, the replacement model responds to the edit unlike the real MLPs; where neither agrees, the edit is too large
for any linear prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..dictionaries.splice import splice_hooks
from ..engine.errors import InputError
from .attribute import prompt_tokens
from .graph import AttributionGraph
from .intervene import intervention_hooks
from .replacement import Recording, _Stop, check_transcoders, decoder_terms, demeaned_unembedding, record
from .targets import Target

TIERS = ("a", "b", "c")
TIER_NAMES = {"a": "local replacement (attention, norms, errors frozen)", "b": "attention frozen",
              "c": "real model"}


@dataclass
class Agreement:
    """How well predicted and measured changes agree over a set of ablations."""

    n: int
    sign_agreement: float  # share of ablations whose predicted change has the measured sign (zeros left out)
    spearman: float
    pearson: float

    def as_dict(self) -> dict[str, float | int | None]:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in vars(self).items()}


def _pearson(a: list[float], b: list[float]) -> float:
    if len(a) < 2:
        return float("nan")
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    d = float(x.norm() * y.norm())
    return float(x @ y) / d if d > 0 else float("nan")


def _ranks(v: list[float]) -> list[float]:
    """Ranks with ties averaged (what Spearman's correlation correlates)."""
    order = sorted(range(len(v)), key=lambda i: v[i])
    r = [0.0] * len(v)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
            j += 1
        for t in range(i, j + 1):
            r[order[t]] = (i + j) / 2
        i = j + 1
    return r


def agreement(pred: list[float], meas: list[float]) -> Agreement:
    agree = [math.copysign(1, p) == math.copysign(1, m) for p, m in zip(pred, meas) if p != 0 and m != 0]
    return Agreement(n=len(pred), sign_agreement=sum(agree) / len(agree) if agree else float("nan"),
                     spearman=_pearson(_ranks(pred), _ranks(meas)), pearson=_pearson(pred, meas))


@dataclass
class FeatureCheck:
    node_id: str
    influence: float
    predicted_direct: float
    predicted_total: float  # predicted change of the target for this edit: total effect x (1 - scale)
    measured: float  # tier (c), the real model
    measured_a: float = float("nan")  # tier (a), the local replacement model
    measured_b: float = float("nan")  # tier (b), attention frozen
    crossings: int = 0  # other features of the local replacement model that switched on or off (tier a)
    predicted_gradient: float = float("nan")  # the real model's first-order prediction of this edit (tier c)

    def tier(self, t: str) -> float:
        return {"a": self.measured_a, "b": self.measured_b, "c": self.measured}[t]


def faithfulness_score(features: list[FeatureCheck], errors: list[float]) -> float:
    """One number in [0, 1] from measured interventions in the real model (tier c):

    agreement x coverage. Agreement is the measured-magnitude-weighted mean over the feature ablations of
    min(|predicted|, |measured|) / max(...) (0 where the signs differ): how closely the graph predicts the ablations
    that matter. Coverage is sum |measured| over the features / (that + sum |measured| over as many of the most
    influential error nodes, each removed from its MLP output): how much of what measurably moves the target the
    graph's features carry rather than its errors (a measured counterpart of the replacement score). A replacement
    model whose features do not carry the computation (skip only, random features) scores near 0 however exact its
    maths; a graph without features scores 0.
    """
    if not features:
        return 0.0
    w = sum(abs(f.measured) for f in features)
    if w == 0:
        return 0.0
    close = 0.0
    for f in features:
        p, m = f.predicted_total, f.measured
        if p * m > 0:
            close += abs(m) * min(abs(p), abs(m)) / max(abs(p), abs(m))
    return (close / w) * w / (w + sum(abs(e) for e in errors))


@dataclass
class CheckResult:
    target: str  # the target's name (a token, or "A - B")
    features: list[FeatureCheck]
    sign_agreement: float  # tier (c): share of features whose predicted total effect has the measured sign
    correlation: float  # tier (c): Pearson correlation of predicted total and measured effects
    correlation_direct: float
    lowers_target: float  # share of ablations that lowered the target logit (tier c)
    scale: float = 0.0  # each feature's activation was multiplied by this (0: ablated)
    target_value: float = float("nan")  # the target's clean value (demeaned logit or logit difference)
    tiers: dict[str, Agreement] = field(default_factory=dict)  # tier -> agreement over every ablation
    tiers_no_crossing: dict[str, Agreement] = field(default_factory=dict)  # ... over those without crossings
    score: float = float("nan")  # `faithfulness_score`
    errors: list[tuple[str, float]] = field(default_factory=list)  # (error node, measured change when removed)
    gradient_tiers: dict[str, Agreement] = field(default_factory=dict)  # the real model's gradient against each tier
    # every feature node of the graph, checked or not: (the graph's predicted change of the target when the node is
    # edited by `scale`, the real model's first-order prediction of it), both free once the check has run
    node_effects: dict[str, tuple[float, float]] = field(default_factory=dict)

    def summary(self) -> str:
        n = len(self.features)
        what = "ablations" if self.scale == 0 else f"activations scaled by {self.scale:g}"
        clean = sum(f.crossings == 0 for f in self.features)
        lines = [f"faithfulness on target {self.target!r}: score {self.score:.2f} ({n} {what}; "
                 f"{clean} cross no other feature's threshold)"]
        for t in TIERS:
            a, b = self.tiers[t], self.tiers_no_crossing[t]
            lines.append(f"  ({t}) {TIER_NAMES[t]:<52} sign agreement {a.sign_agreement:4.0%}  spearman "
                         f"{a.spearman:6.3f}  pearson {a.pearson:6.3f}   without crossings: {b.sign_agreement:4.0%} "
                         f"{b.spearman:6.3f} {b.pearson:6.3f}")
        lines.append(f"  correlation (direct, real model) {self.correlation_direct:.3f}, ablation lowers the target "
                     f"{self.lowers_target:.0%}")
        lines.append(_gradient_line(self.gradient_tiers))
        if self.errors:
            lines.append(f"  the {len(self.errors)} most influential error nodes, removed one at a time, move the "
                         f"target by {sum(abs(m) for _, m in self.errors):.4f} in all (the features "
                         f"{sum(abs(f.measured) for f in self.features):.4f})")
        lines.append(f"  {'node':<18}{'influence':>10}{'direct':>10}{'predicted':>10}{'gradient':>10}{'(a)':>10}"
                     f"{'(b)':>10}{'(c)':>10}{'crossed':>8}")
        for f in self.features:
            lines.append(f"  {f.node_id:<18}{f.influence:>10.4f}{f.predicted_direct:>10.4f}{f.predicted_total:>10.4f}"
                         f"{f.predicted_gradient:>10.4f}{f.measured_a:>10.4f}{f.measured_b:>10.4f}{f.measured:>10.4f}"
                         f"{f.crossings:>8d}")
        return "\n".join(lines)

    def to_info(self) -> dict[str, Any]:
        """The figures a graph file's metadata carries (`metadata.info.featurelens.faithfulness`)."""
        fin = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        return {
            "score": fin(self.score), "target": self.target, "scale": self.scale, "target_value": fin(self.target_value),
            "tiers": {t: a.as_dict() for t, a in self.tiers.items()},
            "tiers_no_crossing": {t: a.as_dict() for t, a in self.tiers_no_crossing.items()},
            "gradient_tiers": {t: a.as_dict() for t, a in self.gradient_tiers.items()},
            "features": [{"node_id": f.node_id, "influence": fin(f.influence), "predicted": fin(f.predicted_total),
                          "direct": fin(f.predicted_direct), "gradient": fin(f.predicted_gradient),
                          "a": fin(f.measured_a), "b": fin(f.measured_b), "c": fin(f.measured),
                          "crossings": f.crossings} for f in self.features],
            "errors": [{"node_id": n, "c": fin(m)} for n, m in self.errors],
            "node_effects": {n: [fin(_short(g)), fin(_short(m))] for n, (g, m) in self.node_effects.items()},
        }


def _short(v: float) -> float:
    """Five significant digits: a graph of 1,000 feature nodes carries a pair for each."""
    return float(f"{v:.5g}")


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


def target_direction(model: Any, graph: AttributionGraph) -> torch.Tensor:
    """[D] what the graph's first logit node reads from the unembedding's input."""
    chosen = Target.from_info(graph.info.get("target"))
    if chosen is not None and chosen.is_difference:
        return chosen.vectors(model)[0]
    return demeaned_unembedding(model, torch.tensor([int(graph.logit_tokens[0])], device=model.device))[0]


def _gradient_line(tiers: dict[str, Agreement]) -> str:
    return "  the real model's own gradient (first-order prediction) against " + ", ".join(
        f"({t}): sign {a.sign_agreement:.0%} spearman {a.spearman:.3f}" for t, a in tiers.items())


def gradient_effects(model: Any, rep: Any, rec: Recording, u: torch.Tensor) -> dict[int, torch.Tensor]:
    """{source layer: [P, S]} the gradient of the target (final[-1] @ u) in the real model, everything live, with
    respect to a gate g multiplying each feature's recorded contribution to the MLP outputs it writes (the change is
    (g - 1) x contribution, so nothing moves at g = 1). An edit multiplying feature f by `scale` is then predicted to
    move the target by (scale - 1) x grad[f]: one backward pass for every feature of the prompt."""
    gates = {l: torch.ones_like(rec.acts[l], requires_grad=True) for l in rep.layers}
    final: list[torch.Tensor] = []

    def add(y: torch.Tensor, hook: Any) -> torch.Tensor:
        return y + extra[hook.layer()][None]

    def grab(x: torch.Tensor, hook: Any) -> None:
        final.append(x[0, -1])
        raise _Stop

    with torch.enable_grad():
        # per output layer, the gated change of what every source layer's features write there: {L: [P, D]}
        extra = decoder_terms(rep, {l: (gates[l] - 1) * rec.acts[l] for l in rep.layers}, model.cfg.n_layers,
                              model.dtype)
        hooks = [(f"blocks.{L}.hook_mlp_out", add) for L in extra] + [("ln_final.hook_normalized", grab)]
        try:
            model.run_with_hooks(rec.tokens[None], fwd_hooks=hooks)
        except _Stop:
            pass
        layers = list(rep.layers)
        grads = torch.autograd.grad(final[-1] @ u, [gates[l] for l in layers], allow_unused=True)
    return {l: (g if g is not None else torch.zeros_like(gates[l])).detach() for l, g in zip(layers, grads)}


class _Tiers:
    """Runs one edit of one feature in the three models and reads the target."""

    def __init__(self, model: Any, rep: Any, rec: Recording, u: torch.Tensor, first: int, graph_features: torch.Tensor):
        self.model, self.rep, self.rec, self.u, self.first = model, rep, rec, u, first
        # active features outside the graph: tier (a) holds them, as the graph does
        self.hold: dict[int, torch.Tensor] = {}
        for l in rep.layers:
            active = rec.acts[l] != 0
            mine = graph_features[graph_features[:, 0] == l]
            active[mine[:, 1], mine[:, 2]] = False
            if bool(active.any()):
                self.hold[l] = active
        self.clean = float(rec.final[-1] @ u)
        self.patterns = [(nm, self._frozen) for nm in rec.frozen if nm.endswith("hook_pattern")]

    def _frozen(self, x: torch.Tensor, hook: Any) -> torch.Tensor:
        return self.rec.frozen[hook.name].to(x.dtype)

    def _read(self, hooks: list) -> float:
        final: list[torch.Tensor] = []

        def grab(x: torch.Tensor, hook: Any) -> None:
            final.append(x[0, -1])
            raise _Stop  # the target reads the unembedding's input: the [P, vocab] logits are not needed

        try:
            self.model.run_with_hooks(self.rec.tokens[None], fwd_hooks=hooks + [("ln_final.hook_normalized", grab)])
        except _Stop:
            pass
        return float(final[-1] @ self.u) - self.clean

    def local(self, layer: int, pos: int, idx: int, scale: float) -> tuple[float, int]:
        """Tier (a): the change of the target, and how many other features switched on or off."""
        rep, rec = self.rep, self.rec
        hooks = intervention_hooks(self.model, rep, rec, {layer: [(pos, idx, scale)]}, mode="scale",
                                   freeze_attention=True, freeze_norms=True, hold=self.hold)
        inputs: dict[int, torch.Tensor] = {}
        for l in rep.layers:
            hooks.append((rep.input_hook(l), lambda x, hook, l=l: inputs.__setitem__(l, x[0].detach())))
        moved = self._read(hooks)
        crossed = 0
        for l, x in inputs.items():
            on = rep.encode_layer(l, x.reshape(x.shape[0], -1)).to(rec.acts[l].dtype) != 0
            was = rec.acts[l] != 0
            flip = on != was
            if l in self.hold:
                flip &= ~self.hold[l]
            flip = flip[self.first:]
            if l == layer and pos >= self.first:
                flip[pos - self.first, idx] = False  # the edited feature itself
            crossed += int(flip.sum())
        return moved, crossed

    def live(self, layer: int, pos: int, idx: int, a: float, scale: float, freeze_attention: bool) -> float:
        """Tiers (b) and (c): the feature's contribution scaled in every MLP output it writes, the error live."""
        rep = self.rep

        def edit(acts: torch.Tensor) -> torch.Tensor:
            acts[:, pos, idx] *= scale
            return acts

        held = torch.zeros(1, self.rec.n_pos, rep.decoder(layer).shape[0], dtype=self.model.dtype,
                           device=self.model.device)
        held[0, pos, idx] = a
        hooks = splice_hooks(rep, keep_error=True, edit={layer: edit}, features={layer: held},
                             outputs=rep.output_layers(layer))
        return self._read((self.patterns if freeze_attention else []) + hooks)

    def without_error(self, layer: int, pos: int) -> float:
        """Tier (c) with one error node removed: its recorded vector taken out of the live MLP output."""
        err = self.rec.errors[layer][pos]

        def remove(y: torch.Tensor, hook: Any) -> torch.Tensor:
            y = y.clone()
            y[0, pos] -= err.to(y.dtype)
            return y

        return self._read([(f"blocks.{layer}.hook_mlp_out", remove)])


@torch.no_grad()
def check_graph(graph: AttributionGraph, model: Any, transcoders: Any, k: int = 10, *, scale: float = 0.0,
                tiers: tuple[str, ...] = TIERS) -> CheckResult:
    """Edit the graph's k most influential features one at a time (multiply the activation by `scale`; 0 ablates)
    in tiers (a), (b) and (c) (see the module docstring) and compare with the graph's prediction.

    >>> from featurelens.attribution import check_graph
    >>> r = check_graph(g, model, tc)               # r.tiers["c"].spearman, r.score, print(r.summary())
    """
    g = graph.root
    if g.n_features == 0:
        raise InputError("the graph has no feature nodes to check")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 1:
        raise InputError(f"scale must be a finite number other than 1 (0 ablates), got {scale!r}")
    unknown = set(tiers) - set(TIERS)
    if unknown or "c" not in tiers:
        raise InputError(f"tiers are some of {TIERS} and always include 'c', got {tiers!r}")
    rep = check_transcoders(model, transcoders)
    tokens = prompt_tokens(model, torch.tensor(g.tokens))
    rec = record(model, rep, tokens)
    u = target_direction(model, g).to(rec.final.dtype)
    run = _Tiers(model, rep, rec, u, first=1 if g.bos else 0, graph_features=g.features.to(rec.tokens.device))
    logit_node = g.logit_slice.start
    infl = g.node_influence()[: g.n_features]
    order = infl.argsort(descending=True)[:k].tolist()
    A = g.dense()
    totals = total_effects(g, logit_node) * (1 - scale)
    grads = gradient_effects(model, rep, rec, u)
    # every feature node: (the graph's predicted change of the target, the real model's first-order one)
    node_effects = {g.node_id(f): (float(totals[f]), (scale - 1) * float(grads[layer][pos, idx]))
                    for f, (layer, pos, idx) in enumerate(g.features.tolist())}

    checks = []
    for f in order:
        layer, pos, idx = g.features[f].tolist()
        a = float(rec.acts[layer][pos, idx])
        ma, crossed = run.local(layer, pos, idx, scale) if "a" in tiers else (float("nan"), 0)
        mb = run.live(layer, pos, idx, a, scale, freeze_attention=True) if "b" in tiers else float("nan")
        mc = run.live(layer, pos, idx, a, scale, freeze_attention=False)
        node = g.node_id(f)
        predicted_total, predicted_gradient = node_effects[node]
        checks.append(FeatureCheck(node, float(infl[f]), -float(A[logit_node, f]) * (1 - scale), predicted_total,
                                   mc, ma, mb, crossed, predicted_gradient=predicted_gradient))
    errors = []
    if scale == 0:  # coverage: the same number of the most influential error nodes, removed in the real model
        e_infl = g.node_influence()[g.error_slice]
        for i in e_infl.argsort(descending=True)[:k].tolist():
            if float(e_infl[i]) > 0:
                node = g.error_slice.start + i
                errors.append((g.node_id(node), run.without_error(g.node_layer(node), g.node_pos(node))))
    return _result(g.logit_strs[0], checks, scale, run.clean, tiers, errors, node_effects)


def _result(target: str, checks: list[FeatureCheck], scale: float, clean: float, tiers: tuple[str, ...] = TIERS,
            errors: list[tuple[str, float]] | None = None,
            node_effects: dict[str, tuple[float, float]] | None = None) -> CheckResult:
    pred = [c.predicted_total for c in checks]
    meas = [c.measured for c in checks]
    c_agree = agreement(pred, meas)
    quiet = [c for c in checks if c.crossings == 0]
    return CheckResult(
        target=target, features=checks, sign_agreement=c_agree.sign_agreement, correlation=c_agree.pearson,
        correlation_direct=_pearson([c.predicted_direct for c in checks], meas),
        lowers_target=sum(m < 0 for m in meas) / max(len(meas), 1), scale=float(scale), target_value=clean,
        tiers={t: agreement(pred, [c.tier(t) for c in checks]) for t in tiers},
        tiers_no_crossing={t: agreement([c.predicted_total for c in quiet], [c.tier(t) for c in quiet])
                           for t in tiers},
        score=faithfulness_score(checks, [m for _, m in errors or []]) if scale == 0 else float("nan"),
        errors=list(errors or []),
        gradient_tiers={t: agreement([c.predicted_gradient for c in checks], [c.tier(t) for c in checks])
                        for t in tiers},
        node_effects=dict(node_effects or {}),
    )


@dataclass
class FaithfulnessReport:
    """`check_graph` over many prompts, pooled: every ablation of every prompt counts once."""

    per_prompt: list[tuple[str, CheckResult]]
    sign_agreement: float  # tier (c)
    correlation: float  # tier (c), Pearson
    correlation_direct: float
    lowers_target: float
    tiers: dict[str, Agreement] = field(default_factory=dict)
    tiers_no_crossing: dict[str, Agreement] = field(default_factory=dict)
    gradient_tiers: dict[str, Agreement] = field(default_factory=dict)  # the real model's gradient against each tier

    def summary(self) -> str:
        feats = [f for _, r in self.per_prompt for f in r.features]
        quiet = sum(f.crossings == 0 for f in feats)
        lines = [f"{len(self.per_prompt)} prompts, {len(feats)} ablations ({quiet} without threshold crossings), "
                 f"pooled:",
                 f"  {'tier':<58}{'sign':>6}{'spearman':>10}{'pearson':>9}   without crossings: sign spearman pearson"]
        for t, a in self.tiers.items():
            b = self.tiers_no_crossing[t]
            lines.append(f"  ({t}) {TIER_NAMES[t]:<54}{a.sign_agreement:>6.0%}{a.spearman:>10.3f}{a.pearson:>9.3f}"
                         f"   {b.sign_agreement:>23.0%} {b.spearman:>8.3f} {b.pearson:>7.3f}")
        lines.append(f"  correlation (direct, real model) {self.correlation_direct:.3f}, ablation lowers the target "
                     f"{self.lowers_target:.0%}")
        lines.append(_gradient_line(self.gradient_tiers))
        for prompt, r in self.per_prompt:
            lines.append(f"  {prompt[:40]!r:<44} -> {r.target!r:<16} score {r.score:.2f}  (c) sign "
                         f"{r.sign_agreement:.0%} corr {r.correlation:.3f}")
        return "\n".join(lines)


def pool(results: list[tuple[str, CheckResult]]) -> FaithfulnessReport:
    """Pool the ablations of several checks (each counts once)."""
    feats = [f for _, r in results for f in r.features]
    tiers = [t for t in TIERS if results and t in results[0][1].tiers]
    pred = [f.predicted_total for f in feats]
    meas = [f.measured for f in feats]
    c = agreement(pred, meas)
    quiet = [f for f in feats if f.crossings == 0]
    return FaithfulnessReport(
        per_prompt=results, sign_agreement=c.sign_agreement, correlation=c.pearson,
        correlation_direct=_pearson([f.predicted_direct for f in feats], meas),
        lowers_target=sum(m < 0 for m in meas) / max(len(meas), 1),
        tiers={t: agreement(pred, [f.tier(t) for f in feats]) for t in tiers},
        tiers_no_crossing={t: agreement([f.predicted_total for f in quiet], [f.tier(t) for f in quiet]) for t in tiers},
        gradient_tiers={t: agreement([f.predicted_gradient for f in feats], [f.tier(t) for f in feats]) for t in tiers},
    )


def check_prompts(model: Any, transcoders: Any, prompts: list[Any], k: int = 10, *, targets: list[Any] | None = None,
                  scale: float = 0.0, tiers: tuple[str, ...] = TIERS, **attribute_kwargs: Any) -> FaithfulnessReport:
    """Attribute each prompt (to its target, if `targets` gives one per prompt; None: the most likely tokens), edit
    its graph's k most influential features in tiers (a), (b) and (c), and pool the comparisons.

    >>> rep = check_prompts(model, tc, ["The capital of France is", "2 + 2 ="], targets=[" Paris", " 4"])
    >>> print(rep.summary())
    """
    from .attribute import attribute

    if not prompts:
        raise InputError("no prompts to check")
    if targets is not None and len(targets) != len(prompts):
        raise InputError(f"{len(targets)} targets for {len(prompts)} prompts: give one per prompt (None: the top)")
    attribute_kwargs.setdefault("progress", False)
    results = []
    for i, p in enumerate(prompts):
        g = attribute(model, transcoders, p, target=None if targets is None else targets[i], **attribute_kwargs)
        results.append((p if isinstance(p, str) else g.prompt,
                        check_graph(g, model, transcoders, k=k, scale=scale, tiers=tiers)))
    return pool(results)
