"""The replacement model: every MLP replaced by transcoder features at once, with no error terms, and how good it is.

Works on anything with the replacement protocol (`TranscoderSet`, `CrossLayerTranscoder`): during one forward pass,
each layer's input hook encodes the features of that layer and adds what they write to every output layer they
reach; each output hook is then replaced by the sum of what reached it, plus its bias and skip. Later layers' inputs
come from the replaced model, so errors compound as they do in attribution graphs built on it.

>>> res = fl.evaluate_dictionary(model, clt)          # {layer: DictionaryMetrics, "all": DictionaryMetrics}
>>> res["all"].ce_loss_recovered                      # against zero-ablating every MLP
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .compat import check_fits
from .metrics import DictionaryMetrics, ReconstructionSums


class Replacement:
    """Hooks that put a transcoder set's or CLT's reconstruction in place of its output hooks.

    outputs: the output layers to replace (default all); the others run as the model does (for "layer L alone").
    `hooks(not_bos, mode)` is what `splice_metrics_groups` asks of a group: mode "dictionary" replaces by the
    reconstruction, "zero" by zeros (zero-ablating those MLPs); BOS positions are left as they are.
    """

    def __init__(self, transcoders: Any, outputs: Iterable[int] | None = None):
        self.tc = transcoders
        all_out = sorted({L for l in transcoders.layers for L in transcoders.output_layers(l)})
        self.outputs = all_out if outputs is None else sorted(outputs)

    def hooks(self, not_bos: torch.Tensor, mode: str = "dictionary") -> list[tuple[str, Any]]:
        tc, keep = self.tc, not_bos[:, :, None]
        targets = set(self.outputs)
        pending: dict[int, torch.Tensor] = {}

        def put_for(L: int) -> Any:
            def put(act: torch.Tensor, hook: Any) -> torch.Tensor:
                flat = act.reshape(act.shape[0], act.shape[1], -1)
                if mode == "zero":
                    new = torch.zeros_like(flat)
                else:
                    new = (pending.pop(L) + tc.b_dec_out(L)).to(device=act.device, dtype=act.dtype)
                return torch.where(keep.to(act.device), new, flat).reshape(act.shape)
            return put

        def grab_for(l: int) -> Any:
            wanted = [(j, L) for j, L in enumerate(tc.output_layers(l)) if L in targets]

            def grab(act: torch.Tensor, hook: Any) -> None:
                from .clt import decode_contributions

                x = act.reshape(act.shape[0], act.shape[1], -1)
                f = tc.encode_layer(l, x)
                W = tc.decoder(l)
                W = W[:, [j for j, _ in wanted]]  # only the output layers being replaced
                for (_, L), part in zip(wanted, decode_contributions(f, W)):
                    pending[L] = pending[L] + part if L in pending else part
                if l in targets:
                    skip = tc.skip_out(l, x)
                    if skip is not None:
                        pending[l] = pending[l] + skip if l in pending else skip
            return grab

        hooks: list[tuple[str, Any]] = []
        if mode != "zero":
            hooks += [(tc.input_hook(l), grab_for(l)) for l in tc.layers
                      if any(L in targets for L in tc.output_layers(l))]
        hooks += [(tc.output_hook(L), put_for(L)) for L in self.outputs]
        return hooks


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
    from ..data import load_contexts
    from .batches import chunk_for, model_batches
    from .metrics import splice_metrics_groups

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
    for batch in model_batches(model, hooks, contexts[:n_ctx], batch_size, epochs=1, chunk_contexts=chunk)(0):
        batch = {h: v[:n_tok - seen] for h, v in batch.items()}
        xs = {l: batch[transcoders.input_hook(l)] for l in layers}
        feats = {l: transcoders.encode_layer(l, x) for l, x in xs.items()}
        y_hat = _decode(transcoders, feats, xs)
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
        groups: dict[Any, Any] = {"all": Replacement(transcoders)}
        if per_layer_ce:
            groups.update({L: Replacement(transcoders, [L]) for L in outputs})
        spliced = splice_metrics_groups(model, groups, contexts[:ce_contexts], progress=progress)
        for key, values in spliced.items():
            for k, v in values.items():
                setattr(results[key], k, v)
    return results


def _decode(transcoders: Any, feats: dict[int, torch.Tensor], xs: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """{L: reconstruction} from already-encoded features (the protocol's pieces, so any implementation works)."""
    from .clt import decode_contributions

    out: dict[int, torch.Tensor] = {}
    for l, f in feats.items():
        for L, part in zip(transcoders.output_layers(l), decode_contributions(f, transcoders.decoder(l))):
            out[L] = out[L] + part if L in out else part
    for L in list(out):
        out[L] = out[L] + transcoders.b_dec_out(L)
        skip = transcoders.skip_out(L, xs[L]) if L in xs else None
        if skip is not None:
            out[L] = out[L] + skip
    return out
