"""Distributed analysis: `analyze` on 2 torchrun ranks (gloo, CPU) builds the same analysis as one process: the
same densities, histograms, top and quantile examples (with their activation windows), co-firing and labels.
Also `Accumulator.merge`, which the ranks' merge is made of.

This file is also the ranks' program: torchrun runs it as a script (`python test_distributed_analysis.py DIR`).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
HOOK = "blocks.1.hook_resid_post"
# everything an analysis writes per feature, but the times it was written at
TABLES = {"features": "idx", "examples": "feature, kind, rank", "tokens": "id", "labels": "feature, provenance",
          "label_scores": "feature, provenance, method"}


def _analyze(workdir: Path, out: Path) -> Any:
    import featurelens as fl

    model = fl.load_model(workdir / "model")
    contexts = torch.load(workdir / "contexts.pt")
    return fl.analyze(model, workdir / "sae", contexts, n_tokens=None, batch_size=3, out=out, embed=False,
                      progress=False, n_top=6, n_sample=8, window=(4, 2))


def _prepare(workdir: Path) -> None:
    """A tiny Llama with its own tokenizer (as the web app's fixture makes it), an SAE on it, and contexts."""
    import transformers

    import featurelens as fl
    from builders import _contexts, _tokenizer, sentences

    texts = sentences(200)
    tok = _tokenizer(texts)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(cfg).save_pretrained(workdir / "model")
    tok.save_pretrained(workdir / "model")
    model = fl.load_model(workdir / "model")
    ctx = _contexts(model, texts, ctx=16)
    fl.train_sae(model, HOOK, arch="topk", k=4, width=48, tokens=2048, batch_size=128, contexts=ctx,
                 out=workdir / "sae", progress=False)
    torch.save(ctx[:40], workdir / "contexts.pt")  # 14 batches of 3 (the last one short), dealt to 2 ranks


def _rows(db: Path) -> dict[str, list[tuple]]:
    with sqlite3.connect(db) as conn:
        out = {}
        for table, key in TABLES.items():
            cols = [c[1] for c in conn.execute(f"PRAGMA table_info({table})") if c[1] != "created"]
            out[table] = [tuple(round(v, 9) if isinstance(v, float) else v for v in row)
                          for row in conn.execute(f"SELECT {', '.join(cols)} FROM {table} ORDER BY {key}")]
    return out


def test_two_ranks_build_the_same_analysis(tmp_path: Path) -> None:
    _prepare(tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")]), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(HERE), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _analyze(tmp_path, tmp_path / "one")
    a, b = _rows(tmp_path / "one" / "features.sqlite"), _rows(tmp_path / "ranks" / "features.sqlite")
    assert len(a["features"]) == 48 and len(a["examples"]) > 48, "the analysis found too little to compare"
    assert sum(r[1] for r in a["features"]) > 0
    for table in TABLES:
        assert a[table] == b[table], table


def test_accumulator_merge_equals_one_stream() -> None:
    from featurelens.analysis.accumulate import Accumulator, AccumulatorConfig

    cfg = AccumulatorConfig(d_sae=12, n_top=4, n_sample=5, before=2, after=1)
    g = torch.Generator().manual_seed(0)
    batches = [torch.relu(torch.randn(3, 7, 12, generator=g) - 0.5) for _ in range(5)]
    valid = torch.ones(3, 7, dtype=torch.bool)
    whole, parts = Accumulator(cfg), [Accumulator(cfg), Accumulator(cfg)]
    for i, f in enumerate(batches):
        whole.update(f.clone(), valid, 3 * i)
        parts[i % 2].update(f.clone(), valid, 3 * i, batch_index=i)
    parts[0].merge(parts[1])
    for k, v in whole.state_dict().items():
        torch.testing.assert_close(parts[0].state_dict()[k], v, msg=lambda m: f"{k}: {m}")


if __name__ == "__main__":  # a rank of torchrun
    from featurelens import distributed

    assert distributed.init_from_env(), "run under torchrun with 2 processes"
    result = _analyze(Path(sys.argv[1]), Path(sys.argv[1]) / "ranks")
    assert result.n_features == 48  # every rank gets the published analysis
