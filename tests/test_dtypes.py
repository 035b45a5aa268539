"""dtypes: names, and bfloat16 autocast for the forward passes that only make activations."""

from __future__ import annotations

import torch

from featurelens.dtypes import autocast_wanted, forward_autocast


def test_autocast_by_default_only_for_a_float32_model_on_cuda() -> None:
    assert autocast_wanted("cuda", torch.float32)
    assert not autocast_wanted("cuda", torch.bfloat16)  # already bfloat16 weights: nothing to add
    assert not autocast_wanted("cpu", torch.float32)
    assert autocast_wanted("cpu", torch.float32, enabled=True) and not autocast_wanted("cuda", torch.float32, False)
    with forward_autocast("cpu", torch.float32):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with forward_autocast("cpu", torch.float32, enabled=True):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_activation_store_autocast_changes_only_precision() -> None:
    """Forced on (on this CPU) the forward pass runs its matmuls in bfloat16: the activations come back as float32,
    close to the float32 pass but not equal to it; the default on a CPU is the float32 pass itself."""
    from builders import tiny_model

    from featurelens.data import ActivationStore

    model = tiny_model("llama").to(torch.float32)
    ctx = torch.randint(3, model.cfg.d_vocab, (4, 9), generator=torch.Generator().manual_seed(0))
    hook = "blocks.1.hook_mlp_out"

    def rows(autocast: bool | None) -> torch.Tensor:
        store = ActivationStore(model, [hook], ctx, batch_size=16, buffer_tokens=64, shuffle=False, progress=False,
                                autocast=autocast)
        return torch.cat([b[hook] for b in store])

    exact, default, bf16 = rows(False), rows(None), rows(True)
    assert bf16.dtype == exact.dtype == torch.float32
    assert torch.equal(exact, default)
    assert not torch.equal(exact, bf16)
    torch.testing.assert_close(bf16, exact, rtol=0.1, atol=0.05 * float(exact.abs().max()))
