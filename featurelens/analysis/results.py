"""`open_analysis(path)`: a dictionary's finished analysis (`DictionaryAnalysis`): its feature dashboards, labels
and the three searches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from ..dictionaries.compat import dictionary_fingerprint, resolve_dictionary
from ..dictionaries.formats import load_dictionary
from ..dictionaries.sae import check_feature_index
from ..engine.errors import FeaturelensError, InputError, MissingFileError
from ..models.loader import load_model
from ..search.by_text import FeatureActivations, TextSearchResult, feature_activations, search_text
from ..search.by_token import PromoteHit, search_promotes
from ..search.concept import SearchHit, concept_search
from ..store import (BUILD_DIR, DB_FILE, USER, FeatureStore, PgLocation, StoreError, analysis_dir_for_path,
                     analysis_slug, data_analysis_dir, is_postgres_url, pg_location)
from ..store.backends import MAX_NAME
from .dashboard import FeatureDashboard, TokenExample
from .explain import AutoExplainer, Explainer, explain_store
from .scoring import score_labels


class NotAnalyzedError(FeaturelensError, FileNotFoundError):
    """The dictionary has no finished analysis."""


def default_analysis_dir(dictionary: Any, dict_dir: Path | None, model_name: str | None = None) -> Path:
    if dict_dir is not None:
        return analysis_dir_for_path(dict_dir)
    cfg = dictionary.cfg
    name = model_name or getattr(cfg, "model_name", "") or "model"
    return data_analysis_dir(f"{name}-{cfg.hook_name}-{cfg.d_sae}", dictionary_fingerprint(dictionary))


def default_analysis_name(dictionary: Any, dict_dir: Path | None, model_name: str | None = None) -> str:
    """The name of a dictionary's analysis in a PostgreSQL database: like its directory under the data dir (the
    dictionary directory's name and a hash of its path; in memory: model, hook and width, and its weights' hash)."""
    if dict_dir is not None:
        p = Path(dict_dir).expanduser().resolve()
        return analysis_slug(p.name, str(p), MAX_NAME)
    cfg = dictionary.cfg
    name = model_name or getattr(cfg, "model_name", "") or "model"
    return analysis_slug(f"{name}-{cfg.hook_name}-{cfg.d_sae}", dictionary_fingerprint(dictionary), MAX_NAME)


def find_analysis(path: Any) -> Path | PgLocation:
    """The analysis directory for a dictionary directory, an analysis directory, its database, or a dictionary; or
    the PostgreSQL analysis a URL names (postgresql://.../db#name)."""
    if isinstance(path, PgLocation):
        return path
    if is_postgres_url(path):
        return pg_location(path)
    if not isinstance(path, (str, Path)):
        dictionary, d = resolve_dictionary(path)
        cands = [default_analysis_dir(dictionary, d)]
    else:
        p = Path(path).expanduser()
        if p.is_file() and p.name == DB_FILE:
            return p.parent
        if not p.exists():
            raise MissingFileError(f"{p}: no such dictionary or analysis directory")
        cands = [p, p / "analysis", analysis_dir_for_path(p)]
    for c in cands:
        if (c / DB_FILE).is_file():
            return c
    partial = [c for c in cands if (c / BUILD_DIR / DB_FILE).is_file()]
    where = partial[0] if partial else cands[-1]
    hint = (f"an analysis was started in {where / BUILD_DIR} but did not finish; run `featurelens analyze {path}` "
            f"again to resume it") if partial else f"run `featurelens analyze {path}` (or fl.analyze) first"
    raise NotAnalyzedError(f"{path}: this dictionary has not been analyzed: {hint}")


def open_analysis(path: Any, *, model: Any = None) -> "DictionaryAnalysis":
    """Open the finished analysis of a dictionary (its directory, its analysis directory, or a SparseDictionary), or
    one in a PostgreSQL database (postgresql://user@host/db#analysis-name).

    >>> fd = fl.open_analysis("~/sae-l6")
    >>> fd.feature(1234)           # dashboard data; displays as HTML in Jupyter
    >>> fd.search("legal document")
    """
    dictionary = None if isinstance(path, (str, Path, PgLocation)) else path
    return DictionaryAnalysis(find_analysis(path), dictionary=dictionary, model=model)


class DictionaryAnalysis:
    """An analyzed dictionary: dashboards (`feature`), labels (`label`, `set_label`) and the three searches."""

    def __init__(self, adir: str | Path | PgLocation, dictionary: Any = None, model: Any = None):
        """adir: the analysis directory, or a PostgreSQL analysis (a `PgLocation` or postgresql://...#name)."""
        if isinstance(adir, PgLocation) or is_postgres_url(adir):
            self.dir: Path | PgLocation = find_analysis(adir)
            path: Any = self.dir
            self.store = FeatureStore(path)
        else:
            self.dir = Path(adir)
            path = self.dir / DB_FILE
            writable = os.access(self.dir, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))
            self.store = FeatureStore(path, readonly=not writable)
        self.meta = self.store.meta()
        if self.meta.get("status") != "complete":
            raise NotAnalyzedError(f"{path}: the analysis is not complete")
        d = self.meta.get("dictionary")
        if not isinstance(d, dict) or not isinstance(d.get("d_sae"), int) or not isinstance(d.get("hook_name"), str):
            raise StoreError(f"{path} is damaged: it does not record which dictionary it analyzed (d_sae, hook_name); "
                             f"run `featurelens analyze --overwrite` to rebuild it")
        self._dictionary = dictionary
        self._model = model
        self.timings: Any = None

    # ----------------------------------------------------------------- facts
    @property
    def n_features(self) -> int:
        return int(self.meta["dictionary"]["d_sae"])

    def __len__(self) -> int:
        return self.n_features

    @property
    def hook_name(self) -> str:
        return self.meta["dictionary"]["hook_name"]

    @property
    def model_name(self) -> str:
        return self.meta["dictionary"].get("model_name") or self.meta.get("model", "")

    def __repr__(self) -> str:
        c = self.meta.get("corpus", {})
        return (f"DictionaryAnalysis({self.n_features} features, {self.model_name} {self.hook_name}, "
                f"{c.get('n_tokens', 0):,} tokens of {c.get('source')}, at {self.dir})")

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> "DictionaryAnalysis":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ----------------------------------------------------------------- lazily loaded model and dictionary
    @property
    def dictionary(self) -> Any:
        if self._dictionary is None:
            p = self.meta["dictionary"].get("path")
            if not p or not Path(p).exists():
                raise MissingFileError(f"the dictionary this analysis was made from is not at {p!r} any more; pass "
                                        f"it: open_analysis(dictionary) or DictionaryAnalysis(dir, dictionary=dictionary)")
            self._dictionary = load_dictionary(p)
        return self._dictionary

    @property
    def model(self) -> Any:
        if self._model is None:
            self._model = load_model(self.model_name)
        return self._model

    # ----------------------------------------------------------------- features
    def check_index(self, idx: Any) -> int:
        return check_feature_index(idx, self.n_features)

    def feature(self, idx: int) -> FeatureDashboard:
        """The dashboard data of feature `idx`."""
        idx = self.check_index(idx)
        row = self.store.feature(idx)
        if row is None:
            raise NotAnalyzedError(f"feature {idx} is missing from {self.store.path}; re-run the analysis")
        exs = self.store.examples(idx)
        ids = {t for e in exs for t in e["tokens"]} | {t for t, _ in row["logit_up"] + row["logit_down"]}
        strings = self.store.token_strings(ids)
        labels_all = self.store.current_labels()
        labels = self.store.labels(idx)
        cur = labels[0] if labels else None

        def lab(i: int) -> str | None:
            v = labels_all.get(i)
            return v[0] if v else None

        def example(e: dict[str, Any]) -> TokenExample:
            return TokenExample(tokens=[strings.get(t, f"<{t}>") for t in e["tokens"]], acts=e["acts"],
                                index=e["pos"] - e["start"], act=e["act"], ctx=e["ctx"], pos=e["pos"],
                                bin=e["bin"] if e["kind"] == "quantile" else None)

        hist = self.meta.get("hist", {})
        return FeatureDashboard(
            index=idx, d_sae=self.n_features, model=self.model_name, hook_name=self.hook_name,
            label=cur["label"] if cur else None, label_provenance=cur["provenance"] if cur else None, labels=labels,
            density=row["density"], n_fires=row["n_fires"], n_tokens=int(self.meta.get("stats", {}).get("n_tokens", 0)),
            max_act=row["max_act"], mean_act=row["mean_act"], hist_edges=hist.get("edges", []),
            hist_counts=row["hist"].tolist() if row["hist"] is not None else [],
            logit_up=[(strings.get(t, f"<{t}>"), t, v) for t, v in row["logit_up"]],
            logit_down=[(strings.get(t, f"<{t}>"), t, v) for t, v in row["logit_down"]],
            similar=[(i, c, lab(i)) for i, c in row["similar"]],
            cofiring=[(i, j, p, n, lab(i)) for i, j, p, n in row["cofire"]],
            top_examples=[example(e) for e in exs if e["kind"] == "top"],
            quantile_examples=[example(e) for e in exs if e["kind"] == "quantile"],
            label_score=cur["score"] if cur else None, label_score_method=cur["score_method"] if cur else None,
        )

    __getitem__ = feature

    # ----------------------------------------------------------------- labels
    def label(self, idx: int) -> str | None:
        labels = self.store.labels(self.check_index(idx))
        return labels[0]["label"] if labels else None

    def labels(self) -> dict[int, str]:
        """feature -> current label (the user's, else the newest)."""
        return {f: l for f, (l, _) in self.store.current_labels().items()}

    def set_label(self, idx: int, label: str | None) -> None:
        """Set a feature's label by hand (provenance "user"); None removes the user's label."""
        idx = self.check_index(idx)
        if label is not None:
            if not isinstance(label, str) or not label.strip():
                raise InputError("a label is a non-empty string (use None to remove your label)")
            label = label.strip()
        if self.store.readonly:
            raise PermissionError(f"{self.store.path} is read-only")
        self.store.set_label(idx, label, USER)
        if label is not None:  # a label a person wrote is scored like any other
            score_labels(self.store, provenance=USER, features=[idx], progress=False)

    def explain(self, explainer: Any = None, features: Any = None, progress: bool = True, *,
                skip_labeled: bool = False, batch: int = 512) -> int:
        """Label features with an `Explainer` (default: the built-in one) and score the new labels; returns how
        many were labeled. With `skip_labeled`, features that have a label from this explainer already are left
        alone (resume an interrupted run)."""
        return explain(self, explainer, features, progress=progress, skip_labeled=skip_labeled, batch=batch)

    # ----------------------------------------------------------------- searches
    def search(self, query: str, k: int = 10, method: str = "auto") -> list[SearchHit]:
        """Features by meaning: `query` against labels and top snippets (sentence embeddings, else lexical).
        `fl.steerable_search(analysis, query)` also checks the best matches by steering them."""
        return concept_search(self.store, query, k=k, method=method)

    def search_text(self, text: str, k: int = 10) -> TextSearchResult:
        """The features that fire on `text`: overall and per token."""
        return search_text(self, text, k=k)

    def feature_activations(self, idx: int, text: str) -> FeatureActivations:
        """Feature `idx`'s activation at each token of `text`."""
        return feature_activations(self, idx, text)

    def search_promotes(self, token: str | int, k: int = 10) -> list[PromoteHit]:
        """The features whose logit lens pushes `token` up most."""
        return search_promotes(self, token, k=k)


def explain(analysis: Any, explainer: Explainer | None = None, features: Iterable[int] | None = None,
            progress: bool = True, *, skip_labeled: bool = False, batch: int = 512) -> int:
    """Label the features of an analyzed dictionary (a path or a DictionaryAnalysis) with `explainer`, then score
    the labels it wrote (`score_labels`); returns how many were labeled. When the explainer fails partway, the
    batches already stored are scored before the error propagates (a rerun with skip_labeled=True goes on)."""
    a = analysis if isinstance(analysis, DictionaryAnalysis) else open_analysis(analysis)
    explainer = explainer or AutoExplainer()
    features = None if features is None else [int(f) for f in features]
    try:
        return explain_store(a.store, explainer, features, batch=batch, progress=progress, skip_labeled=skip_labeled)
    finally:
        score_labels(a.store, provenance=explainer.provenance, features=features, progress=progress)
