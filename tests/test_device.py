"""`check_device`: the --device of every command and `load_model(device=...)`."""

from __future__ import annotations

import argparse

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
    with pytest.raises(InputError, match="sees no CUDA GPU"):
        fl.run_demo(quick=True, device="cuda", progress=False)  # before any step


# the commands that never run a model: listing, a stored dashboard, labels from a remote language model
NO_MODEL = {"models", "feature", "explain", "graph-push"}


def _model_commands() -> dict[str, argparse.ArgumentParser]:
    from featurelens.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items() if name not in NO_MODEL}


def _minimal_args(p: argparse.ArgumentParser) -> list[str]:
    """Values for a command's required arguments that its parser accepts (what they name need not exist: the
    device is checked before anything is read)."""
    argv: list[str] = []
    for a in p._actions:
        value = str(next(iter(a.choices))) if a.choices else "1"
        if not a.option_strings and a.nargs not in ("?", "*"):
            argv.append(value)
        elif a.option_strings and a.required:
            argv += [a.option_strings[0], value]
    return argv


def test_every_command_that_runs_a_model_takes_device() -> None:
    commands = _model_commands()
    assert {"train", "analyze", "graph", "steer", "search", "serve", "demo", "generate"} <= set(commands)
    lacking = [name for name, p in commands.items() if "--device" not in p._option_string_actions]
    assert not lacking, f"commands without --device: {lacking}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("name", sorted(_model_commands()))
def test_device_cuda_without_a_gpu_stops_every_command(name: str, capsys: pytest.CaptureFixture) -> None:
    from featurelens.cli import main

    argv = [name, *_minimal_args(_model_commands()[name]), "--device", "cuda"]
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert "featurelens: error: device 'cuda'" in err and "sees no CUDA GPU" in err, (argv, err)
    assert "Traceback" not in err, argv
