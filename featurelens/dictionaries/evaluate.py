"""`evaluate_dictionary` (`evaluate_dictionaries`): how good is a dictionary, on held-out text (`metrics` says
what each number means).

An SAE or transcoder gives one `DictionaryMetrics`; a transcoder set {layer: metrics} plus "all" (every layer spliced
at once); a cross-layer transcoder is measured as a replacement model (`replacement.evaluate_replacement`).
"""

from __future__ import annotations

from typing import Any, Mapping

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
    `evaluate_dictionaries` measures several dictionaries of one model on shared forward passes.

    >>> fl.evaluate_dictionary(model, sae, tokens=30_000, ce_contexts=8).ce_loss_recovered
    """
    return evaluate_dictionaries(model, {"it": dictionary}, tokens=tokens, ce_contexts=ce_contexts, source=source,
                                 ctx_len=ctx_len, contexts=contexts, dense_threshold=dense_threshold,
                                 batch_size=batch_size, per_layer_ce=per_layer_ce, progress=progress)["it"]


def evaluate_dictionaries(model: Any, dictionaries: Mapping[str, Any], *, tokens: int | None = 100_000,
                          ce_contexts: int = 32, source: Any = "nlp-corpus", ctx_len: int = 128,
                          contexts: torch.Tensor | None = None, dense_threshold: float = 0.1, batch_size: int = 4096,
                          per_layer_ce: bool = True, progress: bool = True) -> dict[str, Any]:
    """`evaluate_dictionary` for each of `dictionaries` ({name: dictionary}, all of one model): {name: its result}.

    One pass of the model records every dictionary's hooks for the reconstruction metrics, and the spliced
    cross-entropy shares its clean pass; a dictionary's figures are those it gets alone (the same rows, as long as
    its activations alone would be cut into the same chunks: `batches.chunk_for`). A cross-layer transcoder is
    measured on its own passes (`evaluate_replacement`).

    >>> m = fl.evaluate_dictionaries(model, {"sae4": sae4, "sae8": sae8}, tokens=30_000, ce_contexts=8)
    >>> m["sae8"].explained_variance
    """
    kw = dict(tokens=tokens, ce_contexts=ce_contexts, source=source, ctx_len=ctx_len, dense_threshold=dense_threshold,
              batch_size=batch_size, per_layer_ce=per_layer_ce, progress=progress)
    # a cross-layer transcoder is measured as a replacement model; the others share the passes below
    own = {name: d for name, d in dictionaries.items()
           if isinstance(d, Transcoders) and not isinstance(d, TranscoderSet)}
    shared = {name: d for name, d in dictionaries.items() if name not in own}
    for dictionary in shared.values():
        if isinstance(dictionary, TranscoderSet):
            check_fits(model, dictionary)  # model, layers, hooks and widths, naming what does not fit
    if contexts is None:  # once, for every dictionary
        contexts = load_contexts(model, source, ctx_len, "test", progress=progress)
    results: dict[str, Any] = {name: evaluate_replacement(model, d, contexts=contexts, **kw) for name, d in own.items()}
    if not shared:
        return results
    # (name, layer or None, dictionary): a transcoder set's layers are members of their own
    members = [(name, key, d) for name, dictionary in shared.items()
               for key, d in (dictionary.items() if isinstance(dictionary, TranscoderSet) else [(None, dictionary)])]
    hooks = sorted({h for _, _, d in members for h in (d.hook_name, d.hook_name_out)})
    for hook in hooks:
        model.hook_spec(hook)  # UnknownHookError, with the close matches
    bos = model.cfg.bos_token_id
    per_row = (contexts != bos).sum(1) if bos is not None else torch.full((len(contexts),), contexts.shape[1])
    rows = int(per_row.sum())
    n_tok = min(tokens or rows, rows)
    n_ctx = int((per_row.cumsum(0) < n_tok).sum()) + 1  # only the contexts the token budget needs
    recon_contexts = contexts[:n_ctx]
    accs = [ReconstructionAccumulator(d) for _, _, d in members]
    seen = 0
    row_width = sum(d.d_in + d.d_out for _, _, d in members)
    chunk = chunk_for(n_tok, recon_contexts, row_width)
    for batch in model_batches(model, hooks, recon_contexts, batch_size, epochs=1, chunk_contexts=chunk,
                               autocast=False)(0):  # measured in float32
        batch = {h: v[:n_tok - seen] for h, v in batch.items()}
        for acc in accs:
            acc.update(batch)
        seen += len(batch[hooks[0]])
        if seen >= n_tok:
            break
    got: dict[tuple[str, Any], DictionaryMetrics] = {(name, key): acc.result(dense_threshold)
                                                    for (name, key, _), acc in zip(members, accs)}
    if ce_contexts:
        groups: dict[tuple[str, Any], list[Any]] = {}
        for name, dictionary in shared.items():
            several = isinstance(dictionary, TranscoderSet) and len(dictionary) > 1
            if per_layer_ce or not several:
                groups.update({(n, key): [d] for n, key, d in members if n == name})
            if several:
                groups[(name, "all")] = list(dictionary)
                got[(name, "all")] = DictionaryMetrics()
        spliced = splice_metrics_groups(model, groups, contexts[:ce_contexts], progress=progress)
        for key, values in spliced.items():
            for k, v in values.items():
                setattr(got[key], k, v)
    for name, dictionary in shared.items():
        mine = {key: m for (n, key), m in got.items() if n == name}
        results[name] = mine if isinstance(dictionary, TranscoderSet) else mine[None]
    return {name: results[name] for name in dictionaries}  # in the order given
