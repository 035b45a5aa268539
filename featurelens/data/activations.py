"""ActivationStore: a model's activations at one or several hooks, as shuffled batches of token rows.

One forward pass per batch of contexts feeds every hook (and stops after the last layer any hook needs). Rows are
token positions; BOS positions are left out by default (Gemma's BOS activations have norms hundreds of times the
rest). Every yielded batch holds the same token rows for every hook, so a transcoder's input and output line up.

With `cache_dir`, activations are also written to disk as safetensors shards plus a manifest; an interrupted run
resumes where it stopped (finished shards are reused, a half-written one never existed: every file is written to a
temporary name and renamed), and later epochs (or later runs) read the shards instead of running the model.

>>> import featurelens as fl
>>> model = fl.load_model("gemma-3-270m")
>>> store = fl.ActivationStore(model, ["blocks.6.ln2.hook_normalized", "blocks.6.hook_mlp_out"], batch_size=4096)
>>> batch = next(iter(store))
>>> batch["blocks.6.hook_mlp_out"].shape
torch.Size([4096, 640])
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from ..dtypes import dtype_name, forward_autocast, parse_dtype
from ..engine.hooks import full_hook_name
from ..io import atomic_save, atomic_write_json
from ..models.gguf import CorruptFileError
from ..paths import sub_dir
from .corpus import DEFAULT_CORPUS
from .tokens import DEFAULT_CTX_LEN, _slug, load_contexts
from ..engine.errors import FeaturelensError, InputError, MissingFileError

CACHE_FORMAT = 1
MANIFEST = "manifest.json"
TOKENS_KEY = "tokens"  # token id of each row, stored in shards and yielded with return_tokens=True
DTYPES = ("float32", "float16", "bfloat16")  # what a cache may store


class CacheMismatchError(FeaturelensError, ValueError):
    """An activation cache directory made for other settings (model, contexts, hooks, BOS handling, dtype)."""


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    atomic_save(path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp)))


class ShuffleBuffer:
    """Mixes rows from many forward passes. Holds up to `capacity` rows; when full, emits a random part in batches
    and keeps the rest (at least half) to mix with what comes next. Without a generator, rows pass in order."""

    def __init__(self, capacity: int, batch_size: int, generator: torch.Generator | None, drop_last: bool = False):
        self.capacity, self.batch_size, self.generator, self.drop_last = capacity, batch_size, generator, drop_last
        self._parts: list[dict[str, torch.Tensor]] = []
        self._n = 0

    def push(self, rows: dict[str, torch.Tensor]) -> Iterator[dict[str, torch.Tensor]]:
        self._parts.append(rows)
        self._n += len(next(iter(rows.values())))
        if self._n >= self.capacity:
            yield from self._emit(keep=self.capacity // 2)

    def flush(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._n:
            yield from self._emit(keep=0)

    def _emit(self, keep: int) -> Iterator[dict[str, torch.Tensor]]:
        # torch.cat copies: yielded rows are ordinary tensors even when they come from inference mode.
        big = {k: torch.cat([p[k] for p in self._parts]) for k in self._parts[0]}
        n, bs = self._n, self.batch_size
        n_out = (n - keep) // bs * bs
        if keep == 0 and not self.drop_last:
            n_out = n
        order = None
        if self.generator is not None:
            order = torch.randperm(n, generator=self.generator).to(next(iter(big.values())).device)
        self._parts, self._n = [], 0
        for i in range(0, n_out, bs):
            if order is None:
                yield {k: v[i:i + bs] for k, v in big.items()}
            else:
                yield {k: v[order[i:i + bs]] for k, v in big.items()}
        if n - n_out and keep:
            rest = order[n_out:] if order is not None else slice(n_out, n)
            self._parts, self._n = [{k: v[rest] for k, v in big.items()}], n - n_out


class ActivationStore:
    """Batches of activations {hook_name: [batch_tokens, d]} from a model run over packed contexts.

    model: a HookedTransformer (None only for `from_cache` on a finished cache).
    hooks: one hook name or several (or ("resid_post", 6) pairs); all come from one forward pass per
        `model_batch_size` contexts, stopping after the last layer needed.
    contexts: token ids [n, ctx_len]; default `load_contexts(model, source, ctx_len, split, max_tokens)`.
    batch_size: token rows per yielded batch. buffer_tokens: rows in the shuffle buffer (memory:
        buffer_tokens x sum of d x 4 bytes, up to about 2.5x that while it mixes).
    keep_bos: keep BOS positions (dropped by default, separators included when they are BOS).
    shuffle / seed: the order of contexts and the mixing of rows (epoch e uses seed + e).
    dtype / device: of yielded (and cached) activations; default the model's dtype, `device` the model's device.
    cache_dir: a directory for the on-disk activation cache, "auto" for one under <data dir>/activations/,
        or None (default) to stream only. shard_tokens: token positions per shard (auto: about 128 MB a shard).
    return_tokens: also yield the token id of every row under the key "tokens".
    autocast: run the forward pass under bfloat16 autocast (`dtypes.forward_autocast`); None (default): on for a
        float32 model on CUDA, off elsewhere. The activations are yielded in `dtype` either way.

    Iterating gives one epoch; `stream(n_tokens)` runs epochs until n_tokens rows have been yielded.
    """

    def __init__(self, model: Any, hooks: "str | tuple | Sequence[str | tuple]",
                 contexts: torch.Tensor | None = None, *,
                 source: Any = DEFAULT_CORPUS, ctx_len: int = DEFAULT_CTX_LEN, split: str = "train",
                 max_tokens: int | None = None, text_field: str = "text", batch_size: int = 4096,
                 model_batch_size: int = 32, buffer_tokens: int = 65536, keep_bos: bool = False, shuffle: bool = True,
                 seed: int = 0, dtype: "torch.dtype | str | None" = None, device: "str | torch.device | None" = None,
                 cache_dir: "str | Path | None" = None, shard_tokens: int | None = None, drop_last: bool = False,
                 return_tokens: bool = False, progress: bool = True, autocast: bool | None = None):
        if batch_size <= 0 or model_batch_size <= 0:
            raise InputError(f"batch_size and model_batch_size must be positive, got {batch_size}, {model_batch_size}")
        if buffer_tokens < batch_size:
            raise InputError(f"buffer_tokens ({buffer_tokens}) must be at least batch_size ({batch_size})")
        self.model = model
        self.hooks = self._check_hooks(hooks)
        if contexts is None:
            if model is None:
                raise InputError("give a model (or contexts and a finished cache_dir)")
            contexts = load_contexts(model, source, ctx_len, split, max_tokens, text_field=text_field,
                                     progress=progress)
        if contexts.dim() != 2 or contexts.shape[0] == 0:
            raise InputError(f"contexts must be token ids [n, ctx_len] with n > 0, got shape {tuple(contexts.shape)}")
        self.contexts = contexts.long().cpu()
        self.batch_size, self.model_batch_size, self.buffer_tokens = batch_size, model_batch_size, buffer_tokens
        self.keep_bos, self.shuffle, self.seed, self.drop_last = keep_bos, shuffle, seed, drop_last
        self.return_tokens, self.progress, self.autocast = return_tokens, progress, autocast
        self.bos_token_id = model.cfg.bos_token_id if model is not None else None
        self.dtype = parse_dtype(dtype, DTYPES) if isinstance(dtype, str) else dtype
        if device is None:
            device = model.device if model is not None else "cpu"
        self.device = torch.device(device)
        self.stats = {"contexts_computed": 0, "contexts_from_cache": 0, "shards_written": 0, "shards_read": 0}
        self._epoch = 0
        self._run_hooks = list(self.hooks)  # what the forward pass records: the cache's hooks when it has more
        self._dims: dict[str, int] | None = None
        self.cache_dir: Path | None = None
        self._manifest: dict[str, Any] | None = None
        if cache_dir is not None:
            self._open_cache(cache_dir, shard_tokens)
        if self.dtype is None:
            self.dtype = model.dtype if model is not None else torch.float32

    # ----------------------------------------------------------------------------------------- setup
    def _check_hooks(self, hooks: Any) -> list[str]:
        if isinstance(hooks, (str, tuple)):
            hooks = [hooks]
        names = [full_hook_name(*h) if isinstance(h, tuple) else h for h in hooks]
        if not names:
            raise InputError("give at least one hook name")
        if len(set(names)) != len(names):
            raise InputError(f"duplicate hook names in {names}")
        for n in names:
            if self.model is not None and not self.model.hook_spec(n).per_token:  # UnknownHookError when absent
                raise InputError(f"{n} is not one vector per token (it is [batch, head, q_pos, k_pos]); the store "
                                 f"takes per-token hooks such as blocks.L.hook_resid_post or blocks.L.attn.hook_z")
        return names

    @property
    def stop_at_layer(self) -> int | None:
        """The forward pass stops before this block: one past the last layer any hook needs (None: full model)."""
        stops = [self.model.hook_spec(n).stop_layer for n in self._run_hooks]
        return None if None in stops else max(stops)

    @property
    def d(self) -> dict[str, int]:
        """Width of each hook's rows (attention hooks are flattened: heads x d_head)."""
        if self._dims is None:
            if self._manifest is not None:
                self._dims = dict(self._manifest["d"])
            else:
                self._dims = self._probe_dims()
        return {h: self._dims[h] for h in self.hooks}

    @property
    def n_tokens(self) -> int:
        """Token rows per epoch."""
        if self.keep_bos or self.bos_token_id is None:
            return self.contexts.numel()
        return int((self.contexts != self.bos_token_id).sum())

    def __len__(self) -> int:
        """Batches per epoch."""
        n = self.n_tokens
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __repr__(self) -> str:
        return (f"ActivationStore({len(self.contexts)} contexts x {self.contexts.shape[1]}, hooks={self.hooks}, "
                f"{self.n_tokens:,} tokens/epoch, batch_size={self.batch_size}, cache_dir={self.cache_dir})")

    # ----------------------------------------------------------------------------------------- the model
    def _probe_dims(self) -> dict[str, int]:
        return {n: self.model.hook_spec(n).width for n in self._run_hooks}

    def _compute(self, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One forward pass over contexts [b, p] -> ({hook: [rows, d]}, token ids [rows]), BOS rows dropped."""
        if self.model is None:
            raise InputError(f"the activation cache in {self.cache_dir} is not finished; pass the model to finish it")
        with torch.inference_mode(), forward_autocast(self.model.device, self.model.dtype, self.autocast):
            _, cache = self.model.run_with_cache(tokens.to(self.model.device), names_filter=self._run_hooks,
                                                 stop_at_layer=self.stop_at_layer)
            flat_tokens = tokens.reshape(-1)
            keep = None if self.keep_bos or self.bos_token_id is None else flat_tokens != self.bos_token_id
            out = {}
            for name in self._run_hooks:
                a = cache[name]
                a = a.reshape(a.shape[0] * a.shape[1], -1)
                if keep is not None:
                    a = a[keep.to(a.device)]
                out[name] = a.to(device=self.device, dtype=self.dtype or a.dtype)
            row_tokens = flat_tokens[keep] if keep is not None else flat_tokens
        self.stats["contexts_computed"] += len(tokens)
        return out, row_tokens.to(torch.int32)

    # ----------------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, self._epoch = self._epoch, self._epoch + 1
        return self._iter_epoch(epoch)

    def stream(self, n_tokens: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches until n_tokens rows have been yielded, over as many epochs as it takes (the last batch is cut)."""
        left = n_tokens
        while left > 0:
            for batch in self:
                rows = len(batch[self.hooks[0]])
                if rows > left:
                    batch = {k: v[:left] for k, v in batch.items()}
                    rows = left
                left -= rows
                yield batch
                if left <= 0:
                    return

    def _iter_epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        from tqdm.auto import tqdm

        gen = torch.Generator().manual_seed(self.seed + epoch) if self.shuffle else None
        buf = ShuffleBuffer(self.buffer_tokens, self.batch_size, gen, self.drop_last)
        bar = tqdm(total=self.n_tokens, unit="tok", unit_scale=True, desc="activations", disable=not self.progress,
                   file=sys.stderr, mininterval=0.5)
        wanted = self.hooks + ([TOKENS_KEY] if self.return_tokens else [])
        try:
            chunks = self._chunks_cached(gen) if self._manifest is not None else self._chunks_streamed(gen)
            for acts, toks in chunks:
                bar.update(len(toks))
                yield from buf.push({k: (toks.to(self.device).long() if k == TOKENS_KEY else acts[k]) for k in wanted})
            yield from buf.flush()
        finally:
            bar.close()

    def _chunks_streamed(self, gen: torch.Generator | None) -> Iterator[tuple[dict, torch.Tensor]]:
        n = len(self.contexts)
        order = torch.randperm(n, generator=gen) if gen is not None else torch.arange(n)
        for i in range(0, n, self.model_batch_size):
            yield self._compute(self.contexts[order[i:i + self.model_batch_size]])

    # ----------------------------------------------------------------------------------------- the disk cache
    def _contexts_sha1(self) -> str:
        return hashlib.sha1(self.contexts.to(torch.int64).numpy().tobytes()).hexdigest()

    def _open_cache(self, cache_dir: "str | Path", shard_tokens: int | None) -> None:
        if str(cache_dir) == "auto":
            if self.model is None:
                raise InputError("cache_dir='auto' needs the model; give the cache's path instead")
            key = json.dumps([self._contexts_sha1(), sorted(self.hooks), self.keep_bos,
                              str(self.dtype or self.model.dtype)])
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            cache_dir = sub_dir("activations") / f"{_slug(self.model.name)}-{digest}"
        d = Path(cache_dir).expanduser()
        d.mkdir(parents=True, exist_ok=True)
        self.cache_dir = d
        for stale in d.glob(".*.tmp-*"):  # what an interrupted write left: never read, safe to remove
            stale.unlink(missing_ok=True)
        path = d / MANIFEST
        if path.is_file():
            try:
                m = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError) as e:
                raise CorruptFileError(f"{path} is unreadable ({e}); delete {d} to start the cache again") from e
            self._check_manifest(m)
            self._manifest = m
            self._run_hooks = list(m["hooks"])
            # a listed shard whose file is gone is simply computed again
            m["shards"] = {k: s for k, s in m["shards"].items() if (d / s["file"]).is_file()}
            return
        if self.model is None:
            raise MissingFileError(f"no activation cache in {d} (no {MANIFEST})")
        self.dtype = self.dtype or self.model.dtype
        dims = self._dims = self._probe_dims()
        ctx_len = self.contexts.shape[1]
        if shard_tokens is not None:
            per_shard = max(1, shard_tokens // ctx_len)
        else:
            bytes_per_context = ctx_len * sum(dims.values()) * torch.tensor([], dtype=self.dtype).element_size()
            mbs = self.model_batch_size  # whole forward passes per shard, about 128 MB
            per_shard = max(mbs, (2 ** 27 // bytes_per_context) // mbs * mbs)
        n = len(self.contexts)
        m = {"format": CACHE_FORMAT, "model": self.model.name, "hooks": self.hooks, "d": dims,
             "keep_bos": self.keep_bos, "bos_token_id": self.bos_token_id,
             "dtype": dtype_name(self.dtype), "n_contexts": n, "ctx_len": ctx_len,
             "contexts_sha1": self._contexts_sha1(), "contexts_per_shard": per_shard,
             "n_shards": -(-n // per_shard), "n_tokens": self.n_tokens, "tokens_done": 0, "complete": False,
             "shards": {}}
        _save_tensors({"tokens": self.contexts.to(torch.int32)}, d / "contexts.safetensors")
        atomic_write_json(path, m, indent=1)
        self._manifest = m

    def _check_manifest(self, m: dict[str, Any]) -> None:
        where = self.cache_dir
        if m.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(f"{where} holds a cache of format {m.get('format')}, not {CACHE_FORMAT}; "
                                     f"delete it")
        problems = []
        if self.model is not None and m["model"] != self.model.name:
            problems.append(f"model {m['model']!r}, not {self.model.name!r}")
        if m["contexts_sha1"] != self._contexts_sha1():
            problems.append("other contexts (another source, split, ctx_len or max_tokens)")
        if m["keep_bos"] != self.keep_bos:
            problems.append(f"keep_bos={m['keep_bos']}")
        missing = [h for h in self.hooks if h not in m["hooks"]]
        if missing:
            problems.append(f"hooks {m['hooks']} (it lacks {missing})")
        if self.dtype is not None and m["dtype"] != dtype_name(self.dtype):
            problems.append(f"dtype {m['dtype']}")
        if problems:
            raise CacheMismatchError(f"the activation cache in {where} was made with {'; '.join(problems)}. Use "
                                     f"another cache_dir, or delete {where} to start again")
        self.dtype = parse_dtype(m["dtype"], DTYPES)
        self.bos_token_id = m["bos_token_id"]

    @classmethod
    def from_cache(cls, cache_dir: "str | Path", hooks: "str | Sequence[str] | None" = None, model: Any = None,
                   **kwargs: Any) -> "ActivationStore":
        """A store over a cache on disk; without a model the cache must be finished."""
        from safetensors.torch import load_file

        d = Path(cache_dir).expanduser()
        path = d / MANIFEST
        if not path.is_file():
            raise MissingFileError(f"no activation cache in {d} (no {MANIFEST})")
        try:
            m = json.loads(path.read_text())
            contexts = load_file(str(d / "contexts.safetensors"))["tokens"]
        except Exception as e:
            raise CorruptFileError(f"the activation cache in {d} is unreadable ({e})") from e
        if model is None and not m.get("complete"):
            raise InputError(f"the activation cache in {d} is not finished ({m['tokens_done']:,} of {m['n_tokens']:,} "
                             f"tokens); pass the model to finish it")
        kwargs.setdefault("keep_bos", m["keep_bos"])
        return cls(model, hooks if hooks is not None else m["hooks"], contexts, cache_dir=d, **kwargs)

    def _chunks_cached(self, gen: torch.Generator | None) -> Iterator[tuple[dict, torch.Tensor]]:
        m = self._manifest
        done = sorted(int(k) for k in m["shards"])
        if gen is not None:
            done = [done[i] for i in torch.randperm(len(done), generator=gen).tolist()]
        for i in done:
            yield self._read_shard(m["shards"][str(i)])
        todo = [i for i in range(m["n_shards"]) if str(i) not in m["shards"]]
        per = m["contexts_per_shard"]
        for i in todo:
            acts: list[dict[str, torch.Tensor]] = []
            toks: list[torch.Tensor] = []
            for s in range(i * per, min((i + 1) * per, len(self.contexts)), self.model_batch_size):
                a, t = self._compute(self.contexts[s:min(s + self.model_batch_size, (i + 1) * per)])
                acts.append(a)
                toks.append(t)
                yield a, t
            self._write_shard(i, acts, toks)

    def _read_shard(self, shard: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        from safetensors import safe_open

        path = self.cache_dir / shard["file"]
        try:
            with safe_open(str(path), framework="pt", device=str(self.device)) as f:
                acts = {h: f.get_tensor(h) for h in self.hooks}
                toks = f.get_tensor(TOKENS_KEY)
        except Exception as e:
            raise CorruptFileError(f"activation shard {path} is unreadable ({type(e).__name__}: {e}); delete the file "
                                   f"and run again to compute it anew") from e
        self.stats["shards_read"] += 1
        self.stats["contexts_from_cache"] += shard["contexts"][1] - shard["contexts"][0]
        return acts, toks

    def _write_shard(self, i: int, acts: list[dict[str, torch.Tensor]], toks: list[torch.Tensor]) -> None:
        m = self._manifest
        file = f"shard-{i:05d}.safetensors"
        tensors = {h: torch.cat([a[h] for a in acts]).cpu() for h in m["hooks"]}
        tensors[TOKENS_KEY] = torch.cat(toks).cpu()
        _save_tensors(tensors, self.cache_dir / file)  # the shard first, then the manifest that lists it
        per = m["contexts_per_shard"]
        m["shards"][str(i)] = {"file": file, "rows": len(tensors[TOKENS_KEY]),
                               "contexts": [i * per, min((i + 1) * per, m["n_contexts"])]}
        m["tokens_done"] = sum(s["rows"] for s in m["shards"].values())
        m["complete"] = len(m["shards"]) == m["n_shards"]
        atomic_write_json(self.cache_dir / MANIFEST, m, indent=1)
        self.stats["shards_written"] += 1
