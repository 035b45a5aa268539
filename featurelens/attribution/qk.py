"""Attention circuits, the QK side: why a head attends from one position to another, as a sum over node pairs.

With norm scales frozen (the layer norms, and in Gemma 3 / Qwen 3 the q/k norms at their recorded scales) a query
is an affine map of the attention input at its position: q = x_q @ M_q + c_q, where M_q folds W_Q, the q-norm's
frozen scale and weight, and the rotary rotation at that position, and c_q the projection bias through the same
map. The attention input is itself a sum of what the graph's nodes write (propagated through the frozen earlier
layers) and a constant from the biases. So the pre-softmax score of (layer, head, query q, key k) is bilinear:

    score = scale * q . k = sum over nodes i (query side) and j (key side) of c_ij,   c_ij = scale * q_i . k_j

with one extra "bias" node on each side. Each node's part of every layer's attention input at every position is
pushed through the frozen model once per graph (`_node_inputs`, one forward-mode pass batched over the nodes);
then a node's q_i ([d_head]) is its part at q times M_q, and k_j likewise: two small matmuls per question.
Features of the transcoders that the (pruned) graph does not show are merged into the error node at their layer
and position, as circuit-tracer's subgraph scores merge them.

For soft-capped families (Gemma 2) the decomposed score is the one before the cap (cap * tanh(score / cap) is
what the softmax sees); `capped` gives that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..engine.errors import InputError
from ..engine.model import rotate
from .heads import AttentionCircuits

BIAS = "bias"  # the node id of the constant terms


@dataclass
class QKTerm:
    query: str  # node id on the query side ("" for a key-side term)
    key: str  # node id on the key side ("" for a query-side term)
    value: float
    query_label: str = ""
    key_label: str = ""


@dataclass
class QKDecomposition:
    """The pre-softmax attention score of one head at (query, key) as a sum over node pairs."""

    layer: int
    head: int
    query_pos: int
    key_pos: int
    score: float  # the score recorded in the real model, before soft-capping: scale * q . k
    total: float  # the sum of every pair's term (equals score up to rounding)
    pattern: float  # the head's attention weight at (query, key)
    softcap: float | None  # the family's cap on attention scores, if any
    query_token: str
    key_token: str
    node_ids: list[str]  # the nodes (the graph's features, errors and embeddings, then "bias")
    labels: list[str]
    query_vectors: torch.Tensor  # [nodes, d_head]: each node's part of the (rotated, normed) query
    key_vectors: torch.Tensor  # [nodes, d_head]: each node's part of the key
    scale: float
    top_pairs: list[QKTerm] = field(default_factory=list)
    top_query: list[QKTerm] = field(default_factory=list)  # query-side terms: q_i . k (the whole key)
    top_key: list[QKTerm] = field(default_factory=list)  # key-side terms: q . k_j

    @property
    def capped(self) -> float:
        """The score the softmax sees (after the soft-cap, where the family has one)."""
        if self.softcap is None:
            return self.score
        return self.softcap * math.tanh(self.score / self.softcap)

    def pair(self, query: str, key: str) -> float:
        """c_ij for two node ids."""
        i, j = self.node_ids.index(query), self.node_ids.index(key)
        return float(self.query_vectors[i].double() @ self.key_vectors[j].double()) * self.scale

    def summary(self) -> str:
        cap = f" (before the soft-cap at {self.softcap:g}: {self.capped:+.4g} after)" if self.softcap else ""
        lines = [f"head {self.layer}.{self.head} attends from {self.query_token!r}@{self.query_pos} to "
                 f"{self.key_token!r}@{self.key_pos} with weight {self.pattern:.3f}; score {self.score:+.4g}{cap}, "
                 f"sum of terms {self.total:+.4g}", "top pairs (query node x key node):"]
        lines += [f"  {t.value:+.4g}  query: {t.query_label}  x  key: {t.key_label}" for t in self.top_pairs]
        lines.append("top query-side terms (node . whole key):")
        lines += [f"  {t.value:+.4g}  {t.query_label}" for t in self.top_query]
        lines.append("top key-side terms (whole query . node):")
        lines += [f"  {t.value:+.4g}  {t.key_label}" for t in self.top_key]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        def term(t: QKTerm) -> dict[str, Any]:
            return {"query": t.query, "key": t.key, "value": t.value, "query_label": t.query_label,
                    "key_label": t.key_label}

        return {"layer": self.layer, "head": self.head, "query_pos": self.query_pos, "key_pos": self.key_pos,
                "score": self.score, "total": self.total, "pattern": self.pattern, "softcap": self.softcap,
                "top_pairs": [term(t) for t in self.top_pairs], "top_query": [term(t) for t in self.top_query],
                "top_key": [term(t) for t in self.top_key]}


def _recorded(circuits: AttentionCircuits) -> dict[str, torch.Tensor]:
    """Queries and keys (before and after norm and rotation) and patterns of every layer in the real model, and the
    projection weights: recorded once per prompt."""
    if "qk_record" not in circuits.cache:
        model, n = circuits.model, circuits.model.cfg.n_layers
        parts = ("hook_q", "hook_k", "hook_rot_q", "hook_rot_k", "hook_pattern")
        with torch.no_grad():
            _, cache = model.run_with_cache(circuits.rec.tokens[None],
                                            names_filter=[f"blocks.{l}.attn.{s}" for l in range(n) for s in parts])
            out = {s: torch.stack([cache[f"blocks.{l}.attn.{s}"][0] for l in range(n)]) for s in parts}
            out.update(W_Q=model.W_Q, b_Q=model.b_Q, W_K=model.W_K, b_K=model.b_K)
        circuits.cache["qk_record"] = out
    return circuits.cache["qk_record"]


def _affine_maps(circuits: AttentionCircuits, layer: int, head: int, q: int, k: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(M_q [D, d], c_q [d], M_k, c_k, recorded activations): query / key = attention input @ M + c, exactly, with the
    q/k norms at the scales of the real run."""
    model, cfg = circuits.model, circuits.model.cfg
    kv = head // (cfg.n_heads // cfg.n_kv_heads)
    rec = {name: v[layer] for name, v in _recorded(circuits).items()}
    attn = model.blocks[layer].attn
    positions = torch.arange(circuits.rec.n_pos, device=model.device)[None]
    rope = model.net._rope(layer, positions, {})  # (cos, sin, ..) [1, P, 1, d], or None (learned positions)
    eye = torch.eye(cfg.d_head, dtype=torch.float64, device=model.device)

    def fold(W: torch.Tensor, b: torch.Tensor, pre: torch.Tensor, norm: Any, pos: int) -> tuple[torch.Tensor, ...]:
        # the projection's output is multiplied by the norm's frozen scale and weight, then rotated: all linear
        W, b = W.double(), b.double()
        f = torch.ones(cfg.d_head, dtype=torch.float64, device=model.device)
        if norm is not None:
            pre = pre.double()
            f = norm.w.double() / torch.sqrt((pre * pre).mean() + norm.eps)
        R = eye if rope is None else rotate(eye[None, None], rope[0][:, pos : pos + 1].double(),
                                            rope[1][:, pos : pos + 1].double())[0, 0]  # rotate(x) = x @ R
        return (W * f) @ R, (b * f) @ R

    M_q, c_q = fold(rec["W_Q"][head], rec["b_Q"][head], rec["hook_q"][q, head], attn.q_norm, q)
    M_k, c_k = fold(rec["W_K"][kv], rec["b_K"][kv], rec["hook_k"][k, kv], attn.k_norm, k)
    return M_q, c_q, M_k, c_k, {"rot_q": rec["hook_rot_q"][q, head], "rot_k": rec["hook_rot_k"][k, kv],
                                "pattern": rec["hook_pattern"][head, q, k]}


# Every graph node's part of every layer's attention input ([layers, nodes, P, D], float32) is kept per graph: from
# it any side of any QK score is one small matmul. Nodes are pushed through the frozen model this many at a time.
_PUSH_CHUNK = 128


def _node_writes(circuits: AttentionCircuits) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What each graph node adds to the residual stream, as parallel rows (node, point, pos, vector [D]); point = the
    layer whose MLP output it joins, -1 for the embeddings. A transcoder feature the (pruned) graph does not show is
    merged into the error node at its layer and position, as circuit-tracer's subgraph scores merge them."""
    g, rec, rep, dtype = circuits.graph, circuits.rec, circuits.rep, circuits.model.dtype
    P, dev = rec.n_pos, rec.resid0.device
    shown = {tuple(f): i for i, f in enumerate(g.features.tolist())}
    nodes, points, positions, vecs = [], [], [], []
    for layer in rep.layers:
        a = rec.acts[layer]
        pos, idx = a.nonzero(as_tuple=True)
        owner = torch.tensor([shown.get((layer, p, f), g.error_index(layer, p))
                              for p, f in zip(pos.tolist(), idx.tolist())], dtype=torch.long)
        W = rep.decoder(layer)  # [S, O, D]
        for j, out in enumerate(rep.output_layers(layer)):
            nodes.append(owner)
            points.append(torch.full_like(owner, out))
            positions.append(pos.cpu())
            vecs.append(a[pos, idx, None].to(dtype) * W[idx, j].to(dtype))
    every = torch.arange(P)
    for l in range(g.n_layers):
        nodes.append(g.error_index(l, 0) + every)
        points.append(torch.full_like(every, l))
        positions.append(every)
        vecs.append(rec.errors[l].to(dtype))
    nodes.append(g.token_slice.start + every)
    points.append(torch.full_like(every, -1))
    positions.append(every)
    vecs.append(rec.resid0.to(dtype))
    return torch.cat(nodes), torch.cat(points), torch.cat(positions), torch.cat(vecs).to(dev)


def _node_inputs(circuits: AttentionCircuits) -> torch.Tensor:
    """[layers, nodes, P, D]: each graph node's part of each layer's attention input (ln1's output, at the frozen norm
    scales) at every position, from forward-mode passes batched over the nodes (`AttentionCircuits.push`); the
    constant terms are `constant_attention_inputs`. Kept per graph (n_layers * nodes * P * d_model floats)."""
    if "node_inputs" not in circuits.cache:
        g, model = circuits.graph, circuits.model
        n, P, n_nodes = model.cfg.n_layers, circuits.rec.n_pos, g.logit_slice.start
        node, point, pos, vec = _node_writes(circuits)
        out = torch.zeros(n, n_nodes, P, model.cfg.d_model, dtype=torch.float32)
        for s in range(0, n_nodes, _PUSH_CHUNK):
            e = min(n_nodes, s + _PUSH_CHUNK)
            tangents = {}
            for p in point.unique().tolist():
                t = torch.zeros(e - s, 1, P, vec.shape[-1], dtype=vec.dtype, device=vec.device)
                sel = (point == p) & (node >= s) & (node < e)
                t[:, 0].index_put_((node[sel] - s, pos[sel]), vec[sel], accumulate=True)
                tangents[p] = t
            for l, f in enumerate(circuits.push(tangents, "attn_in")):
                if f is not None:
                    out[l, s:e] = f[:, 0].float().cpu()
        circuits.cache["node_inputs"] = out
    return circuits.cache["node_inputs"]


def _side(circuits: AttentionCircuits, layer: int, pos: int, M: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """[nodes + 1, d]: each graph node's part of (attention input at pos) @ M + c, the constant terms in the last
    row (the bias node)."""
    X = _node_inputs(circuits)[layer, :, pos].double()
    const = circuits.constant_attention_inputs()[layer][pos].double().cpu() @ M.cpu() + c.cpu()
    return torch.cat([X @ M.cpu(), const[None]])


def _top_pairs(Q: torch.Tensor, K: torch.Tensor, scale: float, k: int, chunk: int = 2048
               ) -> list[tuple[int, int, float]]:
    """The k largest |scale * Q_i . K_j| over all pairs, without holding the whole [n, m] matrix."""
    best: list[tuple[int, int, float]] = []
    m = K.shape[0]
    for s in range(0, Q.shape[0], chunk):
        C = (Q[s : s + chunk] @ K.T) * scale
        top = C.abs().flatten().topk(min(k, C.numel()))
        for flat in top.indices.tolist():
            i, j = divmod(flat, m)
            best.append((s + i, j, float(C[i, j])))
        best = sorted(best, key=lambda x: -abs(x[2]))[:k]
    return best


def qk_decomposition(circuits: AttentionCircuits, layer: int, head: int, q: int, k: int, top: int = 10
                     ) -> QKDecomposition:
    """The pre-softmax score of `head` of `layer` from query position q to key position k, as a sum over pairs of
    the graph's nodes (query side x key side)."""
    model, cfg, g = circuits.model, circuits.model.cfg, circuits.graph
    P = circuits.rec.n_pos
    for name, v, hi in (("layer", layer, cfg.n_layers), ("head", head, cfg.n_heads), ("query", q, P), ("key", k, P)):
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < hi:
            raise InputError(f"{name} must be an integer in [0, {hi}), got {v!r}")
    if k > q:
        raise InputError(f"the key position ({k}) comes after the query position ({q}): a causal model cannot look "
                         f"there")
    window = cfg.sliding_window if cfg.layer_types[layer] == "sliding" else None
    if window is not None and q - k >= window:
        raise InputError(f"layer {layer} slides a window of {window} tokens: from position {q} it cannot see {k}")

    M_q, c_q, M_k, c_k, real = _affine_maps(circuits, layer, head, q, k)
    Qv = _side(circuits, layer, q, M_q, c_q)
    Kv = _side(circuits, layer, k, M_k, c_k)

    n_nodes = g.logit_slice.start
    scale = cfg.q_scale
    q_all, k_all = Qv.sum(0), Kv.sum(0)
    score = float(real["rot_q"].double() @ real["rot_k"].double()) * scale
    ids = g.node_ids()[:n_nodes] + [BIAS]
    labels = [g.node_label(i) for i in range(n_nodes)] + ["bias (constant terms)"]
    qi = (Qv.abs().sum(1) > 0).nonzero().flatten()  # nodes with a part in the query (positions <= q) ...
    kj = (Kv.abs().sum(1) > 0).nonzero().flatten()  # ... and in the key
    pairs = _top_pairs(Qv[qi], Kv[kj], scale, top)
    side_q = (Qv @ k_all) * scale
    side_k = (Kv @ q_all) * scale
    tok = g.token_strs
    result = QKDecomposition(
        layer=layer, head=head, query_pos=q, key_pos=k, score=score, total=float(q_all @ k_all) * scale,
        pattern=float(real["pattern"]), softcap=cfg.attn_softcap, query_token=tok[q], key_token=tok[k],
        node_ids=ids, labels=labels, query_vectors=Qv.float(), key_vectors=Kv.float(), scale=scale,
    )
    for i, j, v in pairs:
        a, b = int(qi[i]), int(kj[j])
        result.top_pairs.append(QKTerm(ids[a], ids[b], v, labels[a], labels[b]))
    for i in side_q.abs().argsort(descending=True)[:top].tolist():
        if side_q[i] != 0:
            result.top_query.append(QKTerm(ids[i], "", float(side_q[i]), labels[i], ""))
    for j in side_k.abs().argsort(descending=True)[:top].tolist():
        if side_k[j] != 0:
            result.top_key.append(QKTerm("", ids[j], float(side_k[j]), "", labels[j]))
    return result


def strongest_cross_position_edges(graph: Any, n: int) -> list[tuple[int, int]]:
    """(source, target) node indices of the n edges with the largest |weight| whose ends sit at different positions:
    the edges attention carries."""
    out: list[tuple[int, int]] = []
    for e in graph.weights.abs().argsort(descending=True).tolist():
        t, s = graph.edges[:, e].tolist()
        if graph.node_pos(t) != graph.node_pos(s):
            out.append((s, t))
            if len(out) == n:
                break
    return out


def attention_story(circuits: AttentionCircuits, n_edges: int = 20, heads: int = 5, top: int = 10,
                    progress: Any = None) -> dict[str, Any]:
    """For the graph's n_edges strongest cross-position edges: the head split (the `heads` strongest heads of the
    edge) and the QK decomposition of the top head at (target position, source position). JSON-ready; `progress`
    is called with (done, total) after each edge."""
    g = circuits.graph
    edges = strongest_cross_position_edges(g, n_edges)
    circuits.source_parts([s for s, _ in edges])  # every source pushed forward in one batch ...
    circuits.target_grads([t for _, t in edges])  # ... and every target's gradients in one backward pass
    out = []
    for done, (s, t) in enumerate(edges, 1):
        split = circuits.edge_heads(s, t)
        entry: dict[str, Any] = {**split.to_dict(), "top_heads": [
            {"layer": layer, "head": h.head, "contribution": h.contribution, "pattern": h.pattern}
            for layer, h in split.top(heads)]}
        layer, share = split.top(1)[0]
        q, k = g.node_pos(t), g.node_pos(s)
        window = circuits.model.cfg.sliding_window if circuits.model.cfg.layer_types[layer] == "sliding" else None
        if window is None or q - k < window:
            entry["qk"] = qk_decomposition(circuits, layer, share.head, q, k, top=top).to_dict()
        out.append(entry)
        if progress is not None:
            progress(done, len(edges))
    return {"version": 1, "edges": out}


def attention_story_path(graph_file: "str | Path") -> Path:
    """Where the attention story of a graph file is kept: `<slug>.attention.json` beside `<slug>.json` (a file no
    graph viewer lists: they read graph-metadata.json)."""
    p = Path(graph_file)
    return p.with_name(p.stem + ".attention.json")


def save_attention_story(graph_file: "str | Path", story: dict[str, Any]) -> Path:
    from ..io import atomic_write_json

    return atomic_write_json(attention_story_path(graph_file), story)
