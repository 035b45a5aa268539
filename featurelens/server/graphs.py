"""Attribution-graph files for the circuit explorer: validation of uploads (circuit-tracer's and Neuronpedia's JSON),
storage in circuit-tracer's layout, saved subgraphs, and the replacement / completeness scores of a graph or of a
pinned subgraph.

A graph file is {"metadata", "qParams", "nodes", "links"} as circuit-tracer's `frontend/graph_models.py` describes it
(nodes carry node_id, feature, layer, ctx_idx, feature_type; links carry source, target, weight). Subgraphs the user
saves are kept in the same file under "subgraphs" (clients that do not know the key ignore it), and the last one
saved also becomes the file's qParams, which is where circuit-tracer's and Neuronpedia's viewers read a pinned view.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

MAX_NODES = 50_000
MAX_LINKS = 2_000_000
NODE_TYPES = {"embedding", "logit", "mlp reconstruction error", "cross layer transcoder", "transcoder",
              "lorsa", "lorsa error", "feature"}
ERROR_TYPES = {"mlp reconstruction error", "lorsa error"}


class GraphFormatError(InputError):
    """A graph JSON that circuit-tracer's viewer could not read either; the message names the field."""


def slugify(text: str, limit: int = 60) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return s or "graph"


def _need(obj: Any, key: str, types: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise GraphFormatError(f"{where}: missing {key!r}")
    v = obj[key]
    if not isinstance(v, types) or (isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        want = types.__name__ if isinstance(types, type) else " or ".join(t.__name__ for t in types)
        raise GraphFormatError(f"{where}: {key!r} must be {want}, got {type(v).__name__}")
    return v


def validate_graph(g: Any) -> dict[str, Any]:
    """Check every field circuit-tracer's pydantic models require (and that links join existing nodes); fill the
    optional ones with their defaults. Returns the graph; raises GraphFormatError naming the first problem."""
    if not isinstance(g, dict):
        raise GraphFormatError("a graph file is a JSON object with metadata, qParams, nodes and links")
    meta = _need(g, "metadata", dict, "graph")
    for k in ("slug", "scan", "prompt"):
        _need(meta, k, str, "metadata")
    toks = _need(meta, "prompt_tokens", list, "metadata")
    if not all(isinstance(t, str) for t in toks):
        raise GraphFormatError("metadata: prompt_tokens must be a list of strings")
    meta.setdefault("transcoder_list", [])
    if not isinstance(meta["transcoder_list"], list):
        raise GraphFormatError("metadata: transcoder_list must be a list")
    if meta.get("node_threshold") is not None and not isinstance(meta["node_threshold"], (int, float)):
        raise GraphFormatError("metadata: node_threshold must be a number")
    q = g.get("qParams")
    if q is None:
        q = g["qParams"] = {}
    if not isinstance(q, dict):
        raise GraphFormatError("qParams must be an object")
    q.setdefault("pinnedIds", [])
    q.setdefault("supernodes", [])
    q.setdefault("linkType", "both")
    q.setdefault("clickedId", "")
    q.setdefault("sg_pos", "")
    if not isinstance(q["pinnedIds"], list) or not all(isinstance(x, str) for x in q["pinnedIds"]):
        raise GraphFormatError("qParams: pinnedIds must be a list of node ids")
    if not isinstance(q["supernodes"], list) or not all(isinstance(s, list) and all(isinstance(x, str) for x in s)
                                                        for s in q["supernodes"]):
        raise GraphFormatError("qParams: supernodes must be a list of [label, node id, ...] lists")
    nodes = _need(g, "nodes", list, "graph")
    links = _need(g, "links", list, "graph")
    if len(nodes) > MAX_NODES or len(links) > MAX_LINKS:
        raise GraphFormatError(f"the graph has {len(nodes):,} nodes and {len(links):,} links; at most "
                               f"{MAX_NODES:,} and {MAX_LINKS:,} are shown")
    ids = set()
    for i, n in enumerate(nodes):
        where = f"nodes[{i}]"
        nid = _need(n, "node_id", str, where)
        _need(n, "feature", int, where)
        layer = _need(n, "layer", (str, int), where)
        n["layer"] = str(layer)
        _need(n, "ctx_idx", int, where)
        _need(n, "feature_type", str, where)
        n.setdefault("jsNodeId", nid)
        for k, default in (("token_prob", 0.0), ("is_target_logit", False), ("run_idx", 0), ("reverse_ctx_idx", 0),
                           ("clerp", "")):
            n.setdefault(k, default)
        for k in ("influence", "activation", "token_prob"):
            v = n.get(k)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)):
                raise GraphFormatError(f"{where}: {k} must be a finite number or null, got {v!r}")
        if nid in ids:
            raise GraphFormatError(f"{where}: node id {nid!r} appears twice")
        ids.add(nid)
    for i, e in enumerate(links):
        where = f"links[{i}]"
        s, t = _need(e, "source", str, where), _need(e, "target", str, where)
        w = _need(e, "weight", (int, float), where)
        if not math.isfinite(w):
            raise GraphFormatError(f"{where}: weight must be finite")
        if s not in ids or t not in ids:
            raise GraphFormatError(f"{where}: {'source ' + repr(s) if s not in ids else 'target ' + repr(t)} is not "
                                   f"a node of this graph")
    subs = g.get("subgraphs", [])
    if not isinstance(subs, list):
        raise GraphFormatError("subgraphs must be a list")
    for i, sg in enumerate(subs):
        check_subgraph(sg, ids, f"subgraphs[{i}]")
    return g


def check_subgraph(sg: Any, ids: set[str], where: str = "subgraph") -> dict[str, Any]:
    name = _need(sg, "name", str, where)
    if not name.strip() or len(name) > 200:
        raise GraphFormatError(f"{where}: name must be 1-200 characters")
    pinned = _need(sg, "pinnedIds", list, where)
    bad = [p for p in pinned if not isinstance(p, str) or p not in ids]
    if bad:
        raise GraphFormatError(f"{where}: pinned ids not in the graph: {bad[:5]}")
    sup = sg.setdefault("supernodes", [])
    if not isinstance(sup, list):
        raise GraphFormatError(f"{where}: supernodes must be a list of [label, node id, ...] lists")
    for s in sup:
        if not isinstance(s, list) or len(s) < 2 or not all(isinstance(x, str) for x in s):
            raise GraphFormatError(f"{where}: each supernode is [label, node id, ...]")
        missing = [x for x in s[1:] if x not in ids]
        if missing:
            raise GraphFormatError(f"{where}: supernode {s[0]!r} names nodes not in the graph: {missing[:5]}")
    sg.setdefault("clickedId", "")
    sg.setdefault("labels", {})
    if not isinstance(sg["labels"], dict):
        raise GraphFormatError(f"{where}: labels maps node id -> label")
    return sg


# ----------------------------------------------------------------------------------------------- files
def write_json_atomic(path: Path, obj: Any) -> None:
    """Write-then-rename, so a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        from ..io import atomic_write_json  # type: ignore[import-not-found]
    except ImportError:
        atomic_write_json = None
    if atomic_write_json is not None:
        atomic_write_json(path, obj)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def add_to_set(set_dir: Path, graph: dict[str, Any], slug: str | None = None) -> str:
    """Store `graph` as <set_dir>/<slug>.json and list it in graph-metadata.json; returns the slug (made unique)."""
    meta = graph["metadata"]
    base = slugify(slug or meta.get("slug") or meta.get("prompt", ""))
    listing_path = set_dir / "graph-metadata.json"
    listing = {"graphs": []}
    if listing_path.is_file():
        try:
            listing = json.loads(listing_path.read_text(encoding="utf-8"))
        except ValueError:
            listing = {"graphs": []}
    taken = {g.get("slug") for g in listing.get("graphs", []) if isinstance(g, dict)}
    taken |= {p.stem for p in set_dir.glob("*.json")}
    s, i = base, 2
    while s in taken:
        s, i = f"{base}-{i}", i + 1
    meta["slug"] = s
    write_json_atomic(set_dir / f"{s}.json", graph)
    listing.setdefault("graphs", []).append({"slug": s, "scan": meta.get("scan", ""), "prompt_tokens":
                                             meta.get("prompt_tokens", []), "prompt": meta.get("prompt", ""),
                                             "title_prefix": meta.get("title_prefix", "")})
    write_json_atomic(listing_path, listing)
    return s


# ----------------------------------------------------------------------------------------------- scores
def graph_scores(graph: dict[str, Any], pinned: list[str] | None = None) -> dict[str, float]:
    """Replacement and completeness scores (circuit-tracer's definitions) of the graph as stored, or of the subgraph
    of `pinned` features, where every unpinned feature counts as part of the error node at its place (as Neuronpedia
    does).

    With A the adjacency (row = target) with absolute, row-normalised weights and w the logit probabilities on the
    logit nodes: influence = w^T (A + A^2 + ...). Replacement = the share of the logits' influence that reaches the
    token embeddings rather than errors; completeness = the influence-weighted share of each node's input that does
    not come from errors.
    """
    nodes = graph["nodes"]
    idx = {n["node_id"]: i for i, n in enumerate(nodes)}
    n = len(nodes)
    A = np.zeros((n, n))
    for e in graph["links"]:
        A[idx[e["target"]], idx[e["source"]]] += abs(float(e["weight"]))
    rows = A.sum(1, keepdims=True)
    A = np.divide(A, rows, out=np.zeros_like(A), where=rows > 0)
    types = [x["feature_type"] for x in nodes]
    pinned_set = set(pinned) if pinned is not None else None
    is_token = np.array([t == "embedding" for t in types])
    is_logit = np.array([t == "logit" for t in types])
    is_error = np.array([t in ERROR_TYPES or (pinned_set is not None and t not in ("embedding", "logit")
                                              and x["node_id"] not in pinned_set)
                         for t, x in zip(types, nodes)])
    w = np.array([float(x.get("token_prob") or 0.0) if t == "logit" else 0.0 for t, x in zip(types, nodes)])
    if w.sum() <= 0:
        w = is_logit.astype(float)
    if w.sum() <= 0:
        return {"replacement": float("nan"), "completeness": float("nan")}
    w = w / w.sum()
    # Influence through errors stops there: an error node's inputs are not followed.
    A_follow = A.copy()
    A_follow[is_error] = 0.0
    # total = w^T (I - A)^-1 - w^T: influence of each node on the logits through any path
    total = np.linalg.solve((np.eye(n) - A_follow).T, w) - w
    tok, err = total[is_token].sum(), total[is_error].sum()
    replacement = float(tok / (tok + err)) if tok + err > 0 else float("nan")
    non_error = 1.0 - A[:, is_error].sum(1)
    has_in = A.sum(1) > 0
    out_inf = (total + w) * has_in * ~is_error
    completeness = float((non_error * out_inf).sum() / out_inf.sum()) if out_inf.sum() > 0 else float("nan")
    return {"replacement": replacement, "completeness": completeness}
