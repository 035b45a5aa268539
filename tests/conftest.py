"""Shared fixtures. The embedded models convert once into the data directory (about 40 s), then load in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "data" / "nlp-corpus" / "sentences.jsonl.gz"


@pytest.fixture(scope="session")
def gemma():
    import featurelens as fl

    torch.manual_seed(0)
    return fl.load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def smollm():
    import featurelens as fl

    return fl.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    if not SHARED_CORPUS.is_file():
        pytest.skip(f"shared corpus copy not found at {SHARED_CORPUS}")
    return SHARED_CORPUS


@pytest.fixture
def sigint_default():
    """SIGINT handled as in an interactive Python (a KeyboardInterrupt), whatever the test runner inherited: CI may
    start the suite with SIGINT ignored, as shells do for background jobs."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)
