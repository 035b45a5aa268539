"""What the server keeps loaded: models, dictionaries and analyses, each loaded once on first use and shared by
every request, and the lock that serializes the model's forward passes.

Requests run in worker threads (FastAPI runs plain `def` endpoints in a thread pool), so a long generation or a
graph being computed never blocks the event loop: other requests (listing, dashboards, job progress) are answered
meanwhile. Forward passes take `Runtime.forward_lock` one step at a time, so two tabs steering at once interleave
their tokens instead of one waiting for the other to finish.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from . import catalog


class Runtime:
    def __init__(self, data_dir: Path, model_loader: Callable[[str], Any] | None = None):
        self.data_dir = Path(data_dir)
        self._model_loader = model_loader
        self.forward_lock = threading.RLock()
        self._load_lock = threading.Lock()  # one load at a time: two requests for one model load it once
        self._models: dict[str, Any] = {}
        self._dictionaries: dict[str, Any] = {}
        self._analyses: dict[str, Any] = {}

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
                    self._models[name] = load_model(local if hf_dir else name)
            return self._models[name]

    # ----------------------------------------------------------------- dictionaries and analyses
    def dictionary(self, ident: str) -> Any:
        """The dictionary (SparseDictionary or TranscoderSet) of a dictionary id."""
        d, adir = catalog.dictionary_dir(self.data_dir, ident)
        with self._load_lock:
            if ident not in self._dictionaries:
                from ..dictionaries import load_dictionary

                if d is None:
                    analysis = self._analysis_locked(ident, adir)
                    self._dictionaries[ident] = analysis.dictionary
                else:
                    self._dictionaries[ident] = load_dictionary(d)
            return self._dictionaries[ident]

    def analysis(self, ident: str) -> Any:
        """The `DictionaryAnalysis` of a dictionary id, with the shared model and dictionary attached."""
        d, adir = catalog.dictionary_dir(self.data_dir, ident)
        if adir is None:
            from ..analysis import NotAnalyzedError

            raise NotAnalyzedError(f"dictionary {ident!r} has not been analyzed: run `featurelens analyze {d}` "
                                   f"to build its dashboards")
        with self._load_lock:
            return self._analysis_locked(ident, adir)

    def _analysis_locked(self, ident: str, adir: Path) -> Any:
        if ident not in self._analyses:
            # check_same_thread is off in the store (requests come from a thread pool); writes (labels) are
            # serialized by SQLite itself.
            from ..analysis import open_analysis

            self._analyses[ident] = open_analysis(adir)
        return self._analyses[ident]

    def layer_analyses(self, ident: str) -> dict[int, Any]:
        """{layer: DictionaryAnalysis} for the analyzed layers of a transcoder set (opened once, shared)."""
        d, _ = catalog.dictionary_dir(self.data_dir, ident)
        out = {}
        for layer, adir in catalog.layer_analyses(d).items() if d is not None else ():
            key = f"{ident}#layer{layer}"
            with self._load_lock:
                out[layer] = self._analysis_locked(key, adir)
        return out

    def analysis_with_model(self, ident: str) -> Any:
        """The analysis with its model and dictionary loaded through this runtime (shared, loaded once)."""
        a = self.analysis(ident)
        if a._model is None:
            a._model = self.model(a.model_name)
        if a._dictionary is None:
            d, _ = catalog.dictionary_dir(self.data_dir, ident)
            a._dictionary = self.dictionary(ident) if d is not None else a.dictionary
        return a

    def close(self) -> None:
        for a in self._analyses.values():
            try:
                a.close()
            except Exception:
                pass
        self._analyses.clear()
