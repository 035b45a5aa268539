"""From a model and a hook to a trained, saved dictionary: `train_sae` (`train_saes`), `train_transcoders`, `train_clt`.

    sae = fl.train_sae(model, hook="blocks.6.hook_resid_post", arch="topk", k=32, width=8192,
                       tokens=2_000_000, out="~/sae-l6")
    saes = fl.train_saes(model, {"blocks.4.hook_resid_post": "~/sae-l4", "blocks.8.hook_resid_post": "~/sae-l8"})
    tcs = fl.train_transcoders(model, layers="all", arch="topk", k=32, width=4096, tokens=1_000_000, out="~/tc")
    clt = fl.train_clt(model, layers="all", arch="batchtopk", k=16, width=2048, tokens=2_000_000, out="~/clt")

Activations come from `batches.model_batches` over the training split of a corpus (BOS positions left out), in
chunks of contexts whose order is fixed by the seed, so a resumed run skips exactly the rows it already trained on.
One forward pass feeds every dictionary of a run (all layers' transcoders at once, several SAEs). The learners are in `learner`,
the loop in `loop.run_training`, the checkpoints in `checkpoints`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from .. import distributed as dist
from ..data import CachedActivations, load_contexts
from ..engine.errors import InputError
from ..paths import sub_dir
from ..progress import OnProgress
from .batches import Batches, chunk_for, model_batches, with_mlp_probes
from .checkpoints import clear_checkpoints, has_checkpoints
from .clt import CLTConfig, CrossLayerTranscoder
from .formats import META_FILE, save_clt, save_dictionary, save_transcoder_set
from .learner import CLTLearner, Learner
from .loop import RunResult, run_training
from .protocol import TRANSCODER_IN, TRANSCODER_OUT
from .sae import DictionaryConfig, SparseDictionary, TranscoderSet
from .train_config import TrainConfig


def _check_hook(model: Any, hook: str) -> int:
    """The width of `hook`'s per-token vectors (attention heads flattened), or an error if a dictionary cannot
    learn it."""
    spec = model.hook_spec(hook)  # UnknownHookError names the close matches
    if not spec.per_token or spec.width == 1:
        raise InputError(f"{hook} is not a per-token activation vector a dictionary can learn; try a residual, "
                         f"MLP or attention output hook such as blocks.6.hook_resid_post")
    return spec.width


def _train_options(arch: str, k: int | None, width: int, tokens: int, lr: float | None, batch_size: int,
                   seed: int, checkpoint_every: int | None, options: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    options = {"shards": dist.world_size(), **{k_: v for k_, v in options.items() if v is not None or k_ != "shards"}}
    return TrainConfig(arch=arch, k=k, width=width, tokens=tokens, lr=lr, batch_size=batch_size, seed=seed,
                       checkpoint_every=checkpoint_every, **options)


def _per_layer_transcoders_only(tcfg: TrainConfig, what: str) -> None:
    if tcfg.response_coefficient > 0:
        raise InputError(f"response_coefficient (--response-coefficient) matches a per-layer transcoder's response to "
                         f"its MLP's; {what} has no such MLP to match")


def _shard_batches(model: Any, hooks: list[str], contexts: torch.Tensor, tcfg: TrainConfig,
                   row_width: int) -> list[Batches]:
    """This rank's activation streams: contexts dealt round-robin into tcfg.shards shards, rank r holding the r-th
    equal run of them, each computing its own activations (batch_size / shards rows a step)."""
    n_shards, world = tcfg.shards, dist.world_size()
    if n_shards % world:
        raise InputError(f"shards ({n_shards}) must be a multiple of the number of ranks ({world})")
    if len(contexts) < n_shards:
        raise InputError(f"{len(contexts)} contexts cannot be dealt into {n_shards} shards")
    per_rank = n_shards // world
    first = dist.rank() * per_rank
    out: list[Batches] = []
    for j in range(first, first + per_rank):
        part = contexts[j::n_shards]
        out.append(model_batches(model, hooks, part, tcfg.batch_size // n_shards, tcfg.seed,
                                 chunk_contexts=chunk_for(tcfg.tokens // n_shards, part, row_width),
                                 autocast=tcfg.autocast))
    return out


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    try:
        _check_out(out, resume, overwrite)
    finally:
        dist.barrier()  # every rank sees `out` as rank 0 left it


def _check_out(out: Path, resume: bool, overwrite: bool) -> None:
    from ..io import clean_stale_tmp

    main = dist.is_main()  # only rank 0 changes the disk; every rank makes the same checks
    if main:
        clean_stale_tmp(out.parent, recursive=False)  # a save of `out` cut off by a crash: finished or undone
        clean_stale_tmp(out)
    has_ckpt = has_checkpoints(out)
    finished = (out / META_FILE).is_file() or (out / "cfg.json").is_file()
    if overwrite:
        if main:
            clear_checkpoints(out)
            # the old weights' dashboards: never to be shown beside new weights
            for adir in [out / "analysis", *out.glob("layer_*/analysis")]:
                if adir.is_dir():
                    shutil.rmtree(adir)
        return
    if has_ckpt and not resume:
        raise InputError(f"{out} holds an unfinished training run; pass resume=True (--resume) to continue it, "
                         f"or overwrite=True (--overwrite) to start over")
    if finished and not has_ckpt:
        if resume:
            raise InputError(f"{out} holds a finished dictionary: nothing to resume (overwrite=True / --overwrite "
                             f"trains it again)")
        raise InputError(f"{out} already holds a trained dictionary; choose another out, or overwrite=True (--overwrite)")


def _activations(model: Any, hooks: list[str], contexts: torch.Tensor | None, source: Any, ctx_len: int,
                 progress: bool, from_cache: "str | Path | None") -> tuple[Any, torch.Tensor, Any, int]:
    """(what computes the activations, the contexts, their source, ctx_len): the model over the corpus's training
    split (or the `contexts` given), or an activation cache (`data.cache`), checked against the model and hooks."""
    if from_cache is None:
        if contexts is None:
            contexts = load_contexts(model, source, ctx_len, "train", progress=progress and dist.is_main())
        return model, contexts, source, ctx_len
    if contexts is not None:
        raise InputError("give contexts or from_cache, not both (a cache holds its own contexts)")
    cache = CachedActivations(from_cache, model=model, hooks=hooks)
    return (cache.model_view(model), cache.contexts, cache.manifest["corpus"] or str(from_cache),
            int(cache.manifest["ctx_len"]))


def _run_metadata(model: Any, source: Any, ctx_len: int, tcfg: TrainConfig, res: RunResult,
                  learner: Learner) -> dict[str, Any]:
    return {"train_config": tcfg.to_dict(), "tokens_trained": res.tokens, "steps": res.steps,
            "source": str(source), "context_size": ctx_len, "model": getattr(model, "name", ""),
            "scale_in": learner.scale_in, "scale_out": learner.scale_out,
            "final_train_metrics": {k: round(v, 6) for k, v in learner.ema.items()},
            "train_seconds_last_session": round(res.seconds, 1), "resumed_from_step": res.resumed_from}


def _default_out(model: Any, tag: str) -> Path:
    return sub_dir("dictionaries", getattr(model, "name", "model").replace("/", "_")) / tag


def train_sae(model: Any, hook: str, *, arch: str = "topk", k: int | None = None, width: int = 8192,
              tokens: int = 2_000_000, out: str | Path | None = None, lr: float | None = None,
              batch_size: int = 4096, source: Any = "nlp-corpus", ctx_len: int = 128, resume: bool = False,
              overwrite: bool = False, progress: bool = True, seed: int = 0, checkpoint_every: int | None = None,
              contexts: torch.Tensor | None = None, on_progress: OnProgress | None = None,
              from_cache: str | Path | None = None, **options: Any) -> SparseDictionary:
    """Train a sparse autoencoder on `hook` of `model`; save it to `out` (SAELens layout) and return it.

    arch: "topk" (default, k=32), "batchtopk", "relu" or "jumprelu". tokens: training tokens (BOS excluded).
    resume: continue the run checkpointed in <out>/checkpoints. Further `options` are `TrainConfig` fields
    (l1_coefficient, l0_coefficient, aux_coefficient, dead_tokens, warmup, decay, normalize, ...).
    `contexts` (token ids [n, ctx]) replaces the corpus's training split; `from_cache` (a directory or URL written
    by `write_activation_cache` / `featurelens cache-activations`) reads activations and contexts from a cache
    instead of running the model. on_progress: called with a `ProgressEvent` (tokens trained on) after every step.
    Under torchrun every rank calls this: the run is data parallel (see `distributed`, TrainConfig.shards).
    `train_saes` trains several hooks' SAEs on one forward pass.

    >>> sae = fl.train_sae(model, "blocks.6.hook_resid_post", width=4096, tokens=250_000, out="~/sae-l6")
    """
    return train_saes(model, {hook: out}, arch=arch, k=k, width=width, tokens=tokens, lr=lr, batch_size=batch_size,
                      source=source, ctx_len=ctx_len, resume=resume, overwrite=overwrite, progress=progress,
                      seed=seed, checkpoint_every=checkpoint_every, contexts=contexts, on_progress=on_progress,
                      from_cache=from_cache, **options)[0]


def train_saes(model: Any, outs: Mapping[str, str | Path | None], *, arch: str = "topk", k: int | None = None,
               width: int = 8192, tokens: int = 2_000_000, lr: float | None = None, batch_size: int = 4096,
               source: Any = "nlp-corpus", ctx_len: int = 128, resume: bool = False, overwrite: bool = False,
               progress: bool = True, seed: int = 0, checkpoint_every: int | None = None,
               contexts: torch.Tensor | None = None, on_progress: OnProgress | None = None,
               from_cache: str | Path | None = None, **options: Any) -> list[SparseDictionary]:
    """Train one SAE per hook of `outs` ({hook: its out directory, or None for `train_sae`'s default one}) on one
    activation stream; returns them in order.

    One forward pass (to the deepest hook) feeds every SAE, so two SAEs at layers 4 and 8 cost the forward of the
    layer-8 one alone. Each SAE is the one `train_sae` trains on its hook with the same settings (same initial weights,
    same rows in the same order). The run's checkpoints live in the first out directory; resume=True continues it.
    The other arguments are `train_sae`'s.

    >>> sae4, sae8 = fl.train_saes(model, {"blocks.4.hook_resid_post": "~/sae-l4",
    ...                                     "blocks.8.hook_resid_post": "~/sae-l8"}, width=4096, tokens=250_000)
    """
    if not outs:
        raise InputError("train_saes needs at least one hook and its out directory")
    hooks = list(outs)
    dirs = [Path(o).expanduser() if o is not None else _default_out(model, f"{h}-{arch}-{width}")
            for h, o in outs.items()]
    if len(set(dirs)) < len(dirs):
        raise InputError(f"each SAE needs an out directory of its own; got {[str(d) for d in dirs]}")
    widths = [_check_hook(model, h) for h in hooks]
    tcfg = _train_options(arch, k, width, tokens, lr, batch_size, seed, checkpoint_every, options)
    _per_layer_transcoders_only(tcfg, "an SAE")
    _prepare_out(dirs[0], resume, overwrite)
    # the run's checkpoints are in the first directory; a run stopped while saving may have written some others
    resuming = resume and has_checkpoints(dirs[0])
    for d in dirs[1:]:
        _prepare_out(d, False, overwrite or resuming)
    acts, contexts, source, ctx_len = _activations(model, hooks, contexts, source, ctx_len, progress, from_cache)
    learners = []
    for hook, d in zip(hooks, widths):
        torch.manual_seed(seed)  # each SAE starts where it would alone
        cfg = DictionaryConfig(d_in=d, d_sae=width, arch=arch, k=tcfg.k, hook_name=hook, model_name=model.name,
                               metadata={"context_size": ctx_len, "dataset_path": str(source), "prepend_bos": True})
        learners.append(Learner(hook, cfg, tcfg, device=model.device))
    batches = _shard_batches(acts, hooks, contexts, tcfg, sum(widths))
    desc = f"{arch} SAE {hooks[0]}" if len(hooks) == 1 else f"{arch} SAEs x{len(hooks)}"
    res = run_training(learners, batches, tcfg, dirs[0], resume=resume, progress=progress, desc=desc,
                       on_progress=on_progress)
    saes = []
    for learner, out in zip(learners, dirs):
        sae = learner.export()
        meta = _run_metadata(model, source, ctx_len, tcfg, res, learner)
        if dist.is_main():
            save_dictionary(sae, out, meta)
        sae.stats, sae.source = meta, out
        saes.append(sae)
    if dist.is_main():
        clear_checkpoints(dirs[0])
    dist.barrier()
    return saes


def _parse_layers(layers: "str | int | Sequence[int]", n_layers: int) -> list[int]:
    if layers == "all":
        return list(range(n_layers))
    if isinstance(layers, int):
        layers = [layers]
    if isinstance(layers, str):
        try:
            layers = [int(s) for s in layers.replace(" ", "").split(",") if s]
        except ValueError:
            raise InputError(f"layers must be 'all' or a comma-separated list of integers, got {layers!r}") from None
    out = sorted(set(int(x) for x in layers))
    bad = [x for x in out if not 0 <= x < n_layers]
    if not out or bad:
        raise InputError(f"layers must lie in 0..{n_layers - 1} (the model has {n_layers} layers); got {list(layers)}")
    return out


SHARD_MODES = ("data", "layers")


def _layer_groups(layers: list[int], n: int) -> list[list[int]]:
    """`layers` cut into `n` contiguous runs of nearly equal length, the first ones a layer longer: the rank with
    the lower layers then stops its forward passes earlier."""
    q, r = divmod(len(layers), n)
    groups, at = [], 0
    for i in range(n):
        size = q + (i < r)
        groups.append(layers[at:at + size])
        at += size
    return groups


def _group_dir(group: list[int]) -> str:
    return "layers-" + "_".join(map(str, group))


def _check_layer_checkpoints(out: Path, groups: list[list[int]] | None) -> None:
    """A resume must split the layers as the stopped run did: checkpoints of a `shard="layers"` run sit in
    <out>/checkpoints/layers-<its layers>/, one directory per rank's group; a data-parallel run's in <out>/checkpoints.
    A group without a checkpoint of its own (none was due before the stop) starts afresh: the groups are independent."""
    root = out / "checkpoints"
    if not root.is_dir():
        return
    flat = any(root.glob("step-*.pt"))
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("step-*.pt")))
    if groups is None:
        if found and not flat:
            raise InputError(f"{out} holds checkpoints of a run with its layers on {len(found)} ranks ({', '.join(found)}); "
                             f"resume it with shard='layers' (--shard layers) on {len(found)} ranks")
        return
    if flat:
        raise InputError(f"{out} holds checkpoints of a data-parallel run; resume it without shard='layers' (--shard layers)")
    expected = {_group_dir(g) for g in groups}
    if not set(found) <= expected:
        raise InputError(f"{out} holds checkpoints of layer groups {', '.join(found)}, but {len(groups)} rank(s) split "
                         f"the layers as {', '.join(sorted(expected))}: resume on as many ranks as the stopped run had")


def train_transcoders(model: Any, layers: "str | int | Sequence[int]" = "all", *, arch: str = "topk",
                      k: int | None = None, width: int = 4096, tokens: int = 1_000_000, out: str | Path | None = None,
                      lr: float | None = None, batch_size: int = 1024, skip: bool = True, source: Any = "nlp-corpus",
                      ctx_len: int = 128, resume: bool = False, overwrite: bool = False, progress: bool = True,
                      seed: int = 0, checkpoint_every: int | None = None, contexts: torch.Tensor | None = None,
                      on_progress: OnProgress | None = None, from_cache: str | Path | None = None,
                      shard: str = "data", **options: Any) -> TranscoderSet:
    """Train per-layer transcoders (blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out) from one stream.

    skip (default True): each transcoder also has an affine skip W_skip from the MLP input to its output, started at
    the least-squares fit over the first rows and kept there (TrainConfig.skip_lr_scale): the linear part of the MLP
    then needs no features, and the replacement model holds when every layer is replaced at once; skip=False trains
    plain transcoders. response_coefficient > 0 (an option, default 0) also trains each transcoder's response to a
    small perturbation of its input, its active features held as an attribution graph holds them, toward the
    MLP's (`batches.with_mlp_probes`; benchmarks/transcoder_response.py measures it). batch_size 1024 (more,
    smaller steps) beat 4096 in benchmarks/transcoders.py. Saved as
    <out>/layer_<L>/ (each a SAELens-layout dictionary) plus <out>/featurelens.json; returns the set.

    Under torchrun, shard="data" (default) splits the corpus over the ranks, each holding every layer's transcoder;
    shard="layers" gives each rank a contiguous run of the layers instead: it runs the model over the whole stream
    (data shards `shards`, default 1) for its own layers only, trains their transcoders with no collectives at all
    (each layer's transcoder depends only on its own layer's rows), and the ranks' results are gathered at the end,
    where rank 0 saves the set. The result equals one process training all the layers; a stopped run resumes on the
    same number of ranks.

    >>> tcs = fl.train_transcoders(model, layers="all", width=1024, tokens=600_000, reuse=4)
    >>> fl.evaluate_dictionary(model, tcs, per_layer_ce=False)["all"].ce_loss_recovered
    """
    wanted = _parse_layers(layers, model.cfg.n_layers)
    if shard not in SHARD_MODES:
        raise InputError(f"shard must be one of {', '.join(SHARD_MODES)}, got {shard!r}")
    by_layers = shard == "layers"
    if by_layers:
        if dist.world_size() > len(wanted):
            raise InputError(f"shard='layers' (--shard layers) gives every rank at least one layer, but there are "
                             f"{dist.world_size()} ranks for {len(wanted)} layer(s): use at most {len(wanted)} "
                             f"ranks, or shard='data'")
        options = {**options, "shards": options.get("shards") or 1}  # every rank reads the whole stream
    tcfg = _train_options(arch, k, width, tokens, lr, batch_size, seed, checkpoint_every, {**options, "skip": skip})
    out = Path(out).expanduser() if out is not None else _default_out(model, f"transcoders-{arch}-{width}")
    _prepare_out(out, resume, overwrite)
    groups = _layer_groups(wanted, dist.world_size()) if by_layers else None
    mine = groups[dist.rank()] if groups is not None else wanted
    if resume:
        _check_layer_checkpoints(out, groups)
    hooks = [h for layer in mine for h in (TRANSCODER_IN.format(layer), TRANSCODER_OUT.format(layer))]
    acts, contexts, source, ctx_len = _activations(model, hooks, contexts, source, ctx_len, progress, from_cache)
    torch.manual_seed(seed)
    learners = []
    for layer in wanted:  # every layer's, in order, so that each starts from the random weights it has in one process
        h_in, h_out = TRANSCODER_IN.format(layer), TRANSCODER_OUT.format(layer)
        d_in, d_out = _check_hook(model, h_in), _check_hook(model, h_out)
        cfg = DictionaryConfig(d_in=d_in, d_sae=width, arch=arch, k=tcfg.k, transcoder=True, d_out=d_out, skip=skip,
                               hook_name=h_in, hook_name_out=h_out, model_name=model.name,
                               metadata={"context_size": ctx_len, "dataset_path": str(source), "prepend_bos": True})
        learners.append(Learner(f"layer_{layer}", cfg, tcfg, device=model.device))
    learners = [lrn for layer, lrn in zip(wanted, learners) if layer in mine]
    row_width = sum(lrn.sae.d_in + lrn.sae.d_out for lrn in learners)
    main = dist.is_main()
    with dist.alone() if by_layers else contextlib.nullcontext():
        batches = _shard_batches(acts, hooks, contexts, tcfg, row_width)
        if tcfg.response_coefficient > 0:
            batches = [with_mlp_probes(b, model, mine, hooks[0::2], hooks[1::2], tcfg.response_scale,
                                       tcfg.batch_size // tcfg.shards, tcfg.seed) for b in batches]
        res = run_training(learners, batches, tcfg, out, resume=resume, progress=progress and main,
                           desc=f"{arch} transcoders x{len(learners)}", on_progress=on_progress if main else None,
                           checkpoint_dir=out / "checkpoints" / _group_dir(mine) if by_layers else None)
    trained = {layer: (lrn.export(), _run_metadata(model, source, ctx_len, tcfg, res, lrn))
               for layer, lrn in zip(mine, learners)}
    if by_layers:  # every rank's layers, on every rank
        trained = {layer: t for part in dist.gather_objects(trained) for layer, t in part.items()}
    tset = TranscoderSet({layer: trained[layer][0] for layer in wanted}, n_layers_model=model.cfg.n_layers)
    stats = {str(layer): trained[layer][1] for layer in wanted}
    if dist.is_main():
        save_transcoder_set(tset, out, stats)
        clear_checkpoints(out)
    dist.barrier()
    for layer, tc in tset.items():
        tc.stats, tc.source = stats[str(layer)], out / f"layer_{layer}"
    return tset


def train_clt(model: Any, layers: "str | int | Sequence[int]" = "all", *, arch: str = "batchtopk",
              k: int | None = None, width: int = 2048, tokens: int = 1_000_000, out: str | Path | None = None,
              lr: float | None = None, batch_size: int = 4096, skip: bool = False, source: Any = "nlp-corpus",
              ctx_len: int = 128, resume: bool = False, overwrite: bool = False, progress: bool = True, seed: int = 0,
              checkpoint_every: int | None = None, contexts: torch.Tensor | None = None,
              on_progress: OnProgress | None = None, from_cache: str | Path | None = None,
              **options: Any) -> CrossLayerTranscoder:
    """Train a cross-layer transcoder over `layers` (each layer's MLP input -> its MLP output and all later ones).

    width: features per layer. arch: "batchtopk" (default: at inference a threshold, i.e. a JumpReLU that
    circuit-tracer loads as it is), "topk", "jumprelu" or "relu"; k: latents per token and layer. skip: an affine
    skip per layer. Further `options` are `TrainConfig` fields (loss="normalized_mse", reuse=4, warmup, decay, ...).
    Saved to `out` (cfg.json + clt_weights.safetensors + featurelens.json); `resume=True` continues a checkpointed run.

    >>> clt = fl.train_clt(model, layers="all", k=16, width=2048, tokens=2_000_000, out="~/clt")
    """
    wanted = _parse_layers(layers, model.cfg.n_layers)
    tcfg = _train_options(arch, k, width, tokens, lr, batch_size, seed, checkpoint_every, {**options, "skip": skip})
    _per_layer_transcoders_only(tcfg, "a cross-layer transcoder")
    out = Path(out).expanduser() if out is not None else _default_out(model, f"clt-{arch}-{width}")
    _prepare_out(out, resume, overwrite)
    hooks, width_of = [], {}
    for layer in wanted:
        for h in (TRANSCODER_IN.format(layer), TRANSCODER_OUT.format(layer)):
            width_of[h] = _check_hook(model, h)  # the width of h's per-token vectors
            hooks.append(h)
    d_in, d_out = width_of[hooks[0]], width_of[hooks[1]]
    acts, contexts, source, ctx_len = _activations(model, hooks, contexts, source, ctx_len, progress, from_cache)
    torch.manual_seed(seed)
    cfg = CLTConfig(layers=wanted, d_in=d_in, d_sae=width, arch=arch, k=tcfg.k, d_out=d_out, skip=skip,
                    model_name=getattr(model, "name", ""), n_layers_model=model.cfg.n_layers,
                    metadata={"context_size": ctx_len, "dataset_path": str(source), "prepend_bos": True})
    learner = CLTLearner("clt", cfg, tcfg, device=model.device)
    row_width = len(wanted) * (d_in + d_out)
    batches = _shard_batches(acts, hooks, contexts, tcfg, row_width)
    res = run_training([learner], batches, tcfg, out, resume=resume, progress=progress,  # type: ignore[list-item]
                       desc=f"{arch} CLT x{len(wanted)} layers", on_progress=on_progress)
    clt = learner.export()
    stats = {"train_config": tcfg.to_dict(), "tokens_trained": res.tokens, "steps": res.steps, "source": str(source),
             "context_size": ctx_len, "model": getattr(model, "name", ""), "scale_in": learner.scale_in,
             "scale_out": learner.scale_out, "final_train_metrics": {k_: round(v, 6) for k_, v in learner.ema.items()},
             "train_seconds_last_session": round(res.seconds, 1), "resumed_from_step": res.resumed_from}
    if dist.is_main():
        save_clt(clt, out, stats)
        clear_checkpoints(out)
    dist.barrier()
    clt.stats, clt.source = stats, out
    return clt
