"""The replacement model: every MLP replaced by transcoder features at once, with no error terms, and how good it is.

Works on the replacement protocol (`Transcoders`: `TranscoderSet`, `CrossLayerTranscoder`), spliced in by
`splice.splice_hooks`: during one forward pass, each layer's input hook encodes the features of that layer and adds
what they write to every output layer they reach; each output hook is then replaced by the sum of what reached it,
plus its bias and skip. Later layers' inputs come from the replaced model, so errors compound as they do in
attribution graphs built on it.

>>> res = fl.evaluate_dictionary(model, clt)          # {layer: DictionaryMetrics, "all": DictionaryMetrics}
>>> res["all"].ce_loss_recovered                      # against zero-ablating every MLP
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import load_contexts
from .batches import chunk_for, model_batches
from .compat import check_fits
from .metrics import DictionaryMetrics, ReconstructionSums, splice_metrics_groups


@torch.no_grad()
def evaluate_replacement(model: Any, transcoders: Any, *, tokens: int | None = 100_000, ce_contexts: int = 32,
                         source: Any = "nlp-corpus", ctx_len: int = 128, contexts: torch.Tensor | None = None,
                         dense_threshold: float = 0.1, batch_size: int = 4096, per_layer_ce: bool = True,
                         progress: bool = True) -> dict[Any, DictionaryMetrics]:
    """Per layer: L0 and dead / dense fractions of that layer's features, normalized MSE (FVU) and explained
    variance of that layer's MLP output reconstructed from the clean model's inputs, and CE / KL with that layer's
    MLP alone replaced; "all": CE / KL with every MLP replaced at once and no error terms, against zero-ablating
    every MLP (CE loss recovered), plus the layers' mean L0 and the pooled explained variance.
    """
    check_fits(model, transcoders)
    if contexts is None:
        contexts = load_contexts(model, source, ctx_len, "test", progress=progress)
    layers = transcoders.layers
    outputs = sorted({L for l in layers for L in transcoders.output_layers(l)})
    hooks = sorted({transcoders.input_hook(l) for l in layers} | {transcoders.output_hook(L) for L in outputs})
    bos = model.cfg.bos_token_id
    per_row = (contexts != bos).sum(1) if bos is not None else torch.full((len(contexts),), contexts.shape[1])
    rows = int(per_row.sum())
    n_tok = min(tokens or rows, rows)
    n_ctx = int((per_row.cumsum(0) < n_tok).sum()) + 1
    accs = {l: ReconstructionSums(transcoders.decoder(l).shape[-1], transcoders.decoder(l).shape[0]) for l in layers}
    seen = 0
    width = sum(model.cfg.d_model for _ in hooks)
    chunk = chunk_for(n_tok, contexts[:n_ctx], width)
    for batch in model_batches(model, hooks, contexts[:n_ctx], batch_size, epochs=1, chunk_contexts=chunk,
                               autocast=False)(0):  # measured in float32
        batch = {h: v[:n_tok - seen] for h, v in batch.items()}
        xs = {l: batch[transcoders.input_hook(l)] for l in layers}
        feats = {l: transcoders.encode_layer(l, x) for l, x in xs.items()}
        y_hat = transcoders.decode_layers(feats, xs)
        for l in layers:
            accs[l].add(batch[transcoders.output_hook(l)].to(y_hat[l].dtype), y_hat[l], feats[l])
        seen += len(batch[hooks[0]])
        if seen >= n_tok:
            break
    results: dict[Any, DictionaryMetrics] = {l: accs[l].result(dense_threshold) for l in layers}
    pooled = DictionaryMetrics(l0=sum(r.l0 for r in results.values()) / len(layers), eval_tokens=seen)
    sse = sum(a.sse for a in accs.values())
    sst = sum(a.sum_y2 - float(a.sum_y.pow(2).sum()) / a.n for a in accs.values())
    pooled.fvu = sse / max(sst, 1e-30)
    pooled.explained_variance = 1 - pooled.fvu
    pooled.dead_fraction = sum(r.dead_fraction for r in results.values()) / len(layers)
    pooled.dense_fraction = sum(r.dense_fraction for r in results.values()) / len(layers)
    results["all"] = pooled
    if ce_contexts:
        groups: dict[Any, Any] = {"all": [transcoders]}
        if per_layer_ce:
            groups.update({L: [(transcoders, [L])] for L in outputs})
        spliced = splice_metrics_groups(model, groups, contexts[:ce_contexts], progress=progress)
        for key, values in spliced.items():
            for k, v in values.items():
                setattr(results[key], k, v)
    return results
