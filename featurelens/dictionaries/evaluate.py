"""`evaluate_dictionary`: how good is a dictionary, on held-out text (see `metrics` for what each number means).

An SAE or transcoder gives one `DictionaryMetrics`; a transcoder set {layer: metrics} plus "all" (every layer spliced
at once); a cross-layer transcoder is measured as a replacement model (`replacement.evaluate_replacement`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data import load_contexts
from .batches import chunk_for, model_batches
from .compat import check_fits
from .metrics import DictionaryMetrics, ReconstructionAccumulator, splice_metrics_groups
from .protocol import Transcoders
from .replacement import evaluate_replacement
from .sae import SparseDictionary, TranscoderSet


def evaluate_dictionary(model: Any, dictionary: "SparseDictionary | TranscoderSet", *, tokens: int | None = 100_000,
                        ce_contexts: int = 32, source: Any = "nlp-corpus", ctx_len: int = 128,
                        contexts: torch.Tensor | None = None, dense_threshold: float = 0.1, batch_size: int = 4096,
                        per_layer_ce: bool = True, progress: bool = True
                        ) -> "DictionaryMetrics | dict[int, DictionaryMetrics]":
    """Measure a dictionary on held-out text (the corpus's test split, or `contexts`).

    tokens: evaluation tokens for L0 / FVU / dead and dense fractions (None: the whole split).
    ce_contexts: contexts for the spliced cross-entropy (0 skips it).
    A TranscoderSet gives {layer: metrics} (each layer spliced alone) plus {"all": ...} for all layers spliced
    together (only CE and KL filled in). per_layer_ce=False splices only all layers at once: the CE passes (two
    full forwards per layer and context pair, logits included) are most of an evaluation's time.
    """
    if isinstance(dictionary, Transcoders) and not isinstance(dictionary, TranscoderSet):
        return evaluate_replacement(model, dictionary, tokens=tokens, ce_contexts=ce_contexts, source=source,
                                    ctx_len=ctx_len, contexts=contexts, dense_threshold=dense_threshold,
                                    batch_size=batch_size, per_layer_ce=per_layer_ce, progress=progress)
    if isinstance(dictionary, TranscoderSet):
        check_fits(model, dictionary)  # model, layers, hooks and widths, naming what does not fit
    if contexts is None:
        contexts = load_contexts(model, source, ctx_len, "test", progress=progress)
    members = dictionary.items() if isinstance(dictionary, TranscoderSet) else [(None, dictionary)]
    hooks = sorted({h for _, d in members for h in (d.hook_name, d.hook_name_out)})
    for hook in hooks:
        model.hook_spec(hook)  # UnknownHookError, with the close matches
    bos = model.cfg.bos_token_id
    per_row = (contexts != bos).sum(1) if bos is not None else torch.full((len(contexts),), contexts.shape[1])
    rows = int(per_row.sum())
    n_tok = min(tokens or rows, rows)
    n_ctx = int((per_row.cumsum(0) < n_tok).sum()) + 1  # only the contexts the token budget needs
    recon_contexts = contexts[:n_ctx]
    accs = [ReconstructionAccumulator(d) for _, d in members]
    seen = 0
    row_width = sum(d.d_in + d.d_out for _, d in members)
    chunk = chunk_for(n_tok, recon_contexts, row_width)
    for batch in model_batches(model, hooks, recon_contexts, batch_size, epochs=1, chunk_contexts=chunk,
                               autocast=False)(0):  # measured in float32
        batch = {h: v[:n_tok - seen] for h, v in batch.items()}
        for acc in accs:
            acc.update(batch)
        seen += len(batch[hooks[0]])
        if seen >= n_tok:
            break
    results: dict[Any, DictionaryMetrics] = {key: acc.result(dense_threshold) for (key, _), acc in zip(members, accs)}
    if ce_contexts:
        several = isinstance(dictionary, TranscoderSet) and len(dictionary) > 1
        groups = {key: [d] for key, d in members} if per_layer_ce or not several else {}
        if several:
            groups["all"] = list(dictionary)
            results["all"] = DictionaryMetrics()
        spliced = splice_metrics_groups(model, groups, contexts[:ce_contexts], progress=progress)
        for key, values in spliced.items():
            for k, v in values.items():
                setattr(results[key], k, v)
    return results if isinstance(dictionary, TranscoderSet) else results[None]
