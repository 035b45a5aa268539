"""circuit-tracer as an outside reference: its own virtual environment, our weights and transcoders in its formats.

circuit-tracer pins transformers<=4.57.3, which featurelens's environment does not satisfy, so it lives in a venv of
its own under the data directory, built once from PyPI (`pip install circuit-tracer torch==<ours>`: torch is pinned
to the version already installed here, the CPU build, since an unpinned torch would pull a multi-GB CUDA build).

What it needs, written from featurelens's own files so both sides run the very same numbers:

* the model as a Hugging Face directory (config.json, model.safetensors, tokenizer): the tensors are what
  featurelens's GGUF reader dequantizes, i.e. exactly what `fl.load_model` runs;
* the transcoders in circuit-tracer's transcoder-set layout, written by featurelens's own `fl.save_circuit_tracer`
  (one `layer_{L}.safetensors` per layer plus `config.yaml` naming the hooks in TransformerLens's names; TopK's k is
  in config.yaml, and the driver applies it with circuit-tracer's own TopK module).

The driver (DRIVER, run with the venv's python) builds circuit-tracer's TransformerLens replacement model offline
from those two directories, times `attribute`, and writes the dense graph for comparison plus the viewer JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from featurelens.io import atomic_dir

CIRCUIT_TRACER_VERSION = "0.5.0"
TORCH_PIN = torch.__version__.split("+")[0]  # the wheel this machine already has (CPU build)
ENV_FORMAT = 1  # bump when the set of installed packages changes


class BenchmarkSetupError(RuntimeError):
    """The reference environment or its inputs could not be prepared; the message says which step failed."""


# ----------------------------------------------------------------------------------------------- the venv
def env_dir() -> Path:
    from featurelens.paths import sub_dir

    return sub_dir("bench-envs") / "circuit-tracer"


def env_python(env: Path | None = None) -> Path:
    return (env or env_dir()) / "bin" / "python"


def env_ready(env: Path | None = None) -> bool:
    marker = (env or env_dir()) / ".featurelens-ready.json"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == ENV_FORMAT and meta.get("circuit_tracer") == CIRCUIT_TRACER_VERSION


def ensure_env(progress: bool = True, env: Path | None = None) -> Path:
    """Create (once) the circuit-tracer venv (in `env`, default under the data directory); returns its directory.
    pip's output goes to <env>/install.log."""
    env = Path(env) if env is not None else env_dir()
    if env_ready(env):
        return env
    if progress:
        print(f"benchmark: building circuit-tracer {CIRCUIT_TRACER_VERSION} venv in {env} (once; pip, a few minutes)",
              flush=True)
    if not env_python(env).exists():
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    log = env / "install.log"
    with log.open("a") as f:
        r = subprocess.run([str(env_python(env)), "-m", "pip", "install", f"torch=={TORCH_PIN}",
                            f"circuit-tracer=={CIRCUIT_TRACER_VERSION}"], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        raise BenchmarkSetupError(f"pip could not install circuit-tracer into {env}; see {log}")
    check = subprocess.run([str(env_python(env)), "-c",
                            "import circuit_tracer, transformer_lens, torch; from importlib.metadata import version; "
                            "print(circuit_tracer.__version__, version('transformer-lens'), torch.__version__)"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchmarkSetupError(f"circuit-tracer installed in {env} but does not import:\n{check.stderr[-2000:]}")
    ct, tl, tv = check.stdout.split()
    (env / ".featurelens-ready.json").write_text(json.dumps(
        {"format": ENV_FORMAT, "circuit_tracer": ct, "transformer_lens": tl, "torch": tv}))
    return env


def env_versions(env: Path | None = None) -> dict[str, Any]:
    return json.loads(((env or env_dir()) / ".featurelens-ready.json").read_text())


# ----------------------------------------------------------------------------------------------- the model
_LAYER_TENSORS = (  # Hugging Face names of one decoder layer's tensors, for the families featurelens reads
    "input_layernorm.weight", "post_attention_layernorm.weight", "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
    "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
_ARCHITECTURES = {"gemma3_text": "Gemma3ForCausalLM", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma": "GemmaForCausalLM"}
# TransformerLens's name of each embedded model, i.e. which of its hard-coded configs to use
TL_NAMES = {"gemma-3-270m": "google/gemma-3-270m", "smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def export_hf_model(name: str = "gemma-3-270m", progress: bool = True) -> Path:
    """Write an embedded model as a Hugging Face directory under <data dir>/bench-models/<name>-hf (once).

    The tensors come from featurelens's own GGUF reader (`gguf_to_hf`), the same getter the featurelens model
    cache is converted from, so the two libraries start from bit-identical weights.
    """
    from safetensors.torch import save_file

    from featurelens.models.gguf import gguf_to_hf
    from featurelens.models.loader import EMBEDDED, cache_dir_for, load_model
    from featurelens.paths import sub_dir

    if name not in EMBEDDED:
        raise BenchmarkSetupError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    m = EMBEDDED[name]
    source_id = m.source_id()
    out = sub_dir("bench-models") / f"{name}-hf"
    stamp = out / ".featurelens-source.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("source_id") == source_id:
        return out
    if progress:
        print(f"benchmark: writing {name} as a Hugging Face directory in {out} (once)", flush=True)
    load_model(name)  # makes sure the featurelens cache (and its tokenizer) exists
    hf_cfg, get = gguf_to_hf(m.locate())
    tensors: dict[str, torch.Tensor] = {}
    for top in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        t = get(top)
        if t is not None:
            tensors[("" if top.startswith("lm_head") else "model.") + top] = t.contiguous()
    for i in range(hf_cfg["num_hidden_layers"]):
        for leaf in _LAYER_TENSORS:
            t = get(f"layers.{i}.{leaf}")
            if t is not None:
                tensors[f"model.layers.{i}.{leaf}"] = t.contiguous()
    with atomic_dir(out) as tmp:  # complete, or not there at all
        cfg = {k: v for k, v in hf_cfg.items() if v is not None}
        cfg["architectures"] = [_ARCHITECTURES.get(cfg["model_type"], cfg["model_type"])]
        cfg["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        shutil.copytree(cache_dir_for(name) / "tokenizer", tmp, dirs_exist_ok=True)
        (tmp / ".featurelens-source.json").write_text(json.dumps({"source_id": source_id}))
    return out


# ----------------------------------------------------------------------------------------------- running it
def run_driver(env: Path, job: dict[str, Any], work: Path, timeout: float | None = None,
               threads: int | None = None) -> dict[str, Any]:
    """Run DRIVER with the venv's python on `job` (written to work/job.json); returns its result.json."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "driver.py").write_text(DRIVER)
    (work / "job.json").write_text(json.dumps(job))
    envvars = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    envvars.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled",
                   TOKENIZERS_PARALLELISM="false")
    if threads:
        envvars["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    r = subprocess.run([str(env_python(env)), str(work / "driver.py"), str(work / "job.json")], env=envvars,
                       cwd=str(work), timeout=timeout)
    if r.returncode != 0:
        raise BenchmarkSetupError(f"the circuit-tracer driver failed (exit {r.returncode}) after "
                                  f"{time.time() - t0:.0f}s; its output is above")
    return json.loads((work / "result.json").read_text())


# The driver runs inside the circuit-tracer venv (transformers 4.57, TransformerLens, circuit-tracer); it must not
# import featurelens. It reads job.json and writes result.json, graph.safetensors (the dense adjacency and its node
# bookkeeping) and the viewer JSON via circuit-tracer's own create_graph_files.
DRIVER = r'''
import json, os, statistics, sys, time
from pathlib import Path

import torch
import yaml

job = json.loads(Path(sys.argv[1]).read_text())
work = Path(sys.argv[1]).parent
torch.set_grad_enabled(True)
if job.get("threads"):
    torch.set_num_threads(int(job["threads"]))

from transformers import AutoModelForCausalLM, AutoTokenizer
from circuit_tracer import ReplacementModel, attribute
from circuit_tracer.transcoder.activation_functions import TopK
from circuit_tracer.utils.caching import load_transcoders_from_cache
from circuit_tracer.utils.create_graph_files import create_graph_files

t0 = time.time()
tc_dir = Path(job["transcoders"])
transcoders, tc_cfg = load_transcoders_from_cache(tc_dir.name, cache_dir=str(tc_dir.parent), device=torch.device(job.get("device", "cpu")),
                                                  dtype=torch.float32, lazy_encoder=False, lazy_decoder=False)
if tc_cfg.get("activation") == "topk":
    # featurelens's TopK keeps the k largest pre-activations and ReLUs them; circuit-tracer's TopK module keeps the k
    # largest as they are, so a ReLU after it gives the transcoders' defined function.
    for t in transcoders:
        t.activation_function = torch.nn.Sequential(TopK(int(tc_cfg["k"])), torch.nn.ReLU())


def _share_buffers_per_attention_type(self):
    """circuit-tracer 0.5 shares one attention mask per attention type but ONE rotary table for all layers (the
    last layer's): Gemma 3's local layers (RoPE base 10k) would then rotate with the global layers' base (1M), a
    different model. Share both per attention type instead: the same memory saving, the model's own numbers."""
    shared = {}
    for block in self.blocks:
        attn = block.attn
        first = shared.setdefault(attn.attn_type, attn)
        attn.mask = first.mask
        if hasattr(attn, "rotary_sin"):
            attn.rotary_sin, attn.rotary_cos = first.rotary_sin, first.rotary_cos


from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
TransformerLensReplacementModel._deduplicate_attention_buffers = _share_buffers_per_attention_type

hf = AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(job["hf_dir"])
model = ReplacementModel.from_pretrained_and_transcoders(job["tl_name"], transcoders, backend="transformerlens",
                                                         hf_model=hf, tokenizer=tok, device=torch.device(job.get("device", "cpu")),
                                                         dtype=torch.float32)
del hf
model.cfg.tokenizer_name = job["hf_dir"]  # create_graph_files reloads the tokenizer by this name: keep it offline
load_s = time.time() - t0

tokens = torch.tensor(job["tokens"], dtype=torch.long, device=job.get("device", "cpu"))
with torch.no_grad():
    logits = model(tokens[None])[0, -1].float()
    hf_check = None

times, graph = [], None
for i in range(int(job["runs"])):
    t = time.time()
    graph = attribute(tokens, model, max_n_logits=job["max_n_logits"], desired_logit_prob=job["desired_logit_prob"],
                      batch_size=job["batch_size"], max_feature_nodes=job["max_feature_nodes"], verbose=False)
    if tokens.is_cuda:
        torch.cuda.synchronize()
    times.append(time.time() - t)
    print(f"circuit-tracer run {i + 1}/{job['runs']}: {times[-1]:.2f}s", flush=True)

from safetensors.torch import save_file
save_file({"adjacency": graph.adjacency_matrix.float().cpu().contiguous(),
           "active_features": graph.active_features.long().cpu().contiguous(),
           "selected_features": graph.selected_features.long().cpu().contiguous(),
           "activation_values": graph.activation_values.float().cpu().contiguous(),
           "logit_tokens": graph.logit_token_ids.long().cpu().contiguous(),
           "logit_probabilities": graph.logit_probabilities.float().cpu().contiguous(),
           "input_tokens": graph.input_tokens.long().cpu().contiguous(),
           "last_logits": logits.cpu().contiguous()}, str(work / "graph.safetensors"))
json_dir = Path(job["json_dir"])
create_graph_files(graph, slug=job["slug"], output_path=str(json_dir), scan=job["scan"],
                   node_threshold=job["node_threshold"], edge_threshold=job["edge_threshold"])
(work / "result.json").write_text(json.dumps({
    "times": times, "median_s": statistics.median(times), "load_s": load_s, "n_layers": model.cfg.n_layers,
    "n_active": int(graph.active_features.shape[0]), "n_selected": int(graph.selected_features.shape[0]),
    "graph_json": str(json_dir / (job["slug"] + ".json")),
}))
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # skip interpreter teardown, where the replacement model's __del__ trips over half-unloaded modules
'''

