"""`run_demo`: the main job. From nothing to a fully analysed model on the embedded default (Gemma 3 270M and the
embedded corpus), ready to browse in the web app.

    report = fl.run_demo(quick=True)       # about 10 minutes on 2 CPU cores
    print(report.summary())

Steps, in order (`DEMO_STEPS`):

1. **model**: convert the embedded model once (later runs load the cache);
2. **corpus**: fetch and tokenize the embedded corpus (training and held-out splits);
3. **transcoders**: the replacement model the graphs are computed on: skip transcoders for every layer (the
   default), or one cross-layer transcoder (`replacement="clt"`, `featurelens demo --replacement clt`);
4. **saes**: TopK SAEs on the residual stream of a few layers;
5. **evaluate**: L0, explained variance, CE loss recovered and KL of every SAE; L0 and explained variance of each
   transcoder, and CE / KL with all of them spliced in at once; written beside each dictionary (eval.json), where
   the web app reads it;
6. **analyze**: dashboards, labels and the search index of every SAE and transcoder feature;
7. **graphs**: an attribution graph per prompt, pruned and saved with its scores, then checked by ablating its
   most influential features in the real model.

Idempotent: a step's key is a hash of the budget it reads and of the keys of the steps it builds on; a step whose
recorded key matches is reused (and says so), a changed budget redoes that step and what depends on it. Every long
step resumes by itself after an interruption (training checkpoints, the analysis's saved state, one file per
graph), and a step is recorded only once it has finished. The record is <data dir>/demo/state.json.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError
from ..io import atomic_write_json
from ..paths import data_dir

PROMPTS = ("The capital of France is", "2 + 2 = ", 'The opposite of "small" is "',
           "The keys to the old cabinet", "The Eiffel Tower is located in the city of")
# the answer each demo prompt is traced to, whether or not the model ranks it first (Gemma writes " 4" as " " + "4",
# so the sum's prompt ends with the space)
ANSWERS = {"The capital of France is": " Paris", "2 + 2 = ": "4", 'The opposite of "small" is "': "large",
           "The keys to the old cabinet": " are", "The Eiffel Tower is located in the city of": " Paris"}
STATE_FILE = "state.json"
GRAPH_SET = "demo"
REPLACEMENTS = ("transcoders", "clt")  # per-layer skip transcoders, or a cross-layer transcoder
# A CLT row costs several per-layer rows (benchmarks/clt_train.py), and a CLT trained on half the rows still predicted
# the real model's ablations better than the per-layer set on all of them (docs/benchmarks.md, "The CLT as the
# replacement model"): its presets take half the transcoder rows.
CLT_ROW_SHARE = 0.5


@dataclass(frozen=True)
class DemoBudget:
    """Everything the demo's result depends on. `preset` gives the default and the quick budgets, scaled.

    Token counts are training / analysis tokens; the transcoders' analysis reads fewer tokens per layer because
    there are 18 layers of them.
    """

    model: str = "gemma-3-270m"
    ctx_len: int = 128
    transcoder_tokens: int = 600_000  # training rows (repeats included); fresh tokens = this / transcoder_reuse
    transcoder_width: int = 1024
    transcoder_k: int = 32
    transcoder_reuse: int = 4
    transcoder_batch_size: int = 1024
    sae_layers: tuple[int, ...] = (4, 8)
    sae_tokens: int = 250_000
    sae_width: int = 4096
    sae_k: int = 32
    eval_tokens: int = 30_000
    ce_contexts: int = 8
    analysis_tokens: int = 150_000
    transcoder_analysis_tokens: int = 10_000
    transcoder_embed: bool = True  # search embeddings for the transcoders' features too (about 9 s a layer)
    prompts: tuple[str, ...] = PROMPTS
    max_feature_nodes: int = 1024
    check_features: int = 10
    replacement: str = "transcoders"  # REPLACEMENTS: what the "transcoders" step trains

    def __post_init__(self) -> None:
        if self.replacement not in REPLACEMENTS:
            raise InputError(f"replacement must be one of {', '.join(REPLACEMENTS)}, got {self.replacement!r}")

    @classmethod
    def preset(cls, quick: bool = False, scale: float = 1.0, replacement: str = "transcoders",
               **overrides: Any) -> "DemoBudget":
        """The default budget (under 45 minutes on 2 CPU cores) or the quick one (under 10); `scale` multiplies
        every token budget and the feature rows of the graphs (use it on a bigger machine or a GPU).
        replacement: "transcoders" (per-layer skip transcoders) or "clt" (a cross-layer transcoder, on
        CLT_ROW_SHARE of the rows)."""
        if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
            raise InputError(f"scale must be a positive number, got {scale!r}")
        base = cls(replacement=replacement) if not quick else cls(
            transcoder_tokens=80_000, transcoder_width=512, transcoder_k=16, sae_layers=(6,), sae_tokens=60_000,
            sae_width=1024, eval_tokens=8_000, ce_contexts=2, analysis_tokens=30_000, transcoder_analysis_tokens=2_000,
            transcoder_embed=False, prompts=PROMPTS[:2], max_feature_nodes=256, check_features=5,
            replacement=replacement)
        if replacement == "clt":
            base = dataclasses.replace(base, transcoder_tokens=int(base.transcoder_tokens * CLT_ROW_SHARE))
        scaled = {f: max(1, int(round(getattr(base, f) * scale))) for f in (
            "transcoder_tokens", "sae_tokens", "eval_tokens", "ce_contexts", "analysis_tokens",
            "transcoder_analysis_tokens", "max_feature_nodes")}
        budget = dataclasses.replace(base, **scaled)
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"unknown demo budget field(s) {', '.join(unknown)}")
        return dataclasses.replace(budget, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DemoStep:
    name: str
    title: str
    reads: tuple[str, ...]  # the budget fields this step depends on
    after: tuple[str, ...]  # the steps whose results it builds on


DEMO_STEPS = (
    DemoStep("model", "convert and load the model", ("model",), ()),
    DemoStep("corpus", "fetch and tokenize the embedded corpus", ("ctx_len",), ("model",)),
    DemoStep("transcoders", "train the replacement model (transcoders for every layer)",
             ("transcoder_tokens", "transcoder_width", "transcoder_k", "transcoder_reuse", "transcoder_batch_size",
              "replacement"), ("corpus",)),
    DemoStep("saes", "train residual-stream SAEs", ("sae_layers", "sae_tokens", "sae_width", "sae_k"), ("corpus",)),
    DemoStep("evaluate", "evaluate every dictionary", ("eval_tokens", "ce_contexts"), ("transcoders", "saes")),
    DemoStep("analyze", "analyse every feature (dashboards, labels, search)",
             ("analysis_tokens", "transcoder_analysis_tokens", "transcoder_embed"), ("transcoders", "saes")),
    DemoStep("graphs", "attribution graphs and their faithfulness checks",
             ("prompts", "max_feature_nodes", "check_features"), ("transcoders", "analyze")),
)
STEP_NAMES = tuple(s.name for s in DEMO_STEPS)

# Seconds on a 2-core CPU (measured: the model's forward ~650 tokens/s through all 18 layers, a width-1024 skip
# transcoder step ~0.04 ms a token and layer; in the analysis, labels and their scores ~80 features/s and search
# embeddings ~150 features/s, 4-6x that for the transcoder layers, whose windows repeat from layer to layer: the
# embedder encodes each once), for the time-left estimate before a step has run; it is rescaled by how fast the
# finished steps actually went.
_FORWARD = 650.0  # tokens/s, all layers
_LABELS, _EMBED = 80.0, 150.0  # features/s
_TC_LABELS, _TC_EMBED = 350.0, 850.0  # features/s, the transcoder layers (analysed on the same tokens)
_CLT_STEP = 4.6  # a CLT row over a per-layer set's: the default budget's CLT trained in 18:28 (dead latents' AuxK too)


def _upto(layer: int) -> float:
    return (layer + 1) / 18


_COST = {"model": lambda b: 40.0, "corpus": lambda b: 15.0,
         "transcoders": lambda b: b.transcoder_tokens * 18 * 4e-5 * b.transcoder_width / 1024
         * (_CLT_STEP if b.replacement == "clt" else 1.0) + b.transcoder_tokens / b.transcoder_reuse / _FORWARD,
         # one forward to the deepest SAE's layer feeds them all (`train_saes`)
         "saes": lambda b: b.sae_tokens * (_upto(max(b.sae_layers, default=-1)) / _FORWARD + 1e-4 * len(b.sae_layers)),
         # one pass for every dictionary's reconstruction (`evaluate_dictionaries`), then its spliced CE passes
         "evaluate": lambda b: 1.3 * b.eval_tokens / _FORWARD + (len(b.sae_layers) + 1)
         * 1.5 * b.ce_contexts * b.ctx_len / 120,
         # one forward for the SAEs and one for the transcoder layers (`SharedForward`), then per feature
         "analyze": lambda b: b.analysis_tokens * _upto(max(b.sae_layers, default=-1)) / _FORWARD
         + b.transcoder_analysis_tokens / _FORWARD
         + len(b.sae_layers) * b.sae_width * (1 / _LABELS + 1 / _EMBED)
         + 18 * b.transcoder_width * (1 / _TC_LABELS + (1 / _TC_EMBED if b.transcoder_embed else 0))
         + 35 * len(b.sae_layers) + 5 * 18,  # logit lens, dashboards, writing
         "graphs": lambda b: len(b.prompts) * (10 + b.max_feature_nodes / 40)}


def step_keys(budget: DemoBudget) -> dict[str, str]:
    """{step: key}: a hash of the budget fields the step reads and of the keys of the steps it builds on."""
    keys: dict[str, str] = {}
    for s in DEMO_STEPS:
        ident = {"reads": {f: getattr(budget, f) for f in s.reads}, "after": [keys[a] for a in s.after]}
        keys[s.name] = hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return keys


def with_later_steps(force: "set[str] | list[str] | tuple[str, ...]") -> set[str]:
    """The steps to redo when `force` is redone: those, and every step that builds on one of them (retrained SAEs
    make their evaluation and analyses stale; the retraining even deletes the old analyses)."""
    out = set(force)
    for s in DEMO_STEPS:  # in order: a step's `after` comes before it
        if any(a in out for a in s.after):
            out.add(s.name)
    return out


def demo_dir(root: Path | None = None) -> Path:
    return (root or data_dir()) / "demo"


def demo_state(root: Path | None = None) -> dict[str, Any]:
    """What the last demo runs recorded: {"steps": {name: {"key", "seconds", "summary", ...}}, "budget": ...}."""
    path = demo_dir(root) / STATE_FILE
    if not path.is_file():
        return {"steps": {}}
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        print(f"featurelens: {path} is unreadable; the demo starts over", file=sys.stderr)
        return {"steps": {}}
    if not isinstance(state, dict) or not isinstance(state.get("steps"), dict):
        return {"steps": {}}
    return state


@dataclass
class DemoReport:
    """What a demo run did: per step, whether it ran or was reused, its seconds and its summary."""

    budget: DemoBudget
    root: Path
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(float(self.steps[s].get("seconds", 0.0)) for s in self.ran)

    def summary(self) -> str:
        lines = [f"featurelens demo in {self.root}:"]
        for s in DEMO_STEPS:
            rec = self.steps.get(s.name, {})
            how = "ran" if s.name in self.ran else "reused"
            lines.append(f"  {s.name:<12} {how:<7} {_clock(rec.get('seconds', 0.0)):>8}  {_one_line(rec.get('summary'))}")
        lines.append(f"  this run: {_clock(self.seconds)}")
        return "\n".join(lines)


def _clock(seconds: float) -> str:
    s = int(round(float(seconds)))
    return f"{s // 60}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _one_line(summary: Any) -> str:
    if not isinstance(summary, dict):
        return ""
    return ", ".join(f"{k} {v}" for k, v in summary.items() if isinstance(v, (str, int, float)))[:110]


def run_demo(budget: DemoBudget | None = None, *, quick: bool = False, scale: float = 1.0,
             replacement: str = "transcoders", device: str | None = None, force: "list[str] | tuple[str, ...]" = (),
             progress: bool = True, log: Callable[[str], None] | None = None) -> DemoReport:
    """Run (or finish, or reuse) every demo step; returns the report. Artifacts go under the data directory:
    dictionaries/<model>/demo-*, graphs/demo/, demo/state.json.

    budget: what to run (default: `DemoBudget.preset(quick, scale, replacement)`).
    replacement: "transcoders" (per-layer skip transcoders, in demo-transcoders/) or "clt" (a cross-layer
        transcoder, in demo-clt/), when no budget is given.
    force: step names to redo even when their record matches (and the steps that build on them).

    >>> report = run_demo(quick=True)   # doctest: +SKIP
    >>> report.steps["graphs"]["summary"]["graphs"]   # doctest: +SKIP
    2
    """
    from ..device import check_device

    check_device(device)  # before any step: `device` is where the model, training and analyses run
    budget = budget or DemoBudget.preset(quick=quick, scale=scale, replacement=replacement)
    bad = [f for f in force if f not in STEP_NAMES]
    if bad:
        raise InputError(f"unknown demo step(s) {', '.join(map(repr, bad))}; the steps are {', '.join(STEP_NAMES)}")
    return _Demo(budget, device, with_later_steps(force), progress,
                 log or (lambda m: print(m, file=sys.stderr, flush=True))).run()


class _Demo:
    def __init__(self, budget: DemoBudget, device: str | None, force: set[str], progress: bool,
                 log: Callable[[str], None]):
        self.budget, self.device, self.force, self.progress, self.log = budget, device, force, progress, log
        self.root = data_dir()
        self.dir = demo_dir(self.root)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.state = demo_state(self.root)
        self.keys = step_keys(budget)
        self._model: Any = None
        safe_model = budget.model.replace("/", "_")
        self.dict_root = self.root / "dictionaries" / safe_model
        self.tc_dir = self.dict_root / ("demo-clt" if budget.replacement == "clt" else "demo-transcoders")
        self.graph_dir = self.root / "graphs" / GRAPH_SET

    # -------------------------------------------------------------------------------------------- bookkeeping
    def sae_dir(self, layer: int) -> Path:
        return self.dict_root / f"demo-sae-resid-post-{layer}"

    @staticmethod
    def sae_hook(layer: int) -> str:
        return f"blocks.{layer}.hook_resid_post"

    @property
    def model(self) -> Any:
        if self._model is None:
            from ..models.loader import load_model

            self._model = load_model(self.budget.model, device=self.device)
        return self._model

    def _save_state(self) -> None:
        self.state["budget"] = self.budget.to_dict()
        atomic_write_json(self.dir / STATE_FILE, self.state)

    def _done(self, step: str) -> bool:
        rec = self.state["steps"].get(step)
        return (isinstance(rec, dict) and rec.get("key") == self.keys[step] and rec.get("status") == "done"
                and step not in self.force)

    def _started_same(self, step: str) -> bool:
        rec = self.state["steps"].get(step)
        return isinstance(rec, dict) and rec.get("key") == self.keys[step] and rec.get("status") == "running"

    def run(self) -> DemoReport:
        report = DemoReport(self.budget, self.root)
        todo = [s for s in DEMO_STEPS if not self._done(s.name)]
        estimate = {s.name: _COST[s.name](self.budget) for s in todo}
        measured = predicted = 0.0
        t_start = time.perf_counter()
        for i, s in enumerate(DEMO_STEPS, 1):
            head = f"[{i}/{len(DEMO_STEPS)}] {s.name}: {s.title}"
            if self._done(s.name):
                rec = self.state["steps"][s.name]
                self.log(f"{head}: done earlier ({_clock(rec.get('seconds', 0))}), reusing it")
                report.steps[s.name] = rec
                continue
            rate = measured / predicted if predicted > 0 else 1.0
            left = sum(estimate[n] for n in estimate if n not in report.ran) * rate
            self.log(f"{head}: about {_clock(estimate[s.name] * rate)} (the demo: about {_clock(left)} left)")
            prev = self.state["steps"].get(s.name) or {}
            started = prev.get("started") if self._started_same(s.name) else None  # an interrupted run of this budget
            self.state["steps"][s.name] = {"key": self.keys[s.name], "status": "running",
                                           "started": started or time.time()}
            self._save_state()
            t0 = time.perf_counter()
            summary = getattr(self, f"_step_{s.name}")()
            dt = time.perf_counter() - t0
            self.state["steps"][s.name] = {"key": self.keys[s.name], "status": "done", "seconds": round(dt, 1),
                                           "finished": time.time(), "summary": summary}
            self._save_state()
            self.force.discard(s.name)
            report.steps[s.name] = self.state["steps"][s.name]
            report.ran.append(s.name)
            if estimate[s.name] >= 120:  # the short fixed steps (conversion, tokenizing) say little about speed
                measured, predicted = measured + dt, predicted + estimate[s.name]
            self.log(f"{head}: finished in {_clock(dt)}")
        self.log(f"featurelens demo: finished in {_clock(time.perf_counter() - t_start)}")
        return report

    # -------------------------------------------------------------------------------------------- the steps
    def _step_model(self) -> dict[str, Any]:
        m = self.model
        return {"model": m.name, "layers": m.cfg.n_layers, "d_model": m.cfg.d_model, "device": str(m.device)}

    def _step_corpus(self) -> dict[str, Any]:
        from ..data import load_contexts

        out = {}
        for split in ("train", "test"):
            ctx = load_contexts(self.model, "nlp-corpus", self.budget.ctx_len, split, progress=self.progress)
            out[f"{split} tokens"] = int(ctx.numel())
        return out

    def _train_kwargs(self, step: str, out: Path) -> dict[str, Any]:
        """resume an interrupted run of this very budget; otherwise start over (a changed budget, or a rerun)."""
        from ..dictionaries.checkpoints import has_checkpoints

        resume = has_checkpoints(out) and self._started_same(step) and step not in self.force
        return {"resume": resume, "overwrite": not resume, "progress": self.progress, "ctx_len": self.budget.ctx_len}

    def _step_transcoders(self) -> dict[str, Any]:
        from ..dictionaries import train_clt, train_transcoders

        b = self.budget
        kw = dict(layers="all", skip=True, arch="topk", k=b.transcoder_k, width=b.transcoder_width,
                  tokens=b.transcoder_tokens, out=self.tc_dir, reuse=b.transcoder_reuse,
                  batch_size=b.transcoder_batch_size, **self._train_kwargs("transcoders", self.tc_dir))
        if b.replacement == "clt":
            clt = train_clt(self.model, **kw)
            n_layers, stats = len(clt.layers), clt.stats
        else:
            tcs = train_transcoders(self.model, **kw)
            n_layers, stats = len(tcs), next(iter(tcs)).stats
        return {"path": str(self.tc_dir), "kind": b.replacement, "layers": n_layers,
                "tokens": stats.get("tokens_trained"), "steps": stats.get("steps")}

    def _step_saes(self) -> dict[str, Any]:
        from ..dictionaries import train_saes
        from ..dictionaries.checkpoints import has_checkpoints

        b = self.budget
        outs = {self.sae_hook(layer): self.sae_dir(layer) for layer in b.sae_layers}
        if not outs:
            return {"paths": [], "saes": 0}
        first = next(iter(outs.values()))  # where the run keeps its checkpoints
        # one run trains them all and saves them together: all finished, or the run is to do (or to resume)
        done = (self._started_same("saes") and "saes" not in self.force and not has_checkpoints(first)
                and all((out / "cfg.json").is_file() for out in outs.values()))
        if not done:  # one forward pass (to the deepest layer) feeds every SAE
            train_saes(self.model, outs, arch="topk", k=b.sae_k, width=b.sae_width, tokens=b.sae_tokens,
                       **self._train_kwargs("saes", first))
        return {"paths": [str(p) for p in outs.values()], "saes": len(outs)}

    def _replacement(self) -> Any:
        """The trained replacement model (a TranscoderSet or a CrossLayerTranscoder), next to the model."""
        from ..dictionaries import load_dictionary

        return load_dictionary(self.tc_dir, device=self.device or "cpu")  # graphs and evaluations run there

    def _dictionaries(self) -> tuple[Any, dict[int, Any]]:
        from ..dictionaries import load_dictionary

        return self._replacement(), {layer: load_dictionary(self.sae_dir(layer), device=self.device or "cpu")
                                     for layer in self.budget.sae_layers}

    def _step_evaluate(self) -> dict[str, Any]:
        from ..data import load_contexts
        from ..dictionaries import evaluate_dictionaries

        b = self.budget
        tcs, saes = self._dictionaries()
        contexts = load_contexts(self.model, "nlp-corpus", b.ctx_len, "test", progress=False)
        # one pass records every dictionary's hooks; the transcoders spliced all at once (each layer alone would
        # cost two full forwards, logits included, per layer)
        named = {"transcoders": tcs, **{f"sae {layer}": sae for layer, sae in saes.items()}}
        got = evaluate_dictionaries(self.model, named, tokens=b.eval_tokens, ce_contexts=b.ce_contexts,
                                    contexts=contexts, per_layer_ce=False, progress=self.progress)
        per_layer = got["transcoders"]
        atomic_write_json(self.tc_dir / "eval.json", {str(k): m.to_dict() for k, m in per_layer.items()})
        for layer, m in per_layer.items():
            if layer != "all":  # a CLT's layer_<layer> folder holds only what is about that layer's features
                (self.tc_dir / f"layer_{layer}").mkdir(exist_ok=True)
                atomic_write_json(self.tc_dir / f"layer_{layer}" / "eval.json", m.to_dict())
        summary: dict[str, Any] = {}
        every = per_layer["all"]
        summary["transcoders all spliced: CE recovered"] = round(every.ce_loss_recovered, 4)
        summary["KL"] = round(every.kl_div, 4)
        evs = [m.explained_variance for k, m in per_layer.items() if k != "all"]
        summary["transcoder EV min"] = round(min(evs), 4)
        for layer in saes:
            m = got[f"sae {layer}"]
            atomic_write_json(self.sae_dir(layer) / "eval.json", m.to_dict())
            summary[f"SAE {layer} EV"] = round(m.explained_variance, 4)
            summary[f"SAE {layer} CE recovered"] = round(m.ce_loss_recovered, 4)
        return summary

    def _analyze_one(self, dictionary: Any, tokens: int, embed: bool = True, model: Any = None) -> Any:
        """Analyse `dictionary` (a directory, or one loaded from its directory) into <its directory>/analysis."""
        from ..analysis import analyze
        from ..dictionaries.compat import dictionary_fingerprint, resolve_dictionary
        from ..store import DB_FILE, FeatureStore

        dictionary, path = resolve_dictionary(dictionary)
        final = path / "analysis" / DB_FILE
        stale = False
        if final.is_file():  # a finished analysis: keep it only if it is of these weights, under this budget
            with FeatureStore(final, readonly=True) as st:
                same_weights = st.get("dictionary_fingerprint") == dictionary_fingerprint(dictionary)
            stale = not same_weights or not self._started_same("analyze") or "analyze" in self.force
        return analyze(model or self.model, dictionary, n_tokens=tokens, ctx_len=self.budget.ctx_len, overwrite=stale,
                       embed=embed, progress=self.progress)

    def _step_analyze(self) -> dict[str, Any]:
        from ..analysis import SharedForward

        b = self.budget
        # the SAEs read the same contexts too: one forward (to the deepest) records every SAE's hook for all of them
        shared = SharedForward(self.model, [self.sae_hook(layer) for layer in b.sae_layers])
        for layer in b.sae_layers:
            self._analyze_one(self.sae_dir(layer), b.analysis_tokens, model=shared)
        del shared  # its record (every batch of every hook) is not needed past the SAEs
        tcs = self._replacement()
        # the 18 layers read the same contexts: one forward pass records every layer's input for all of them
        shared = SharedForward(self.model, [tcs.input_hook(layer) for layer in tcs.layers])
        for layer in tcs.layers:  # each layer's features, in <replacement dir>/layer_<layer>/analysis
            self._analyze_one(tcs.layer_features(layer), b.transcoder_analysis_tokens, embed=b.transcoder_embed,
                              model=shared)
        return {"saes": len(b.sae_layers), "transcoder layers": self.model.cfg.n_layers}

    def _step_graphs(self) -> dict[str, Any]:
        from ..analysis import open_analysis
        from ..attribution import attribute, check_graph, save_graph
        from ..attribution.files import slugify
        from ..attribution.targets import parse_target

        b = self.budget
        tcs = self._replacement()
        analyses = {layer: open_analysis(tcs.layer_features(layer)) for layer in tcs.layers}
        # one record per graph, keyed by what it depends on: a changed prompt list redoes only the new prompts
        done = self.state.setdefault("graphs", {})
        if "graphs" in self.force:
            done.clear()
        rows = []
        for prompt in b.prompts:
            slug = slugify(prompt)
            target = ANSWERS.get(prompt)
            if target is not None:
                try:
                    parse_target(self.model, target)
                except InputError as e:  # another model's vocabulary: trace its most likely tokens instead
                    self.log(f"  {prompt!r}: {e}; tracing the most likely tokens")
                    target = None
            key = hashlib.sha1(json.dumps([prompt, target, b.max_feature_nodes, b.check_features,
                                           self.keys["transcoders"], self.keys["analyze"]]).encode()).hexdigest()[:16]
            if done.get(slug, {}).get("key") == key and (self.graph_dir / f"{slug}.json").is_file():
                rows.append(done[slug])
                continue
            g = attribute(self.model, tcs, prompt, max_feature_nodes=b.max_feature_nodes, progress=self.progress,
                          transcoders_path=str(self.tc_dir), target=target)
            pruned = g.prune()
            check = check_graph(g, self.model, tcs, k=b.check_features)
            pruned.info["faithfulness"] = check.to_info()
            save_graph(pruned, self.graph_dir, slug=slug, model=self.model, transcoders=tcs, analyses=analyses)
            row = {"key": key, "prompt": prompt, "slug": slug, "target": g.logit_strs[0],
                   "replacement": round(float(g.scores["replacement"]), 4),
                   "completeness": round(float(g.scores["completeness"]), 4),
                   "features shown": int(pruned.n_features), "edges shown": int(pruned.edges.shape[1]),
                   "faithfulness": round(check.score, 4),
                   "sign agreement": round(check.sign_agreement, 4), "ablations lowering the target":
                   round(check.lowers_target, 4)}
            done[slug] = row
            self._save_state()
            rows.append(row)
            self.log(f"  graph {prompt!r} -> {row['target']!r}: replacement {row['replacement']:.3f}, "
                     f"completeness {row['completeness']:.3f}, {row['features shown']} features shown")
        return {"graphs": len(rows), "mean replacement": round(sum(r["replacement"] for r in rows) / len(rows), 4),
                "mean completeness": round(sum(r["completeness"] for r in rows) / len(rows), 4),
                "directory": str(self.graph_dir), "per prompt": rows}
