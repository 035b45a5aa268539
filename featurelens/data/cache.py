"""An activation cache for training: a model's activations at some hooks over a fixed set of contexts, as sharded
safetensors files plus a manifest, written in parallel by the ranks of a torchrun job and read back by training
(`train_sae(..., from_cache=DIR)`, `featurelens train --from-cache DIR`).

    featurelens cache-activations --hook blocks.6.hook_resid_post --tokens 2M --out ~/acts-l6
    torchrun --nproc_per_node 8 -m featurelens cache-activations --mlp --tokens 100M --out s3://bucket/acts

Shard k holds contexts [k * per_shard, (k + 1) * per_shard) (every position, BOS included, [contexts, ctx_len, d]
per hook) and is written by rank k mod world. The manifest (model, hooks and widths, dtype, token count, corpus and
the SHA-1 of the contexts' token ids) is written last, by rank 0, so a cache with a manifest is complete; reading
checks it against what the run wants and refuses a mismatch with the field that differs.

Training reads it through `CachedActivations`, a stand-in for the model that answers `run_with_cache` from the
cache: the activations of a context are a function of its tokens, so a run on the cache sees exactly the rows a run
on the model would. Local paths are read by memory-mapped slices; a URL (any fsspec file system, when fsspec is
installed) is read a whole shard at a time, kept in memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import distributed as dist
from ..dtypes import autocast_wanted, dtype_name, forward_autocast, parse_dtype
from ..engine.errors import InputError, MissingFileError
from ..io import atomic_save, atomic_write_json
from .activations import DTYPES, MANIFEST, CacheMismatchError

CACHE_KIND = "featurelens-activation-cache"
CACHE_FORMAT = 1
CONTEXTS_FILE = "contexts.safetensors"


def contexts_sha1(contexts: torch.Tensor) -> str:
    return hashlib.sha1(contexts.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _is_url(where: str | Path) -> bool:
    return "://" in str(where)


def _fs(where: str) -> Any:
    try:
        import fsspec
    except ImportError:
        raise InputError(f"{where} is a URL: reading or writing it needs fsspec (pip install fsspec)") from None
    return fsspec.core.url_to_fs(where)


def _write(where: str | Path, name: str, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save, save_file

    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    if _is_url(where):
        fs, root = _fs(str(where))
        with fs.open(f"{root.rstrip('/')}/{name}", "wb") as f:
            f.write(save(tensors))
    else:
        atomic_save(Path(where) / name, lambda tmp: save_file(tensors, str(tmp)))


def _write_json(where: str | Path, name: str, obj: dict[str, Any]) -> None:
    if _is_url(where):
        fs, root = _fs(str(where))
        with fs.open(f"{root.rstrip('/')}/{name}", "w") as f:
            json.dump(obj, f, indent=1)
    else:
        atomic_write_json(Path(where) / name, obj, indent=1)


def _read_bytes(where: str | Path, name: str) -> bytes:
    if _is_url(where):
        fs, root = _fs(str(where))
        path = f"{root.rstrip('/')}/{name}"
        if not fs.exists(path):
            raise MissingFileError(f"no {name} in the activation cache {where}")
        with fs.open(path, "rb") as f:
            return f.read()
    path = Path(where) / name
    if not path.is_file():
        raise MissingFileError(f"no {name} in the activation cache {where}")
    return path.read_bytes()


def write_activation_cache(model: Any, hooks: Sequence[str], contexts: torch.Tensor, out: str | Path, *,
                           dtype: str = "float32", corpus: str = "", contexts_per_shard: int | None = None,
                           model_batch_size: int = 32, progress: bool = True,
                           autocast: bool | None = None) -> dict[str, Any]:
    """Compute `model`'s activations at `hooks` over `contexts` [n, ctx_len] into the cache `out` (a directory or
    an fsspec URL); with several ranks each computes and writes every world-th shard. Returns the manifest.
    autocast: the forward pass under bfloat16 autocast (`dtypes.forward_autocast`: by default on CUDA for a float32
    model); the manifest's "forward" says which ran."""
    from ..progress import ProgressBar

    hooks = list(hooks)
    if not hooks:
        raise InputError("give at least one hook to cache")
    store_dtype = parse_dtype(dtype, DTYPES)
    widths = {}
    for h in hooks:
        spec = model.hook_spec(h)  # UnknownHookError names the close matches
        if not spec.per_token:
            raise InputError(f"{h} is not one vector per token; the cache takes per-token hooks")
        widths[h] = spec.width
    n, ctx_len = contexts.shape
    if contexts_per_shard is None:  # about 256 MB a shard
        per_ctx = ctx_len * sum(widths.values()) * torch.tensor([], dtype=store_dtype).element_size()
        contexts_per_shard = max(1, min(n, 2**28 // per_ctx))
    n_shards = -(-n // contexts_per_shard)
    if _is_url(out):
        fs, root = _fs(str(out))
        fs.makedirs(root, exist_ok=True)
    else:
        Path(out).expanduser().mkdir(parents=True, exist_ok=True)
        out = Path(out).expanduser()
    mine = [k for k in range(n_shards) if k % dist.world_size() == dist.rank()]
    stops = [model.hook_spec(h).stop_layer for h in hooks]
    stop = None if None in stops else max(stops)  # the forward pass ends after the last layer a hook needs
    bar = ProgressBar("caching activations", sum(min(contexts_per_shard, n - k * contexts_per_shard) for k in mine)
                      * ctx_len, unit="tok", unit_scale=True, show=progress and dist.is_main())
    try:
        for k in mine:
            part = contexts[k * contexts_per_shard:(k + 1) * contexts_per_shard]
            acts: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
            with torch.inference_mode(), forward_autocast(model.device, model.dtype, autocast):
                for s in range(0, len(part), model_batch_size):
                    toks = part[s:s + model_batch_size]
                    _, cache = model.run_with_cache(toks.to(model.device), names_filter=hooks, stop_at_layer=stop)
                    for h in hooks:
                        acts[h].append(cache[h].reshape(len(toks), ctx_len, -1).to("cpu", store_dtype))
                    bar.update(toks.numel())
            _write(out, f"shard-{k:05d}.safetensors", {h: torch.cat(v) for h, v in acts.items()})
    finally:
        bar.close()
    manifest = {"kind": CACHE_KIND, "format": CACHE_FORMAT, "model": getattr(model, "name", ""), "hooks": hooks,
                "d": widths, "dtype": dtype_name(store_dtype), "ctx_len": ctx_len, "n_contexts": n,
                "n_tokens": n * ctx_len, "bos_token_id": model.cfg.bos_token_id, "corpus": corpus,
                "contexts_sha1": contexts_sha1(contexts), "contexts_per_shard": contexts_per_shard,
                "n_shards": n_shards, "shards": [f"shard-{k:05d}.safetensors" for k in range(n_shards)],
                "forward": "bfloat16 autocast" if autocast_wanted(model.device, model.dtype, autocast)
                else dtype_name(model.dtype)}
    dist.barrier()  # every shard is written before the manifest says the cache is complete
    if dist.is_main():
        _write(out, CONTEXTS_FILE, {"tokens": contexts.to(torch.int32)})
        _write_json(out, MANIFEST, manifest)
    dist.barrier()
    return manifest


class CachedActivations:
    """A finished activation cache, opened and checked; `model_view(model)` stands in for the model in training.

    Checks on open: the manifest is one of ours and complete, the contexts file matches the manifest's hash, and,
    when given, the model's name, the hooks wanted (all present), the dtype, the corpus and its contexts' hash
    agree with it: any difference is a `CacheMismatchError` naming what differs.
    """

    def __init__(self, where: str | Path, *, model: Any = None, hooks: Sequence[str] = (), dtype: str | None = None,
                 corpus: str | None = None, contexts: torch.Tensor | None = None):
        from safetensors.torch import load

        self.where = where if _is_url(where) else Path(where).expanduser()
        try:
            m = json.loads(_read_bytes(self.where, MANIFEST))
        except MissingFileError:
            raise MissingFileError(f"{where} holds no finished activation cache (no {MANIFEST}; a cache is finished "
                                   f"when `featurelens cache-activations` ends)") from None
        except json.JSONDecodeError as e:
            raise CacheMismatchError(f"{where}/{MANIFEST} is unreadable ({e})") from None
        if m.get("kind") != CACHE_KIND or m.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(f"{where} is not a featurelens activation cache of format {CACHE_FORMAT} "
                                     f"(its manifest says kind={m.get('kind')!r}, format={m.get('format')!r})")
        self.manifest = m
        self.contexts = load(_read_bytes(self.where, CONTEXTS_FILE))["tokens"].long()
        problems = []
        if contexts_sha1(self.contexts) != m["contexts_sha1"]:
            problems.append(f"its {CONTEXTS_FILE} does not match the manifest's hash (a damaged or mixed cache)")
        if model is not None and m["model"] != getattr(model, "name", ""):
            problems.append(f"model {m['model']!r}, this run's is {model.name!r}")
        missing = [h for h in hooks if h not in m["hooks"]]
        if missing:
            problems.append(f"hooks {m['hooks']}, this run needs {missing} too")
        if dtype is not None and m["dtype"] != dtype_name(parse_dtype(dtype, DTYPES)):
            problems.append(f"dtype {m['dtype']}, this run wants {dtype}")
        if corpus is not None and m["corpus"] != corpus:
            problems.append(f"corpus {m['corpus']!r}, this run names {corpus!r}")
        if contexts is not None and contexts_sha1(contexts) != m["contexts_sha1"]:
            problems.append("other contexts than this run's (their token ids' SHA-1 differs)")
        if problems:
            raise CacheMismatchError(f"the activation cache in {where} does not fit this run: {'; '.join(problems)}")
        self._index: dict[bytes, int] | None = None
        self._open: dict[int, Any] = {}

    @property
    def hooks(self) -> list[str]:
        return list(self.manifest["hooks"])

    def _shard(self, k: int) -> Any:
        if k not in self._open:
            name = self.manifest["shards"][k]
            if _is_url(self.where):
                from safetensors.torch import load

                self._open[k] = load(_read_bytes(self.where, name))
            else:
                from safetensors import safe_open

                path = Path(self.where) / name
                if not path.is_file():
                    raise MissingFileError(f"the activation cache {self.where} lacks {name}")
                self._open[k] = safe_open(str(path), framework="pt")
        return self._open[k]

    def activations(self, indices: Sequence[int], hooks: Sequence[str]) -> dict[str, torch.Tensor]:
        """{hook: [len(indices), ctx_len, d]} for the contexts at these positions of `self.contexts`."""
        per = self.manifest["contexts_per_shard"]
        out: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
        for i in indices:
            k, j = divmod(int(i), per)
            shard = self._shard(k)
            for h in hooks:
                out[h].append(shard[h][j] if isinstance(shard, dict) else shard.get_slice(h)[j])
        return {h: torch.stack(v) for h, v in out.items()}

    def index_of(self, tokens: torch.Tensor) -> list[int]:
        """Positions in the cache of these contexts [b, ctx_len] (by their tokens)."""
        if self._index is None:
            self._index = {hashlib.sha1(c.numpy().tobytes()).digest(): i
                           for i, c in enumerate(self.contexts.to(torch.int64))}
        out = []
        for c in tokens.to("cpu", torch.int64):
            i = self._index.get(hashlib.sha1(c.numpy().tobytes()).digest())
            if i is None:
                raise InputError("a context that is not in the activation cache was asked for")
            out.append(i)
        return out

    def model_view(self, model: Any) -> "_CachedModel":
        """What `ActivationStore` (and so training) reads instead of `model`: the same hooks, answered from here."""
        return _CachedModel(self, model)


class _CachedModel:
    """`model` with `run_with_cache` answered from the cache (only the hooks the cache holds)."""

    def __init__(self, cache: CachedActivations, model: Any):
        self._cache, self._model = cache, model
        self.cfg, self.name, self.hook_spec = model.cfg, model.name, model.hook_spec
        self.device = torch.device("cpu")
        self.dtype = parse_dtype(cache.manifest["dtype"], DTYPES)

    def run_with_cache(self, tokens: torch.Tensor, names_filter: Sequence[str], stop_at_layer: Any = None,
                       **_: Any) -> tuple[None, dict[str, torch.Tensor]]:
        missing = [h for h in names_filter if h not in self._cache.manifest["hooks"]]
        if missing:
            raise CacheMismatchError(f"the activation cache {self._cache.where} has no {missing}")
        return None, self._cache.activations(self._cache.index_of(tokens), list(names_filter))
