"""Data-parallel training: real `torchrun` runs (gloo, 2 CPU processes) on the tiny model equal one process given
the same data shards, and a run whose rank 0 is killed mid-way resumes to the same result on 2 ranks or on 1.

This file is also the ranks' program: torchrun runs it as a script (`python test_distributed_training.py KIND OUT ...`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
HOOK = "blocks.1.hook_resid_post"
KINDS = ("sae", "transcoders", "clt")


def _contexts(model: Any, n: int = 48, ctx: int = 17) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    c = torch.randint(3, model.cfg.d_vocab, (n, ctx), generator=g)
    c[:, 0] = model.cfg.bos_token_id
    return c


def train(kind: str, out: Path, resume: bool = False, kill_after: int | None = None) -> Any:
    """One of the three trainings, with settings that reach every statistic the ranks must share: batchtopk's
    batch-wide cut and threshold, dead latents (AuxK), least-squares skips, normalized_mse's batch mean, JumpReLU's
    quantile start, reuse buffers."""
    import featurelens as fl
    from builders import tiny_model

    model = tiny_model("llama")
    on_progress = None
    if kill_after is not None:
        def on_progress(event: Any) -> None:  # rank 0 dies as a crash would kill it; torchrun stops the others
            if event.done >= kill_after * 64:
                os.kill(os.getpid(), signal.SIGKILL)
    common: dict[str, Any] = dict(tokens=640, batch_size=64, contexts=_contexts(model), out=out, progress=False,
                                  shards=2, checkpoint_every=2, resume=resume, dead_tokens=128, on_progress=on_progress)
    if kind == "sae":
        return fl.train_sae(model, HOOK, arch="batchtopk", k=4, width=64, **common)
    if kind == "transcoders":
        return fl.train_transcoders(model, [0, 2], arch="topk", k=4, width=32, init_tokens=128,
                                    loss="normalized_mse", **common)
    if kind in ("by-layers", "one-process"):  # the layers on different ranks, against one process holding all three
        common.pop("shards")
        return fl.train_transcoders(model, [0, 1, 2], arch="batchtopk", k=4, width=32, init_tokens=128,
                                    shard="layers" if kind == "by-layers" else "data", **common)
    return fl.train_clt(model, "all", arch="jumprelu", width=32, reuse=2, reuse_buffer_tokens=256, init_l0=8.0,
                        **common)


def _weights(kind: str, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(out.rglob("*.safetensors"))
    assert files, f"{kind}: nothing saved in {out}"
    return {f"{f.relative_to(out)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def _stats(out: Path) -> dict[str, Any]:
    """The training record saved with a dictionary (a transcoder set's first layer's)."""
    import json

    meta = out / "featurelens.json"
    if "stats" not in json.loads(meta.read_text()):
        meta = sorted(out.glob("layer_*/featurelens.json"))[0]
    return json.loads(meta.read_text())["stats"]


def _torchrun(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_same(kind: str, a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), kind
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{kind} {key}: {m}")


def test_two_ranks_equal_one_process(tmp_path: Path) -> None:
    run = _torchrun("all", str(tmp_path / "ranks"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for kind in KINDS:
        train(kind, tmp_path / "one" / kind)
        one, two = _weights(kind, tmp_path / "one" / kind), _weights(kind, tmp_path / "ranks" / kind)
        _assert_same(kind, one, two)
        assert _stats(tmp_path / "ranks" / kind)["tokens_trained"] == 640, kind


def test_killed_run_resumes_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "sae"
    killed = _torchrun("sae", str(out), "--kill-after", "5")
    assert killed.returncode != 0  # rank 0 was killed
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*.pt"))[-1] == "step-00000004.pt"
    assert not (out / "cfg.json").exists()
    import shutil

    shutil.copytree(out, tmp_path / "on-one")  # the same stopped run, to resume on 1 rank as well
    resumed = _torchrun("sae", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    train("sae", tmp_path / "whole")
    _assert_same("sae", _weights("sae", tmp_path / "whole"), _weights("sae", out))
    assert _stats(out)["resumed_from_step"] == 4
    train("sae", tmp_path / "on-one", resume=True)  # its 2 shards now both on one rank
    _assert_same("sae", _weights("sae", tmp_path / "whole"), _weights("sae", tmp_path / "on-one"))
    assert _stats(tmp_path / "on-one")["resumed_from_step"] == 4


def test_layers_on_two_ranks_equal_one_process_and_resume(tmp_path: Path) -> None:
    """--shard layers: rank 0 trains layers 0 and 1, rank 1 layer 2, each over the whole stream; the set equals one
    process training all three, also after rank 0 is killed mid-way and the run resumed on 2 ranks."""
    train("one-process", tmp_path / "one")
    one = _weights("transcoders", tmp_path / "one")
    run = _torchrun("by-layers", str(tmp_path / "ranks"))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _assert_same("by-layers", one, _weights("transcoders", tmp_path / "ranks"))
    assert [_stats(tmp_path / "ranks")["tokens_trained"]] == [640]

    out = tmp_path / "killed"
    killed = _torchrun("by-layers", str(out), "--kill-after", "5")
    assert killed.returncode != 0
    assert (out / "checkpoints" / "layers-0_1" / "step-00000004.pt").is_file()
    assert not (out / "featurelens.json").exists()
    resumed = _torchrun("by-layers", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    _assert_same("by-layers resumed", one, _weights("transcoders", out))
    assert _stats(out)["resumed_from_step"] == 4
    assert not (out / "checkpoints").exists()


def test_layers_shard_refuses_what_it_cannot_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import featurelens as fl
    from builders import tiny_model
    from featurelens import distributed
    from featurelens.cli import main as cli_main
    from featurelens.dictionaries.train import _check_layer_checkpoints
    from featurelens.errors import InputError

    model = tiny_model("llama")
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    with pytest.raises(InputError, match="3 ranks for 2 layer"):
        fl.train_transcoders(model, [0, 1], shard="layers", out=tmp_path / "x", progress=False)
    with pytest.raises(InputError, match="shard must be one of"):
        fl.train_transcoders(model, [0, 1], shard="heads", out=tmp_path / "x", progress=False)
    monkeypatch.undo()
    for flag, why in (("--hook=blocks.0.hook_resid_post", "single hook"), ("--clt", "couples its layers")):
        assert cli_main(["train", flag, "--shard", "layers", "--out", str(tmp_path / "y")]) == 2
        assert why in capsys.readouterr().err
    # checkpoints of another split, or of a data-parallel run, are not silently ignored on resume
    (tmp_path / "c" / "checkpoints" / "layers-0_1").mkdir(parents=True)
    (tmp_path / "c" / "checkpoints" / "layers-0_1" / "step-00000002.pt").write_bytes(b"")
    with pytest.raises(InputError, match="resume on as many ranks"):
        _check_layer_checkpoints(tmp_path / "c", [[0], [1]])
    with pytest.raises(InputError, match="--shard layers"):
        _check_layer_checkpoints(tmp_path / "c", None)
    _check_layer_checkpoints(tmp_path / "c", [[0, 1], [2]])  # the same split: rank 1 had not checkpointed yet
    (tmp_path / "c" / "checkpoints" / "step-00000002.pt").write_bytes(b"")
    with pytest.raises(InputError, match="data-parallel"):
        _check_layer_checkpoints(tmp_path / "c", [[0, 1], [2]])


if __name__ == "__main__":  # a rank of torchrun
    from featurelens import distributed

    assert distributed.init_from_env(), "run under torchrun with 2 processes"
    what, where = sys.argv[1], Path(sys.argv[2])
    kill = int(sys.argv[sys.argv.index("--kill-after") + 1]) if "--kill-after" in sys.argv else None
    for k in (KINDS if what == "all" else (what,)):  # "by-layers" too
        train(k, where / k if what == "all" else where, resume="--resume" in sys.argv,
              kill_after=kill if distributed.is_main() else None)
