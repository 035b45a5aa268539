"""The GPU path on a real GPU (marked `gpu`: skipped where torch.cuda.is_available() is False): a short forward pass
and a short SAE training on cuda, with the activation-making forward pass under bfloat16 autocast by default."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_forward_and_training_on_cuda(tmp_path: Path) -> None:
    import featurelens as fl
    from builders import tiny_model

    from featurelens.data import ActivationStore

    model = tiny_model("llama").to(device="cuda", dtype=torch.float32)
    cpu = tiny_model("llama").to(torch.float32)
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(3, model.cfg.d_vocab, (32, 17), generator=g)
    contexts[:, 0] = model.cfg.bos_token_id
    with torch.inference_mode():
        torch.testing.assert_close(model(contexts[:2].cuda()).float().cpu(), cpu(contexts[:2]).float(),
                                   rtol=1e-3, atol=1e-3)
    hook = "blocks.1.hook_resid_post"
    store = ActivationStore(model, [hook], contexts[:4], batch_size=16, buffer_tokens=64, shuffle=False,
                            progress=False)
    rows = torch.cat([b[hook] for b in store])
    assert rows.is_cuda and rows.dtype == torch.float32  # made under autocast, handed over in float32
    sae = fl.train_sae(model, hook, arch="topk", k=4, width=64, tokens=256, batch_size=64, contexts=contexts,
                       out=tmp_path / "sae", progress=False)
    assert sae.cfg.d_sae == 64 and torch.isfinite(sae.W_dec).all()
    assert sae.stats["tokens_trained"] == 256
