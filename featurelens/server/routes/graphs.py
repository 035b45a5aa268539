"""Attribution graphs: list, open, upload, subgraphs, scores, node cards, and steering from a graph's nodes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Body, HTTPException, Path as PathParam, Query, Request
from fastapi.responses import JSONResponse

from ...errors import InputError
from .. import catalog
from ..catalog import UnknownIdError
from ...attribution.files import add_to_set, slugify, json_graph_scores, read_feature_card, update_graph
from ...attribution.schema import GraphFile, GraphFormatError, check_subgraph, is_feature, validate_upload
from ..responses import dashboard_json, json_response
from ..schemas import InterveneRequest, ScoresRequest, Subgraph
from ..state import AppState, State

router = APIRouter(tags=["graphs"])


def _layer_and_feature(n: dict[str, Any]) -> tuple[int, int]:
    """(layer, feature index) of a feature node, from its id; GraphFormatError for an id of another shape."""
    from ...attribution import parse_feature_node_id

    try:
        layer, feat, _ = parse_feature_node_id(n["node_id"])
    except InputError as e:
        raise GraphFormatError(str(e)) from None
    return layer, feat


@router.get("/api/graphs", summary="Saved attribution graphs (graph-metadata.json under graphs/, and with "
                                  "`serve --db` the database's as @pg.<set>~<slug>)")
def graphs(state: State) -> JSONResponse:
    return json_response(catalog.list_graphs(state.data, state.db))


@router.get("/api/graphs/{graph}", summary="A graph's JSON (circuit-tracer / Neuronpedia format)",
            response_model=GraphFile)
def graph(state: State, graph: str = PathParam(max_length=400)) -> JSONResponse:
    _, g = state.load_graph(graph)
    g["id"] = graph
    _add_densities(state, g)
    return json_response(g)


def _add_densities(state: AppState, g: dict[str, Any]) -> None:
    """Each feature node's density over the analyzed corpus, where its transcoder layer was analyzed (for the
    explorer's density slider)."""
    analyses = state.layer_analyses_or_none(state.graph_transcoders(g))
    if not analyses:
        return
    with state.db_lock:
        dens = {layer: a.store.column("density") for layer, a in analyses.items()}
    for n in g["nodes"]:
        if not is_feature(n):
            continue
        try:
            layer, feat = _layer_and_feature(n)
        except GraphFormatError:
            continue
        col = dens.get(layer)
        if col is not None and 0 <= feat < len(col):
            n["density"] = float(col[feat])


@router.post("/api/graphs", summary="Upload a graph JSON (circuit-tracer or Neuronpedia)", status_code=201,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/GraphFile"}}}}})
def upload_graph(state: State, request: Request, body: dict[str, Any] = Body(..., include_in_schema=False)
                 ) -> JSONResponse:
    g = validate_upload(body)
    g.pop("id", None)
    if state.db is not None:  # `serve --db`: kept in the database, for everyone who serves it
        from ...store.graphs import add_graph, count_graphs

        cap = request.app.state.limits.max_uploads  # as the security middleware's cap on the data directory's
        n = count_graphs(state.db, "uploads")
        if n >= cap:
            raise HTTPException(429, f"{n} uploaded graphs are stored in the database, the most this server keeps "
                                     f"({cap}; FEATURELENS_MAX_UPLOADS)")

        slug = add_graph(state.db, "uploads", g, slugify(g["metadata"].get("slug") or g["metadata"].get("prompt", "")))
        gid = f"{catalog.PG_PREFIX}uploads~{slug}"
    else:
        slug = add_to_set(catalog.graphs_root(state.data) / "uploads", g)
        gid = f"uploads~{slug}"
    return json_response({"id": gid, "slug": slug, "nodes": len(g["nodes"]), "links": len(g["links"])}, 201)


@router.put("/api/graphs/{graph}/subgraphs",
            summary="Save a subgraph (pins, supernodes, labels) into the graph file; replaces one of the same name")
def save_subgraph(state: State, body: Subgraph, graph: str = PathParam(max_length=400)) -> JSONResponse:
    with state.graph_lock:
        f, g = state.load_graph(graph)
        ids = {n["node_id"] for n in g["nodes"]}
        sg = check_subgraph(body.model_dump(), ids)
        subs = [s for s in g.get("subgraphs", []) if s.get("name") != sg["name"]] + [sg]
        g["subgraphs"] = subs
        g["qParams"].update(pinnedIds=sg["pinnedIds"], supernodes=sg["supernodes"], clickedId=sg["clickedId"])
        key = catalog.pg_graph_key(graph)
        if key is not None and state.db is not None:
            from ...store.graphs import put_graph

            # read, change, write back whole: of two servers saving subgraphs of one graph at once, the later wins
            put_graph(state.db, *key, json.dumps(g).encode("utf-8"))
        else:
            update_graph(f, g)
    return json_response({"graph": graph, "subgraphs": subs})


@router.post("/api/graphs/{graph}/scores",
             summary="Replacement and completeness scores of the graph, and of the pinned subgraph when given")
def scores(state: State, body: ScoresRequest, graph: str = PathParam(max_length=400)) -> JSONResponse:
    _, g = state.load_graph(graph)
    out: dict[str, Any] = {"graph": json_graph_scores(g)}
    if body.pinnedIds is not None:
        ids = {n["node_id"] for n in g["nodes"]}
        bad = [p for p in body.pinnedIds if p not in ids]
        if bad:
            raise GraphFormatError(f"pinnedIds: not nodes of this graph: {bad[:5]}")
        out["subgraph"] = json_graph_scores(g, body.pinnedIds)
    info = g["metadata"].get("info") if isinstance(g["metadata"].get("info"), dict) else {}
    fl_info = info.get("featurelens") if isinstance(info.get("featurelens"), dict) else {}
    stored = fl_info.get("scores") or info.get("scores")
    if isinstance(stored, dict):
        out["unpruned"] = stored
    return json_response(out)


@router.get("/api/graphs/{graph}/nodes/{node}",
            summary="A node's feature card: the node, its inputs and outputs, and its feature's dashboard if known")
def node_card(state: State, graph: str = PathParam(max_length=400), node: str = PathParam(max_length=200),
              limit: int = Query(20, ge=1, le=200)) -> JSONResponse:
    f, g = state.load_graph(graph)
    by_id = {n["node_id"]: n for n in g["nodes"]}
    if node not in by_id:
        raise UnknownIdError(f"node {node!r} is not in graph {graph!r}")
    n = by_id[node]
    ins = sorted((e for e in g["links"] if e["target"] == node), key=lambda e: -abs(e["weight"]))[:limit]
    outs = sorted((e for e in g["links"] if e["source"] == node), key=lambda e: -abs(e["weight"]))[:limit]
    card = {"node": n, "inputs": [{"node": by_id[e["source"]], "weight": e["weight"]} for e in ins],
            "outputs": [{"node": by_id[e["target"]], "weight": e["weight"]} for e in outs],
            "feature_card": _feature_card(state, f, g, n)}
    return json_response(card)


def _feature_card(state: AppState, f: Path | None, g: dict[str, Any], n: dict[str, Any]) -> dict[str, Any] | None:
    """The feature's card: the dashboard of its transcoder layer when that layer was analyzed, else the feature
    JSON the graph writer saved beside the graph (where its metadata.scan points)."""
    if not is_feature(n):
        return None
    try:
        layer, feat = _layer_and_feature(n)
    except GraphFormatError:
        layer, feat = None, None
    tid = state.graph_transcoders(g)
    if tid is not None and layer is not None:
        a = state.layer_analyses_or_none(tid).get(layer)
        if a is not None and 0 <= feat < a.n_features:  # type: ignore[operator]
            with state.db_lock:
                return {"source": "analysis", **dashboard_json(a.feature(feat), f"{tid}~layer_{layer}")}
    if f is None:  # a database graph has no feature-card files beside it
        return None
    card = read_feature_card(f, g["metadata"]["scan"], n["feature"], root=state.data)
    return None if card is None else {"source": "graph", **card}


@router.post("/api/graphs/{graph}/intervene",
             summary="Steer from the graph: set or ablate feature nodes; next-token probabilities with attention "
                     "frozen and live, and the continuation, beside the original")
def intervene(state: State, body: InterveneRequest, graph: str = PathParam(max_length=400)) -> JSONResponse:
    from ...attribution import feature_intervention

    rt = state.runtime
    _, g = state.load_graph(graph)
    by_id = {n["node_id"]: n for n in g["nodes"]}
    specs = []
    for it in body.interventions:
        n = by_id.get(it.node_id)
        if n is None:
            raise UnknownIdError(f"node {it.node_id!r} is not in graph {graph!r}")
        if not is_feature(n):
            raise GraphFormatError(f"node {it.node_id!r} is a {n['feature_type']} node; only features can be "
                                   f"set or ablated")
        layer, feat = _layer_and_feature(n)
        specs.append((layer, int(n["ctx_idx"]), feat, float(it.value or 0.0)))
    tid = body.transcoders or state.graph_transcoders(g)
    if tid is None:
        raise GraphFormatError("this graph does not say which transcoders made it; pass \"transcoders\" (a "
                               "dictionary id from GET /api/dictionaries)")
    tcs = rt.dictionary(tid)
    model = rt.model(state.find_dictionary(tid)["model"] or g["metadata"].get("scan", ""))
    prompt = g["metadata"]["prompt"]
    out: dict[str, Any] = {"prompt": prompt, "interventions": [list(s) for s in specs]}
    for frozen in (True, False):
        with rt.forward_lock:
            res = feature_intervention(model, tcs, prompt, specs, freeze_attention=frozen, mode="set",
                                       top_k=body.top_k, max_new_tokens=body.max_new_tokens)
        before = res.original_logits[-1].float().softmax(-1)
        if "original" not in out:
            out["original"] = _top(model, before, body.top_k)
            out["continuation"] = {"original": res.original_generation}
        key = "frozen" if frozen else "live"
        out[key] = _top(model, res.logits[-1].float().softmax(-1), body.top_k, before)
        out["continuation"][key] = res.generation
        out["edits"] = [list(e) for e in res.edits]
    return json_response(out)


def _top(model: Any, probs: Any, k: int, ref: Any = None) -> list[dict[str, Any]]:
    p, i = probs.topk(k)
    return [{"token": model.to_string([int(t)]), "id": int(t), "prob": float(v),
             **({"original_prob": float(ref[int(t)])} if ref is not None else {})} for v, t in zip(p, i)]
