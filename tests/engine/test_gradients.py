"""Gradients through the engine, on a tiny random model of every family (no files, no downloads).

* Backward hooks read and replace the gradient at any hook point, including points the fast paths never
  materialize unless something hooks them.
* The fast paths (fused norm, fused qk-norm + rotary, SDPA, fused post-norm + residual add) give the same gradients
  as the hooked paths, w.r.t. the embeddings and every parameter.
* With attention patterns and norm scales frozen and MLP outputs replaced by constants, the map from the embeddings
  to the (pre-softcap) logits is affine: what attribution graphs rely on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import featurelens as fl
from featurelens.errors import InputError
from builders import FAMILIES, _build, _tokens  # the tiny configs of every family

SEQ = 16


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=list(FAMILIES))
def tiny(request) -> tuple[str, fl.HookedTransformer]:
    family, _, model = _build(request.param)
    return family, model


def _loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy plus a little of every logit, so that every position and vocab entry matters."""
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    return ce + 1e-2 * logits.pow(2).mean()


def _assert_close(got: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the expected gradient is zero, the comparison would be vacuous"
    diff = (got - expected).abs().max().item()
    assert diff <= rel * scale, f"{what}: max abs diff {diff:.2e} vs max {scale:.2e}"


# --------------------------------------------------------------------------- backward hooks

# Points that the fast paths skip unless hooked: the norm scale (fused norm), rotated queries (fused qk-norm + rope),
# the MLP's gate (scratch buffer), the attention output (fused post-norm + residual add), plus the ends.
READ_POINTS = ["hook_embed", "blocks.0.ln1.hook_scale", "blocks.0.attn.hook_rot_q", "blocks.0.attn.hook_v",
               "blocks.0.attn.hook_pattern", "blocks.1.mlp.hook_pre", "blocks.1.hook_attn_out",
               "blocks.1.hook_resid_mid", "ln_final.hook_scale", "ln_final.hook_normalized"]


def test_backward_hook_reads_the_gradient(tiny):
    """A bwd hook's gradient equals autograd's gradient w.r.t. the same activation made a leaf by a fwd hook."""
    family, model = tiny
    tokens = _tokens(seed=20, seq=SEQ)
    for name in READ_POINTS:
        leaf: dict[str, torch.Tensor] = {}

        def capture(x, hook):
            leaf["x"] = x.detach().requires_grad_(True)
            return leaf["x"]

        _loss(model.run_with_hooks(tokens, fwd_hooks=[(name, capture)]), tokens).backward()
        seen: list[tuple[str, torch.Tensor]] = []
        logits = model.run_with_hooks(tokens, bwd_hooks=[(name, lambda g, hook: seen.append((hook.name, g.clone())))])
        assert seen == []  # called on the way back, not forward
        _loss(logits, tokens).backward()
        assert [n for n, _ in seen] == [name], family
        _assert_close(seen[0][1], leaf["x"].grad, f"{family} {name}")


def test_backward_hooks_by_predicate_run_in_backward_order(tiny):
    family, model = tiny
    tokens = _tokens(seed=21, seq=SEQ)
    order: list[str] = []
    logits = model.run_with_hooks(tokens, bwd_hooks=[(lambda n: n.endswith("hook_resid_post"),
                                                      lambda g, hook: order.append(hook.name))])
    logits.sum().backward()
    assert order == [f"blocks.{i}.hook_resid_post" for i in reversed(range(model.cfg.n_layers))]


def _embed_grad(model: fl.HookedTransformer, tokens: torch.Tensor, bwd_hooks=()) -> torch.Tensor:
    seen = {}
    logits = model.run_with_hooks(tokens, bwd_hooks=[("hook_embed", lambda g, hook: seen.update(g=g)), *bwd_hooks])
    _loss(logits, tokens).backward()
    return seen["g"]


def test_backward_hook_replaces_the_gradient(tiny):
    """Every path from the embeddings to the logits crosses each resid_post: zeroing the gradient there zeroes the
    embeddings' gradient; scaling it by 3 at the last layer triples it."""
    family, model = tiny
    tokens = _tokens(seed=22, seq=SEQ)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    plain = _embed_grad(model, tokens)
    assert plain.abs().max() > 0
    zeroed = _embed_grad(model, tokens, [("blocks.0.hook_resid_post", lambda g, hook: torch.zeros_like(g))])
    assert torch.equal(zeroed, torch.zeros_like(plain)), family
    tripled = _embed_grad(model, tokens, [(last, lambda g, hook: 3 * g)])
    _assert_close(tripled, 3 * plain, f"{family}: scaled gradient")
    # replacing only one position's gradient: later positions cannot reach earlier ones (causal attention)
    def keep_first(g, hook):
        out = torch.zeros_like(g)
        out[:, 0] = g[:, 0]
        return out

    first = _embed_grad(model, tokens, [(last, keep_first)])
    assert first[:, 1:].abs().max() == 0 and first[:, 0].abs().max() > 0


def test_persistent_backward_hooks_and_bad_returns(tiny):
    family, model = tiny
    tokens = _tokens(seed=23, seq=SEQ)
    plain = _embed_grad(model, tokens)
    calls: list[str] = []
    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: calls.append(hook.name) or 2 * g)]):
        doubled = _embed_grad(model, tokens)
        with torch.no_grad():  # no graph: the hook is not attached, and nothing fails
            model(tokens)
    assert calls == ["blocks.0.hook_resid_post"]
    _assert_close(doubled, 2 * plain, f"{family}: persistent backward hook")
    _assert_close(_embed_grad(model, tokens), plain, f"{family}: hook removed after the block")
    remove = model.add_hook("blocks.0.hook_resid_pre", lambda g, hook: torch.zeros_like(g), dir="bwd")
    assert torch.equal(_embed_grad(model, tokens), torch.zeros_like(plain))
    remove()
    assert not model._persistent_bwd_hooks
    logits = model.run_with_hooks(tokens, bwd_hooks=[("blocks.0.hook_resid_post", lambda g, hook: g[:, :1])])
    with pytest.raises(InputError, match=r"blocks.0.hook_resid_post \(backward\).*expected a tensor"):
        logits.sum().backward()
    with pytest.raises(fl.UnknownHookError):
        model.run_with_hooks(tokens, bwd_hooks=[("blocks.0.hook_resid_psot", lambda g, hook: None)])


# --------------------------------------------------------------------------- fast path == hooked path, gradients


def _all_grads(model: fl.HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor | None,
               hook_everything: bool) -> dict[str, torch.Tensor]:
    """d loss / d (embeddings and every parameter)."""
    leaf: dict[str, torch.Tensor] = {}

    def embed(x, hook):  # keep the embedding in the graph (W_E gets its gradient through it)
        leaf["e"] = x

    hooks = [("hook_embed", embed)]
    if hook_everything:  # an identity hook on every point sends every layer down its explicit, hooked path
        hooks.append((lambda n: True, lambda x, hook: None))
    params = dict(model.named_parameters())
    model.requires_grad_(True)
    try:
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=mask)
        grads = torch.autograd.grad(_loss(logits, tokens), [leaf["e"], *params.values()])
    finally:
        model.requires_grad_(False)
    return dict(zip(["hook_embed", *params], grads))


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_gradients_equal_on_fast_and_hooked_paths(tiny, padded):
    """The fused kernels are only taken when nothing hooks their intermediates; their gradients must equal the
    explicit ones. (The MLP's scratch buffer is never used while autograd records: it is for inference only.)"""
    family, model = tiny
    tokens = _tokens(seed=24, seq=SEQ)
    mask = None
    if padded:
        mask = torch.ones_like(tokens)
        mask[0, :5] = 0
    fast = _all_grads(model, tokens, mask, hook_everything=False)
    hooked = _all_grads(model, tokens, mask, hook_everything=True)
    assert fast.keys() == hooked.keys() and len(fast) > 10
    for name in fast:
        if hooked[name].abs().max() == 0:  # e.g. embedding rows of tokens that do not occur: zero on both
            assert fast[name].abs().max() == 0, f"{family} {name}"
            continue
        _assert_close(fast[name], hooked[name], f"{family} {name}")


# --------------------------------------------------------------------------- the frozen model is affine


FROZEN_SITES = ("attn.hook_pattern", "hook_scale", "hook_mlp_out")  # hook_scale: every norm, ln_final included


def _frozen_map(model: fl.HookedTransformer, tokens: torch.Tensor, freeze: bool):
    """(recorded embeddings e0 [b, p, D], f) where f(e) is the pre-softcap logits [b, p, V] of the model run on
    embeddings e, with patterns, norm scales and MLP outputs fixed at their values on the recorded pass (or only the
    embeddings replaced, when freeze=False)."""
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "hook_embed" or n.endswith(FROZEN_SITES))
    frozen = {n: v for n, v in cache.items() if n != "hook_embed"} if freeze else {}
    if freeze:
        n_layers = model.cfg.n_layers
        assert sum(n.endswith("hook_pattern") for n in frozen) == n_layers
        assert sum(n.endswith("hook_mlp_out") for n in frozen) == n_layers
        assert "ln_final.hook_scale" in frozen
    W_U = model.W_U  # [D, V]

    def f(e: torch.Tensor) -> torch.Tensor:
        seen = {}
        hooks = [("hook_embed", lambda x, hook: e)] + [(n, lambda x, hook: frozen[hook.name]) for n in frozen]
        hooks.append(("ln_final.hook_normalized", lambda x, hook: seen.update(x=x)))
        model.run_with_hooks(tokens, fwd_hooks=hooks)
        return seen["x"] @ W_U  # the logits before any soft-cap

    return cache["hook_embed"], f


def test_frozen_model_is_affine_in_the_embeddings(tiny):
    family, model = tiny
    tokens = _tokens(seed=25, batch=1, seq=SEQ)
    e0, f = _frozen_map(model, tokens, freeze=True)
    logits = model(tokens)
    pre_cap = f(e0)
    if model.cfg.final_softcap is None:  # frozen at its own values, the model reproduces its logits
        _assert_close(pre_cap, logits, f"{family}: frozen pass at the recorded point", rel=1e-5)
    else:
        cap = model.cfg.final_softcap
        _assert_close(torch.tanh(pre_cap / cap) * cap, logits, f"{family}: frozen pass (capped)", rel=1e-5)

    g = torch.Generator().manual_seed(0)
    a = torch.randn(e0.shape, generator=g) * e0.std()
    zero = torch.zeros_like(e0)
    f0 = f(zero)
    # additive: f(a + b) - f(0) = (f(a) - f(0)) + (f(b) - f(0)), far from the recorded point too
    lhs, rhs = f(e0 + a) - f0, (f(e0) - f0) + (f(a) - f0)
    _assert_close(lhs, rhs, f"{family}: f(a+b) vs f(a)+f(b)", rel=1e-4)
    _assert_close(f(3 * a) - f0, 3 * (f(a) - f0), f"{family}: homogeneous", rel=1e-4)

    # the Jacobian does not move: J^T u at e0 and at a distant point agree for random output directions u
    u = torch.randn(pre_cap.shape, generator=g)
    def vjp(at: torch.Tensor) -> torch.Tensor:
        x = at.clone().requires_grad_(True)
        return torch.autograd.grad((f(x) * u).sum(), x)[0]
    _assert_close(vjp(e0 + 2 * a), vjp(e0), f"{family}: Jacobian moved", rel=1e-4)

    # the same checks fail on the live model: the test can tell
    _, live = _frozen_map(model, tokens, freeze=False)
    l0 = live(zero)
    gap = ((live(e0 + a) - l0) - ((live(e0) - l0) + (live(a) - l0))).abs().max()
    assert gap > 1e-2 * (live(e0) - l0).abs().max(), f"{family}: the live model looks affine, the test is vacuous"
