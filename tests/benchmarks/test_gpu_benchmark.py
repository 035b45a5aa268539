"""benchmarks/gpu.py: it refuses a GPU this machine lacks with the clear --device error, and its whole run (forward
against transformers, attribution, SAE training, the reference libraries' rows) works on the CPU with --small."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_refuses_cuda_where_there_is_none() -> None:
    r = _run("--device", "cuda", timeout=120)
    assert r.returncode == 2
    assert "device 'cuda'" in r.stderr and "sees no CUDA GPU" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_small_run_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    r = _run("--device", "cpu", "--small", "--json", str(out), timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    f, a, s = res["forward"], res["attribution"], res["sae_training"]
    assert res["device"] == "cpu" and res["matmul_tflops"]["float32"] > 0
    assert f["featurelens_float32"] > 0 and f["transformers_float32"] > 0 and f["logit_max_abs_diff"] < 1e-3
    assert a["featurelens_s"] > 0 and ("circuit_tracer_s" in a or "not available" in a["circuit_tracer"])
    assert s["featurelens_tokens_per_s"] > 0 and ("saelens_tokens_per_s" in s or "not available" in s["saelens"])
    assert "ratio" in r.stdout and "SAE training" in r.stdout
