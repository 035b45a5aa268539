"""The activation cache: written by 2 torchrun ranks (gloo, CPU) in parallel, read back by training to the same
dictionary as training on the model, and its manifest checked on read.

This file is also the ranks' program: torchrun runs it as a script (`python test_cache.py DIR`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
HOOKS = ["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out", "blocks.2.hook_resid_post"]


def _contexts() -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    c = torch.randint(3, 50, (22, 9), generator=g)
    c[:, 0] = 1  # BOS
    return c


def _write(out: Path) -> dict:
    from builders import tiny_model

    from featurelens.data import write_activation_cache

    return write_activation_cache(tiny_model("llama"), HOOKS, _contexts(), out, corpus="random-ids",
                                  contexts_per_shard=5, progress=False)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "acts"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(HERE), str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_ranks_write_the_shards_and_rank_0_the_manifest(cache: Path) -> None:
    from builders import tiny_model

    m = json.loads((cache / "manifest.json").read_text())
    assert (m["model"], m["hooks"], m["dtype"], m["n_contexts"], m["n_tokens"], m["corpus"]) == \
        ("tiny-llama", HOOKS, "float32", 22, 22 * 9, "random-ids")
    assert m["n_shards"] == 5 and sorted(p.name for p in cache.glob("shard-*")) == m["shards"]
    # what the shards hold is the model's activations, context by context
    from featurelens.data import CachedActivations

    model = tiny_model("llama")
    c = CachedActivations(cache, model=model, hooks=HOOKS)
    idx = [0, 7, 21]
    _, ref = model.run_with_cache(_contexts()[idx], names_filter=HOOKS)
    got = c.activations(idx, HOOKS)
    for h in HOOKS:
        torch.testing.assert_close(got[h], ref[h].float())


def test_training_from_the_cache_equals_training_on_the_model(cache: Path, tmp_path: Path) -> None:
    import featurelens as fl
    from builders import tiny_model

    model = tiny_model("llama")
    common = dict(arch="topk", k=3, width=24, tokens=512, batch_size=32, progress=False)
    on_cache = fl.train_transcoders(model, [0], from_cache=cache, out=tmp_path / "cache", **common)
    on_model = fl.train_transcoders(model, [0], contexts=_contexts(), out=tmp_path / "model", **common)
    for name, p in on_model[0].state_dict().items():
        torch.testing.assert_close(on_cache[0].state_dict()[name], p, rtol=1e-5, atol=1e-5)
    assert on_cache[0].stats["source"] == "random-ids"
    sae = fl.train_sae(model, HOOKS[2], from_cache=cache, out=tmp_path / "sae", **common)
    assert sae.stats["tokens_trained"] == 512
    # several SAEs on one read of the cache: each the one trained alone
    _, both = fl.train_saes(model, {HOOKS[0]: tmp_path / "s0", HOOKS[2]: tmp_path / "s2"}, from_cache=cache, **common)
    for name, p in sae.state_dict().items():
        torch.testing.assert_close(both.state_dict()[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_the_manifest_is_checked_on_read(cache: Path, tmp_path: Path) -> None:
    import shutil

    import featurelens as fl
    from builders import tiny_model

    from featurelens.data import CacheMismatchError, CachedActivations
    from featurelens.errors import MissingFileError

    llama = tiny_model("llama")
    with pytest.raises(CacheMismatchError, match="model 'tiny-llama', this run's is 'tiny-gemma3'"):
        fl.train_sae(tiny_model("gemma3"), HOOKS[2], from_cache=cache, out=tmp_path / "x", progress=False)
    with pytest.raises(CacheMismatchError, match=r"this run needs \['blocks.1.hook_resid_post'\]"):
        fl.train_sae(llama, "blocks.1.hook_resid_post", from_cache=cache, out=tmp_path / "y", progress=False)
    with pytest.raises(CacheMismatchError, match="dtype float32, this run wants bfloat16"):
        CachedActivations(cache, dtype="bfloat16")
    with pytest.raises(CacheMismatchError, match="corpus 'random-ids', this run names 'nlp-corpus'"):
        CachedActivations(cache, corpus="nlp-corpus")
    with pytest.raises(CacheMismatchError, match="other contexts"):
        CachedActivations(cache, contexts=_contexts()[1:])
    damaged = tmp_path / "damaged"
    shutil.copytree(cache, damaged)
    m = json.loads((damaged / "manifest.json").read_text())
    m["contexts_sha1"] = "0" * 40
    (damaged / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheMismatchError, match="does not match the manifest's hash"):
        CachedActivations(damaged)
    (damaged / "manifest.json").unlink()
    with pytest.raises(MissingFileError, match="no finished activation cache"):
        CachedActivations(damaged)


def test_a_cache_at_an_fsspec_url(tmp_path: Path) -> None:
    import featurelens as fl
    from builders import tiny_model

    url = f"memory://{tmp_path.name}/acts"
    m = _write(url)  # one process writes every shard
    assert m["n_shards"] == 5
    sae = fl.train_sae(tiny_model("llama"), HOOKS[2], from_cache=url, out=tmp_path / "sae", arch="topk", k=3,
                       width=24, tokens=256, batch_size=32, progress=False)
    ref = fl.train_sae(tiny_model("llama"), HOOKS[2], contexts=_contexts(), out=tmp_path / "ref", arch="topk", k=3,
                       width=24, tokens=256, batch_size=32, progress=False)
    torch.testing.assert_close(sae.W_dec, ref.W_dec, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":  # a rank of torchrun
    from featurelens import distributed

    assert distributed.init_from_env(), "run under torchrun with 2 processes"
    _write(Path(sys.argv[1]))
