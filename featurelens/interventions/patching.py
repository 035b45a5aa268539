"""Activation patching and attribution patching: which activations carry the answer?

Run a clean prompt ("The Eiffel Tower is in" -> " Paris") and a corrupt one that differs in a few tokens
("The Colosseum is in" -> " Rome"). Activation patching copies one clean activation (a layer's residual
stream at one position, an attention or MLP output at one position, or one head's output at every
position) into the corrupt run and measures how much of the clean behaviour comes back:

>>> scores = fl.activation_patching(model, "The Eiffel Tower is in", "The Colosseum is in",
...                                 metric=fl.logit_diff(" Paris", " Rome"), hook="resid_pre")   # [layers, positions]

Each entry is the metric of the patched corrupt run; with normalize=True it is rescaled so 0 is the corrupt
run and 1 the clean run. Many patched runs share one batched forward pass (`batch_size`).

Attribution patching estimates the same grid from one forward and one backward pass on the corrupt run:
metric(patched) ~ metric(corrupt) + grad_act metric(corrupt) . (act_clean - act_corrupt).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..engine.errors import InputError

if TYPE_CHECKING:
    from ..engine.hooked import HookedTransformer

# site -> hook suffix inside a block; "z" is patched per head (every position at once)
SITES = {
    "resid_pre": "hook_resid_pre",
    "resid_mid": "hook_resid_mid",
    "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out",
    "mlp_out": "hook_mlp_out",
    "z": "attn.hook_z",
}
_ALIASES = {v: k for k, v in SITES.items()} | {"heads": "z", "head": "z"}


# --------------------------------------------------------------------------- metrics
class Metric:
    """A metric of the final logits at one position, one value per batch row.

    Answers may be strings (single tokens, resolved against the model by the patching functions or by
    `metric.resolve(model)`) or token ids. Called on logits [b, p, V] it returns [b].
    """

    def __init__(self, kind: str, answer: str | int, wrong: str | int | None = None, position: int = -1):
        self.kind, self.answer, self.wrong, self.position = kind, answer, wrong, position

    def resolve(self, model: "HookedTransformer") -> "Metric":
        def tok(t: str | int) -> int:
            if isinstance(t, str):
                return model.to_single_token(t)
            t = int(t)
            if not 0 <= t < model.cfg.d_vocab:
                raise InputError(f"token id {t} is outside the vocabulary [0, {model.cfg.d_vocab})")
            return t

        return Metric(self.kind, tok(self.answer), None if self.wrong is None else tok(self.wrong), self.position)

    def evaluate(self, model: "HookedTransformer", input: Any) -> torch.Tensor:
        """The metric on `input` (a prompt, prompts or tokens): [b] float32, or a float for one prompt.

        >>> fl.logit_diff(" Paris", " Rome").evaluate(model, "The Eiffel Tower is in")
        """
        metric = self.resolve(model)
        tokens = model.as_tokens(input)
        with torch.inference_mode():
            values = _metric_values(model, tokens, metric, [])
        return float(values[0]) if tokens.shape[0] == 1 else values

    def at_position(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [b, V] at the metric's position -> [b]."""
        if isinstance(self.answer, str) or isinstance(self.wrong, str):
            raise InputError(f"{self!r} names tokens as text: call metric.resolve(model) first")
        logits = logits.float()
        if self.kind == "logit_diff":
            return logits[:, self.answer] - logits[:, self.wrong]
        return logits.softmax(-1)[:, self.answer]

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.at_position(logits[:, self.position])

    def __repr__(self) -> str:
        if self.kind == "logit_diff":
            return f"logit_diff({self.answer!r}, {self.wrong!r})"
        return f"answer_prob({self.answer!r})"


def logit_diff(answer: str | int, wrong: str | int, position: int = -1) -> Metric:
    """logit(answer) - logit(wrong) at `position` (default: the last token)."""
    return Metric("logit_diff", answer, wrong, position)


def answer_prob(answer: str | int, position: int = -1) -> Metric:
    """Probability of `answer` at `position` (default: the last token)."""
    return Metric("prob", answer, None, position)


def _resolve(metric: Any, model: "HookedTransformer") -> Any:
    if isinstance(metric, Metric):
        return metric.resolve(model)
    if not callable(metric):
        raise TypeError(f"metric must be fl.logit_diff(...), fl.answer_prob(...) or a function of logits, got {metric!r}")
    return metric


def _final_logits(model: "HookedTransformer", resid: torch.Tensor) -> torch.Tensor:
    """Final residual [b, n, D] -> logits [b, n, V] (final norm, unembedding, soft-cap), for a few positions only."""
    return model.unembed(resid)


def _metric_values(model: "HookedTransformer", tokens: torch.Tensor, metric: Any, hooks: list) -> torch.Tensor:
    """Forward with hooks -> the metric per batch row [b] (float32). Our metrics unembed one position only."""
    if isinstance(metric, Metric):
        resid = model.forward(tokens, fwd_hooks=hooks, stop_at_layer=model.cfg.n_layers)
        values = metric.at_position(_final_logits(model, resid[:, [metric.position]])[:, 0])
    else:
        values = torch.as_tensor(metric(model.forward(tokens, fwd_hooks=hooks)))
        if values.dim() == 0:
            values = values[None]
    if values.shape != (tokens.shape[0],):
        raise InputError(f"the metric must return one value per batch row ({tokens.shape[0]}), got shape {tuple(values.shape)}")
    return values.float()


# --------------------------------------------------------------------------- inputs
def _site(hook: str) -> tuple[str, str]:
    site = hook if hook in SITES else _ALIASES.get(hook)
    if site is None:
        raise InputError(f"cannot patch hook {hook!r}: choose one of {', '.join(SITES)} (z = single attention heads)")
    return site, SITES[site]


def pair_tokens(model: "HookedTransformer", clean: Any, corrupt: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean and corrupt prompts -> token tensors [1, p] of equal length, or a ValueError showing both tokenizations."""
    c, k = model.as_tokens(clean), model.as_tokens(corrupt)
    if c.shape[0] != 1 or k.shape[0] != 1:
        raise InputError(f"give one clean and one corrupt prompt (got batches of {c.shape[0]} and {k.shape[0]})")
    if c.shape != k.shape:
        def show(t: torch.Tensor) -> str:
            try:
                return str(model.to_str_tokens(t[0]))
            except ValueError:
                return str(t[0].tolist())

        raise InputError(
            "clean and corrupt prompts must have the same number of tokens to be patched position by position:\n"
            f"  clean   ({c.shape[1]} tokens): {show(c)}\n"
            f"  corrupt ({k.shape[1]} tokens): {show(k)}\n"
            "reword one of them (e.g. swap in a name of the same token length) so the tokens line up")
    return c, k


def _layers(model: "HookedTransformer", layers: Sequence[int] | None) -> list[int]:
    n = model.cfg.n_layers
    out = list(range(n)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in out if not 0 <= layer < n]
    if bad or not out:
        raise InputError(f"layers must lie in [0, {n}), got {bad or out}")
    return out


def _baselines(model, clean, corrupt, metric, names) -> tuple[float, float, dict[str, torch.Tensor]]:
    """Clean activations at `names` plus the clean and corrupt metric values."""
    store: dict[str, torch.Tensor] = {}

    def save(x: torch.Tensor, hook: Any) -> None:
        store[hook.name] = x.detach()

    with torch.inference_mode():
        m_clean = float(_metric_values(model, clean, metric, [(n, save) for n in names])[0])
        m_corrupt = float(_metric_values(model, corrupt, metric, [])[0])
    return m_clean, m_corrupt, store


def _normalize(scores: torch.Tensor, m_clean: float, m_corrupt: float) -> torch.Tensor:
    span = m_clean - m_corrupt
    if abs(span) < 1e-6:
        raise InputError(f"clean and corrupt runs give the same metric ({m_clean:.4g}); there is nothing to normalize by")
    return (scores - m_corrupt) / span


# --------------------------------------------------------------------------- activation patching
def activation_patching(
    model: "HookedTransformer",
    clean: Any,
    corrupt: Any,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    hook: str = "resid_pre",
    *,
    layers: Sequence[int] | None = None,
    normalize: bool = False,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """Patch each clean activation into the corrupt run; the metric of every patched run.

    hook: "resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out" -> [layers, positions];
    "z" (single heads, patched at every position) -> [layers, heads]. normalize=True maps the corrupt run
    to 0 and the clean run to 1. `batch_size` patched runs share one forward pass. Returns float32 on CPU.
    """
    site, suffix = _site(hook)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    clean_t, corrupt_t = pair_tokens(model, clean, corrupt)
    metric = _resolve(metric, model)
    layers = _layers(model, layers)
    names = {layer: f"blocks.{layer}.{suffix}" for layer in layers}
    m_clean, m_corrupt, acts = _baselines(model, clean_t, corrupt_t, metric, list(names.values()))

    per_head = site == "z"
    n_cols = model.cfg.n_heads if per_head else clean_t.shape[1]
    jobs = [(i, layer, col) for i, layer in enumerate(layers) for col in range(n_cols)]
    scores = torch.empty(len(layers), n_cols)
    chunks = [jobs[s : s + batch_size] for s in range(0, len(jobs), batch_size)]
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=f"patching {site}", unit="batch")
    with torch.inference_mode():
        for chunk in chunks:
            hooks = []
            for layer in sorted({job[1] for job in chunk}):
                rows = torch.tensor([r for r, job in enumerate(chunk) if job[1] == layer], device=model.device)
                cols = torch.tensor([job[2] for job in chunk if job[1] == layer], device=model.device)
                hooks.append((names[layer], _patch_fn(acts[names[layer]][0], rows, cols, per_head)))
            values = _metric_values(model, corrupt_t.expand(len(chunk), -1), metric, hooks).cpu()
            for r, (i, _, col) in enumerate(chunk):
                scores[i, col] = values[r]
    return _normalize(scores, m_clean, m_corrupt) if normalize else scores


def _patch_fn(src: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, per_head: bool):
    """Row r of the batch gets the clean activation at position cols[r] (or head cols[r], all positions)."""

    def patch(x: torch.Tensor, hook: Any) -> torch.Tensor:
        x = x.clone()
        if per_head:  # x [b, p, h, d]; x[rows, :, cols] is [k, p, d]
            x[rows, :, cols] = src[:, cols].transpose(0, 1).to(x.dtype)
        else:  # x [b, p, D]
            x[rows, cols] = src[cols].to(x.dtype)
        return x

    return patch


# --------------------------------------------------------------------------- attribution patching
def attribution_patching(
    model: "HookedTransformer",
    clean: Any,
    corrupt: Any,
    metric: Metric | Callable[[torch.Tensor], torch.Tensor],
    hook: str = "resid_pre",
    *,
    layers: Sequence[int] | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """The first-order estimate of `activation_patching`, from one clean forward and one corrupt forward+backward.

    Each entry estimates the same quantity activation_patching returns:
    metric(corrupt) + sum over the patched slice of grad . (clean - corrupt), the gradient taken on the
    corrupt run (normalized the same way when normalize=True). Cheap but linear: it misses saturation,
    so read it as a map of where to look, then confirm with activation patching.
    """
    site, suffix = _site(hook)
    clean_t, corrupt_t = pair_tokens(model, clean, corrupt)
    metric = _resolve(metric, model)
    layers = _layers(model, layers)
    names = [f"blocks.{layer}.{suffix}" for layer in layers]
    m_clean, m_corrupt, clean_acts = _baselines(model, clean_t, corrupt_t, metric, names)

    deltas: dict[str, torch.Tensor] = {}
    corrupt_acts: dict[str, torch.Tensor] = {}

    def attach(x: torch.Tensor, hook: Any) -> torch.Tensor:
        # A zero leaf added to the activation: its gradient is the metric's gradient at this activation,
        # while the gradient still flows on to earlier layers through x.
        delta = torch.zeros_like(x, requires_grad=True)
        deltas[hook.name], corrupt_acts[hook.name] = delta, x.detach()
        return x + delta

    with torch.inference_mode(False), torch.enable_grad():
        value = _metric_values(model, corrupt_t, metric, [(n, attach) for n in names]).sum()
        grads = torch.autograd.grad(value, [deltas[n] for n in names])
    rows = []
    for name, grad in zip(names, grads):
        prod = (grad * (clean_acts[name] - corrupt_acts[name]))[0].float()  # [p, D] or [p, h, d]
        rows.append(prod.sum((0, 2)) if site == "z" else prod.sum(-1))
    estimate = m_corrupt + torch.stack(rows).detach().cpu()
    return _normalize(estimate, m_clean, m_corrupt) if normalize else estimate


# --------------------------------------------------------------------------- labels for plots
def patching_labels(model: "HookedTransformer", clean: Any, corrupt: Any, hook: str,
                    layers: Sequence[int] | None = None) -> tuple[list[str], list[str]]:
    """Row and column labels for a patching grid: "L0".., and "i tok" (or "i clean/corrupt") or "H0".."""
    site, _ = _site(hook)
    rows = [f"L{layer}" for layer in _layers(model, layers)]
    if site == "z":
        return rows, [f"H{h}" for h in range(model.cfg.n_heads)]
    c, k = pair_tokens(model, clean, corrupt)
    try:
        cs, ks = model.to_str_tokens(c[0]), model.to_str_tokens(k[0])
    except ValueError:
        cs, ks = [str(t) for t in c[0].tolist()], [str(t) for t in k[0].tolist()]
    return rows, [f"{i} {a!r}" if a == b else f"{i} {a!r}/{b!r}" for i, (a, b) in enumerate(zip(cs, ks))]
