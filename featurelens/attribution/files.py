"""Graph files in circuit-tracer's / Neuronpedia's JSON schema (`schema.py`), and feature cards in circuit-tracer's
feature schema.

A graph directory (a "graph set") holds:

* `<slug>.json`: {"metadata", "qParams", "nodes", "links"} as `schema.GraphFile` (circuit-tracer's
  `frontend/graph_models.py`). Feature nodes `{layer}_{feature}_{pos}` with the Cantor pairing of (layer, feature) as
  `feature`; embeddings `E_{token}_{pos}`; logits `{n_layers+1}_{token}_{pos}` with clerp `Output "tok" (p=0.123)`.
  Error nodes are `{layer}_-1_{pos}` (feature -1, feature_type "mlp reconstruction error"), the form current
  circuit-tracer writes: the older `0_{layer}_{pos}` collides with the layer-0 feature number `layer` at `pos`.
  Readers (ours, circuit-tracer's viewer, Neuronpedia) tell node kinds by `feature_type` (`schema.node_kind`), not
  by parsing the id; `load_graph` reads both error-id forms.
* `graph-metadata.json`: {"graphs": [metadata, ...]}, one entry per slug. A graph file and its entry are written
  together under one lock per set (a thread lock and an OS file lock on `.graph-set.lock`), so concurrent writers,
  threads or processes, never lose a graph; a fresh slug is picked inside the same lock.
* `features/<name>/<feature>.json`: one card per feature node (examples by quantile, top/bottom logits, histogram,
  activation frequency), with `metadata.scan` = "./features/<name>": circuit-tracer's viewer fetches
  `${scan}/${feature}.json` for a scan that starts with "./". Files written before this layout have a bare
  `scan` = "<name>" with the cards in the same place; `read_feature_card` reads both.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
from pathlib import Path
from typing import Any, Iterator

import torch

from ..engine.errors import FeaturelensError, InputError
from ..io import atomic_write_json
from .graph import AttributionGraph, cantor, graph_scores
from .schema import (ERROR_TYPE, FEATURE_TYPE, SCHEMA_VERSION, FeatureCard, GraphFile, GraphFormatError, Link,
                     Metadata, Node, QParams, check_scan, node_kind, scan_dir, scan_for, validate_graph)

METADATA_FILE = "graph-metadata.json"
LOCK_FILE = ".graph-set.lock"

# The one error class for graph files; this name is kept for code written against earlier releases.
GraphFileError = GraphFormatError


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug: lower-case letters, digits and dashes ("graph" when nothing is left)."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return s or "graph"


def process_token(tok: str) -> str:
    """Control characters as circuit-tracer's viewer shows them."""
    return tok.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _node(node_id: str, feature: int, layer: str, pos: int, ftype: str, js: str, *, clerp: str = "",
          influence: float | None = None, activation: float | None = None, token_prob: float = 0.0,
          target: bool = False) -> Node:
    return Node(node_id=node_id, feature=int(feature), layer=layer, ctx_idx=int(pos), feature_type=ftype,
                token_prob=float(token_prob), is_target_logit=bool(target), run_idx=0, reverse_ctx_idx=0, jsNodeId=js,
                clerp=clerp, influence=influence, activation=activation)


def graph_json(g: AttributionGraph, slug: str, scan: str) -> GraphFile:
    """The graph as circuit-tracer's `Model` (metadata, qParams, nodes, links); `scan` as written into metadata."""
    kept = g.kept()
    cum = g.cumulative
    nodes: list[Node] = []
    for i in range(g.n_nodes):
        if not bool(kept[i]):
            continue
        kind, pos = g.node_kind(i), g.node_pos(i)
        infl = None if cum is None else float(cum[i])
        if kind == "feature":
            layer, _, idx = g.features[i].tolist()
            nodes.append(_node(g.node_id(i), cantor(layer, idx), str(layer), pos, FEATURE_TYPE, f"{layer}_{idx}-0",
                               clerp=g.labels.get(i, ""), influence=infl, activation=float(g.activations[i])))
        elif kind == "error":
            layer = g.node_layer(i)
            nodes.append(_node(g.node_id(i), -1, str(layer), pos, ERROR_TYPE, f"{layer}_{pos}-0", influence=infl))
        elif kind == "embedding":
            nodes.append(_node(g.node_id(i), pos, "E", pos, "embedding", f"E_{g.tokens[pos]}-{pos}", influence=infl))
        else:
            k = i - g.logit_slice.start
            tok, p = int(g.logit_tokens[k]), float(g.logit_probs[k])
            nodes.append(_node(g.node_id(i), tok, str(g.n_layers + 1), pos, "logit", f"L_{tok}-{pos}",
                               clerp=f'Output "{process_token(g.logit_strs[k])}" (p={p:.3f})', token_prob=p,
                               target=k == 0))
    ids = g.node_ids()
    links = [Link(source=ids[s], target=ids[t], weight=float(w))
             for (t, s), w in zip(g.edges.T.tolist(), g.weights.tolist())]
    scores = {k: None if math.isnan(v) else v for k, v in g.scores.items()}  # JSON has no NaN: undefined is null
    metadata = Metadata(slug=slug, scan=scan, transcoder_list=[], prompt=g.prompt, node_threshold=g.node_threshold,
                        prompt_tokens=[process_token(t) for t in g.token_strs], schema_version=SCHEMA_VERSION)
    metadata["info"] = {  # type: ignore[typeddict-unknown-key]  (an extra field: circuit-tracer's viewer ignores it)
        "creator_name": "featurelens", "generator": {"name": "featurelens", "version": _version(), "url": ""},
        "featurelens": {
            "model": g.model_name, "transcoders": g.transcoders, "n_layers": g.n_layers, "tokens": g.tokens,
            "bos_zeroed": g.bos, "edge_threshold": g.edge_threshold, "scores": scores,
            "error_node_id": "{layer}_-1_{pos}", **{k: v for k, v in g.info.items() if _jsonable(v)},
        },
    }
    qparams = QParams(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos="")
    return GraphFile(metadata=metadata, qParams=qparams, nodes=nodes, links=links)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _version() -> str:
    try:
        from ..version import __version__

        return __version__
    except ImportError:  # pragma: no cover - partial installs
        return ""


def save_graph(g: AttributionGraph, directory: str | Path, slug: str | None = None, *, scan: str | None = None,
               node_threshold: float = 0.8, edge_threshold: float = 0.98, model: Any = None,
               transcoders: Any = None, analyses: dict[int, Any] | None = None, cards: bool = True,
               unique: bool = False) -> Path:
    """Write `<slug>.json`, list it in `graph-metadata.json`, and (with `cards`) write feature cards.

    An unpruned graph is pruned first with node_threshold / edge_threshold. `scan` names the feature cards'
    directory (`features/<scan>/`; default from the model and transcoders); `metadata.scan` is then
    "./features/<scan>". A graph of the same slug is replaced, unless `unique`, which picks the first free
    `<slug>`, `<slug>-2`, ... (inside the set's lock, so concurrent writers never share one). `model` and
    `transcoders` give the cards top/bottom logits from the decoder; `analyses` ({layer: DictionaryAnalysis}) gives
    them examples, histograms, frequency and labels (used as each node's clerp). Returns the graph file's path.
    """
    directory = Path(directory).expanduser()
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory} is a file; give a directory for the graph files")
    directory.mkdir(parents=True, exist_ok=True)
    slug = slugify(slug if slug is not None else g.prompt)
    if g.parent is None and g.node_mask is None:
        g = g.prune(node_threshold, edge_threshold)
    if analyses:
        for i in range(g.n_features):
            layer, _, idx = g.features[i].tolist()
            a = analyses.get(layer)
            if a is not None and i not in g.labels:
                label = a.label(idx)
                if label:
                    g.labels[i] = label
    name = _scan_name(scan) if scan else slugify(f"{g.model_name}-{Path(str(g.transcoders)).name}")
    data = graph_json(g, slug, scan_for(name))
    slug = add_to_set(directory, data, unique=unique)
    if cards:
        write_feature_cards(g, directory / scan_dir(scan_for(name)), model=model, transcoders=transcoders,
                            analyses=analyses, scan=name)
    return directory / f"{slug}.json"


def _scan_name(scan: str) -> str:
    """The cards' directory name from a `scan` argument: a name, or our "./features/<name>" form."""
    check_scan(scan, what="scan")
    rel = scan_dir(scan)
    if len(rel.parts) < 2 or rel.parts[0] != "features":
        raise InputError(f"scan {scan!r}: give a name for the feature cards' directory (features/<name>/)")
    return "/".join(rel.parts[1:])


# --------------------------------------------------------------------------------------------- graph sets
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def set_lock(directory: str | Path) -> Iterator[Path]:
    """Hold the graph set `directory`'s lock: one thread of this process at a time (a lock per directory) and one
    process at a time (an exclusive `flock` on `<directory>/.graph-set.lock`; where the OS has no flock, threads
    only)."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    key = str(directory.resolve())
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.setdefault(key, threading.Lock())
    with lock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            yield directory
            return
        with open(directory / LOCK_FILE, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield directory
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_listing(directory: Path) -> list[dict[str, Any]]:
    """The entries of `<directory>/graph-metadata.json` (none when the file does not exist)."""
    path = directory / METADATA_FILE
    if not path.exists():
        return []
    try:
        listing = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise GraphFormatError(f"{path} is not JSON ({e}); move it away to start a new list") from None
    # entries are not held to the full Metadata model: older servers listed only slug, scan, prompt and tokens
    if not isinstance(listing, dict) or not isinstance(listing.get("graphs"), list):
        raise GraphFormatError(f'{path} is not a graph list ({{"graphs": [...]}}); move it away to start a new one')
    return [m for m in listing["graphs"] if isinstance(m, dict)]


def add_to_set(directory: str | Path, graph: GraphFile | dict[str, Any], slug: str | None = None, *,
               unique: bool = True) -> str:
    """Store `graph` as `<directory>/<slug>.json` and list its metadata in graph-metadata.json, both under the set's
    lock. The slug is `slug`, else the graph's own, else one from its prompt; `unique` picks the first free
    `<slug>`, `<slug>-2`, ... (else a graph of the same slug is replaced). Sets `metadata.slug`; returns the slug."""
    directory = Path(directory).expanduser()
    meta = graph["metadata"]
    base = slugify(slug or meta.get("slug") or meta.get("prompt", ""))
    with set_lock(directory):
        graphs = read_listing(directory)
        s = base
        if unique:
            taken = {m.get("slug") for m in graphs} | {p.stem for p in directory.glob("*.json")}
            i = 2
            while s in taken:
                s, i = f"{base}-{i}", i + 1
        meta["slug"] = s
        atomic_write_json(directory / f"{s}.json", graph, indent=None)
        graphs = [m for m in graphs if m.get("slug") != s] + [dict(meta)]
        atomic_write_json(directory / METADATA_FILE, {"graphs": graphs})
    return s


def update_graph(path: str | Path, graph: GraphFile | dict[str, Any]) -> None:
    """Rewrite a listed graph file (a saved subgraph, more metadata) under its set's lock, its listing entry too."""
    path = Path(path)
    with set_lock(path.parent):
        atomic_write_json(path, graph, indent=None)
        graphs = read_listing(path.parent)
        slug = path.stem
        if any(m.get("slug") == slug for m in graphs):
            graphs = [dict(graph["metadata"], slug=slug) if m.get("slug") == slug else m for m in graphs]
            atomic_write_json(path.parent / METADATA_FILE, {"graphs": graphs})


# --------------------------------------------------------------------------------------------- feature cards


def write_feature_cards(g: AttributionGraph, directory: Path, *, model: Any = None, transcoders: Any = None,
                        analyses: dict[int, Any] | None = None, scan: str = "", n_logits: int = 10) -> int:
    """One circuit-tracer feature JSON per feature node of `g` into `directory`; `scan` is the cards' name (their
    `transcoder_id` is `<scan>/<layer>`). Returns how many were written."""
    directory.mkdir(parents=True, exist_ok=True)
    rep = transcoders if model is not None else None  # a `Transcoders`: their decoders give the cards' logits
    written = 0
    for layer, idx in sorted({(int(l), int(f)) for l, _, f in g.features.tolist()}):
        fid = cantor(layer, idx)
        a = (analyses or {}).get(layer)
        if a is None and rep is None and (directory / f"{fid}.json").exists():
            continue  # never replace a card with one that knows less
        card = FeatureCard(transcoder_id=f"{scan}/{layer}", index=fid, examples_quantiles=[], top_logits=[],
                           bottom_logits=[], act_min=0.0, act_max=0.0, quantile_values=[], histogram=[],
                           activation_frequency=0.0)
        dash = None
        if a is not None:
            try:
                dash = a.feature(idx)
            except FeaturelensError:
                dash = None
        if dash is not None:
            card.update(_card_from_dashboard(dash))
        elif rep is not None:
            up, down = decoder_logits(model, rep, layer, idx, n_logits)
            card["top_logits"], card["bottom_logits"] = up, down
        atomic_write_json(directory / f"{fid}.json", card, indent=None)
        written += 1
    return written


@torch.no_grad()
def decoder_logits(model: Any, rep: Any, layer: int, idx: int, n: int = 10) -> tuple[list[str], list[str]]:
    """The tokens a feature's decoder (summed over its output layers) promotes and suppresses most, direct path."""
    w = rep.decoder(layer)[idx].sum(0).to(model.W_U.dtype)  # [D]
    logits = w @ model.W_U  # [V]
    tok = model.tokenizer

    def s(i: int) -> str:
        return process_token(tok.decode([i])) if tok is not None else f"<{i}>"

    return [s(i) for i in logits.topk(n).indices.tolist()], [s(i) for i in (-logits).topk(n).indices.tolist()]


def _card_from_dashboard(d: Any) -> dict[str, Any]:
    def example(e: Any) -> dict[str, Any]:
        return {"tokens_acts_list": [float(x) for x in e.acts], "train_token_ind": int(e.index),
                "is_repeated_datapoint": False, "tokens": [process_token(t) for t in e.tokens]}

    quantiles = [{"quantile_name": "Top activations", "examples": [example(e) for e in d.top_examples]}]
    bins = sorted({e.bin for e in d.quantile_examples if e.bin is not None}, reverse=True)
    qvals = []
    for b in bins:
        exs = [e for e in d.quantile_examples if e.bin == b]
        quantiles.append({"quantile_name": f"Quantile {b + 1}", "examples": [example(e) for e in exs]})
        qvals.append(float(min(e.act for e in exs)))
    edges = list(d.hist_edges)
    return {
        "examples_quantiles": quantiles, "top_logits": [process_token(s) for s, _, _ in d.logit_up],
        "bottom_logits": [process_token(s) for s, _, _ in d.logit_down],
        "act_min": float(edges[0]) if edges else 0.0, "act_max": float(d.max_act), "quantile_values": qvals,
        "histogram": [float(c) for c in d.hist_counts], "activation_frequency": float(d.density),
    }


# --------------------------------------------------------------------------------------------- reading


def load_graph(path: str | Path) -> AttributionGraph:
    """Read a graph JSON written by featurelens or by circuit-tracer (either error-id form)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise GraphFormatError(f"{path}: no such graph file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise GraphFormatError(f"{path}: not a circuit-tracer graph file (not JSON: {e})") from None
    validate_graph(data, fill_defaults=True, what=str(path))
    meta, raw_nodes, links = data["metadata"], data["nodes"], data["links"]
    info = (meta.get("info") or {}).get("featurelens", {}) if isinstance(meta.get("info"), dict) else {}
    prompt_tokens = list(meta.get("prompt_tokens", []))
    P = len(prompt_tokens)
    feats, acts, labels_by_key, cum = [], {}, {}, {}
    errors, embeds, logits = {}, {}, []
    for nd in raw_nodes:
        ftype, nid, pos = nd["feature_type"], nd["node_id"], int(nd["ctx_idx"])
        kind = node_kind(ftype)
        if kind == "feature":
            try:
                layer, idx, _ = (int(x) for x in nid.split("_"))
            except ValueError:
                raise GraphFormatError(f"{path}: feature node {nid!r} is not <layer>_<feature>_<position>") from None
            feats.append((layer, pos, idx))
            acts[(layer, pos, idx)] = float(nd.get("activation") or 0.0)
            if nd.get("clerp"):
                labels_by_key[(layer, pos, idx)] = nd["clerp"]
            cum[("f", layer, pos, idx)] = nd.get("influence")
        elif kind == "error":
            errors[(int(nd["layer"]), pos)] = nd.get("influence")
        elif kind == "embedding":
            embeds[pos] = (int(nid.split("_")[1]), nd.get("influence"))
        else:
            m = re.match(r'Output "(.*)" \(p=', nd.get("clerp", ""), re.S)
            logits.append((int(nd["feature"]), float(nd.get("token_prob", 0.0)), m.group(1) if m else "",
                           bool(nd.get("is_target_logit")), int(nd["layer"])))
    if not logits:
        raise GraphFormatError(f"{path}: the graph has no logit nodes")
    n_layers = logits[0][4] - 1
    logits.sort(key=lambda x: (not x[3], -x[1]))
    tokens = info.get("tokens") or [embeds[p][0] if p in embeds else 0 for p in range(P)]
    feats.sort()
    F = len(feats)
    order = {f: i for i, f in enumerate(feats)}
    g = AttributionGraph(
        prompt=meta.get("prompt", ""), tokens=list(tokens), token_strs=prompt_tokens, n_layers=n_layers,
        features=torch.tensor(feats, dtype=torch.long).reshape(-1, 3),
        activations=torch.tensor([acts[f] for f in feats], dtype=torch.float32),
        logit_tokens=torch.tensor([x[0] for x in logits]), logit_probs=torch.tensor([x[1] for x in logits]),
        logit_strs=[x[2] for x in logits], edges=torch.zeros(2, 0, dtype=torch.long), weights=torch.zeros(0),
        model_name=info.get("model", ""), transcoders=info.get("transcoders", meta.get("scan", "")),
        bos=bool(info.get("bos_zeroed", True)), node_threshold=meta.get("node_threshold"),
        edge_threshold=info.get("edge_threshold"), info=dict(info),
    )
    g.labels = {order[k]: v for k, v in labels_by_key.items()}
    mask = torch.zeros(g.n_nodes, dtype=torch.bool)
    mask[:F] = True
    mask[g.token_slice] = True
    mask[g.logit_slice] = True
    cumulative = torch.zeros(g.n_nodes)
    for (layer, pos), infl in errors.items():
        i = g.error_index(layer, pos)
        mask[i] = True
        cumulative[i] = infl or 0.0
    for k, (layer, pos, idx) in enumerate(feats):
        cumulative[k] = cum.get(("f", layer, pos, idx)) or 0.0
    for pos, (_, infl) in embeds.items():
        cumulative[g.token_slice.start + pos] = infl or 0.0
    g.node_mask, g.cumulative = mask, cumulative
    # node ids -> indices: our own ids plus every form a file may use for an error node
    index = {nid: i for i, nid in enumerate(g.node_ids())}
    for nd in raw_nodes:
        if node_kind(nd) == "error":
            index[nd["node_id"]] = g.error_index(int(nd["layer"]), int(nd["ctx_idx"]))
        elif node_kind(nd) == "embedding":
            index[nd["node_id"]] = g.token_slice.start + int(nd["ctx_idx"])
    try:
        pairs = [(index[l["target"]], index[l["source"]], float(l["weight"])) for l in links]
    except KeyError as e:
        raise GraphFormatError(f"{path}: a link refers to node {e.args[0]!r}, which is not in the file") from None
    if pairs:
        t, s, w = zip(*pairs)
        g.edges = torch.tensor([t, s], dtype=torch.long)
        g.weights = torch.tensor(w, dtype=torch.float32)
    if isinstance(info.get("scores"), dict):
        g._scores = {k: math.nan if v is None else float(v) for k, v in info["scores"].items()}
    return g


# --------------------------------------------------------------------------------------------- graph JSON as it is


def read_feature_card(graph_file: str | Path, scan: str, feature: int, root: str | Path | None = None
                      ) -> dict[str, Any] | None:
    """The feature card a graph file's `scan` points at (`./features/<name>/<feature>.json` beside the graph, or
    `features/<scan>/<feature>.json` for files written before that form), or None when there is none here.

    Nothing outside `root` (default: the graph's directory) is ever opened: an absolute scan or one climbing out
    with ".." (circuit-tracer's "/..." scans name features its own server serves) has no cards here, and a card
    whose real path (symbolic links resolved) leaves `root` is not read."""
    graph_file = Path(graph_file)
    base = graph_file.parent
    root_dir = Path(root if root is not None else base).resolve()
    try:
        rel = scan_dir(scan)
    except GraphFormatError:
        return None
    for cand in (base / rel / f"{int(feature)}.json", base / "features" / f"{int(feature)}.json"):
        real = cand.resolve()
        if not real.is_relative_to(root_dir):
            return None
        if real.is_file():
            try:
                return json.loads(real.read_text(encoding="utf-8"))
            except ValueError:
                return None
    return None


def json_graph_scores(graph: GraphFile | dict[str, Any], pinned: list[str] | None = None) -> dict[str, float]:
    """Replacement and completeness scores (`graph.graph_scores`, circuit-tracer's definitions) of a graph file as
    stored, or of the subgraph of its `pinned` node ids, where every other feature counts as an error node (its
    inputs are no longer followed). Sparse: memory and time grow with the links, not with nodes squared.

    Logit weights are the logits' `token_prob`s (every logit alike when none has one). NaN where a score is
    undefined (no influence reaches a token or an error; no logit)."""
    nodes = graph["nodes"]
    n = len(nodes)
    idx = {nd["node_id"]: i for i, nd in enumerate(nodes)}
    kinds = [node_kind(nd) for nd in nodes]
    keep = None if pinned is None else set(pinned)
    is_error = torch.tensor([k == "error" or (keep is not None and k == "feature" and nd["node_id"] not in keep)
                             for k, nd in zip(kinds, nodes)], dtype=torch.bool)
    is_token = torch.tensor([k == "embedding" for k in kinds], dtype=torch.bool)
    is_logit = torch.tensor([k == "logit" for k in kinds], dtype=torch.bool)
    seed = torch.tensor([float(nd.get("token_prob") or 0.0) if k == "logit" else 0.0 for k, nd in zip(kinds, nodes)],
                        dtype=torch.float64)
    if not bool(seed.sum() > 0):
        seed = is_logit.double()
    if not bool(seed.sum() > 0):
        return {"replacement": math.nan, "completeness": math.nan}
    links = graph["links"]
    edges = torch.tensor([[idx[e["target"]] for e in links], [idx[e["source"]] for e in links]],
                         dtype=torch.long).reshape(2, -1)
    weights = torch.tensor([abs(float(e["weight"])) for e in links], dtype=torch.float64)
    # duplicate links between one pair of nodes add up (as magnitudes), as in one adjacency matrix
    A = torch.sparse_coo_tensor(edges, weights, (n, n), check_invariants=False).coalesce()
    try:
        return graph_scores(A.indices(), A.values(), n, seed / seed.sum(), is_error, is_token)
    except RuntimeError as e:  # influence does not die out: links form a cycle
        raise GraphFormatError(f"no scores for this graph: {e}") from None
