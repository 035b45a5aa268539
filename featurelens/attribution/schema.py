"""The graph file format, written once: circuit-tracer's `frontend/graph_models.py` (a graph is Model = metadata,
qParams, nodes, links) and `frontend/feature_models.py` (a feature card), as pydantic-validated typed dicts.

Everything that writes, reads, validates or documents a graph goes through this module: the writer
(`files.graph_json`), the reader (`files.load_graph`), the server's uploads and OpenAPI description, and the tests.
The field names are circuit-tracer's; the rules are its models' rules with JSON's exact types (a number is never a
string, a layer never a number). Extra fields are allowed everywhere, because circuit-tracer's viewer ignores them
and ours carry more (`metadata.info.featurelens`: scores, faithfulness, targets; saved `subgraphs`).

Typed dicts rather than BaseModel classes: a graph may have two million links, and validating them as dicts is
about five times faster than building a model object per link; what comes back is the plain JSON again.

>>> g = validate_graph(json.loads(text))         # GraphFormatError naming the first problem
>>> g = validate_graph(raw, fill_defaults=True)   # what circuit-tracer's older writers and Neuronpedia omit, filled
>>> g = validate_upload(body)                     # the server's uploads: defaults filled, size bounded
>>> node_kind(g["nodes"][0])                     # "feature" | "error" | "embedding" | "logit"
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BeforeValidator, ConfigDict, TypeAdapter, ValidationError, with_config
from typing_extensions import Annotated, NotRequired, TypedDict

from ..engine.errors import InputError

SCHEMA_VERSION = 1
FEATURE_TYPE = "cross layer transcoder"  # what circuit-tracer (and we) write for a transcoder feature
ERROR_TYPE = "mlp reconstruction error"
MAX_NODES = 50_000  # the most an uploaded graph may have (the explorer draws every node)
MAX_LINKS = 2_000_000
LOCAL_SCAN_PREFIX = "./"  # circuit-tracer's viewer loads `${scan}/${feature}.json` locally only for such a scan

NodeKind = Literal["feature", "error", "embedding", "logit"]


class GraphFormatError(InputError):
    """A graph (or feature card) that is missing, not JSON, or not in circuit-tracer's schema; the message names the
    field."""


# The one node-kind test. Error nodes are every "... error" type (circuit-tracer's "mlp reconstruction error",
# Neuronpedia's "lorsa error"); every type that is not an embedding, a logit or an error is a feature of some
# dictionary ("cross layer transcoder", "transcoder", "lorsa", ...).
def node_kind(node: dict[str, Any] | str) -> NodeKind:
    """A node's kind from its `feature_type` (give the node or the type string)."""
    ftype = node if isinstance(node, str) else node["feature_type"]
    if ftype == "embedding":
        return "embedding"
    if ftype == "logit":
        return "logit"
    if "error" in ftype:
        return "error"
    return "feature"


def is_feature(node: dict[str, Any] | str) -> bool:
    return node_kind(node) == "feature"


# ----------------------------------------------------------------------------------------------- the models
_CONFIG = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)


@with_config(_CONFIG)
class Metadata(TypedDict):
    slug: str
    scan: str  # "./features/<name>": cards at <graph dir>/features/<name>/<feature>.json (see files.py)
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: NotRequired[float | None]
    schema_version: NotRequired[int | None]


@with_config(_CONFIG)
class QParams(TypedDict):
    pinnedIds: list[str]
    supernodes: list[list[str]]  # [label, node id, node id, ...]
    linkType: str
    clickedId: str
    sg_pos: str


@with_config(_CONFIG)
class Node(TypedDict):
    node_id: str
    feature: int  # features: Cantor pairing of (layer, index); errors -1; embeddings the position; logits the token
    layer: str  # "E" for embeddings, n_layers + 1 for logits
    ctx_idx: int
    feature_type: str
    jsNodeId: str
    token_prob: NotRequired[float]
    is_target_logit: NotRequired[bool]
    run_idx: NotRequired[int]
    reverse_ctx_idx: NotRequired[int]
    clerp: NotRequired[str]
    influence: NotRequired[float | None]
    activation: NotRequired[float | None]


def _js_node_id(node: Any) -> Any:
    # circuit-tracer's Node.__init__ copies node_id into a missing jsNodeId
    if isinstance(node, dict) and "node_id" in node and "jsNodeId" not in node:
        node = {**node, "jsNodeId": node["node_id"]}
    return node


_NodeIn = Annotated[Node, BeforeValidator(_js_node_id)]

# What circuit-tracer's Node fills in when a field is absent.
NODE_DEFAULTS: dict[str, Any] = {"token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0,
                                 "clerp": "", "influence": None, "activation": None}


@with_config(_CONFIG)
class Link(TypedDict):
    source: str
    target: str
    weight: float


@with_config(_CONFIG)
class SavedSubgraph(TypedDict):
    """A pinned view the user saved in the explorer (our extension: `subgraphs` beside circuit-tracer's keys)."""
    name: str
    pinnedIds: list[str]
    supernodes: NotRequired[list[list[str]]]
    clickedId: NotRequired[str]
    labels: NotRequired[dict[str, str]]


@with_config(_CONFIG)
class GraphFile(TypedDict):
    """A graph file: circuit-tracer's Model (its `links` is `list[dict]`; we check each as its Link)."""
    metadata: Metadata
    qParams: QParams
    nodes: list[_NodeIn]
    links: list[Link]
    subgraphs: NotRequired[list[SavedSubgraph]]


@with_config(_CONFIG)
class Example(TypedDict):
    tokens_acts_list: list[float]
    train_token_ind: int
    is_repeated_datapoint: bool
    tokens: list[str]


@with_config(_CONFIG)
class Quantile(TypedDict):
    quantile_name: str
    examples: list[Example]


@with_config(_CONFIG)
class FeatureCard(TypedDict):
    """A feature card (circuit-tracer's feature_models.Model): `<scan>/<feature>.json` beside the graph."""
    transcoder_id: str
    index: int
    examples_quantiles: list[Quantile]
    top_logits: list[str]
    bottom_logits: list[str]
    act_min: float
    act_max: float
    quantile_values: list[float]
    histogram: list[float]
    activation_frequency: float


_ADAPTERS: dict[Any, TypeAdapter[Any]] = {}


def _adapter(kind: Any) -> TypeAdapter[Any]:
    if kind not in _ADAPTERS:
        _ADAPTERS[kind] = TypeAdapter(kind)
    return _ADAPTERS[kind]


# ----------------------------------------------------------------------------------------------- checks
def _say(e: ValidationError, what: str) -> str:
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-")) or what
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) or err["type"] == "missing" else f", got {got!r:.60}"
    return f"{what}: {where}: {err['msg'].lower()}{shown}" + (f" (and {e.error_count() - 1} more problems)"
                                                              if e.error_count() > 1 else "")


def schema_errors(obj: Any, kind: Any = GraphFile) -> list[str]:
    """Every way `obj` misses the model `kind` (empty: it validates), one line each."""
    try:
        _adapter(kind).validate_python(obj)
    except ValidationError as e:
        return [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()]
    return []


def with_defaults(g: Any) -> Any:
    """Fill what circuit-tracer's own models default and older writers (and Neuronpedia) omit: qParams, the
    transcoder list, node fields; a numeric node layer becomes its string. Changes `g` in place; returns it."""
    if not isinstance(g, dict):
        return g
    meta = g.get("metadata")
    if isinstance(meta, dict):
        meta.setdefault("transcoder_list", [])
    if g.get("qParams") is None:
        g["qParams"] = {}
    q = g["qParams"]
    if isinstance(q, dict):
        for k, v in (("pinnedIds", []), ("supernodes", []), ("linkType", "both"), ("clickedId", ""), ("sg_pos", "")):
            q.setdefault(k, v)
    for n in g.get("nodes") or []:
        if not isinstance(n, dict):
            continue
        if isinstance(n.get("layer"), int) and not isinstance(n["layer"], bool):
            n["layer"] = str(n["layer"])
        if "node_id" in n:
            n.setdefault("jsNodeId", n["node_id"])
        for k, v in NODE_DEFAULTS.items():
            n.setdefault(k, v)
    return g


def validate_graph(g: Any, *, fill_defaults: bool = False, max_nodes: int | None = None,
                   max_links: int | None = None, what: str = "graph") -> dict[str, Any]:
    """`g` checked against circuit-tracer's models, plus what its viewer needs beyond them (unique node ids, links
    and saved subgraphs naming existing nodes). Returns `g` (the same dict); raises GraphFormatError naming the
    first problem. `fill_defaults` first fills what older writers omit (see `with_defaults`); `max_nodes` /
    `max_links` bound the size (checked before any per-node work).

    Any `metadata.scan` is accepted (circuit-tracer writes names, Hub repositories and "/..." paths its own server
    maps); readers find feature cards through `scan_dir`, which follows only a scan that stays beside the graph."""
    if not isinstance(g, dict):
        raise GraphFormatError(f"{what}: a graph file is a JSON object with metadata, qParams, nodes and links")
    nodes, links = g.get("nodes"), g.get("links")
    if isinstance(nodes, list) and isinstance(links, list) and (
            (max_nodes is not None and len(nodes) > max_nodes) or (max_links is not None and len(links) > max_links)):
        raise GraphFormatError(f"{what}: the graph has {len(nodes):,} nodes and {len(links):,} links; at most "
                               f"{max_nodes or len(nodes):,} and {max_links or len(links):,} are allowed")
    if fill_defaults:
        with_defaults(g)
    try:
        _adapter(GraphFile).validate_python(g)
    except ValidationError as e:
        raise GraphFormatError(_say(e, what)) from None
    ids: set[str] = set()
    for i, n in enumerate(g["nodes"]):
        if n["node_id"] in ids:
            raise GraphFormatError(f"{what}: nodes.{i}: node id {n['node_id']!r} appears twice")
        ids.add(n["node_id"])
        n.setdefault("jsNodeId", n["node_id"])
    for i, e in enumerate(g["links"]):
        for end in ("source", "target"):
            if e[end] not in ids:
                raise GraphFormatError(f"{what}: links.{i}: {end} {e[end]!r} is not a node of this graph")
    for i, sg in enumerate(g.get("subgraphs", [])):
        check_subgraph(sg, ids, f"{what}: subgraphs.{i}")
    return g


def validate_upload(g: Any) -> dict[str, Any]:
    """A graph sent to the server (or read back from its data directory): `validate_graph` with the fields older
    writers omit filled in, and at most MAX_NODES nodes and MAX_LINKS links."""
    return validate_graph(g, fill_defaults=True, max_nodes=MAX_NODES, max_links=MAX_LINKS)


def check_subgraph(sg: Any, ids: set[str], where: str = "subgraph") -> dict[str, Any]:
    """A saved subgraph whose pins and supernodes are nodes of the graph (`ids`); fills its optional fields."""
    try:
        _adapter(SavedSubgraph).validate_python(sg)
    except ValidationError as e:
        raise GraphFormatError(_say(e, where)) from None
    if not sg["name"].strip() or len(sg["name"]) > 200:
        raise GraphFormatError(f"{where}: name must be 1-200 characters")
    bad = [p for p in sg["pinnedIds"] if p not in ids]
    if bad:
        raise GraphFormatError(f"{where}: pinned ids not in the graph: {bad[:5]}")
    for s in sg.setdefault("supernodes", []):
        if len(s) < 2:
            raise GraphFormatError(f"{where}: each supernode is [label, node id, ...]")
        missing = [x for x in s[1:] if x not in ids]
        if missing:
            raise GraphFormatError(f"{where}: supernode {s[0]!r} names nodes not in the graph: {missing[:5]}")
    sg.setdefault("clickedId", "")
    sg.setdefault("labels", {})
    return sg


def check_scan(scan: str, what: str = "metadata.scan") -> str:
    """A scan we write or follow to feature cards: a name (circuit-tracer's, Neuronpedia's: "gemma-2-2b") or a
    relative directory ("./features/<name>"). Never absolute and never climbing out with "..": cards are read
    relative to the graph's own directory, so a graph cannot make its reader open files elsewhere."""
    p = PurePosixPath(scan.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or scan[1:3] in (":/", ":\\") or "\x00" in scan:
        raise GraphFormatError(f"{what} must be a name or a relative directory without '..', got {scan!r}")
    return scan


def scan_for(name: str) -> str:
    """The `metadata.scan` we write for feature cards under `features/<name>/` (what circuit-tracer's viewer reads:
    it fetches `${scan}/${feature}.json` when the scan starts with "./")."""
    return f"{LOCAL_SCAN_PREFIX}features/{name}"


def scan_dir(scan: str) -> PurePosixPath:
    """The directory, relative to the graph's, that holds the feature cards of a graph with this `scan`: the scan
    itself when it starts with "./" (what we write now), else `features/<scan>` (our files before that, and
    circuit-tracer's viewer's fallback). GraphFormatError for a scan that would leave the graph's directory."""
    check_scan(scan)
    s = scan.replace("\\", "/")
    if s.startswith(LOCAL_SCAN_PREFIX):
        return PurePosixPath(s[len(LOCAL_SCAN_PREFIX):])
    return PurePosixPath("features", s)
