"""What the data directory holds, as the web app lists it: models, dictionaries (with their metrics and analyses),
standalone analyses, the analyses in a PostgreSQL database (`featurelens serve --db`) and saved attribution graphs.

Ids are paths relative to their folder with "/" written as "~", so they fit in one URL segment and say where the
files are: dictionary "gemma-3-270m~blocks.6.hook_resid_post-topk-8192" is
<data dir>/dictionaries/gemma-3-270m/blocks.6.hook_resid_post-topk-8192. An analysis stored apart from its
dictionary (<data dir>/analysis/<slug>) is listed as "@<slug>", one in the server's
PostgreSQL database as "@pg.<name>". A graph is "<set>~<slug>": <data dir>/graphs/<set>/
holds graph-metadata.json and <slug>.json; one in the PostgreSQL database is "@pg.<set>~<slug>".
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..errors import FeaturelensError, MissingFileError

PG_PREFIX = "@pg."  # ids of the analyses in the server's PostgreSQL database
MAX_DEPTH = 4  # how deep dictionaries/ and graphs/ are searched
ID_RE = re.compile(r"^@?[A-Za-z0-9._~+=-]{1,400}$")
SLUG_RE = re.compile(r"^[A-Za-z0-9._+=-]{1,200}$")


class UnknownIdError(FeaturelensError, LookupError):
    """An id (dictionary, graph, job) that names nothing in the data directory."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def id_of(rel: Path) -> str:
    return "~".join(rel.parts)


def path_of(root: Path, ident: str) -> Path:
    """The path an id names under `root`, refusing anything that would leave it."""
    if not isinstance(ident, str) or not ID_RE.match(ident) or any(p in ("", ".", "..") for p in ident.split("~")):
        raise UnknownIdError(f"{ident!r} is not a valid id (letters, digits, '.', '_', '-', '~' as the folder "
                             f"separator)")
    return root.joinpath(*ident.split("~"))


# ----------------------------------------------------------------------------------------------- dictionaries
def dictionary_metrics(d: Path) -> dict[str, float | None]:
    """L0, explained variance and CE loss recovered from what training (featurelens.json stats) and evaluation
    (eval.json, or stats["eval"]) wrote; None where nothing was measured."""
    meta = _read_json(d / "featurelens.json") or {}
    stats = meta.get("stats") or {}
    ev = _read_json(d / "eval.json") or stats.get("eval") or {}
    if isinstance(ev, dict) and "l0" not in ev and len(ev) == 1 and isinstance(next(iter(ev.values())), dict):
        ev = next(iter(ev.values()))
    train = stats.get("final_train_metrics") or {}
    out = {"l0": _finite(ev.get("l0")) if isinstance(ev, dict) else None,
           "explained_variance": _finite(ev.get("explained_variance")) if isinstance(ev, dict) else None,
           "ce_loss_recovered": _finite(ev.get("ce_loss_recovered")) if isinstance(ev, dict) else None,
           "dead_fraction": _finite(ev.get("dead_fraction")) if isinstance(ev, dict) else None,
           "source": "eval" if isinstance(ev, dict) and ev else None}
    if out["l0"] is None and _finite(train.get("l0")) is not None:
        out["l0"] = _finite(train.get("l0"))
        fvu = _finite(train.get("fvu"))
        out["explained_variance"] = None if fvu is None else 1.0 - fvu
        out["dead_fraction"] = _finite(train.get("dead"))
        out["source"] = "training (last steps)"
    out["tokens_trained"] = _finite(stats.get("tokens_trained"))
    return out


def set_metrics(d: Path) -> dict[str, float | None]:
    """A transcoder set's figures from its evaluation (eval.json: {layer: metrics, "all": every layer spliced at
    once}, as the demo writes it; else each layer's own eval.json): L0 and explained variance averaged over the
    layers, CE loss recovered and KL with all of them spliced in."""
    ev = _read_json(d / "eval.json")
    per: list[dict[str, Any]] = []
    every: dict[str, Any] = {}
    if isinstance(ev, dict):
        per = [v for k, v in ev.items() if str(k).isdigit() and isinstance(v, dict)]
        every = ev.get("all") if isinstance(ev.get("all"), dict) else {}
    if not per:
        meta = _read_json(d / "featurelens.json") or {}
        layers = meta.get("layers") if isinstance(meta.get("layers"), dict) else {}
        per = [m for sub in layers.values() if isinstance(sub, str)
               for m in [_read_json(d / sub / "eval.json")] if isinstance(m, dict)]

    def mean(key: str) -> float | None:
        vals = [v for m in per for v in [_finite(m.get(key))] if v is not None]
        return sum(vals) / len(vals) if vals else None

    return {"l0": mean("l0"), "explained_variance": mean("explained_variance"),
            "ce_loss_recovered": _finite(every.get("ce_loss_recovered")), "kl_div": _finite(every.get("kl_div")),
            "dead_fraction": mean("dead_fraction"), "layers_evaluated": len(per),
            "source": "eval (L0 and EV: mean over layers; CE: all layers spliced at once)" if per or every else None}


def _clt_layers(d: Path) -> list[int] | None:
    """The layers of the cross-layer transcoder in `d`, or None when `d` holds none."""
    cfg = _read_json(d / "cfg.json")
    if not isinstance(cfg, dict) or cfg.get("architecture") != "cross_layer_transcoder":
        return None
    layers = cfg.get("layers")
    return [int(x) for x in layers if isinstance(x, int)] if isinstance(layers, list) else None


def is_clt_layer(d: Path) -> bool:
    """Whether `d` is <a cross-layer transcoder's directory>/layer_L for one of its layers L (its weights are the
    parent's; the folder holds at most that layer's analysis)."""
    return re.fullmatch(r"layer_(\d+)", d.name) is not None and int(d.name[6:]) in (_clt_layers(d.parent) or ())


def _layer_folders(d: Path, meta: Any) -> tuple[Any, list[int] | None]:
    """(the layers a set's featurelens.json lists, or for a cross-layer transcoder {layer: "layer_<layer>"}; the
    CLT's layers or None): a CLT is one set of weights, but its features, figures and pages are per layer, as a
    set's are."""
    clt_layers = _clt_layers(d)
    if clt_layers is not None:
        return {str(x): f"layer_{x}" for x in clt_layers}, clt_layers
    return (meta.get("layers") if isinstance(meta, dict) else None), None


def _dictionary_entry(root: Path, d: Path) -> dict[str, Any]:
    cfg = _read_json(d / "cfg.json") or {}
    meta = _read_json(d / "featurelens.json") or {}
    layers, clt_layers = _layer_folders(d, meta)
    is_set = isinstance(layers, (dict, list)) and not (d / "cfg.json").is_file()
    if is_set:
        first = None
        names = sorted(layers) if isinstance(layers, dict) else []
        if names:
            sub = layers[names[0]] if isinstance(layers, dict) else None
            sub_dir = d / (sub if isinstance(sub, str) else f"layer_{names[0]}")
            first = _read_json(sub_dir / "cfg.json")
        cfg = first or {}
    many = is_set or clt_layers is not None
    kind = "transcoders" if many else (
        "transcoder" if cfg.get("transcoder") or cfg.get("hook_name_out") else "sae")
    own = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    adir = d / "analysis"
    analysed = layer_analyses(d) if many else {}
    return {"id": id_of(d.relative_to(root)), "path": str(d), "kind": kind,
            "model": cfg.get("model_name") or meta.get("model") or "",
            "hook_name": cfg.get("hook_name", ""), "d_sae": cfg.get("d_sae"),
            "arch": own.get("arch") or cfg.get("architecture"),
            "k": own.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k"),
            "layers": sorted(int(x) for x in layers if str(x).isdigit()) if many and isinstance(layers, dict) else None,
            "cross_layer": clt_layers is not None,
            "metrics": dictionary_metrics(d) if not many else set_metrics(d),
            "analyzed": (adir / "features.sqlite").is_file(), "analysis_dir": str(adir) if adir.is_dir() else None,
            "analyzed_layers": sorted(analysed) if many else None,
            # each analyzed layer's own dictionary id (its feature pages: /api/dictionaries/<id>/features/<n>)
            "layer_ids": {str(layer): id_of(a.parent.relative_to(root)) for layer, a in analysed.items()}
            if many else None}


def layer_analyses(set_dir: Path) -> dict[int, Path]:
    """{layer: analysis dir} of the layers of a transcoder set, or of a cross-layer transcoder, that were analyzed
    (`featurelens analyze <dir>/layer_L`)."""
    layers, _ = _layer_folders(set_dir, _read_json(set_dir / "featurelens.json") or {})
    out = {}
    if isinstance(layers, dict):
        for layer, sub in layers.items():
            a = set_dir / str(sub) / "analysis"
            if str(layer).isdigit() and isinstance(sub, str) and (a / "features.sqlite").is_file():
                out[int(layer)] = a
    return out


def list_dictionaries(data: Path, db: str | None = None) -> list[dict[str, Any]]:
    """Every dictionary directory under <data>/dictionaries (cfg.json, or a transcoder set's featurelens.json),
    every analysis under <data>/analysis whose dictionary lies elsewhere, and every analysis in the PostgreSQL
    database `db` (`featurelens serve --db`)."""
    root = data / "dictionaries"
    out: list[dict[str, Any]] = []
    if root.is_dir():
        stack = [(root, 0)]
        while stack:
            d, depth = stack.pop()
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir())
            except OSError:
                continue
            is_dict = (d / "cfg.json").is_file() or isinstance((_read_json(d / "featurelens.json") or {}).get("layers"),
                                                                (dict, list))
            if d != root and is_dict:
                out.append(_dictionary_entry(root, d))
                continue  # a transcoder set's layers and an analysis/ folder are parts of it
            if depth < MAX_DEPTH:
                stack.extend((c, depth + 1) for c in reversed(children) if c.name not in ("checkpoints", "analysis"))
    for a in sorted((data / "analysis").glob("*/features.sqlite")) if (data / "analysis").is_dir() else []:
        out.append(_analysis_entry(a.parent))
    if db is not None:
        out.extend(_pg_entries(db))
    return out


def _pg_entries(db: str) -> list[dict[str, Any]]:
    """The analyses in a PostgreSQL database, each listed as "@pg.<name>"."""
    from ..store import list_pg_analyses, pg_location

    out = []
    for name, meta in list_pg_analyses(db).items():
        try:
            d = json.loads(meta.get("dictionary") or "{}")
            complete = json.loads(meta.get("status") or "null") == "complete"
        except ValueError:
            d, complete = {}, False
        d = d if isinstance(d, dict) else {}
        info = {"id": PG_PREFIX + name, "path": d.get("path"), "kind": "transcoder" if d.get("transcoder") else "sae",
                "model": d.get("model_name", ""), "hook_name": d.get("hook_name", ""), "d_sae": d.get("d_sae"),
                "arch": d.get("arch"), "k": None, "layers": None, "metrics": {}, "analyzed": complete,
                "analysis_dir": str(pg_location(db, name))}
        if d.get("path") and Path(d["path"]).is_dir():
            info["metrics"] = dictionary_metrics(Path(d["path"]))
        out.append(info)
    return out


def _analysis_entry(adir: Path) -> dict[str, Any]:
    from ..store import FeatureStore

    info: dict[str, Any] = {"id": "@" + adir.name, "path": None, "kind": "sae", "model": "", "hook_name": "",
                            "d_sae": None, "arch": None, "k": None, "layers": None, "metrics": {}, "analyzed": True,
                            "analysis_dir": str(adir)}
    try:
        with FeatureStore(adir / "features.sqlite", readonly=True) as st:
            d = st.get("dictionary") or {}
    except Exception:
        return {**info, "analyzed": False}
    info.update(path=d.get("path"), model=d.get("model_name", ""), hook_name=d.get("hook_name", ""),
                d_sae=d.get("d_sae"), arch=d.get("arch"), kind="transcoder" if d.get("transcoder") else "sae")
    if d.get("path") and Path(d["path"]).is_dir():
        info["metrics"] = dictionary_metrics(Path(d["path"]))
    return info


def dictionary_dir(data: Path, ident: str, db: str | None = None) -> tuple[Path | None, Any]:
    """(dictionary directory, analysis directory or None) of a dictionary id; an analysis in the PostgreSQL
    database `db` ("@pg.<name>") is (None, its `PgLocation`)."""
    if isinstance(ident, str) and ident.startswith(PG_PREFIX):
        if db is None:
            raise UnknownIdError(f"{ident!r} names an analysis in a PostgreSQL database, and this server has none "
                                 f"(featurelens serve --db postgresql://...)")
        from ..store import pg_location

        try:
            return None, pg_location(db, ident[len(PG_PREFIX):])
        except FeaturelensError as e:
            raise UnknownIdError(str(e)) from None
    if isinstance(ident, str) and ident.startswith("@"):
        a = path_of(data / "analysis", ident[1:])
        if not (a / "features.sqlite").is_file():
            raise UnknownIdError(f"no analysis {ident!r} in {data / 'analysis'}")
        return None, a
    d = path_of(data / "dictionaries", ident)
    if is_clt_layer(d):  # a cross-layer transcoder's layer: its features, analysed in <clt>/layer_L/analysis
        a = d / "analysis"
        return d, (a if (a / "features.sqlite").is_file() else None)
    if not d.is_dir() or not ((d / "cfg.json").is_file() or (d / "featurelens.json").is_file()):
        raise UnknownIdError(f"no dictionary {ident!r}: {d} is not a dictionary directory; GET /api/dictionaries "
                             f"lists them")
    a = d / "analysis"
    return d, (a if (a / "features.sqlite").is_file() else None)


# ----------------------------------------------------------------------------------------------- models
def dictionary_id_of_path(data: Path, path: str | Path) -> str | None:
    """The id of the dictionary at `path` (or with id `path`), None when the data directory has no such one."""
    want = Path(path).expanduser().resolve()
    for d in list_dictionaries(data):
        if d["id"] == str(path) or (d["path"] and Path(d["path"]).resolve() == want):
            return d["id"]
    return None


def list_models(data: Path, dictionaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The embedded models, converted model caches under <data>/models, and models dictionaries name."""
    from ..models.loader import list_models as embedded

    rows: dict[str, dict[str, Any]] = {}
    for m in embedded():
        converted = (data / "models" / m["name"] / "model.safetensors").is_file()  # this data dir's cache
        rows[m["name"]] = {"name": m["name"], "description": m["description"], "converted": converted,
                           "available": bool(m["installed"] or converted), "dictionaries": []}
    mdir = data / "models"
    if mdir.is_dir():
        for d in sorted(mdir.iterdir()):
            if (d / "config.json").is_file() and d.name not in rows:
                rows[d.name] = {"name": d.name, "description": "converted model", "converted": True,
                                "available": True, "dictionaries": []}
    for dic in dictionaries:
        name = dic.get("model") or ""
        if not name:
            continue
        row = rows.setdefault(name, {"name": name, "description": "named by a dictionary", "converted": False,
                                     "available": Path(name).expanduser().is_dir() or name.count("/") == 1,
                                     "dictionaries": []})
        row["dictionaries"].append(dic["id"])
    return list(rows.values())


# ----------------------------------------------------------------------------------------------- graphs
def graphs_root(data: Path) -> Path:
    return data / "graphs"


def _graph_row(ident: str, slug: str, set_id: str, g: dict[str, Any]) -> dict[str, Any]:
    return {"id": ident, "slug": slug, "set": set_id, "prompt": g.get("prompt", ""), "scan": g.get("scan", ""),
            "title_prefix": g.get("title_prefix", ""), "n_tokens": len(g.get("prompt_tokens") or [])}


def list_graphs(data: Path, db: str | None = None) -> list[dict[str, Any]]:
    """Graphs listed by every graph-metadata.json under <data>/graphs (circuit-tracer's layout), then those in the
    PostgreSQL database `db` as "@pg.<set>~<slug>"."""
    root = graphs_root(data)
    out = _list_file_graphs(root) if root.is_dir() else []
    if db is not None:
        from ..store.graphs import list_graphs as list_db_graphs

        out += [_graph_row(f"{PG_PREFIX}{r['set']}~{r['slug']}", r["slug"], PG_PREFIX + r["set"], r["metadata"])
                for r in list_db_graphs(db)]
    return out


def pg_graph_key(ident: str) -> tuple[str, str] | None:
    """(set, slug) of a database graph's id "@pg.<set>~<slug>"; None for a data directory's graph id;
    UnknownIdError for a malformed one."""
    if not ident.startswith(PG_PREFIX):
        return None
    set_name, sep, slug = ident[len(PG_PREFIX):].partition("~")
    if not sep or not SLUG_RE.match(set_name) or not SLUG_RE.match(slug):
        raise UnknownIdError(f"{ident!r} is not a database graph id (@pg.<set>~<slug>)")
    return set_name, slug


def _list_file_graphs(root: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for meta in sorted(root.rglob("graph-metadata.json")):
        if len(meta.relative_to(root).parts) > MAX_DEPTH + 1:
            continue
        listing = _read_json(meta) or {}
        for g in listing.get("graphs", []) if isinstance(listing, dict) else []:
            slug = g.get("slug") if isinstance(g, dict) else None
            if not isinstance(slug, str) or not SLUG_RE.match(slug) or not (meta.parent / f"{slug}.json").is_file():
                continue
            rel = meta.parent.relative_to(root)
            out.append(_graph_row(id_of(rel / slug) if rel.parts else slug, slug, id_of(rel), g))
    return out


def graph_file(data: Path, ident: str) -> Path:
    p = path_of(graphs_root(data), ident)
    f = p.with_name(p.name + ".json")
    # <slug>.attention.json beside a graph is its attention story, not a graph
    if p.name.endswith(".attention") or not f.is_file() or not (f.parent / "graph-metadata.json").is_file():
        raise UnknownIdError(f"no graph {ident!r} (GET /api/graphs lists them)")
    return f


def require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise MissingFileError(f"{what} {path} does not exist")
    return path
