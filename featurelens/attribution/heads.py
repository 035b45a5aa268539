"""Attention circuits, the OV side: how much of an edge goes through each head of each attention layer.

In the frozen replacement model (`replacement.py`) attention patterns and norm scales are constants, so an edge
(source node -> target node) is a sum over linear paths, and every path crosses each layer's attention either
once, through exactly one head, or not at all. For each attention layer l between the source and the target:

    edge = bypass_l + sum over heads h of c_{l,h}

exactly. With G_l = d target / d z_l (the gradient at layer l's pattern-weighted values, one backward pass from the
target) and z_l^src the part of z_l caused by the source, c_{l,h} = sum over positions of G_l[pos, h] . z_l^src[pos, h].
The second factor, for every layer at once, is one forward-mode product of the source's write through the frozen
model (`AttentionCircuits.push`; the sources of many edges go in one batch), so a split costs a backward pass from
the target and a contraction.

Everything after z is linear in the frozen model (W_O, Gemma's post-attention norm with its scale frozen), before
it the patterns mix values of shared key/value heads (GQA: the split is per query head); q/k norms, soft-capping
and sliding windows only shape the (frozen) patterns.

>>> circuits = AttentionCircuits(graph, model, transcoders)
>>> split = circuits.edge_heads("3_87_4", "6_231_5")
>>> print(split.summary())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..engine.errors import InputError
from .replacement import FrozenRun, Recording, check_transcoders, demeaned_unembedding, frozen_forward, record

if TYPE_CHECKING:  # the graph's methods call into this module
    from .graph import AttributionGraph

# Sources (their parts of every layer's z) and targets (their gradients at every z and write point) kept for edge
# splits: ~0.4 and ~0.7 MB each for a 6-token prompt of Gemma 3 270M.
_KEPT_NODES = 256
# Activations the recording must reproduce for the graph's features (the graph came from these transcoders).
_ACT_TOLERANCE = 1e-3


@dataclass
class HeadShare:
    head: int
    contribution: float  # the part of the edge that goes through this head
    pattern: float  # this head's attention from the target's position to the source's (0 if it cannot look there)


@dataclass
class LayerSplit:
    layer: int
    bypass: float  # the part of the edge that does not go through this layer's attention
    heads: list[HeadShare]  # strongest (largest |contribution|) first

    @property
    def through(self) -> float:
        return sum(h.contribution for h in self.heads)


@dataclass
class EdgeHeads:
    """An edge split, layer by layer, into its parts through each attention head and the part bypassing the layer."""

    source: str  # node ids
    target: str
    source_label: str
    target_label: str
    edge: float  # the edge's weight (the source's direct effect on the target) recomputed in the frozen model
    layers: list[LayerSplit] = field(default_factory=list)  # attention layers between source and target

    def top(self, k: int = 5) -> list[tuple[int, HeadShare]]:
        """The k (layer, head) parts with the largest |contribution|, strongest first."""
        parts = [(s.layer, h) for s in self.layers for h in s.heads]
        return sorted(parts, key=lambda x: -abs(x[1].contribution))[:k]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "edge": self.edge,
                "layers": [{"layer": s.layer, "bypass": s.bypass,
                            "heads": [{"head": h.head, "contribution": h.contribution, "pattern": h.pattern}
                                      for h in s.heads]} for s in self.layers]}

    def summary(self, k: int = 5) -> str:
        lines = [f"edge {self.source_label} -> {self.target_label}: {self.edge:+.4g}"]
        for layer, h in self.top(k):
            lines.append(f"  head {layer}.{h.head}: {h.contribution:+.4g} ({h.contribution / self.edge:+.1%} of the "
                         f"edge), pattern {h.pattern:.3f}" if self.edge else f"  head {layer}.{h.head}: "
                         f"{h.contribution:+.4g}")
        return "\n".join(lines)


@dataclass
class _Tape:
    """One frozen forward pass with gradients, kept for every question asked of the same prompt."""

    run: FrozenRun
    z: dict[int, torch.Tensor]  # layer -> [1, P, heads, d_head] pattern-weighted values, live
    attn_in: dict[int, torch.Tensor]  # layer -> [1, P, D] the attention's input (ln1 output), live


class AttentionCircuits:
    """The frozen replacement model of a graph's prompt, kept to split edges by head (`edge_heads`) and attention
    scores by node pairs (`qk`, see `qk.py`).

    The prompt is recorded once; one frozen forward pass with gradients serves every later question: backward
    passes from targets, forward-mode products (`push`) from sources.
    """

    def __init__(self, graph: AttributionGraph, model: Any, transcoders: Any):
        self.graph, self.model, self.transcoders = graph, model, transcoders
        self.rep = transcoders
        check_transcoders(model, transcoders)
        if graph.n_layers != model.cfg.n_layers:
            raise InputError(f"the graph has {graph.n_layers} layers, the model {model.cfg.n_layers}")
        tokens = torch.tensor(graph.tokens, dtype=torch.long, device=model.device)
        self.rec: Recording = record(model, self.rep, tokens)
        self._check_activations()
        self._tape: _Tape | None = None
        self.cache: dict[str, Any] = {}  # what later questions reuse (see qk.py)
        self._constant_in: dict[int, torch.Tensor] | None = None
        self._source_z: dict[int, list[torch.Tensor | None]] = {}
        self._target_grads: dict[int, tuple[list[torch.Tensor | None], dict[int, torch.Tensor | None]]] = {}
        self._dual: tuple[list[int], list[torch.Tensor], dict[str, list[torch.Tensor]]] | None = None

    def _check_activations(self) -> None:
        g = self.graph
        for i in range(g.n_features):
            layer, pos, idx = g.features[i].tolist()
            if layer not in self.rec.acts:
                raise InputError(f"the graph has a feature at layer {layer}, where the transcoders have none")
            have, want = float(self.rec.acts[layer][pos, idx]), float(g.activations[i])
            if abs(have - want) > _ACT_TOLERANCE * max(1.0, abs(want)):
                raise InputError(f"feature {g.node_id(i)} activates at {have:.4g} here but {want:.4g} in the graph: "
                                 f"these are not the transcoders (or the model) the graph was made with")

    # ----------------------------------------------------------------- the frozen pass
    def tape(self) -> _Tape:
        """The frozen pass over the prompt with its autograd graph (~15 MB for 10 tokens of Gemma 3 270M), kept for
        every question asked of it."""
        if self._tape is None:
            model, n = self.model, self.model.cfg.n_layers
            z: dict[int, torch.Tensor] = {}
            attn_in: dict[int, torch.Tensor] = {}
            hooks = [(f"blocks.{l}.attn.hook_z", lambda x, hook: z.__setitem__(hook.layer(), x)) for l in range(n)]
            hooks += [(f"blocks.{l}.ln1.hook_normalized", lambda x, hook: attn_in.__setitem__(hook.layer(), x))
                      for l in range(n)]
            with model.hooks(hooks):
                run = frozen_forward(model, self.rep, self.rec, grad=True, logits=False)
            self._tape = _Tape(run, z, attn_in)
        return self._tape

    def push(self, tangents: dict[int, torch.Tensor], what: str) -> list[torch.Tensor | None]:
        """Forward-mode products of the frozen model over the whole prompt: writes {point: [B, 1, P, D]} (a batch
        of B changes at the write points, see `point`) -> per layer their change of the attention input (what =
        "attn_in": [B, 1, P, D]) or of the pattern-weighted values (what = "z": [B, 1, P, heads, d_head]); None
        where none reaches.

        The frozen model is linear, so these are Jacobian-vector products. They come from differentiating a backward
        pass (a vector-Jacobian product is linear in its cotangent u; its derivative in u along a write is that
        write's push-forward), kept once per prompt and batched over B: a pass through the frozen model's linear
        paths only, not the real MLPs the replacement discards."""
        if what not in ("attn_in", "z"):
            raise InputError(f"what must be 'attn_in' or 'z', got {what!r}")
        if self._dual is None:
            tape, n = self.tape(), self.model.cfg.n_layers
            outs = {"attn_in": [tape.attn_in[l] for l in range(n)], "z": [tape.z[l] for l in range(n)]}
            u = {k: [torch.zeros_like(x, requires_grad=True) for x in v] for k, v in outs.items()}
            ids = [-1] + list(range(n))
            with torch.enable_grad():
                back = torch.autograd.grad(outs["attn_in"] + outs["z"], [self.point(tape, p) for p in ids],
                                           grad_outputs=u["attn_in"] + u["z"], create_graph=True, allow_unused=True)
            live = [(p, b) for p, b in zip(ids, back) if b is not None and b.requires_grad]
            self._dual = ([p for p, _ in live], [b for _, b in live], u)
        ids, back, u = self._dual
        batch = next(iter(tangents.values())).shape[0]
        grad_out = [tangents[p].to(b.dtype) if p in tangents else
                    torch.zeros(batch, *b.shape, dtype=b.dtype, device=b.device) for p, b in zip(ids, back)]
        return list(torch.autograd.grad(back, u[what], grad_outputs=grad_out, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True))

    def source_parts(self, sources: list[int]) -> list[list[torch.Tensor | None]]:
        """Per source node, its part of every layer's pattern-weighted values z ([P, heads, d_head], None where it
        does not reach), the sources not yet kept pushed forward in one batch (`push`); the last few are kept."""
        kept = self._source_z
        todo = [s for s in dict.fromkeys(sources) if s not in kept]
        if todo:
            P = self.rec.n_pos
            tangents: dict[int, torch.Tensor] = {}
            for b, s in enumerate(todo):
                for p, pos, vec in self.writes(s):
                    w = tangents.setdefault(p, torch.zeros(len(todo), 1, P, vec.shape[-1], dtype=vec.dtype,
                                                           device=vec.device))
                    w[b, 0, pos] += vec
            zs = self.push(tangents, "z")
            for b, s in enumerate(todo):
                kept[s] = [None if z is None else z[b, 0] for z in zs]
        return _recent(kept, sources)

    def target_grads(self, targets: list[int]
                     ) -> list[tuple[list[torch.Tensor | None], dict[int, torch.Tensor | None]]]:
        """Per target node, the gradient of what it reads at every layer's pattern-weighted values z ([P, heads,
        d_head]) and at every write point ({point: [1, P, D]}), None where it does not depend on them; the targets not
        yet kept in one batched backward pass over the whole prompt; the last few are kept."""
        kept = self._target_grads
        todo = [t for t in dict.fromkeys(targets) if t not in kept]
        if todo:
            tape, n = self.tape(), self.model.cfg.n_layers
            reads: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # targets reading the same tensor share it
            for b, t in enumerate(todo):
                read, pos, vec, _ = self.reading(t, tape)
                _, cot = reads.setdefault(id(read), (read, torch.zeros(len(todo), *read.shape, dtype=read.dtype,
                                                                       device=read.device)))
                cot[b, 0, pos] = vec.to(read.dtype)
            ids = [-1] + list(range(n))
            grads = torch.autograd.grad([r for r, _ in reads.values()],
                                        [tape.z[l] for l in range(n)] + [self.point(tape, p) for p in ids],
                                        grad_outputs=[c for _, c in reads.values()], retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
            for b, t in enumerate(todo):
                kept[t] = ([None if gr is None else gr[b, 0] for gr in grads[:n]],
                           {p: None if gr is None else gr[b] for p, gr in zip(ids, grads[n:])})
        return _recent(kept, targets)

    def constant_attention_inputs(self) -> dict[int, torch.Tensor]:
        """Per layer [P, D]: the attention's input in the frozen model with every node set to zero, i.e. what the
        biases (transcoder b_dec, attention and norm biases, projection biases through earlier layers) put there."""
        if self._constant_in is None:
            rec, n = self.rec, self.model.cfg.n_layers
            out: dict[int, torch.Tensor] = {}
            hooks = [(f"blocks.{l}.ln1.hook_normalized", lambda x, hook: out.__setitem__(hook.layer(), x[0].detach()))
                     for l in range(n)]
            with self.model.hooks(hooks):
                frozen_forward(self.model, self.rep, rec, acts={l: torch.zeros_like(a) for l, a in rec.acts.items()},
                               errors={l: torch.zeros_like(e) for l, e in rec.errors.items()},
                               resid0=torch.zeros_like(rec.resid0), logits=False)
            self._constant_in = out
        return self._constant_in

    # ----------------------------------------------------------------- nodes
    def node(self, node: "str | int") -> int:
        """A graph node index from a node id ("3_87_4") or an index."""
        g = self.graph
        if isinstance(node, str):
            return g.index_of(node)
        if isinstance(node, bool) or not isinstance(node, int) or not 0 <= node < g.n_nodes:
            raise InputError(f"node {node!r} is not a node id or an index below {g.n_nodes}")
        return node

    def writes(self, i: int) -> list[tuple[int, int, torch.Tensor]]:
        """What source node i adds to the residual stream: [(point, pos, vector [D])], point = the layer whose MLP
        output it joins, or -1 for the embeddings (the residual stream's start)."""
        g, rec, dtype = self.graph, self.rec, self.model.dtype
        kind, pos = g.node_kind(i), g.node_pos(i)
        if kind == "feature":
            layer, _, idx = g.features[i].tolist()
            a = rec.acts[layer][pos, idx].to(dtype)
            W = self.rep.decoder(layer)  # [S, O, D]
            return [(out, pos, a * W[idx, j].to(dtype)) for j, out in enumerate(self.rep.output_layers(layer))]
        if kind == "error":
            layer = g.node_layer(i)
            return [(layer, pos, rec.errors[layer][pos])]
        if kind == "embedding":
            return [(-1, pos, rec.resid0[pos])]
        raise InputError(f"{g.node_id(i)} is a logit: it has no outgoing edges")

    def reading(self, i: int, tape: _Tape) -> tuple[torch.Tensor, int, torch.Tensor, int]:
        """Where target node i reads the residual stream in `tape`: (live tensor [1, P, D], pos, vector [D], last
        attention layer before the read)."""
        g = self.graph
        kind = g.node_kind(i)
        if kind == "feature":
            layer, pos, idx = g.features[i].tolist()
            return tape.run.inputs[layer], pos, self.rep.encoder(layer)[:, idx], layer
        if kind == "logit":
            tok = g.logit_tokens[i - g.logit_slice.start].to(self.model.device)
            u = demeaned_unembedding(self.model, tok[None])[0]
            return tape.run.final, tape.run.final.shape[1] - 1, u, self.model.cfg.n_layers - 1
        raise InputError(f"{g.node_id(i)} is a {kind} node: it has no incoming edges (targets are features or logits)")

    @staticmethod
    def point(tape: _Tape, point: int) -> torch.Tensor:
        """The live tensor a write joins: an MLP output, or the residual stream's start (point -1)."""
        return tape.run.resid0 if point < 0 else tape.run.outputs[point]

    def contract(self, grads: dict[int, torch.Tensor | None], writes: list[tuple[int, int, torch.Tensor]]
                 ) -> torch.Tensor:
        """Gradients at the write points {point: [B, 1, P, D]} dotted with the writes: [B]."""
        total: torch.Tensor | int = 0
        for point, pos, vec in writes:
            g = grads.get(point)
            if g is not None:
                total = total + g[:, 0, pos].to(vec.dtype) @ vec
        if isinstance(total, int):
            raise RuntimeError("no write point received a gradient")
        return total

    # ----------------------------------------------------------------- the split
    def edge_heads(self, source: "str | int", target: "str | int") -> EdgeHeads:
        """The edge source -> target split, for each attention layer between them, into each head's part and the
        part that bypasses the layer (they sum to the edge exactly)."""
        g, model = self.graph, self.model
        s, t = self.node(source), self.node(target)
        writes = self.writes(s)
        _, read_pos, _, last_layer = self.reading(t, self.tape())
        first_layer = min(p for p, _, _ in writes) + 1  # the first attention after the source's write
        layers = [l for l in range(max(first_layer, 0), last_layer + 1)]
        if not layers or read_pos < g.node_pos(s):
            raise InputError(f"{g.node_id(t)} does not read anything {g.node_id(s)} writes: no attention layer "
                             f"lies between them" if not layers else
                             f"{g.node_id(t)} is at position {read_pos}, before {g.node_id(s)} ({g.node_pos(s)})")
        at_z, at_points = self.target_grads([t])[0]
        G = {l: at_z[l] for l in layers}
        edge = float(self.contract({p: None if gr is None else gr[None] for p, gr in at_points.items()}, writes))
        H = model.cfg.n_heads
        contrib = torch.zeros(len(layers), H, dtype=torch.float64)
        if any(G[l] is not None for l in layers):
            # c_{l,h} = G_l . (the source's part of z_l) on head h: the part is a forward-mode product
            zs = self.source_parts([s])[0]
            for j, l in enumerate(layers):
                if G[l] is not None and zs[l] is not None:
                    contrib[j] = (G[l].double() * zs[l].double()).sum((0, 2)).cpu()
        out = EdgeHeads(g.node_id(s), g.node_id(t), g.node_label(s), g.node_label(t), edge)
        src_pos = g.node_pos(s)
        for j, l in enumerate(layers):
            pattern = self.rec.frozen[f"blocks.{l}.attn.hook_pattern"][0, :, read_pos, src_pos]
            heads = [HeadShare(h, float(contrib[j, h]), float(pattern[h])) for h in range(H)]
            heads.sort(key=lambda x: -abs(x.contribution))
            out.layers.append(LayerSplit(l, edge - float(contrib[j].sum()), heads))
        return out


def _recent(kept: dict[int, Any], keys: list[int]) -> list[Any]:
    """kept[k] for each key, those keys marked most recently used; the least recently used beyond _KEPT_NODES
    dropped."""
    out = []
    for k in keys:
        kept[k] = kept.pop(k)
        out.append(kept[k])
    while len(kept) > max(_KEPT_NODES, len(set(keys))):
        kept.pop(next(iter(kept)))
    return out


def circuits_for(graph: AttributionGraph, model: Any = None, transcoders: Any = None) -> AttentionCircuits:
    """The `AttentionCircuits` of a graph, kept on the graph for later questions. Without a model or transcoders,
    the ones the graph names are loaded."""
    from pathlib import Path

    kept = graph.__dict__.get("_attention_circuits")
    if kept is not None and (model is None or model is kept.model) and \
            (transcoders is None or transcoders is kept.transcoders):
        return kept
    if model is None:
        if not graph.model_name:
            raise InputError("the graph does not name its model: pass model=")
        from ..models.loader import load_model

        model = load_model(graph.model_name)
    if transcoders is None:
        path = Path(graph.transcoders).expanduser() if graph.transcoders else None
        if path is None or not path.exists():
            raise InputError(f"the graph names transcoders {graph.transcoders!r}, which are not a directory here: "
                             f"pass transcoders=")
        from ..dictionaries import load_dictionary

        transcoders = load_dictionary(path)
    circuits = AttentionCircuits(graph, model, transcoders)
    graph.__dict__["_attention_circuits"] = circuits
    return circuits


@dataclass
class HeadPathCheck:
    """Does the story hold? Head `head` of `layer` is made to see the prompt as if the source were absent (its
    values, pattern-weighted, from a run without the source; every other head and path sees the source), and the
    target's change is compared with the head's part of the edge."""

    source: str
    target: str
    layer: int
    head: int
    predicted: float  # the head's part of the edge (edge_heads)
    frozen: float  # minus the target's change under that patch in the frozen model (equals `predicted`)
    live: float  # the same in the real model: attention patterns, norms and MLPs respond

    def summary(self) -> str:
        return (f"head {self.layer}.{self.head} on {self.source} -> {self.target}: split {self.predicted:+.4g}, "
                f"frozen-model patch {self.frozen:+.4g}, real-model patch {self.live:+.4g}")


def head_path_check(circuits: AttentionCircuits, source: "str | int", target: "str | int", layer: int, head: int
                    ) -> HeadPathCheck:
    """Path-patch one head: replace its pattern-weighted values z (every position) by those of a run without the
    source, in the frozen model and in the real one, and read the target's change (see `HeadPathCheck`)."""
    g, model, rep, rec = circuits.graph, circuits.model, circuits.rep, circuits.rec
    s, t = circuits.node(source), circuits.node(target)
    split = circuits.edge_heads(s, t)
    parts = {ls.layer: {h.head: h.contribution for h in ls.heads} for ls in split.layers}
    if layer not in parts:
        raise InputError(f"layer {layer}'s attention is not between {g.node_id(s)} and {g.node_id(t)} "
                         f"(layers {sorted(parts)})")
    if not 0 <= head < model.cfg.n_heads:
        raise InputError(f"head must be in [0, {model.cfg.n_heads}), got {head}")
    writes = circuits.writes(s)
    kind, pos = g.node_kind(t), g.node_pos(t)
    if kind == "feature":
        tl, _, ti = g.features[t].tolist()
        read_hook, read_vec = rep.input_hook(tl), rep.encoder(tl)[:, ti].detach()
    else:
        tok = g.logit_tokens[t - g.logit_slice.start].to(model.device)
        read_hook, read_vec = "ln_final.hook_normalized", demeaned_unembedding(model, tok[None])[0]
    z_name = f"blocks.{layer}.attn.hook_z"

    def run(frozen: bool, without_source: bool, patch: torch.Tensor | None) -> tuple[float, torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}
        hooks: list[tuple[str, Any]] = [(read_hook, lambda x, hook: seen.__setitem__("read", x[0, pos])),
                                        (z_name, lambda x, hook: seen.__setitem__("z", x[0].detach().clone()))]
        if patch is not None:
            def patch_z(x: torch.Tensor, hook: Any) -> torch.Tensor:
                y = x.clone()
                y[0, :, head] = patch[:, head].to(x.dtype)
                return y

            hooks.insert(0, (z_name, patch_z))
        with torch.no_grad():
            if frozen:
                kw = _without(rec, g, s) if without_source else {}
                with model.hooks(hooks):
                    frozen_forward(model, rep, rec, logits=False, **kw)
            else:
                if without_source:
                    hooks += [(f"blocks.{p}.hook_mlp_out" if p >= 0 else "blocks.0.hook_resid_pre",
                               lambda x, hook, p=p, at=at, v=v: _subtract(x, at, v)) for p, at, v in writes]
                model.run_with_hooks(rec.tokens[None], fwd_hooks=hooks)
        return float(seen["read"].to(read_vec.dtype) @ read_vec), seen["z"]

    results = {}
    for frozen in (True, False):
        clean, _ = run(frozen, False, None)
        _, z_without = run(frozen, True, None)
        patched, _ = run(frozen, False, z_without)
        results[frozen] = clean - patched
    return HeadPathCheck(g.node_id(s), g.node_id(t), layer, head, parts[layer][head], results[True], results[False])


def _subtract(x: torch.Tensor, pos: int, vec: torch.Tensor) -> torch.Tensor:
    y = x.clone()
    y[0, pos] -= vec.to(x.dtype)
    return y


def _without(rec: Recording, g: AttributionGraph, s: int) -> dict[str, Any]:
    """frozen_forward's overrides that remove source node s."""
    kind, pos = g.node_kind(s), g.node_pos(s)
    if kind == "feature":
        layer, _, idx = g.features[s].tolist()
        a = rec.acts[layer].clone()
        a[pos, idx] = 0
        return {"acts": {layer: a}}
    if kind == "error":
        layer = g.node_layer(s)
        e = rec.errors[layer].clone()
        e[pos] = 0
        return {"errors": {layer: e}}
    r0 = rec.resid0.clone()
    r0[pos] = 0
    return {"resid0": r0}
