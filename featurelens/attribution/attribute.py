"""`attribute`: the attribution graph of a prompt, computed with batched backward passes through the frozen model.

The frozen replacement model (see `replacement.py`) is run once, at batch size 1. Each target node (a logit, or an
active feature's pre-activation) is a vector injected as the gradient at one point (the unembedding input at the
last position, or the feature's encoder vector at its transcoder input); a batch of targets is one backward pass
with `is_grads_batched` (vmap over the backward graph), so the forward pass is never repeated per target. The
gradient at each layer's MLP output is then contracted with the activation-scaled decoder vectors of the features
writing there, with the error vectors, and the gradient at the residual stream's start with the embeddings: one
row of A per target.

Logit rows come first; feature rows are admitted in order of their (partial) influence on the logits, re-ranked
as rows arrive, up to `max_feature_nodes`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import torch

from ..engine.errors import InputError
from ..progress import OnProgress, ProgressBar
from .graph import AttributionGraph
from .replacement import check_transcoders, demeaned_unembedding, frozen_forward, record
from .sources import Sources
from .targets import parse_target

# Gradients held at once per batch: batch x positions x d_model x layers floats. Larger batches are split.
_GRAD_BUDGET_BYTES = 2 * 1024**3


def prompt_tokens(model: Any, prompt: Any) -> torch.Tensor:
    """Text or token ids -> [P] on the model's device, with the checks attribution needs."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise InputError("empty prompt: give the text to attribute")
        tokens = model.to_tokens(prompt)[0]
    else:
        tokens = torch.as_tensor(prompt, dtype=torch.long).flatten()
        if tokens.numel() == 0:
            raise InputError("empty prompt: no tokens")
        if int(tokens.min()) < 0 or int(tokens.max()) >= model.cfg.d_vocab:
            raise InputError(f"token ids must lie in [0, {model.cfg.d_vocab})")
    if tokens.numel() > model.cfg.n_ctx:
        raise InputError(f"the prompt is {tokens.numel()} tokens, longer than the model's context of {model.cfg.n_ctx}")
    return tokens.to(model.device)


def _memory_budget() -> float:
    """Bytes the edge rows may take: half of the machine's memory."""
    try:
        return 0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - platforms without sysconf
        return 8e9


def _bucket_ends(P: int, min_width: int = 48, max_buckets: int = 16) -> list[int]:
    """Prefix lengths to run backward passes on. Each prefix costs a forward pass and splits batches, which only
    pays when it saves many positions: one bucket (the whole prompt) below 2 x min_width tokens, then buckets at
    least min_width wide, at most max_buckets."""
    n = min(max_buckets, P // min_width)
    if n <= 1:
        return [P]
    return sorted({int(math.ceil(P * (i + 1) / n)) for i in range(n)})


def select_logits(logits: torch.Tensor, desired_prob: float, max_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The most likely next tokens until their cumulative probability reaches desired_prob, at most max_n."""
    probs = torch.softmax(logits.double(), -1)
    top_p, top_i = probs.topk(min(max_n, probs.numel()))
    n = int((top_p.cumsum(0) < desired_prob).sum()) + 1
    n = min(n, len(top_p))
    return top_i[:n], top_p[:n].float()


def attribute(
    model: Any,
    transcoders: Any,
    prompt: Any,
    *,
    max_feature_nodes: int | None = None,
    batch_size: int = 256,
    desired_logit_prob: float = 0.95,
    max_n_logits: int = 10,
    progress: bool = True,
    update_interval: int = 4,
    transcoders_path: str | None = None,
    on_progress: OnProgress | None = None,
    target: Any = None,
) -> AttributionGraph:
    """The attribution graph of `prompt` (text or token ids) through `transcoders` (a per-layer `TranscoderSet` or a
    cross-layer transcoder): every edge an exact direct effect in the frozen replacement model.

    >>> import featurelens as fl
    >>> model = fl.load_model("gemma-3-270m")
    >>> tc = fl.load_dictionary("~/tc")
    >>> g = fl.attribute(model, tc, "The capital of France is")
    >>> g.scores["replacement"] > 0
    True

    max_feature_nodes: feature rows to compute (None: every active feature); the rest stay as sources only and are
    left out of the graph. batch_size: target rows per backward pass. progress: a bar on stderr; on_progress: called
    with a `ProgressEvent` (stage "attribution", rows of the edge matrix done / total) after every batch of rows.
    target: what to trace (see `targets`): None for the most likely next tokens (up to desired_logit_prob of the
    probability, at most max_n_logits), a token (" Paris"), a list of tokens, or a logit difference
    ('" Paris" - " London"'); the graph's metadata records it (`info["target"]`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_feature_nodes is not None and (isinstance(max_feature_nodes, bool) or not isinstance(max_feature_nodes, int)
                                          or max_feature_nodes < 0):
        raise InputError(f"max_feature_nodes must be a non-negative integer or None, got {max_feature_nodes!r}")
    if not 0 < desired_logit_prob <= 1:
        raise InputError(f"desired_logit_prob must be in (0, 1], got {desired_logit_prob}")
    if max_n_logits < 1:
        raise InputError(f"max_n_logits must be >= 1, got {max_n_logits}")
    t0 = time.perf_counter()
    rep = check_transcoders(model, transcoders)
    tokens = prompt_tokens(model, prompt)
    chosen = None if target is None else parse_target(model, target)
    bos_id = model.cfg.bos_token_id
    skip_pos0 = bos_id is not None and int(tokens[0]) == bos_id and tokens.numel() > 1

    rec = record(model, rep, tokens)
    src = Sources(model, rep, rec, skip_pos0)
    n, P, F = model.cfg.n_layers, rec.n_pos, src.n_active
    if chosen is None:
        logit_ids, logit_probs = select_logits(rec.logits[-1], desired_logit_prob, max_n_logits)
        logit_vecs = demeaned_unembedding(model, logit_ids).to(model.dtype)  # [K, D]
        logit_strs = _decode_each(model, logit_ids.tolist())
    else:
        logit_ids = torch.tensor(chosen.tokens, device=rec.logits.device)
        # the model's probabilities weigh the logit nodes (their ratios are all that influence uses); a floor keeps
        # an unlikely target's influence from underflowing to zero
        logit_probs = torch.softmax(rec.logits[-1].double(), -1)[logit_ids].float().clamp_min(1e-30)
        logit_vecs = chosen.vectors(model).to(model.dtype)
        logit_strs = chosen.node_strs()
    K = len(logit_ids)
    n_rows = F if max_feature_nodes is None else min(max_feature_nodes, F)
    need = (K + n_rows) * src.n_cols * 4  # the dense rows of A, float32
    if need > _memory_budget():
        fit = max(0, int(_memory_budget() // (src.n_cols * 4)) - K)
        raise InputError(f"{P} tokens have {F:,} active features: {K + n_rows:,} rows of {src.n_cols:,} edges would "
                         f"take {need / 1e9:.1f} GB; pass max_feature_nodes (at most about {fit:,} fit here)")

    per_row = P * model.cfg.d_model * (n + 1) * rec.resid0.element_size() * 2
    batch = max(1, min(batch_size, _GRAD_BUDGET_BYTES // max(per_row, 1)))
    out_layers = list(range(n))
    feat_layer, feat_pos, feat_idx = src.features[:, 0], src.features[:, 1], src.features[:, 2]
    enc = {layer: rep.encoder(layer) for layer in rep.layers}
    # A target at position p depends on positions <= p only, so for long prompts its backward pass runs on the
    # frozen model of a prefix (a few buckets; each costs a forward pass); short prompts use the whole prompt.
    ends = _bucket_ends(P)
    feat_end = torch.tensor(ends)[torch.searchsorted(torch.tensor(ends), feat_pos.contiguous(), right=True)]
    runs: dict[int, tuple[Any, list[torch.Tensor]]] = {}

    def run_for(end: int) -> tuple[Any, list[torch.Tensor]]:
        if end not in runs:
            runs.clear()  # one prefix's autograd graph at a time
            r = frozen_forward(model, rep, rec.prefix(end), grad=True, logits=False)
            runs[end] = (r, [r.outputs[l] for l in out_layers] + [r.resid0])
        return runs[end]

    def backward(targets: list[tuple[str, int, int, torch.Tensor]], end: int) -> torch.Tensor:
        """targets (kind, layer, pos, vector [D]), all at positions < end -> rows [b, n_cols] on the CPU."""
        run, inputs = run_for(end)
        b = len(targets)
        by_point: dict[Any, torch.Tensor] = {}
        for row, (kind, layer, pos, vec) in enumerate(targets):
            key = "final" if kind == "logit" else layer
            if key not in by_point:
                by_point[key] = torch.zeros(b, 1, end, model.cfg.d_model, dtype=model.dtype, device=model.device)
            by_point[key][row, 0, pos] = vec.to(model.dtype)
        outputs = [run.final if k == "final" else run.inputs[k] for k in by_point]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=list(by_point.values()), retain_graph=True,
                                    allow_unused=True, is_grads_batched=True)
        g_out = {l: (None if g is None else g[:, 0]) for l, g in zip(out_layers, grads[:-1])}
        g_start = None if grads[-1] is None else grads[-1][:, 0]
        return src.rows(g_out, g_start, b).cpu()

    A = torch.zeros(K + n_rows, src.n_cols)  # rows: logits, then features in the order computed
    row_node = torch.zeros(K + n_rows, dtype=torch.long)  # column-space index of each row's node (logits: n_cols+k)
    bar = ProgressBar("attribution", K + n_rows, unit="row", show=progress, on_progress=on_progress, leave=False)
    for s in range(0, K, batch):
        ids = range(s, min(K, s + batch))
        A[s : s + len(ids)] = backward([("logit", n, P - 1, logit_vecs[k]) for k in ids], P)
        row_node[s : s + len(ids)] = torch.tensor([src.n_cols + k for k in ids])
        bar.update(len(ids))

    visited = torch.zeros(F, dtype=torch.bool)
    filled = K
    while filled < K + n_rows:
        if n_rows == F:
            pending = torch.arange(F)[~visited]
        else:
            infl = _partial_influence(A[:filled], row_node[:filled], logit_probs, src.n_cols)[:F]
            rank = torch.argsort(infl, descending=True)
            pending = rank[~visited[rank]][: min(update_interval * batch, K + n_rows - filled)]
        # group by prefix, then by layer: a batch's backward pass reaches down only as far as its highest target
        pending = pending[torch.argsort(feat_end[pending] * (n + 1) + feat_layer[pending], stable=True)]
        for end in torch.unique_consecutive(feat_end[pending]).tolist():
            group = pending[feat_end[pending] == end]
            for s in range(0, len(group), batch):
                chunk = group[s : s + batch]
                targets = [("feature", int(feat_layer[i]), int(feat_pos[i]),
                            enc[int(feat_layer[i])][:, int(feat_idx[i])]) for i in chunk]
                A[filled : filled + len(chunk)] = backward(targets, int(end))
                row_node[filled : filled + len(chunk)] = chunk
                visited[chunk] = True
                filled += len(chunk)
                bar.update(len(chunk))
    bar.close()
    runs.clear()
    t_rows = time.perf_counter()

    # Assemble: node order [selected features][errors][tokens][logits]; keep only selected feature columns.
    selected = visited.nonzero().flatten()
    n_sel = len(selected)
    col_map = torch.full((src.n_cols,), -1, dtype=torch.long)
    col_map[selected] = torch.arange(n_sel)
    col_map[F:] = torch.arange(n_sel, n_sel + src.n_cols - F)
    node_of_row = torch.where(row_node >= src.n_cols, row_node - src.n_cols + n_sel + src.n_cols - F, col_map[
        row_node.clamp(max=src.n_cols - 1)])
    cols = (col_map >= 0).nonzero().flatten()  # kept columns, already in their new order
    A = A[:, cols]  # [rows, N - K]: drops the columns of features that were never admitted
    r, c = A.nonzero(as_tuple=True)
    edges = torch.stack([node_of_row[r], c])
    weights = A[r, c].float()
    del A

    tok = model.tokenizer
    token_strs = _decode_each(model, tokens.tolist())
    graph = AttributionGraph(
        prompt=prompt if isinstance(prompt, str) else (tok.decode(tokens.tolist()) if tok is not None
                                                       else "".join(token_strs)),
        tokens=tokens.tolist(), token_strs=token_strs, n_layers=n,
        features=src.features[selected], activations=src.activations[selected],
        logit_tokens=logit_ids.cpu(), logit_probs=logit_probs.cpu(), logit_strs=logit_strs,
        edges=edges, weights=weights, model_name=getattr(model, "name", ""),
        transcoders=transcoders_path or _source_path(transcoders) or rep.describe(), bos=skip_pos0,
        info={"n_active_features": F, "n_feature_rows": n_sel, "batch_size": batch,
              "seconds": round(time.perf_counter() - t0, 3), "seconds_rows": round(t_rows - t0, 3),
              "transcoder_kind": rep.describe(), **({} if chosen is None else {"target": chosen.info()})},
    )
    return graph


def _partial_influence(rows: torch.Tensor, row_node: torch.Tensor, logit_probs: torch.Tensor, n_cols: int,
                       chunk: int = 512) -> torch.Tensor:
    """Influence on the logits of every column node, from the rows computed so far: [n_cols].

    Rows are read in chunks (|row| / row sum formed per chunk), so no normalised copy of the matrix is held.
    """
    K = len(logit_probs)
    sums = torch.cat([rows[i : i + chunk].abs().sum(1) for i in range(0, len(rows), chunk)]).clamp_min(1e-10)
    weight = torch.zeros(n_cols + K)
    weight[n_cols:] = logit_probs.float()
    total = torch.zeros(n_cols)
    for _ in range(1000):
        w = weight[row_node] / sums  # [rows]
        cur = torch.zeros(n_cols)
        for i in range(0, len(rows), chunk):
            if bool(w[i : i + chunk].any()):
                cur += w[i : i + chunk] @ rows[i : i + chunk].abs()
        if not bool(cur.any()):
            return total
        total += cur
        weight = torch.cat([cur, torch.zeros(K)])
    raise RuntimeError("influence did not converge")


def _decode_each(model: Any, ids: list[int]) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{i}>" for i in ids]
    return [tok.decode([i]) for i in ids]


def _source_path(transcoders: Any) -> str | None:
    src = getattr(transcoders, "source", None) or getattr(getattr(transcoders, "cfg", None), "source", None)
    if src is None:
        for tc in (transcoders.values() if hasattr(transcoders, "values") else []):
            s = getattr(tc, "source", None)
            if s is not None:
                from pathlib import Path

                return str(Path(s).parent)
        return None
    return str(src)
