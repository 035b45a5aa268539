"""Graph files in circuit-tracer's / Neuronpedia's JSON schema, and feature cards in circuit-tracer's feature schema.

A graph directory holds:

* `<slug>.json`: {"metadata", "qParams", "nodes", "links"} as circuit-tracer's `frontend/graph_models.py` defines
  them. Feature nodes `{layer}_{feature}_{pos}` with the Cantor pairing of (layer, feature) as `feature`; embeddings
  `E_{token}_{pos}`; logits `{n_layers+1}_{token}_{pos}` with clerp `Output "tok" (p=0.123)`.
  Error nodes are `{layer}_-1_{pos}` (feature -1, feature_type "mlp reconstruction error"), the form current
  circuit-tracer writes: the older `0_{layer}_{pos}` collides with the layer-0 feature number `layer` at `pos`.
  Readers (ours, circuit-tracer's viewer, Neuronpedia) tell node kinds by `feature_type`, not by parsing the id;
  `load_graph` reads both error-id forms.
* `graph-metadata.json`: {"graphs": [metadata, ...]}, one entry per slug (replaced atomically on each save).
* `features/<scan>/<feature>.json`: one card per feature node (examples by quantile, top/bottom logits, histogram,
  activation frequency): circuit-tracer's viewer fetches them there for a graph whose `metadata.scan` is `<scan>`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..engine.errors import FeaturelensError, InputError
from ..io import atomic_write_json
from .graph import AttributionGraph, cantor

SCHEMA_VERSION = 1
METADATA_FILE = "graph-metadata.json"
FEATURE_TYPE = "cross layer transcoder"
ERROR_TYPE = "mlp reconstruction error"


class GraphFileError(FeaturelensError, ValueError):
    """A graph file that is missing, not JSON, or not in circuit-tracer's schema."""


def slugify(text: str, max_len: int = 60) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_len].strip("-")
    return s or "graph"


def process_token(tok: str) -> str:
    """Control characters as circuit-tracer's viewer shows them."""
    return tok.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def _node(node_id: str, feature: int, layer: str, pos: int, ftype: str, js: str, *, clerp: str = "",
          influence: float | None = None, activation: float | None = None, token_prob: float = 0.0,
          target: bool = False) -> dict[str, Any]:
    return {"node_id": node_id, "feature": int(feature), "layer": layer, "ctx_idx": int(pos), "feature_type": ftype,
            "token_prob": float(token_prob), "is_target_logit": bool(target), "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js, "clerp": clerp, "influence": influence, "activation": activation}


def graph_json(g: AttributionGraph, slug: str, scan: str) -> dict[str, Any]:
    """The graph as circuit-tracer's `Model` (metadata, qParams, nodes, links)."""
    kept = g.kept()
    cum = g.cumulative
    nodes: list[dict[str, Any]] = []
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
    links = [{"source": ids[s], "target": ids[t], "weight": float(w)}
             for (t, s), w in zip(g.edges.T.tolist(), g.weights.tolist())]
    scores = g.scores
    metadata = {
        "slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": [process_token(t) for t in g.token_strs],
        "prompt": g.prompt, "node_threshold": g.node_threshold, "schema_version": SCHEMA_VERSION,
        "info": {
            "creator_name": "featurelens", "generator": {"name": "featurelens", "version": _version(), "url": ""},
            "featurelens": {
                "model": g.model_name, "transcoders": g.transcoders, "n_layers": g.n_layers, "tokens": g.tokens,
                "bos_zeroed": g.bos, "edge_threshold": g.edge_threshold, "scores": scores,
                "error_node_id": "{layer}_-1_{pos}", **{k: v for k, v in g.info.items() if _jsonable(v)},
            },
        },
    }
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": nodes, "links": links}


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
               transcoders: Any = None, analyses: dict[int, Any] | None = None, cards: bool = True) -> Path:
    """Write `<slug>.json`, update `graph-metadata.json`, and (with `cards`) write feature cards.

    An unpruned graph is pruned first with node_threshold / edge_threshold. `model` and `transcoders` give the
    cards top/bottom logits from the decoder; `analyses` ({layer: DictionaryAnalysis}) gives them examples,
    histograms, frequency and labels (used as each node's clerp). Returns the graph file's path.
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
    scan = scan or slugify(f"{g.model_name}-{Path(str(g.transcoders)).name}")
    data = graph_json(g, slug, scan)
    path = atomic_write_json(directory / f"{slug}.json", data, indent=None)
    update_metadata(directory, data["metadata"])
    if cards:
        write_feature_cards(g, directory / "features" / scan, model=model, transcoders=transcoders, analyses=analyses,
                            scan=scan)
    return path


def update_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """Replace (or add) this slug's entry in graph-metadata.json, atomically."""
    path = directory / METADATA_FILE
    graphs: list[dict[str, Any]] = []
    if path.exists():
        try:
            graphs = json.loads(path.read_text())["graphs"]
        except (ValueError, KeyError, TypeError) as e:
            raise GraphFileError(f"{path} is not a graph list ({e}); move it away to start a new one") from None
    graphs = [m for m in graphs if m.get("slug") != metadata["slug"]] + [metadata]
    atomic_write_json(path, {"graphs": graphs})


# --------------------------------------------------------------------------------------------- feature cards


def write_feature_cards(g: AttributionGraph, directory: Path, *, model: Any = None, transcoders: Any = None,
                        analyses: dict[int, Any] | None = None, scan: str = "", n_logits: int = 10) -> int:
    """One circuit-tracer feature JSON per feature node of `g`; returns how many were written."""
    directory.mkdir(parents=True, exist_ok=True)
    rep = transcoders if model is not None else None  # a `Transcoders`: their decoders give the cards' logits
    written = 0
    for layer, idx in sorted({(int(l), int(f)) for l, _, f in g.features.tolist()}):
        fid = cantor(layer, idx)
        a = (analyses or {}).get(layer)
        if a is None and rep is None and (directory / f"{fid}.json").exists():
            continue  # never replace a card with one that knows less
        card: dict[str, Any] = {
            "transcoder_id": f"{scan}/{layer}", "index": fid, "examples_quantiles": [], "top_logits": [],
            "bottom_logits": [], "act_min": 0.0, "act_max": 0.0, "quantile_values": [], "histogram": [],
            "activation_frequency": 0.0,
        }
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
        raise GraphFileError(f"{path}: no such graph file")
    try:
        data = json.loads(path.read_text())
        meta, raw_nodes, links = data["metadata"], data["nodes"], data["links"]
    except (ValueError, KeyError, TypeError) as e:
        raise GraphFileError(f"{path}: not a circuit-tracer graph file ({e})") from None
    info = (meta.get("info") or {}).get("featurelens", {}) if isinstance(meta.get("info"), dict) else {}
    prompt_tokens = list(meta.get("prompt_tokens", []))
    P = len(prompt_tokens)
    feats, acts, labels_by_key, cum = [], {}, {}, {}
    errors, embeds, logits = {}, {}, []
    for nd in raw_nodes:
        ftype, nid, pos = nd["feature_type"], nd["node_id"], int(nd["ctx_idx"])
        if ftype == FEATURE_TYPE:
            layer, idx, _ = (int(x) for x in nid.split("_"))
            feats.append((layer, pos, idx))
            acts[(layer, pos, idx)] = float(nd.get("activation") or 0.0)
            if nd.get("clerp"):
                labels_by_key[(layer, pos, idx)] = nd["clerp"]
            cum[("f", layer, pos, idx)] = nd.get("influence")
        elif ftype == ERROR_TYPE or "error" in ftype:
            errors[(int(nd["layer"]), pos)] = nd.get("influence")
        elif ftype == "embedding":
            embeds[pos] = (int(nid.split("_")[1]), nd.get("influence"))
        elif ftype == "logit":
            m = re.match(r'Output "(.*)" \(p=', nd.get("clerp", ""), re.S)
            logits.append((int(nd["feature"]), float(nd.get("token_prob", 0.0)), m.group(1) if m else "",
                           bool(nd.get("is_target_logit")), int(nd["layer"])))
        else:
            raise GraphFileError(f"{path}: node {nid!r} has an unknown feature_type {ftype!r}")
    if not logits:
        raise GraphFileError(f"{path}: the graph has no logit nodes")
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
        if nd["feature_type"] == ERROR_TYPE or "error" in nd["feature_type"]:
            index[nd["node_id"]] = g.error_index(int(nd["layer"]), int(nd["ctx_idx"]))
        elif nd["feature_type"] == "embedding":
            index[nd["node_id"]] = g.token_slice.start + int(nd["ctx_idx"])
    try:
        pairs = [(index[l["target"]], index[l["source"]], float(l["weight"])) for l in links]
    except KeyError as e:
        raise GraphFileError(f"{path}: a link refers to node {e.args[0]!r}, which is not in the file") from None
    if pairs:
        t, s, w = zip(*pairs)
        g.edges = torch.tensor([t, s], dtype=torch.long)
        g.weights = torch.tensor(w, dtype=torch.float32)
    if "scores" in info:
        g._scores = dict(info["scores"])
    return g
