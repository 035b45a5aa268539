"""The featurelens web app: a JSON API over the data directory (the same API the browser pages use) and the pages.

>>> from featurelens.server import create_app
>>> app = create_app("~/.cache/featurelens")          # then: uvicorn.run(app, host="127.0.0.1", port=8765)

or from the shell: `featurelens serve` (http://127.0.0.1:8765/; the OpenAPI description is at /openapi.json and
browsable at /docs). Every heavy endpoint is a plain `def`, so FastAPI runs it in a worker thread and the server
keeps answering while a model runs; forward passes are serialized by one lock (see runtime.py).
"""

from __future__ import annotations

import contextlib
import hmac
import math
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from fastapi import Body, FastAPI, Path as PathParam, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..store import is_clear
from . import catalog
from .catalog import UnknownIdError
from ..attribution.files import add_to_set, json_graph_scores, read_feature_card, save_graph, update_graph
from ..attribution.schema import GraphFile, GraphFormatError, check_subgraph, is_feature, validate_upload
from .instance import clean_on_start
from .jobs import JobManager
from .runtime import Runtime, yield_lock
from .security import Limits, install_security
from .streaming import side_by_side, sse

WEB_DIR = Path(__file__).resolve().parent.parent / "web"

TOKEN_COOKIE = "featurelens_token"
MAX_PROMPT_CHARS = 2000
MAX_TEXT_CHARS = 4000
MAX_NEW_TOKENS = 200
MAX_STRENGTH = 1000.0
MAX_FEATURES = 16
MAX_K = 100
MAX_DICTS = 16
IdStr = Field(min_length=1, max_length=400, pattern=r"^@?[A-Za-z0-9._~+=-]+$")


# ----------------------------------------------------------------------------------------------- request bodies
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureStrength(_Strict):
    feature: int = Field(ge=0, le=10_000_000, description="feature index")
    strength: float = Field(ge=-MAX_STRENGTH, le=MAX_STRENGTH, description="steering strength (x its max activation "
                                                                              "in relative mode)")


class SteerRequest(_Strict):
    dictionary: str = IdStr
    features: list[FeatureStrength] = Field(min_length=1, max_length=MAX_FEATURES)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(30, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.7, ge=0.0, le=5.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(0, ge=0, le=2**31 - 1)
    mode: Literal["relative", "absolute"] = "relative"

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is blank")
        return v


class TextRequest(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the text is blank")
        return v


class TextSearchRequest(TextRequest):
    dictionaries: list[str] = Field(default_factory=list, max_length=MAX_DICTS,
                                    description="dictionary ids (default: every analyzed one)")
    k: int = Field(10, ge=1, le=MAX_K)
    per_token: int = Field(5, ge=1, le=20)


class LabelRequest(_Strict):
    label: str | None = Field(max_length=500, description="the new label; null removes your label")


class Subgraph(_Strict):
    name: str = Field(min_length=1, max_length=200)
    pinnedIds: list[str] = Field(default_factory=list, max_length=5000)
    supernodes: list[list[str]] = Field(default_factory=list, max_length=1000)
    clickedId: str = Field("", max_length=200)
    labels: dict[str, str] = Field(default_factory=dict)


class ScoresRequest(_Strict):
    pinnedIds: list[str] | None = Field(None, max_length=50_000)


class NodeIntervention(_Strict):
    node_id: str = Field(min_length=1, max_length=200, description="a feature node of the graph")
    value: float | None = Field(None, ge=-MAX_STRENGTH, le=MAX_STRENGTH,
                                description="the activation to set; null (or 0) ablates the feature")


class InterveneRequest(_Strict):
    interventions: list[NodeIntervention] = Field(min_length=1, max_length=64)
    transcoders: str | None = Field(None, min_length=1, max_length=400, pattern=r"^@?[A-Za-z0-9._~+=-]+$",
                                    description="dictionary id of the transcoders (default: the graph's own)")
    top_k: int = Field(10, ge=1, le=50)
    max_new_tokens: int = Field(20, ge=0, le=MAX_NEW_TOKENS)


class GraphJobRequest(_Strict):
    transcoders: str = IdStr
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_feature_nodes: int | None = Field(1024, ge=1, le=100_000)
    node_threshold: float = Field(0.8, gt=0.0, le=1.0)
    edge_threshold: float = Field(0.98, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=1, le=4096)
    slug: str | None = Field(None, max_length=80, pattern=r"^[A-Za-z0-9._-]+$")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the prompt is blank")
        return v


# ----------------------------------------------------------------------------------------------- errors
def _status_for(e: Exception) -> int:
    if isinstance(e, GraphFormatError):
        return 422
    if isinstance(e, PermissionError):
        return 403
    if isinstance(e, (LookupError, FileNotFoundError)):
        return 404
    if isinstance(e, NotImplementedError):
        return 501
    return 400


def _clean(v: Any) -> Any:
    """JSON-safe: NaN and infinities become null (JSON has no such numbers)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def _json(v: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(_clean(v), status_code=status)


# ----------------------------------------------------------------------------------------------- the app
def create_app(data_dir: str | Path, *, model_loader: Callable[[str], Any] | None = None,
               token: str | None = None, host: str | None = None, limits: Limits | None = None) -> FastAPI:
    """The FastAPI app serving `data_dir`.

    model_loader: name -> HookedTransformer (default `fl.load_model`); models load on first use, once.
    token: when set, every request must carry it (header `Authorization: Bearer <token>`, header
    `X-Featurelens-Token`, or query `?token=`); `featurelens serve` sets one whenever it binds beyond loopback.
    host: the address the server is bound to (loopback: only loopback Host names are answered); limits: body size,
    stored uploads, jobs at once (default `Limits.from_env()`). See security.py.

    >>> from fastapi.testclient import TestClient
    >>> client = TestClient(create_app("~/.cache/featurelens"))
    >>> client.get("/api/dictionaries").json()
    """
    from ..errors import FeaturelensError

    data = Path(data_dir).expanduser()
    data.mkdir(parents=True, exist_ok=True)
    clean_on_start(data)
    rt = Runtime(data, model_loader)
    jobs = JobManager(data / "server" / "jobs")
    db_lock = threading.RLock()  # one SQLite connection per analysis, shared by the worker threads

    # FastAPI's /docs and /redoc pages load their scripts from the web; the app's own #/api page reads /openapi.json
    app = FastAPI(title="featurelens", version=_version(), docs_url=None, redoc_url=None,
                  description="Local Neuronpedia: dictionaries, feature dashboards, search, steering and attribution "
                              "graphs over the featurelens data directory. Errors are JSON {\"detail\": message}.")
    app.state.runtime, app.state.jobs = rt, jobs

    # ------------------------------------------------------------- errors: 4xx that say what is wrong
    @app.exception_handler(FeaturelensError)
    async def _fl_error(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(e)}, status_code=_status_for(e))

    for cls in (ValueError, TypeError, KeyError, LookupError, FileNotFoundError, PermissionError, NotImplementedError):
        @app.exception_handler(cls)
        async def _py_error(request: Request, e: Exception) -> JSONResponse:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            return JSONResponse({"detail": str(msg)}, status_code=_status_for(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request", "errors": _clean(
            [{"loc": list(err.get("loc", ())), "msg": err.get("msg"), "type": err.get("type")} for err in e.errors()])},
            status_code=422)

    # ------------------------------------------------------------- token
    if token:
        @app.middleware("http")
        async def _require_token(request: Request, call_next: Any) -> Any:
            given = request.query_params.get("token")
            auth = request.headers.get("authorization", "")
            candidates = [request.headers.get("x-featurelens-token"), given, request.cookies.get(TOKEN_COOKIE),
                          auth[7:].strip() if auth.lower().startswith("bearer ") else None]
            if not any(c and hmac.compare_digest(c.encode(), token.encode()) for c in candidates):
                return JSONResponse({"detail": "this server needs its access token: open the URL `featurelens "
                                               "serve` printed (it ends in ?token=...), or send the header "
                                               "Authorization: Bearer <token>"}, status_code=401)
            response = await call_next(request)
            if given:  # the page's own requests (scripts, styles) then carry it as a cookie
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response

    # ------------------------------------------------------------- pages
    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    if WEB_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    # ------------------------------------------------------------- listings
    @app.get("/api/health", tags=["meta"], summary="Server status")
    def health() -> JSONResponse:
        return _json({"ok": True, "version": _version(), "data_dir": str(data)})

    @app.get("/api/overview", tags=["data"], summary="Models, dictionaries (with metrics) and saved graphs")
    def overview() -> JSONResponse:
        dicts = catalog.list_dictionaries(data)
        return _json({"data_dir": str(data), "models": catalog.list_models(data, dicts), "dictionaries": dicts,
                      "graphs": catalog.list_graphs(data)})

    @app.get("/api/models", tags=["data"], summary="Models: embedded, converted, and named by dictionaries")
    def models() -> JSONResponse:
        return _json(catalog.list_models(data, catalog.list_dictionaries(data)))

    @app.get("/api/dictionaries", tags=["data"], summary="Dictionaries with L0, explained variance, CE loss recovered")
    def dictionaries() -> JSONResponse:
        return _json(catalog.list_dictionaries(data))

    @app.get("/api/dictionaries/{dictionary}", tags=["data"], summary="One dictionary")
    def dictionary(dictionary: str = PathParam(max_length=400)) -> JSONResponse:
        return _json(_find_dict(dictionary))

    def _find_dict(ident: str) -> dict[str, Any]:
        catalog.dictionary_dir(data, ident)  # raises a clear 404 for a bad id
        for d in catalog.list_dictionaries(data):
            if d["id"] == ident:
                return d
        raise UnknownIdError(f"no dictionary {ident!r}")

    # ------------------------------------------------------------- features
    @app.get("/api/dictionaries/{dictionary}/features/{feature}", tags=["features"],
             summary="Feature dashboard: label, snippets, quantiles, density, histogram, logit lens, neighbours")
    def feature(dictionary: str = PathParam(max_length=400), feature: int = PathParam(ge=0, le=10**9)) -> JSONResponse:
        with db_lock:
            fd = rt.analysis(dictionary).feature(feature)
        return _json(_dashboard_json(fd, dictionary))

    @app.put("/api/dictionaries/{dictionary}/features/{feature}/label", tags=["features"],
             summary="Set (or with null remove) your label of a feature")
    def set_label(body: LabelRequest, dictionary: str = PathParam(max_length=400),
                  feature: int = PathParam(ge=0, le=10**9)) -> JSONResponse:
        label = body.label
        if label is not None and not label.strip():
            raise GraphFormatError("label: a label has some text in it (send null to remove your label)")
        with db_lock:
            a = rt.analysis(dictionary)
            a.set_label(feature, label)
            labels = a.store.labels(a.check_index(feature))
        cur = labels[0] if labels else None
        score = cur["score"] if cur else None
        return _json({"feature": feature, "label": cur["label"] if cur else None,
                      "provenance": cur["provenance"] if cur else None, "label_score": score,
                      "label_score_method": cur["score_method"] if cur else None, "label_clear": is_clear(score),
                      "labels": labels})

    @app.post("/api/dictionaries/{dictionary}/features/{feature}/activations", tags=["features"],
              summary="Test your own text: the feature's activation on each token")
    def activations(body: TextRequest, dictionary: str = PathParam(max_length=400),
                    feature: int = PathParam(ge=0, le=10**9)) -> JSONResponse:
        return _json(_feature_acts(dictionary, feature, body.text))

    def _feature_acts(ident: str, idx: int, text: str) -> dict[str, Any]:
        import torch

        from ..data import content_mask

        with rt.forward_lock:
            a = rt.analysis_with_model(ident)
            idx = a.check_index(idx)
            model, sae = a.model, a.dictionary
            hook = sae.cfg.hook_name
            with torch.inference_mode():
                tokens = model.to_tokens(text)
                _check_len(model, tokens.shape[1])
                _, cache = model.run_with_cache(tokens, names_filter=[hook],
                                                stop_at_layer=model.hook_spec(hook).stop_layer)
                f = sae.encode(cache[hook][0].flatten(1).to(sae.W_dec.dtype))[:, idx].float().cpu()
                f = f * content_mask(tokens[0].cpu(), model)
            strs = model.to_str_tokens(tokens[0])
        with db_lock:
            top = float(a.store.feature(idx)["max_act"] or 0.0)
        return {"feature": idx, "tokens": strs, "acts": f.tolist(), "max": float(f.max()), "max_act_corpus": top,
                "bos_ignored": True}

    # ------------------------------------------------------------- search
    def _dict_ids(given: list[str] | str | None) -> list[str]:
        if isinstance(given, str):
            given = [x for x in given.split(",") if x]
        if given:
            if len(given) > MAX_DICTS:
                raise GraphFormatError(f"at most {MAX_DICTS} dictionaries per search")
            for g in given:
                catalog.dictionary_dir(data, g)
            return list(dict.fromkeys(given))
        ids = [d["id"] for d in catalog.list_dictionaries(data) if d["analyzed"]]
        if not ids:
            from ..analysis import NotAnalyzedError

            raise NotAnalyzedError("no analyzed dictionary in the data directory: run `featurelens analyze` on one")
        return ids[:MAX_DICTS]

    @app.get("/api/search/concept", tags=["search"], summary="Features by meaning (labels and top snippets)")
    def search_concept(q: str = Query(min_length=1, max_length=500, description="what the features are about"),
                       dictionaries: str = Query("", max_length=4000, description="comma-separated dictionary ids"),
                       k: int = Query(10, ge=1, le=MAX_K),
                       method: Literal["auto", "embedding", "lexical"] = "auto",
                       steerable: bool = Query(False, description="steer the best `pool` matches on neutral prompts "
                                               "and rank them by how much they raise the concept's words"),
                       pool: int = Query(10, ge=1, le=50)) -> JSONResponse:
        from ..interventions import rerank_by_steering
        from ..search import concept_search

        ids = _dict_ids(dictionaries)
        found: list[tuple[str, Any]] = []
        for did in ids:
            with db_lock:
                a = rt.analysis(did)
                found += [(did, h) for h in concept_search(a.store, q, k=max(k, pool) if steerable else k,
                                                           method=method)]
        if steerable:  # candidates of one model are steered and ranked together
            by_model: dict[str, tuple[Any, list[tuple[Any, Any]], list[float]]] = {}
            did_of: dict[int, str] = {}
            max_act: dict[str, Any] = {}  # per dictionary: its analysis's max activation of every feature
            with rt.forward_lock:
                for did, h in found:
                    a = rt.analysis_with_model(did)
                    did_of[id(a.dictionary)] = did
                    if did not in max_act:
                        with db_lock:
                            max_act[did] = a.store.column("max_act")
                    model, cands, tops = by_model.setdefault(a.model_name, (a.model, [], []))
                    cands.append((a.dictionary, h))
                    tops.append(float(max_act[did][h.feature]))
                found = [(did_of[id(d)], h) for model, cands, tops in by_model.values()
                         for d, h in rerank_by_steering(model, q, cands, max_activations=tops)]
        hits = [{"dictionary": did, "feature": h.feature, "score": h.score, "label": h.label,
                 "label_score": h.label_score, "label_score_method": h.label_score_method,
                 "label_clear": h.label_clear, "max_tokens": h.max_tokens[:5], "snippets": h.snippets[:3],
                 "method": h.method, "match_score": h.match_score, "steer_ratio": h.steer_ratio,
                 "steer_words": h.steer_words} for did, h in found]
        hits.sort(key=lambda h: -h["score"])
        return _json({"query": q, "hits": hits[:k] if len(ids) > 1 or steerable else hits})

    @app.post("/api/search/text", tags=["search"], summary="Features that fire on a text, per token (BOS ignored)")
    def search_text(body: TextSearchRequest) -> JSONResponse:
        from ..search import search_text as run

        out = []
        for did in _dict_ids(body.dictionaries):
            with rt.forward_lock:
                a = rt.analysis_with_model(did)
                _check_len(a.model, len(a.model.encode(body.text)))
                with db_lock:
                    r = run(a, body.text, k=body.k, per_token=body.per_token)
            out.append({"dictionary": did, "tokens": r.tokens,
                        "overall": [{"feature": h.feature, "max_act": h.max_act, "relative": h.relative,
                                     "token_index": h.token_index, "label": h.label, "acts": h.acts}
                                    for h in r.overall],
                        "per_token": [[{"feature": f, "act": v, "relative": rel, "label": lab}
                                       for f, v, rel, lab in row] for row in r.per_token]})
        return _json({"text": body.text, "results": out})

    @app.get("/api/search/token", tags=["search"], summary="Features whose logit lens promotes a token")
    def search_token(token: str = Query(min_length=1, max_length=100, description='a single token, e.g. " Paris"'),
                     dictionaries: str = Query("", max_length=4000),
                     k: int = Query(10, ge=1, le=MAX_K)) -> JSONResponse:
        from ..search import search_promotes

        hits = []
        for did in _dict_ids(dictionaries):
            with rt.forward_lock:
                a = rt.analysis_with_model(did)
                with db_lock:
                    for h in search_promotes(a, token, k=k):
                        hits.append({"dictionary": did, "feature": h.feature, "logit": h.logit, "zscore": h.zscore,
                                     "label": h.label})
        hits.sort(key=lambda h: -h["logit"])
        return _json({"token": token, "hits": hits})

    # ------------------------------------------------------------- steering
    def _steer_setup(body: SteerRequest) -> tuple[Any, list[tuple[str, Any]], list[str]]:
        import warnings

        from ..dictionaries import Transcoders
        from ..interventions import Steer, intervention_hooks

        with rt.forward_lock:
            sae = rt.dictionary(body.dictionary)
            if isinstance(sae, Transcoders):
                raise GraphFormatError(f"{body.dictionary!r} is a set of transcoders; steer with one dictionary "
                                       f"(an SAE or one transcoder)")
            model = rt.model(getattr(sae.cfg, "model_name", "") or _find_dict(body.dictionary)["model"])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                its = [Steer(sae, f.feature, f.strength, mode=body.mode) for f in body.features]
            hooks = intervention_hooks(model, its)
        return model, hooks, [repr(i) for i in its] + [i.note for i in its if i.note]

    @app.post("/api/steer", tags=["steering"], summary="Default and steered continuations (complete)")
    def steer(body: SteerRequest) -> JSONResponse:
        model, hooks, desc = _steer_setup(body)
        texts = {"default": "", "steered": ""}
        for side, delta, _ in side_by_side(model, rt.forward_lock, body.prompt, hooks, body.max_new_tokens,
                                           body.temperature, body.top_p, body.seed):
            texts[side] += delta
        return _json({"prompt": body.prompt, **texts, "interventions": desc, "seed": body.seed})

    @app.post("/api/steer/stream", tags=["steering"],
              summary="Default and steered continuations, streamed token by token (server-sent events)",
              response_description="text/event-stream: `token` events {side, text, step}, then `done` (or `error`)")
    def steer_stream(body: SteerRequest) -> StreamingResponse:
        model, hooks, desc = _steer_setup(body)
        with rt.forward_lock:
            n = len(model.encode(body.prompt))
        _check_len(model, n + body.max_new_tokens)

        def events() -> Any:
            yield sse("start", {"prompt": body.prompt, "interventions": desc, "seed": body.seed})
            try:
                for side, delta, step in side_by_side(model, rt.forward_lock, body.prompt, hooks,
                                                      body.max_new_tokens, body.temperature, body.top_p, body.seed):
                    yield sse("token", {"side": side, "text": delta, "step": step})
                yield sse("done", {})
            except Exception as e:  # noqa: BLE001  (headers are sent: report in the stream)
                yield sse("error", {"detail": str(e)})

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ------------------------------------------------------------- graphs
    def _load_graph(gid: str) -> tuple[Path, dict[str, Any]]:
        import json

        f = catalog.graph_file(data, gid)
        try:
            g = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise GraphFormatError(f"{f} is not valid JSON ({e})") from None
        return f, validate_upload(g)

    @app.get("/api/graphs", tags=["graphs"], summary="Saved attribution graphs (graph-metadata.json under graphs/)")
    def graphs() -> JSONResponse:
        return _json(catalog.list_graphs(data))

    @app.get("/api/graphs/{graph}", tags=["graphs"], summary="A graph's JSON (circuit-tracer / Neuronpedia format)",
             response_model=GraphFile)
    def graph(graph: str = PathParam(max_length=400)) -> JSONResponse:
        _, g = _load_graph(graph)
        g["id"] = graph
        _add_densities(g)
        return _json(g)

    def _add_densities(g: dict[str, Any]) -> None:
        """Each feature node's density over the analyzed corpus, where its transcoder layer was analyzed (for the
        explorer's density slider)."""
        tid = _graph_transcoders(g)
        if tid is None:
            return
        try:
            analyses = rt.layer_analyses(tid)
        except (UnknownIdError, FileNotFoundError):
            return
        with db_lock:
            dens = {layer: a.store.column("density") for layer, a in analyses.items()}
        for n in g["nodes"]:
            if not is_feature(n):
                continue
            try:
                layer, feat = _node_feature(n)
            except GraphFormatError:
                continue
            col = dens.get(layer)
            if col is not None and 0 <= feat < len(col):
                n["density"] = float(col[feat])

    @app.post("/api/graphs", tags=["graphs"], summary="Upload a graph JSON (circuit-tracer or Neuronpedia)",
              status_code=201, openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": {"$ref": "#/components/schemas/GraphFile"}}}}})
    def upload_graph(body: dict[str, Any] = Body(..., include_in_schema=False)) -> JSONResponse:
        g = validate_upload(body)
        g.pop("id", None)
        slug = add_to_set(catalog.graphs_root(data) / "uploads", g)
        return _json({"id": f"uploads~{slug}", "slug": slug, "nodes": len(g["nodes"]), "links": len(g["links"])}, 201)

    @app.put("/api/graphs/{graph}/subgraphs", tags=["graphs"],
             summary="Save a subgraph (pins, supernodes, labels) into the graph file; replaces one of the same name")
    def save_subgraph(body: Subgraph, graph: str = PathParam(max_length=400)) -> JSONResponse:
        with _graph_lock:
            f, g = _load_graph(graph)
            ids = {n["node_id"] for n in g["nodes"]}
            sg = check_subgraph(body.model_dump(), ids)
            subs = [s for s in g.get("subgraphs", []) if s.get("name") != sg["name"]] + [sg]
            g["subgraphs"] = subs
            g["qParams"].update(pinnedIds=sg["pinnedIds"], supernodes=sg["supernodes"], clickedId=sg["clickedId"])
            update_graph(f, g)
        return _json({"graph": graph, "subgraphs": subs})

    @app.post("/api/graphs/{graph}/scores", tags=["graphs"],
              summary="Replacement and completeness scores of the graph, and of the pinned subgraph when given")
    def scores(body: ScoresRequest, graph: str = PathParam(max_length=400)) -> JSONResponse:
        _, g = _load_graph(graph)
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
        return _json(out)

    @app.get("/api/graphs/{graph}/nodes/{node}", tags=["graphs"],
             summary="A node's feature card: the node, its inputs and outputs, and its feature's dashboard if known")
    def node_card(graph: str = PathParam(max_length=400), node: str = PathParam(max_length=200),
                  limit: int = Query(20, ge=1, le=200)) -> JSONResponse:
        f, g = _load_graph(graph)
        by_id = {n["node_id"]: n for n in g["nodes"]}
        if node not in by_id:
            raise UnknownIdError(f"node {node!r} is not in graph {graph!r}")
        n = by_id[node]
        ins = sorted((e for e in g["links"] if e["target"] == node), key=lambda e: -abs(e["weight"]))[:limit]
        outs = sorted((e for e in g["links"] if e["source"] == node), key=lambda e: -abs(e["weight"]))[:limit]
        card = {"node": n, "inputs": [{"node": by_id[e["source"]], "weight": e["weight"]} for e in ins],
                "outputs": [{"node": by_id[e["target"]], "weight": e["weight"]} for e in outs],
                "feature_card": _feature_card(f, g, n)}
        return _json(card)

    def _feature_card(f: Path, g: dict[str, Any], n: dict[str, Any]) -> dict[str, Any] | None:
        """The feature's card: the dashboard of its transcoder layer when that layer was analyzed, else the feature
        JSON the graph writer saved beside the graph (where its metadata.scan points)."""
        if not is_feature(n):
            return None
        try:
            layer, feat = _node_feature(n)
        except GraphFormatError:
            layer, feat = None, None
        tid = _graph_transcoders(g)
        if tid is not None and layer is not None:
            try:
                a = rt.layer_analyses(tid).get(layer)
            except (UnknownIdError, FileNotFoundError):
                a = None
            if a is not None and 0 <= feat < a.n_features:
                with db_lock:
                    return {"source": "analysis", **_dashboard_json(a.feature(feat), f"{tid}~layer_{layer}")}
        card = read_feature_card(f, g["metadata"]["scan"], n["feature"], root=data)
        return None if card is None else {"source": "graph", **card}

    def _node_feature(n: dict[str, Any]) -> tuple[int, int]:
        parts = n["node_id"].split("_")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].lstrip("-").isdigit():
            raise GraphFormatError(f"node {n['node_id']!r} is not a feature node (layer_feature_position)")
        return int(parts[0]), int(parts[1])

    def _graph_transcoders(g: dict[str, Any]) -> str | None:
        """The dictionary id of the transcoders a graph was made with: recorded by the server when it computed the
        graph, else found from the transcoders' path that featurelens writes into the graph's metadata."""
        info = g["metadata"].get("info") if isinstance(g["metadata"].get("info"), dict) else {}
        fl_info = info.get("featurelens") if isinstance(info.get("featurelens"), dict) else {}
        t = fl_info.get("transcoders_id")
        if isinstance(t, str) and t:
            return t
        t = fl_info.get("transcoders")
        if isinstance(t, str) and t:
            for d in catalog.list_dictionaries(data):
                if d["id"] == t or (d["path"] and Path(d["path"]).resolve() == Path(t).expanduser().resolve()):
                    return d["id"]
        return None

    @app.post("/api/graphs/{graph}/intervene", tags=["graphs"],
              summary="Steer from the graph: set or ablate feature nodes; next-token probabilities with attention "
                      "frozen and live, and the continuation, beside the original")
    def intervene(body: InterveneRequest, graph: str = PathParam(max_length=400)) -> JSONResponse:
        try:
            from ..attribution import feature_intervention
        except ImportError:
            raise NotImplementedError("steering from a graph needs featurelens.attribution (attribution graphs), "
                                      "which this installation does not have") from None
        _, g = _load_graph(graph)
        by_id = {n["node_id"]: n for n in g["nodes"]}
        specs = []
        for it in body.interventions:
            n = by_id.get(it.node_id)
            if n is None:
                raise UnknownIdError(f"node {it.node_id!r} is not in graph {graph!r}")
            if not is_feature(n):
                raise GraphFormatError(f"node {it.node_id!r} is a {n['feature_type']} node; only features can be "
                                       f"set or ablated")
            layer, feat = _node_feature(n)
            specs.append((layer, int(n["ctx_idx"]), feat, float(it.value or 0.0)))
        tid = body.transcoders or _graph_transcoders(g)
        if tid is None:
            raise GraphFormatError("this graph does not say which transcoders made it; pass \"transcoders\" (a "
                                   "dictionary id from GET /api/dictionaries)")
        tcs = rt.dictionary(tid)
        model = rt.model(_find_dict(tid)["model"] or g["metadata"].get("scan", ""))
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
        return _json(out)

    def _top(model: Any, probs: Any, k: int, ref: Any = None) -> list[dict[str, Any]]:
        p, i = probs.topk(k)
        return [{"token": model.to_string([int(t)]), "id": int(t), "prob": float(v),
                 **({"original_prob": float(ref[int(t)])} if ref is not None else {})} for v, t in zip(p, i)]

    # ------------------------------------------------------------- graph jobs
    @app.post("/api/jobs/graph", tags=["jobs"], status_code=202,
              summary="Compute an attribution graph in the background; follow it at /api/jobs/{id}/events")
    def start_graph_job(body: GraphJobRequest) -> JSONResponse:
        try:
            import featurelens.attribution  # noqa: F401
        except ImportError:
            raise NotImplementedError("computing graphs needs featurelens.attribution, which this installation does "
                                      "not have") from None
        entry = _find_dict(body.transcoders)
        if entry["kind"] != "transcoders":
            raise GraphFormatError(f"{body.transcoders!r} is a {entry['kind']}, not a set of transcoders; graphs "
                                   f"need transcoders for every layer (featurelens train --transcoder --layers all)")
        params = body.model_dump()
        return _json(jobs.submit("graph", params, lambda job: _graph_job(job, body, entry)), 202)

    def _graph_job(job: Any, body: GraphJobRequest, entry: dict[str, Any]) -> dict[str, Any]:
        import json

        job.progress("loading model and transcoders")
        tcs = rt.dictionary(body.transcoders)
        model = rt.model(entry["model"])
        job.progress("attributing", None, None, "computing edges by batched backward passes")
        from ..attribution import attribute

        with rt.forward_lock, _rows_reported_to(job, rt.forward_lock):
            g = attribute(model, tcs, body.prompt, max_feature_nodes=body.max_feature_nodes,
                          batch_size=body.batch_size, progress=True, transcoders_path=entry["path"])
        job.progress("pruning")
        pruned = g.prune(node_threshold=body.node_threshold, edge_threshold=body.edge_threshold)
        job.progress("saving", message="graph file and feature cards")
        set_dir = catalog.graphs_root(data) / "computed"
        analyses = rt.layer_analyses(body.transcoders)
        with rt.forward_lock, db_lock:
            f = save_graph(pruned, set_dir, slug=body.slug or body.prompt, model=model, transcoders=tcs,
                           analyses=analyses or None, unique=True)
        with _graph_lock:
            gj = json.loads(f.read_text(encoding="utf-8"))
            info = gj["metadata"].setdefault("info", {})
            info.setdefault("featurelens", {}).update(transcoders_id=body.transcoders)
            update_graph(f, gj)
        return {"graph": f"computed~{f.stem}", "nodes": len(gj["nodes"]), "links": len(gj["links"]),
                "scores": {k: float(v) for k, v in dict(getattr(g, "scores", {}) or {}).items()}}

    @app.get("/api/jobs", tags=["jobs"], summary="Recent jobs")
    def list_jobs(limit: int = Query(50, ge=1, le=500)) -> JSONResponse:
        return _json(jobs.list(limit))

    @app.get("/api/jobs/{job}", tags=["jobs"], summary="A job's status, progress, result or error")
    def job(job: str = PathParam(max_length=40)) -> JSONResponse:
        return _json(jobs.get(job))

    @app.delete("/api/jobs/{job}", tags=["jobs"], summary="Cancel a running job (it stops at its next progress report)")
    def cancel_job(job: str = PathParam(max_length=40)) -> JSONResponse:
        return _json(jobs.cancel(job))

    @app.get("/api/jobs/{job}/events", tags=["jobs"], summary="A job's progress as server-sent events",
             response_description="text/event-stream: `progress` events with the job record until it ends")
    def job_events(job: str = PathParam(max_length=40)) -> StreamingResponse:
        rec = jobs.get(job)  # 404 before the stream starts

        def events() -> Any:
            backlog = jobs.changes_since(job, -1, timeout=0.0) or [rec]  # a late subscriber still sees every stage
            for cur in backlog[:-1]:
                yield sse("progress", _clean(cur))
            cur = backlog[-1]
            last_beat = time.monotonic()
            while True:
                yield sse("progress", _clean(cur))
                if cur.get("status") in ("done", "failed", "interrupted", "cancelled"):
                    yield sse("end", {"status": cur["status"]})
                    return
                newer = jobs.changes_since(job, cur.get("version", 0), timeout=10.0)
                if not newer:
                    if time.monotonic() - last_beat > 9:
                        last_beat = time.monotonic()
                        yield ": keep-alive\n\n"
                    continue
                for cur in newer[:-1]:
                    yield sse("progress", _clean(cur))
                cur = newer[-1]

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    _graph_lock = threading.Lock()
    install_security(app, data, host=host, limits=limits, jobs=jobs)
    return app


# ----------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _rows_reported_to(job: Any, model_lock: Any) -> Iterator[None]:
    """While held, attribution's progress bar (rows of the edge matrix done / total) reports to `job` instead of the
    terminal, a cancelled job stops at the next batch of rows, and between batches the model lock (which the
    caller holds) is let go for a moment, so that other requests' forward passes run between them instead of after
    the whole graph. No other attribution runs in this process meanwhile: the bar is patched into the module."""
    import importlib

    mod = importlib.import_module("featurelens.attribution.attribute")
    base = getattr(mod, "tqdm", None)
    if base is None:
        yield
        return

    class JobBar(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            self.job_total, self.job_done = kwargs.get("total"), 0
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            job.progress("attributing", 0, self.job_total, "rows of the edge matrix")

        def update(self, n: float | None = 1) -> bool | None:
            self.job_done += n or 0
            job.progress("attributing", self.job_done, self.job_total, "rows of the edge matrix")
            yield_lock(model_lock)
            return None

    mod.tqdm = JobBar
    try:
        yield
    finally:
        mod.tqdm = base


def _version() -> str:
    try:
        from .. import __version__

        return __version__
    except ImportError:
        return "0"


def _check_len(model: Any, n_tokens: int) -> None:
    from ..errors import InputError

    if n_tokens > model.cfg.n_ctx:
        raise InputError(f"{n_tokens} tokens is longer than the model's context of {model.cfg.n_ctx} tokens")


def _dashboard_json(fd: Any, dictionary: str) -> dict[str, Any]:
    """A FeatureDashboard as JSON with named fields (tuples become objects)."""

    def ex(x: Any) -> dict[str, Any]:
        return {"tokens": x.tokens, "acts": x.acts, "index": x.index, "act": x.act, "bin": x.bin}

    return {
        "dictionary": dictionary, "feature": fd.index, "d_sae": fd.d_sae, "model": fd.model, "hook_name": fd.hook_name,
        "label": fd.label, "label_provenance": fd.label_provenance, "labels": fd.labels, "density": fd.density,
        "label_score": fd.label_score, "label_score_method": fd.label_score_method, "label_clear": fd.label_clear,
        "n_fires": fd.n_fires, "n_tokens": fd.n_tokens, "max_act": fd.max_act, "mean_act": fd.mean_act,
        "dead": fd.dead,
        "histogram": [{"lo": lo, "hi": hi, "count": c} for lo, hi, c in fd.histogram()],
        "logit_up": [{"token": t, "id": i, "value": v} for t, i, v in fd.logit_up],
        "logit_down": [{"token": t, "id": i, "value": v} for t, i, v in fd.logit_down],
        "similar": [{"feature": i, "cosine": c, "label": lab} for i, c, lab in fd.similar],
        "cofiring": [{"feature": i, "jaccard": j, "p": p, "n": n, "label": lab} for i, j, p, n, lab in fd.cofiring],
        "top_examples": [ex(x) for x in fd.top_examples],
        "quantile_examples": [ex(x) for x in fd.quantile_examples],
    }
