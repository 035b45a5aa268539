"""Attention circuits of a saved graph: which heads carry an edge, why a head attends where it does (a QK score as a
sum over node pairs), and the graph's attention story (`<slug>.attention.json`), computed as a background job.

Every answer comes from the frozen replacement model of the graph's prompt, built once per graph file (a recording
and one forward pass with gradients) and kept for the questions that follow (see attribution/heads.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Path as PathParam, Query
from fastapi.responses import JSONResponse

from ...attribution.schema import GraphFormatError
from ...engine.errors import MissingFileError
from .. import catalog
from ..catalog import UnknownIdError
from ..jobs import Job
from ..responses import json_response
from ..runtime import yield_lock
from ..schemas import AttentionJobRequest
from ..state import AppState, State

router = APIRouter(tags=["attention"])

KEPT_CIRCUITS = 2  # graphs whose frozen models stay loaded (each holds a recording and a few forward passes)


def _circuits(state: AppState, gid: str) -> tuple[Path, Any, str]:
    """(graph file, AttentionCircuits, transcoders' dictionary id) of a saved graph, built on first use and kept while the file is unchanged.
    The caller holds the runtime's forward lock."""
    from ...attribution import load_graph
    from ...attribution.heads import AttentionCircuits

    f, g = state.load_graph(gid)
    if f is None:
        raise GraphFormatError(f"graph {gid!r} is in the database; attention circuits are built from graph files "
                               f"(save it into <data dir>/graphs to trace its attention)")
    stamp = f.stat().st_mtime_ns
    kept = state.circuits.get(gid)
    if kept is not None and kept[0] == stamp:
        state.circuits[gid] = state.circuits.pop(gid)  # most recently used last
        return f, kept[1], kept[2]
    tid = state.graph_transcoders(g)
    if tid is None:
        raise GraphFormatError(f"graph {gid!r} does not say which transcoders made it (metadata.info.featurelens); "
                               f"attention circuits need them")
    entry = state.find_dictionary(tid)
    if entry["kind"] != "transcoders":
        raise GraphFormatError(f"graph {gid!r} names {tid!r}, a {entry['kind']}, not a set of transcoders")
    rt = state.runtime
    circuits = AttentionCircuits(load_graph(f), rt.model(entry["model"] or g["metadata"].get("scan", "")),
                                 rt.dictionary(tid))
    state.circuits[gid] = (stamp, circuits, tid)
    while len(state.circuits) > KEPT_CIRCUITS:
        state.circuits.pop(next(iter(state.circuits)))
    return f, circuits, tid


def _feature_pages(state: AppState, tid: str) -> dict[str, str]:
    """{layer: dictionary id of its feature pages} for the transcoder layers that were analyzed (the explorer links
    a feature to `#/feature/<id>/<index>`)."""
    return {str(layer): f"{tid}~layer_{layer}" for layer in state.layer_analyses_or_none(tid)}


def _node(circuits: Any, gid: str, node: str) -> str:
    if node not in set(circuits.graph.node_ids()):
        raise UnknownIdError(f"node {node!r} is not in graph {gid!r}")
    return node


@router.get("/api/graphs/{graph}/attention",
            summary="The graph's attention story: head splits and QK terms of its strongest cross-position edges "
                    "(computed by POST /api/jobs/attention)")
def attention_story(state: State, graph: str = PathParam(max_length=400)) -> JSONResponse:
    from ...attribution.qk import attention_story_path

    f = catalog.graph_file(state.data, graph)
    p = attention_story_path(f)
    if not p.is_file():
        raise MissingFileError(f"graph {graph!r} has no attention story yet: compute it with POST /api/jobs/attention "
                               f"{{\"graph\": \"{graph}\"}} (or `featurelens graph-attention {f.name}`)")
    try:
        story = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise GraphFormatError(f"{p.name} is not valid JSON ({e}); compute the story again") from None
    return json_response({"graph": graph, **story})


@router.get("/api/graphs/{graph}/heads",
            summary="An edge split by attention head: each head's part and the part bypassing each attention layer "
                    "between the two nodes")
def edge_heads(state: State, graph: str = PathParam(max_length=400),
               source: str = Query(min_length=1, max_length=200, description="source node id"),
               target: str = Query(min_length=1, max_length=200, description="target node id")) -> JSONResponse:
    rt = state.runtime
    with rt.forward_lock:
        _, circuits, _ = _circuits(state, graph)
        split = circuits.edge_heads(_node(circuits, graph, source), _node(circuits, graph, target))
    g = circuits.graph
    return json_response({"graph": graph, "source_label": split.source_label, "target_label": split.target_label,
                          "source_pos": g.node_pos(g.index_of(source)), "target_pos": g.node_pos(g.index_of(target)),
                          **split.to_dict()})


@router.get("/api/graphs/{graph}/qk",
            summary="A head's pre-softmax attention score from a query position to a key position as a sum over "
                    "pairs of the graph's nodes: top pairs and single-side terms")
def qk(state: State, graph: str = PathParam(max_length=400),
       layer: int = Query(ge=0, le=1000, description="attention layer"),
       head: int = Query(ge=0, le=1000, description="query head"),
       query: int = Query(ge=0, le=100_000, description="query position (the attending token)"),
       key: int = Query(ge=0, le=100_000, description="key position (the token attended to)"),
       top: int = Query(10, ge=1, le=100, description="pairs and single-side terms to list")) -> JSONResponse:
    from ...attribution.qk import qk_decomposition

    rt = state.runtime
    with rt.forward_lock:
        _, circuits, tid = _circuits(state, graph)
        r = qk_decomposition(circuits, layer, head, query, key, top=top)
    return json_response({"graph": graph, "query_token": r.query_token, "key_token": r.key_token,
                          "feature_pages": _feature_pages(state, tid), **r.to_dict()})


@router.post("/api/jobs/attention", status_code=202,
             summary="Compute a graph's attention story in the background (saved as <slug>.attention.json); follow "
                     "it at /api/jobs/{id}/events")
def start_attention_job(state: State, body: AttentionJobRequest) -> JSONResponse:
    _, g = state.load_graph(body.graph)  # 404 / 422 now, not in the job
    if state.graph_transcoders(g) is None:
        raise GraphFormatError(f"graph {body.graph!r} does not say which transcoders made it "
                               f"(metadata.info.featurelens); attention circuits need them")
    return json_response(state.jobs.submit("attention", body.model_dump(), lambda job: _story_job(state, job, body)),
                         202)


def _story_job(state: AppState, job: Job, body: AttentionJobRequest) -> dict[str, Any]:
    from ...attribution.qk import attention_story, save_attention_story

    rt = state.runtime
    job.progress("loading model, transcoders and the graph's prompt")
    with rt.forward_lock:
        f, circuits, _ = _circuits(state, body.graph)

        def edge_done(done: int, total: int) -> None:
            job.progress("explaining edges", done, total, "head split and QK terms of each edge")
            yield_lock(rt.forward_lock)  # requests waiting for the model run between edges

        story = attention_story(circuits, n_edges=body.edges, heads=body.heads, top=body.top, progress=edge_done)
    job.progress("saving")
    path = save_attention_story(f, story)
    return {"graph": body.graph, "file": path.name, "edges": len(story["edges"])}
