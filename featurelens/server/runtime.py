"""What the server keeps loaded: models, dictionaries and analyses, each loaded once on first use and shared by
every request, and the lock that serializes the model's forward passes.

Requests run in worker threads (FastAPI runs plain `def` endpoints in a thread pool), so a long generation or a
graph being computed never blocks the event loop: other requests (listing, dashboards, job progress) are answered
meanwhile. Forward passes take `Runtime.forward_lock` one step at a time, so two tabs steering at once interleave
their tokens instead of one waiting for the other to finish.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import catalog
from .freshness import check_fresh, dir_signature, fingerprint_of


YIELD_SECONDS = 0.002  # long enough for a thread waiting on the lock to wake and take it


def yield_lock(lock: Any) -> None:
    """Let go of `lock` (held once by this thread) for a moment and take it back: a long holder (a graph job) calls
    this between its steps so that the requests waiting for the model run in between."""
    lock.release()
    try:
        time.sleep(YIELD_SECONDS)
    finally:
        lock.acquire()


class Runtime:
    def __init__(self, data_dir: Path, model_loader: Callable[[str], Any] | None = None, device: str | None = None,
                 db: str | None = None):
        self.data_dir = Path(data_dir)
        self.device = device  # models' and dictionaries' (None: cpu)
        self.db = db  # a PostgreSQL database whose analyses are served beside the data directory's
        self._model_loader = model_loader
        self.forward_lock = threading.RLock()
        self._load_lock = threading.Lock()  # one load at a time: two requests for one model load it once
        self._models: dict[str, Any] = {}
        self._dictionaries: dict[str, tuple[Any, Any, str | None]] = {}  # id -> (files' signature, dict, fingerprint)
        self._analyses: dict[str, Any] = {}
        self._layer_fingerprints: dict[tuple[str, Any], str] = {}

    # ----------------------------------------------------------------- models
    def model(self, name: str) -> Any:
        if not isinstance(name, str) or not name:
            raise catalog.UnknownIdError("this dictionary does not say which model it belongs to")
        with self._load_lock:
            if name not in self._models:
                if self._model_loader is not None:
                    self._models[name] = self._model_loader(name)
                else:
                    from ..models.loader import EMBEDDED, load_model

                    local = self.data_dir / "models" / name
                    hf_dir = name not in EMBEDDED and (local / "config.json").is_file() and \
                        any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
                    # a Hugging Face directory placed under <data dir>/models/ loads by its folder name
                    self._models[name] = load_model(local if hf_dir else name, device=self.device)
            return self._models[name]

    # ----------------------------------------------------------------- dictionaries and analyses
    def dictionary(self, ident: str) -> Any:
        """The dictionary (SparseDictionary or TranscoderSet) of a dictionary id."""
        d, adir = catalog.dictionary_dir(self.data_dir, ident, self.db)
        with self._load_lock:
            return self._dictionary_locked(ident, d, adir)[1]

    def _dictionary_locked(self, ident: str, d: Path | None, adir: Path | None) -> tuple[Any, Any, str | None]:
        # a CLT layer's weights are its parent's files
        sig = (dir_signature(d), dir_signature(d.parent)) if d is not None and catalog.is_clt_layer(d) else \
            dir_signature(d)
        cached = self._dictionaries.get(ident)
        if cached is None or (d is not None and cached[0] != sig):  # saved again since: load the new weights
            from ..dictionaries import load_dictionary

            if d is None:
                obj = self._analysis_locked(ident, adir).dictionary
            else:
                obj = load_dictionary(d, device=self.device or "cpu")
            self._dictionaries[ident] = (sig, obj, fingerprint_of(obj) if d is not None else None)
        return self._dictionaries[ident]

    def analysis(self, ident: str) -> Any:
        """The `DictionaryAnalysis` of a dictionary id, with the shared model and dictionary attached."""
        d, adir = catalog.dictionary_dir(self.data_dir, ident, self.db)
        if adir is None:
            from ..analysis import NotAnalyzedError

            raise NotAnalyzedError(f"dictionary {ident!r} has not been analyzed: run `featurelens analyze {d}` "
                                   f"to build its dashboards")
        with self._load_lock:
            a = self._analysis_locked(ident, adir)
            if d is not None:  # never the dashboards of other weights than the dictionary's
                _, obj, fp = self._dictionary_locked(ident, d, adir)
                if fp is not None:
                    check_fresh(a, obj, fp, ident)
            return a

    def _analysis_locked(self, ident: str, adir: Any) -> Any:
        a = self._analyses.get(ident)
        if a is not None and a.store.changed():
            # rebuilt (or written by another process) since it was opened: open it afresh. The old object is not
            # closed here (a request may still be reading it); it closes when the last one lets go of it.
            del self._analyses[ident]
        if ident not in self._analyses:
            # check_same_thread is off in the store (requests come from a thread pool); writes (labels) are
            # serialized by SQLite itself, or on PostgreSQL by the store's lock around its one connection.
            from ..analysis import open_analysis

            self._analyses[ident] = open_analysis(adir)
        return self._analyses[ident]

    def layer_analyses(self, ident: str) -> dict[int, Any]:
        """{layer: DictionaryAnalysis} for the analyzed layers of a transcoder set or a cross-layer transcoder
        (opened once, shared)."""
        d, _ = catalog.dictionary_dir(self.data_dir, ident, self.db)
        out = {}
        for layer, adir in catalog.layer_analyses(d).items() if d is not None else ():
            key = f"{ident}#layer{layer}"
            with self._load_lock:
                a = self._analysis_locked(key, adir)
                sig, tset, _ = self._dictionary_locked(ident, d, None)
                fp = self._layer_fingerprints.get((key, sig))
                if fp is None:
                    fp = fingerprint_of(tset.layer_features(layer)) if layer in tset.layers else ""
                    self._layer_fingerprints[(key, sig)] = fp
            if not fp or a.meta.get("dictionary_fingerprint") in (None, fp):
                out[layer] = a  # a layer analyzed before it was trained again is left out
        return out

    def analysis_with_model(self, ident: str) -> Any:
        """The analysis with its model and dictionary loaded through this runtime (shared, loaded once)."""
        a = self.analysis(ident)
        if a._model is None:
            a._model = self.model(a.model_name)
        if a._dictionary is None:
            d, _ = catalog.dictionary_dir(self.data_dir, ident, self.db)
            a._dictionary = self.dictionary(ident) if d is not None else a.dictionary
        return a

    def close(self) -> None:
        for a in self._analyses.values():
            try:
                a.close()
            except Exception:
                pass
        self._analyses.clear()
