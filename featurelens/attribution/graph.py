"""`AttributionGraph`: nodes, sparse weighted edges, influence, pruning, scores and paths.

Node order (as circuit-tracer's): [features F][errors n_layers x P, layer-major][token embeddings P][logits K].
Edges are stored sparsely as (target, source, weight): `weight` = A[target, source], the direct effect of the
source (its activation-scaled decoder vector, error vector or embedding) on the target (a feature's
pre-activation or a demeaned logit) through the frozen replacement model.

Influence and pruning follow circuit-tracer's definitions: |A| normalised per target row, a node's influence is
the logit-probability-weighted sum over all powers of that matrix (every path to the logits), the node threshold
keeps the smallest set of nodes holding that fraction of the total influence, the edge threshold likewise for
edge scores, and pruning repeats until every kept feature has an incoming and an outgoing edge.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..engine.errors import InputError


def cantor(layer: int, index: int) -> int:
    """circuit-tracer's one-integer feature id: the Cantor pairing of (layer, index)."""
    return (layer + index) * (layer + index + 1) // 2 + index


def uncantor(z: int) -> tuple[int, int]:
    w = (math.isqrt(8 * z + 1) - 1) // 2
    index = z - w * (w + 1) // 2
    return w - index, index


def parse_feature_node_id(node_id: str) -> tuple[int, int, int]:
    """(layer, feature, position) of a feature node's id `{layer}_{feature}_{pos}` (see `AttributionGraph.node_id`).

    Raises InputError for anything else; an error node's `{layer}_-1_{pos}` included. A logit node's id has the same
    shape, so callers tell node kinds apart by the node's type first."""
    parts = node_id.split("_") if isinstance(node_id, str) else []
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise InputError(f"node {node_id!r} is not a feature node (layer_feature_position)")
    layer, feature, pos = (int(p) for p in parts)
    return layer, feature, pos


# --------------------------------------------------------------------------------------------- sparse maths


def normalized(edges: torch.Tensor, weights: torch.Tensor, n: int) -> torch.Tensor:
    """|A| with each target row summing to 1 (rows without edges stay empty): [E]."""
    a = weights.abs().double()
    rows = torch.zeros(n, dtype=a.dtype).index_add_(0, edges[0], a)
    return a / rows[edges[0]].clamp_min(1e-10)


def influence(edges: torch.Tensor, wn: torch.Tensor, n: int, seed: torch.Tensor, max_iter: int = 1000) -> torch.Tensor:
    """seed @ (A + A^2 + ...) for the row-normalised matrix with entries wn: [n] (the seed's own mass excluded).

    The graph is acyclic (edges run from earlier to later layers), so the powers vanish after at most
    n_layers + 2 steps.
    """
    if edges.shape[1] == 0:
        return torch.zeros(n, dtype=torch.float64)
    with warnings.catch_warnings():  # sparse CSR is "beta"; matrix-vector products are all we use
        warnings.simplefilter("ignore")
        M = torch.sparse_coo_tensor(torch.stack([edges[1], edges[0]]), wn, (n, n)).coalesce().to_sparse_csr()
    cur = M @ seed.double()
    total = cur.clone()
    for _ in range(max_iter):
        cur = M @ cur
        if not bool(cur.any()):
            return total
        total += cur
    raise RuntimeError("influence did not converge: the graph has a cycle")


def find_threshold(scores: torch.Tensor, fraction: float) -> float:
    """The score above which the highest scores hold `fraction` of the total."""
    if scores.numel() == 0:
        return 0.0
    s = scores.sort(descending=True).values
    total = s.sum()
    if total <= 0:
        return 0.0
    cum = s.cumsum(0) / total
    i = min(int(torch.searchsorted(cum, torch.tensor(fraction, dtype=cum.dtype))), len(s) - 1)
    return float(s[i])


def graph_scores(edges: torch.Tensor, weights: torch.Tensor, n: int, seed: torch.Tensor,
                 errors: slice | torch.Tensor, tokens: slice | torch.Tensor) -> dict[str, float]:
    """circuit-tracer's `compute_graph_scores`, on sparse edges: the replacement score (share of the tokens' and
    errors' end-to-end influence on the logits that starts at a token) and the completeness score (influence-weighted
    share of every node's input that comes from non-error nodes). `errors` and `tokens` select those nodes (a slice
    or a boolean mask); an error node's own inputs, if any, are not followed. `seed`: the logit weights.

    A score is NaN where circuit-tracer's is (0 / 0: no influence reaches a token or an error, or no logit weight).
    Memory and time grow with the edges: nothing here is n x n.
    """
    is_err = torch.zeros(n, dtype=torch.bool)
    is_err[errors] = True
    live = ~is_err[edges[0]]
    edges, weights = edges[:, live], weights[live]
    wn = normalized(edges, weights, n)
    infl = influence(edges, wn, n, seed)
    tok, err = float(infl[tokens].sum()), float(infl[is_err].sum())
    replacement = tok / (tok + err) if tok + err > 0 else math.nan
    from_err = torch.zeros(n, dtype=torch.float64).index_add_(0, edges[0], wn * is_err[edges[1]])
    out_infl = infl + seed.double()
    total = float(out_infl.sum())
    completeness = float(((1 - from_err) * out_infl).sum()) / total if total > 0 else math.nan
    return {"replacement": replacement, "completeness": completeness}


# --------------------------------------------------------------------------------------------- the graph


class GraphPath(NamedTuple):
    score: float  # product of the row-normalised edge weights along the path (its share of the target's input)
    nodes: list[str]  # node ids, source first, target last
    labels: list[str]  # readable names of the same nodes


@dataclass
class AttributionGraph:
    """An attribution graph of one prompt. Make one with `featurelens.attribute`; read one with `load_graph`.

    >>> g = fl.attribute(model, transcoders, "The capital of France is")
    >>> g.scores                                   # {'replacement': ..., 'completeness': ...}
    >>> p = g.prune(node_threshold=0.8, edge_threshold=0.98)
    >>> fl.save_graph(p, "graphs/")                # graphs/the-capital-of-france-is.json + graph-metadata.json
    >>> p.top_paths(" Paris", k=5)
    """

    prompt: str
    tokens: list[int]
    token_strs: list[str]
    n_layers: int
    features: torch.Tensor  # [F, 3] long: (layer, position, feature index)
    activations: torch.Tensor  # [F] float
    logit_tokens: torch.Tensor  # [K] long: vocabulary ids, most likely first
    logit_probs: torch.Tensor  # [K] float
    logit_strs: list[str]
    edges: torch.Tensor  # [2, E] long: (target node, source node)
    weights: torch.Tensor  # [E] float32: A[target, source]
    model_name: str = ""
    transcoders: str = ""  # the transcoders' directory (to re-load them), or a description
    bos: bool = True  # position 0 is BOS: its features and error are left out (their effect is a constant)
    node_mask: torch.Tensor | None = None  # [N] bool: nodes kept by pruning (None: all)
    cumulative: torch.Tensor | None = None  # [N] cumulative influence rank (pruned graphs)
    parent: "AttributionGraph | None" = field(default=None, repr=False)  # the unpruned graph a pruned one came from
    labels: dict[int, str] = field(default_factory=dict)  # feature node -> label (clerp)
    info: dict[str, Any] = field(default_factory=dict)  # timings, counts, thresholds
    node_threshold: float | None = None
    edge_threshold: float | None = None
    _scores: dict[str, float] | None = field(default=None, repr=False)

    # ----------------------------------------------------------------- layout
    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def error_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_layers * self.n_pos)

    @property
    def token_slice(self) -> slice:
        s = self.error_slice.stop
        return slice(s, s + self.n_pos)

    @property
    def logit_slice(self) -> slice:
        s = self.token_slice.stop
        return slice(s, s + self.n_logits)

    @property
    def n_nodes(self) -> int:
        return self.logit_slice.stop

    def logit_weights(self) -> torch.Tensor:
        seed = torch.zeros(self.n_nodes, dtype=torch.float64)
        seed[self.logit_slice] = self.logit_probs.double()
        return seed

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def node_kind(self, i: int) -> str:
        for kind, sl in (("feature", slice(0, self.n_features)), ("error", self.error_slice),
                         ("embedding", self.token_slice), ("logit", self.logit_slice)):
            if sl.start <= i < sl.stop:
                return kind
        raise IndexError(f"node {i} is outside this graph's {self.n_nodes} nodes")

    def node_layer(self, i: int) -> int:
        """Layer for topological order: embeddings -1, features and errors their layer, logits n_layers."""
        kind = self.node_kind(i)
        if kind == "feature":
            return int(self.features[i, 0])
        if kind == "error":
            return (i - self.n_features) // self.n_pos
        return -1 if kind == "embedding" else self.n_layers

    def node_pos(self, i: int) -> int:
        kind = self.node_kind(i)
        if kind == "feature":
            return int(self.features[i, 1])
        if kind == "error":
            return (i - self.n_features) % self.n_pos
        if kind == "embedding":
            return i - self.token_slice.start
        return self.n_pos - 1

    def node_id(self, i: int) -> str:
        """circuit-tracer's ids: `{layer}_{feature}_{pos}`, `E_{token}_{pos}`, `{n_layers+1}_{token}_{pos}`; errors are
        `{layer}_-1_{pos}` (not `0_{layer}_{pos}`, which collides with layer-0 feature `layer` at `pos`)."""
        kind, pos = self.node_kind(i), self.node_pos(i)
        if kind == "feature":
            layer, _, idx = self.features[i].tolist()
            return f"{layer}_{idx}_{pos}"
        if kind == "error":
            return f"{self.node_layer(i)}_-1_{pos}"
        if kind == "embedding":
            return f"E_{self.tokens[pos]}_{pos}"
        return f"{self.n_layers + 1}_{int(self.logit_tokens[i - self.logit_slice.start])}_{pos}"

    def node_label(self, i: int) -> str:
        kind, pos = self.node_kind(i), self.node_pos(i)
        tok = self.token_strs[pos] if pos < len(self.token_strs) else "?"
        if kind == "feature":
            layer, _, idx = self.features[i].tolist()
            label = self.labels.get(i, "")
            return f"L{layer} #{idx} @{tok!r}" + (f" {label}" if label else "")
        if kind == "error":
            return f"error L{self.node_layer(i)} @{tok!r}"
        if kind == "embedding":
            return f"token {tok!r}@{pos}"
        k = i - self.logit_slice.start
        return f'Output "{self.logit_strs[k]}" (p={float(self.logit_probs[k]):.3f})'

    def node_ids(self) -> list[str]:
        return [self.node_id(i) for i in range(self.n_nodes)]

    def index_of(self, node_id: str) -> int:
        ids = {nid: i for i, nid in enumerate(self.node_ids())}
        if node_id not in ids:
            raise InputError(f"no node {node_id!r} in this graph")
        return ids[node_id]

    def kept(self) -> torch.Tensor:
        return torch.ones(self.n_nodes, dtype=torch.bool) if self.node_mask is None else self.node_mask

    def dense(self) -> torch.Tensor:
        """A [N, N] (target, source) as a dense tensor: only for small graphs."""
        if self.n_nodes > 20_000:
            raise InputError(f"{self.n_nodes} nodes is too many for a dense matrix; use .edges and .weights")
        A = torch.zeros(self.n_nodes, self.n_nodes, dtype=self.weights.dtype)
        A[self.edges[0], self.edges[1]] = self.weights
        return A

    def __repr__(self) -> str:
        pruned = "pruned " if self.parent is not None else ""
        return (f"AttributionGraph({pruned}{self.prompt!r}: {self.n_features} features, {int(self.kept().sum())} nodes "
                f"shown, {self.edges.shape[1]:,} edges, top logit {self.logit_strs[0]!r} "
                f"p={float(self.logit_probs[0]):.3f})")

    # ----------------------------------------------------------------- influence and scores
    @property
    def root(self) -> "AttributionGraph":
        return self.parent if self.parent is not None else self

    def node_influence(self) -> torch.Tensor:
        """[N] each node's influence on the logits (probability-weighted, through every path)."""
        wn = normalized(self.edges, self.weights, self.n_nodes)
        return influence(self.edges, wn, self.n_nodes, self.logit_weights())

    @property
    def scores(self) -> dict[str, float]:
        """Replacement and completeness scores of the unpruned graph (circuit-tracer's `compute_graph_scores`)."""
        root = self.root
        if root._scores is None:
            root._scores = graph_scores(root.edges, root.weights, root.n_nodes, root.logit_weights(),
                                        root.error_slice, root.token_slice)
        return dict(root._scores)

    def subgraph_scores(self, pinned: list[str] | None = None) -> dict[str, float]:
        """Scores of the subgraph of `pinned` node ids (default: the features this graph keeps), computed on the
        unpruned graph with every other feature merged into the error node at its layer and position, as
        Neuronpedia scores a subgraph."""
        root = self.root
        if pinned is None:
            keep_ids = {self.node_id(i) for i in range(self.n_features) if bool(self.kept()[i])}
        else:
            keep_ids = set(pinned)
        ids = root.node_ids()
        unknown = keep_ids - set(ids)
        if pinned is not None and unknown:
            raise InputError(f"not nodes of this graph: {sorted(unknown)[:5]}")
        remap = torch.arange(root.n_nodes)
        merged = torch.zeros(root.n_nodes, dtype=torch.bool)
        for i in range(root.n_features):
            if ids[i] not in keep_ids:
                layer, pos, _ = root.features[i].tolist()
                remap[i] = root.error_index(layer, pos)
                merged[i] = True
        keep = ~merged[root.edges[0]]  # a merged feature's inputs vanish: errors have none
        tgt, src = root.edges[0][keep], remap[root.edges[1][keep]]
        # indices < n_nodes by construction: no invariant checks (saying so silences torch's warning that they are off)
        A = torch.sparse_coo_tensor(torch.stack([tgt, src]), root.weights[keep].double(), (root.n_nodes,) * 2,
                                    check_invariants=False)
        A = A.coalesce()
        return graph_scores(A.indices(), A.values(), root.n_nodes, root.logit_weights(),
                            root.error_slice, root.token_slice)

    # ----------------------------------------------------------------- pruning
    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> "AttributionGraph":
        """Keep the nodes holding `node_threshold` of the influence on the logits and the edges holding
        `edge_threshold` of the edge influence; tokens and logits always stay. Returns a new, pruned graph whose
        `cumulative` holds each node's cumulative-influence rank (circuit-tracer's `influence` field)."""
        for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                raise InputError(f"{name} must be in (0, 1], got {v!r}")
        root = self.root
        n, seed = root.n_nodes, root.logit_weights()
        edges, weights = root.edges, root.weights
        infl = influence(edges, normalized(edges, weights, n), n, seed)
        node_mask = infl >= find_threshold(infl, node_threshold)
        fixed = root.token_slice.start  # tokens and logits
        node_mask[fixed:] = True

        both = node_mask[edges[0]] & node_mask[edges[1]]
        e, w = edges[:, both], weights[both]
        wn = normalized(e, w, n)
        score = wn * (influence(e, wn, n, seed) + seed)[e[0]]
        edge_mask = score >= find_threshold(score, edge_threshold)

        while True:  # drop features without inputs and features/errors without outputs, until nothing changes
            live = edge_mask & node_mask[e[0]] & node_mask[e[1]]
            has_out = torch.zeros(n, dtype=torch.bool)
            has_out[e[1][live]] = True
            has_in = torch.zeros(n, dtype=torch.bool)
            has_in[e[0][live]] = True
            new = node_mask.clone()
            new[:fixed] &= has_out[:fixed]
            new[: root.n_features] &= has_in[: root.n_features]
            edge_mask = live
            if torch.equal(new, node_mask):
                break
            node_mask = new

        order = infl.argsort(descending=True)
        cum = torch.zeros(n, dtype=torch.float64)
        total = infl.sum()
        cum[order] = infl[order].cumsum(0) / total if total > 0 else 0.0

        # Re-index: kept features first (in their old order), then the fixed layout of errors, tokens, logits.
        keep_f = node_mask[: root.n_features]
        new_index = torch.full((n,), -1, dtype=torch.long)
        new_index[: root.n_features][keep_f] = torch.arange(int(keep_f.sum()))
        rest = torch.arange(root.n_features, n)
        new_index[rest] = rest - root.n_features + int(keep_f.sum())
        ke, kw = e[:, edge_mask], w[edge_mask]
        new_edges = new_index[ke]
        mask = torch.cat([torch.ones(int(keep_f.sum()), dtype=torch.bool), node_mask[root.n_features:]])
        labels = {int(new_index[i]): s for i, s in root.labels.items() if i < root.n_features and bool(keep_f[i])}
        return replace(
            root, features=root.features[keep_f], activations=root.activations[keep_f], edges=new_edges,
            weights=kw, node_mask=mask, cumulative=cum[new_index >= 0].float(), parent=root, labels=labels,
            node_threshold=float(node_threshold), edge_threshold=float(edge_threshold), _scores=None,
            info=dict(root.info),
        )

    # ----------------------------------------------------------------- paths
    def logit_node(self, target: "str | int | None") -> int:
        """The logit node for a token string (" Paris"), a vocabulary id, or None (the most likely)."""
        if target is None:
            return self.logit_slice.start
        if isinstance(target, str):
            for k, s in enumerate(self.logit_strs):
                if s == target:
                    return self.logit_slice.start + k
            stripped = [k for k, s in enumerate(self.logit_strs) if s.strip() == target.strip()]
            if stripped:
                return self.logit_slice.start + stripped[0]
        else:
            hits = (self.logit_tokens == int(target)).nonzero()
            if len(hits):
                return self.logit_slice.start + int(hits[0])
        raise InputError(f"{target!r} is not one of this graph's logit nodes: {self.logit_strs}")

    def top_paths(self, target: "str | int | None" = None, k: int = 5, max_edges: int = 500_000) -> list[GraphPath]:
        """The k paths into a logit node with the largest product of row-normalised edge weights (each factor is the
        share of its target's input that the edge carries), starting at a node with no inputs (a token or an
        error, or a feature whose inputs were pruned). An unpruned graph with more than `max_edges` edges is pruned
        first (default thresholds)."""
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        g = self
        if g.parent is None and g.edges.shape[1] > max_edges:
            g = g.prune()
        t = g.logit_node(target)
        wn = normalized(g.edges, g.weights, g.n_nodes)
        by_target: dict[int, list[tuple[int, float]]] = {}
        for tgt, src, w in zip(g.edges[0].tolist(), g.edges[1].tolist(), wn.tolist()):
            by_target.setdefault(tgt, []).append((src, w))
        # best[node] = top-k (score, path from node to t), filled from the target backwards (layers descend)
        best: dict[int, list[tuple[float, list[int]]]] = {t: [(1.0, [t])]}
        nodes = sorted(set(g.edges[1].tolist()) | set(g.edges[0].tolist()) | {t}, key=g.node_layer, reverse=True)
        for v in nodes:
            if v not in best:
                continue
            for src, w in by_target.get(v, []):
                cand = [(s * w, [src] + p) for s, p in best[v]]
                best[src] = sorted(best.get(src, []) + cand, key=lambda x: -x[0])[:k]
        starts = [v for v in best if v != t and v not in by_target]
        paths = sorted((sp for v in starts for sp in best[v]), key=lambda x: -x[0])[:k]
        return [GraphPath(s, [g.node_id(i) for i in p], [g.node_label(i) for i in p]) for s, p in paths]


    # ----------------------------------------------------------------- attention circuits (see heads.py, qk.py)
    def edge_heads(self, source: "str | int", target: "str | int", model: Any = None, transcoders: Any = None) -> Any:
        """The edge source -> target split by attention head, layer by layer (`heads.EdgeHeads`). Without a model or
        transcoders, the ones the graph names are loaded (once; later calls reuse them)."""
        from .heads import circuits_for

        return circuits_for(self, model, transcoders).edge_heads(source, target)

    def qk(self, layer: int, head: int, q: int, k: int, model: Any = None, transcoders: Any = None,
           top: int = 10) -> Any:
        """The pre-softmax attention score of `head` in `layer` from position q to position k as a sum over pairs of
        this graph's nodes (`qk.QKDecomposition`)."""
        from .heads import circuits_for
        from .qk import qk_decomposition

        return qk_decomposition(circuits_for(self, model, transcoders), layer, head, q, k, top=top)
