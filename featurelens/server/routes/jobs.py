"""Background jobs: computing an attribution graph, with progress that pages follow as server-sent events."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Path as PathParam, Query
from fastapi.responses import JSONResponse, StreamingResponse

from ...progress import OnProgress, ProgressEvent
from .. import catalog
from ...attribution.schema import GraphFormatError
from ..jobs import FINAL, Job
from ..runtime import yield_lock
from ..responses import clean, json_response
from ..schemas import GraphJobRequest
from ..state import AppState, State
from ..streaming import sse

router = APIRouter(tags=["jobs"])
CHECK_FEATURES = 10  # features a graph job ablates to measure the graph's faithfulness


@router.post("/api/jobs/graph", status_code=202,
             summary="Compute an attribution graph in the background; follow it at /api/jobs/{id}/events")
def start_graph_job(state: State, body: GraphJobRequest) -> JSONResponse:
    entry = state.find_dictionary(body.transcoders)
    if entry["kind"] != "transcoders":
        raise GraphFormatError(f"{body.transcoders!r} is a {entry['kind']}, not a set of transcoders; graphs "
                               f"need transcoders for every layer (featurelens train --transcoder --layers all)")
    params = body.model_dump()
    return json_response(state.jobs.submit("graph", params, lambda job: _graph_job(state, job, body, entry)), 202)


def _graph_job(state: AppState, job: Job, body: GraphJobRequest, entry: dict[str, Any]) -> dict[str, Any]:
    from ...attribution import attribute, check_graph, save_graph

    rt = state.runtime
    job.progress("loading model and transcoders")
    tcs = rt.dictionary(body.transcoders)
    model = rt.model(entry["model"])
    job.progress("attributing", None, None, "computing edges by batched backward passes")
    with rt.forward_lock:
        g = attribute(model, tcs, body.prompt, max_feature_nodes=body.max_feature_nodes, batch_size=body.batch_size,
                      progress=False, on_progress=attribution_progress(job, rt.forward_lock),
                      transcoders_path=entry["path"], target=body.target or None)
    job.progress("pruning")
    pruned = g.prune(node_threshold=body.node_threshold, edge_threshold=body.edge_threshold)
    if g.n_features:
        job.progress("checking faithfulness", message=f"ablating the {CHECK_FEATURES} most influential features")
        with rt.forward_lock:
            pruned.info["faithfulness"] = check_graph(g, model, tcs, k=CHECK_FEATURES).to_info()
    pruned.info["transcoders_id"] = body.transcoders  # which dictionary the page loads for cards and steering
    analyses = rt.layer_analyses(body.transcoders)
    if state.db is not None:
        job.progress("saving", message="graph into the database")
        with state.db_lock:  # the labels are read from the analyses
            gid = _save_into_db(state.db, pruned, body.slug or body.prompt, analyses)
    else:
        job.progress("saving", message="graph file and feature cards")
        set_dir = catalog.graphs_root(state.data) / "computed"
        with rt.forward_lock, state.db_lock:  # the slug is chosen under the graph set's lock (save_graph's unique)
            f = save_graph(pruned, set_dir, slug=body.slug or body.prompt, model=model, transcoders=tcs,
                           analyses=analyses or None, unique=True)
        gid = f"computed~{f.stem}"
    return {"graph": gid, "nodes": int(pruned.kept().sum()), "links": int(pruned.edges.shape[1]),
            "scores": {k: float(v) for k, v in g.scores.items()}}


def _save_into_db(db: str, pruned: Any, slug: str, analyses: dict[int, Any]) -> str:
    """`serve --db`: the graph goes into the database's "computed" set under a free slug (its id
    "@pg.computed~<slug>"), written by `save_graph` (labels from the analyses) without feature cards: the node cards
    of a database graph come from the analyzed layers."""
    import json
    import tempfile

    from ...attribution import save_graph
    from ...store.graphs import add_graph

    with tempfile.TemporaryDirectory(prefix="featurelens-graph-") as tmp:
        f = save_graph(pruned, tmp, slug=slug, analyses=analyses or None, cards=False)
        g = json.loads(f.read_bytes())
    return f"{catalog.PG_PREFIX}computed~{add_graph(db, 'computed', g, f.stem)}"


def attribution_progress(job: Job, model_lock: Any) -> OnProgress:
    """The `on_progress` of a graph job's attribution: each batch of rows is reported to `job` (a cancelled job raises
    JobCancelled there, which stops attribution at that batch), then the model lock, which the caller holds, is let
    go for a moment, so that requests waiting for the model run between batches instead of after the whole graph."""

    def rows_done(ev: ProgressEvent) -> None:
        job.progress("attributing", ev.done, ev.total, "rows of the edge matrix")
        yield_lock(model_lock)

    return rows_done


@router.get("/api/jobs", summary="Recent jobs")
def list_jobs(state: State, limit: int = Query(50, ge=1, le=500)) -> JSONResponse:
    return json_response(state.jobs.list(limit))


@router.get("/api/jobs/{job}", summary="A job's status, progress, result or error")
def job(state: State, job: str = PathParam(max_length=40)) -> JSONResponse:
    return json_response(state.jobs.get(job))


@router.delete("/api/jobs/{job}", summary="Cancel a running job (it stops at its next progress report)")
def cancel_job(state: State, job: str = PathParam(max_length=40)) -> JSONResponse:
    return json_response(state.jobs.cancel(job))


@router.get("/api/jobs/{job}/events", summary="A job's progress as server-sent events",
            response_description="text/event-stream: `progress` events with the job record until it ends")
def job_events(state: State, job: str = PathParam(max_length=40)) -> StreamingResponse:
    jobs = state.jobs
    rec = jobs.get(job)  # 404 before the stream starts

    def events() -> Any:
        backlog = jobs.changes_since(job, -1, timeout=0.0) or [rec]  # a late subscriber still sees every stage
        for cur in backlog[:-1]:
            yield sse("progress", clean(cur))
        cur = backlog[-1]
        last_beat = time.monotonic()
        while True:
            yield sse("progress", clean(cur))
            if cur.get("status") in FINAL:
                yield sse("end", {"status": cur["status"]})
                return
            newer = jobs.changes_since(job, cur.get("version", 0), timeout=10.0)
            if not newer:
                if time.monotonic() - last_beat > 9:
                    last_beat = time.monotonic()
                    yield ": keep-alive\n\n"
                continue
            for cur in newer[:-1]:
                yield sse("progress", clean(cur))
            cur = newer[-1]

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
