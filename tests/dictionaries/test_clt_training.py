"""The CLT training step's fast path (`CLTLearner.loss`: one cross-layer decode into a [B, n, d] output) computes
the same loss and gradients as the plain formulation it replaced (each source layer decoded on its own, its slices
added to per-layer outputs under autograd), on the MLP activations of a tiny Gemma 3."""

from __future__ import annotations

import pytest
import torch

from builders import tiny_model
from featurelens.dictionaries.autograd import cross_layer_decode, sparse_decode
from featurelens.dictionaries.clt import CLTConfig
from featurelens.dictionaries.learner import CLTLearner
from featurelens.dictionaries.losses import (
    dead_latent_aux, decode_for_training, project_decoder_grad, reconstruction_loss,
)
from featurelens.dictionaries.train_config import TrainConfig


def _tiny_activations(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    model = tiny_model("gemma3")
    n = model.cfg.n_layers
    names = [f"blocks.{l}.ln2.hook_normalized" for l in range(n)] + [f"blocks.{l}.hook_mlp_out" for l in range(n)]
    tokens = torch.randint(3, model.cfg.d_vocab, (12, 20), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(tokens, names_filter=names)
    rows = [cache[h].reshape(-1, model.cfg.d_model).to(dtype) for h in names]
    return rows[:n], rows[n:]


def _plain_loss(lrn: CLTLearner, xs: list[torch.Tensor], ys: list[torch.Tensor], sparsity_scale: float) -> torch.Tensor:
    """The step's loss as CLTLearner computed it before the fast path: per-layer outputs, a slice each (the
    encoding, which the fast path left alone, is the learner's own)."""
    clt, cfg, tcfg = lrn.clt, lrn.clt.cfg, lrn.tcfg
    n, B = len(cfg.layers), xs[0].shape[0]
    outs = [clt.b_dec[j].expand(B, -1) for j in range(n)]
    encs, sparsity = lrn.encode_all(xs)
    for i, enc in enumerate(encs):
        dec = decode_for_training(enc, clt.W_dec[i]).view(B, n - i, cfg.d_out)
        for j in range(n - i):
            outs[i + j] = outs[i + j] + dec[:, j]
        if clt.W_skip is not None:
            outs[i] = outs[i] + xs[i] @ clt.W_skip[i].T
    errs = [o - y for o, y in zip(outs, ys)]
    loss = sum(reconstruction_loss(e.pow(2).sum(-1), y.pow(2).sum(-1), tcfg.loss) for e, y in zip(errs, ys))
    loss = loss + sparsity_scale * sparsity
    aux = xs[0].new_zeros(())
    for i in range(n):
        dead = lrn.since_fired[i] >= lrn.dead_tokens
        if dead.any():
            aux = aux + dead_latent_aux(xs[i], None, clt.W_enc[i], clt.b_enc[i], clt.W_dec[i], encs[i].pre, dead,
                                        lrn.aux_k, torch.cat(errs[i:], dim=1))
    return loss + tcfg.aux_coefficient * aux


def _grads(lrn: CLTLearner, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = [p for p in lrn.clt.parameters() if p.requires_grad]
    names = [n for n, p in lrn.clt.named_parameters() if p.requires_grad]
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("arch,kw", [("topk", {"k": 5, "skip": True}), ("batchtopk", {"k": 5}),
                                     ("jumprelu", {"loss": "normalized_mse"}), ("relu", {"skip": True})])
def test_clt_fast_step_equals_the_plain_formulation(arch, kw, dtype):
    xs, ys = _tiny_activations(dtype)
    skip = kw.pop("skip", False)
    tcfg = TrainConfig(arch=arch, width=48, tokens=10_000, batch_size=len(xs[0]), skip=skip, skip_lr_scale=1.0,
                       init_l0=8.0, dead_tokens=100, **kw)
    torch.manual_seed(0)
    lrn = CLTLearner("clt", CLTConfig(layers=[0, 1, 2], d_in=xs[0].shape[1], d_sae=48, arch=arch, k=tcfg.k,
                                      skip=skip, dtype=str(dtype).removeprefix("torch.")), tcfg)
    lrn._initialize(xs, ys)
    with torch.no_grad():  # perturb every parameter, so biases and skips are not at special values
        for p in lrn.clt.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lrn.since_fired[:, ::3] = 1000  # a third of the latents dead: AuxK takes part
    xs = [x * s for x, s in zip(xs, lrn.scale_in)]
    ys = [y * s for y, s in zip(ys, lrn.scale_out)]

    fast = lrn.loss(xs, ys, 0.7)[0]
    plain = _plain_loss(lrn, xs, ys, 0.7)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(fast, plain, **tol)
    g_fast, g_plain = _grads(lrn, fast), _grads(lrn, plain)
    assert g_fast.keys() == g_plain.keys() and any(k.startswith("W_dec") for k in g_fast)
    for name in g_fast:
        a, b = g_fast[name], g_plain[name]
        assert (a is None) == (b is None), name
        if a is not None:
            scale = float(b.abs().max()) or 1.0
            torch.testing.assert_close(a / scale, b / scale, **tol, msg=lambda m: f"{name}: {m}")


def test_cross_layer_decode_sums_each_source_into_its_later_outputs():
    torch.manual_seed(0)
    n, B, S, d = 3, 4, 6, 5
    Ws = [torch.randn(S, (n - i) * d, dtype=torch.float64, requires_grad=True) for i in range(n)]
    dense = [torch.randn(B, S, dtype=torch.float64).relu().requires_grad_() for _ in range(n)]
    idx = [torch.randint(0, S - 2, (B, 2)) for _ in range(n)]  # the last two latents never chosen: empty groups
    vals = [torch.rand(B, 2, dtype=torch.float64, requires_grad=True) for _ in range(n)]
    # layer 0 sparse, 1 dense, 2 sparse: both kinds in one call
    acts, idxs = [vals[0], dense[1], vals[2]], [idx[0], None, idx[2]]
    out = cross_layer_decode(acts, idxs, Ws, d)
    assert out.shape == (B, n, d)
    for L in range(n):
        want = torch.zeros(B, d, dtype=torch.float64)
        for i in range(L + 1):
            f = acts[i] if idxs[i] is None else torch.zeros(B, S, dtype=torch.float64).scatter_add(1, idxs[i], acts[i])
            want = want + f @ Ws[i].view(S, n - i, d)[:, L - i]
        torch.testing.assert_close(out[:, L], want)
    torch.autograd.gradcheck(lambda *a: cross_layer_decode(list(a[:n]), idxs, list(a[n:]), d), (*acts, *Ws))


def test_project_decoder_grad_removes_the_component_along_each_row():
    torch.manual_seed(0)
    W = torch.nn.Parameter(torch.nn.functional.normalize(torch.randn(7, 30, dtype=torch.float64), dim=1))
    W.grad = torch.randn_like(W)
    want = W.grad - (W.grad * W).sum(1, keepdim=True) * W
    project_decoder_grad(W)
    torch.testing.assert_close(W.grad, want)
    torch.testing.assert_close((W.grad * W).sum(1), torch.zeros(7, dtype=torch.float64))


def test_sparse_decode_block_by_block_equals_the_whole_rows():
    """A CLT layer's AuxK decodes its rows as `blocks` outputs side by side: same values and gradients."""
    torch.manual_seed(0)
    S, B, m, d = 7, 5, 3, 4
    W = torch.randn(S, m * d, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(0, S - 2, (B, 3))  # the last two latents never chosen
    vals = torch.rand(B, 3, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(sparse_decode(vals, idx, W, m), sparse_decode(vals, idx, W))
    torch.autograd.gradcheck(lambda v, w: sparse_decode(v, idx, w, m), (vals, W))
