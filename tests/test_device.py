"""`check_device`: the --device of every command and `load_model(device=...)`."""

from __future__ import annotations

import pytest
import torch

from featurelens.device import check_device
from featurelens.errors import InputError


def test_check_device() -> None:
    assert check_device(None) is None
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="unknown device 'gpu0'"):
        check_device("gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    from featurelens.cli import main

    with pytest.raises(InputError, match="sees no CUDA GPU"):
        check_device("cuda")
    import featurelens as fl

    with pytest.raises(InputError, match="sees no CUDA GPU"):
        fl.load_model("gemma-3-270m", device="cuda")  # refused before anything is read
    for command in (["train", "--hook", "blocks.0.hook_resid_post"], ["eval", "nowhere"], ["generate", "hi"]):
        assert main([*command, "--device", "cuda"]) == 2, command
        assert "sees no CUDA GPU" in capsys.readouterr().err, command
