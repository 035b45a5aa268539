"""Shared fixtures, test isolation and the test tiers.

Isolation: the whole run uses a temporary data directory ($FEATURELENS_HOME, also seen by the subprocesses tests
start) and the corpus copy in ../shared ($FEATURELENS_CORPUS): never the user's ~/.cache/featurelens, never npm or
the network. What is slow to rebuild and depends only on the code and the pinned inputs (the converted embedded
models, the trained fixture dictionary) is kept between runs in the repository's gitignored .test-cache/, linked
into the temporary data directory.

Tiers: tests that need an embedded model (converted on first use, about 40 s) or the trained fixture are marked
`slow`, automatically when they use one of the fixtures below. `pytest -m "not slow"` runs in under a minute.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_CORPUS = REPO.parent / "shared" / "data" / "nlp-corpus" / "sentences.jsonl.gz"
TEST_CACHE = REPO / ".test-cache"  # gitignored
CACHED_SUBDIRS = ("downloads", "models", "test-fixtures")  # data-directory parts kept between runs
# Fixtures that load an embedded model or train a dictionary: a test using one (directly or through another
# fixture) belongs to the slow tier.
SLOW_FIXTURES = {"gemma", "smollm", "trained_sae", "analyzed"}


CIRCUIT_TRACER_CACHE_VAR = "FEATURELENS_CIRCUIT_TRACER_CACHE"  # .ci/run sets it: build circuit-tracer's venv there


def pytest_configure(config):
    """With $FEATURELENS_CIRCUIT_TRACER_CACHE set (CI), build circuit-tracer's venv there once (cached between runs,
    keyed by its contents) and point the agreement tests at it; a build that fails stops the run, so those tests
    cannot skip unnoticed."""
    cache = os.environ.get(CIRCUIT_TRACER_CACHE_VAR)
    if not cache or os.environ.get("FEATURELENS_CIRCUIT_TRACER_PYTHON"):
        return
    import importlib.util
    import time

    spec = importlib.util.spec_from_file_location("_ct_env", REPO / "benchmarks" / "_circuit_tracer_env.py")
    ct = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ct)
    env = Path(cache) / f"circuit-tracer-{ct.ENV_FORMAT}-{ct.CIRCUIT_TRACER_VERSION}-torch{ct.TORCH_PIN}"
    t0 = time.perf_counter()
    try:
        ct.ensure_env(progress=False, env=env)
    except (ct.BenchmarkSetupError, OSError) as e:
        pytest.exit(f"{CIRCUIT_TRACER_CACHE_VAR} is set but circuit-tracer's environment could not be built: {e}",
                    returncode=1)
    os.environ["FEATURELENS_CIRCUIT_TRACER_PYTHON"] = str(ct.env_python(env))
    os.environ["FEATURELENS_CIRCUIT_TRACER_ENV"] = str(env)
    print(f"circuit-tracer environment: {env} ({time.perf_counter() - t0:.0f} s)")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


@pytest.fixture(scope="session", autouse=True)
def isolated_data_dir(tmp_path_factory):
    """A temporary data directory and the shared corpus copy, for the whole run (subprocesses included)."""
    from featurelens import paths
    from featurelens.data import corpus

    home = tmp_path_factory.mktemp("featurelens-home")
    for sub in CACHED_SUBDIRS:
        (TEST_CACHE / sub).mkdir(parents=True, exist_ok=True)
        (home / sub).symlink_to(TEST_CACHE / sub, target_is_directory=True)
    mp = pytest.MonkeyPatch()
    mp.setenv(paths.ENV_VAR, str(home))
    # Set even when the copy is missing: reading the corpus then fails naming the file, instead of going online.
    mp.setenv(corpus.CORPUS_ENV_VAR, str(SHARED_CORPUS))
    mp.setattr(paths, "_override", None)
    assert paths.data_dir() == home
    yield home
    mp.undo()


@pytest.fixture(scope="session")
def gemma():
    import featurelens as fl

    torch.manual_seed(0)
    return fl.load_model("gemma-3-270m")


@pytest.fixture(scope="session")
def trained_sae(gemma):
    """A TopK SAE trained on the embedded corpus (builders.TRAINED), cached in the data directory."""
    import builders

    return builders.trained_sae(gemma)


@pytest.fixture(scope="session")
def analyzed(gemma, trained_sae, tmp_path_factory):
    """The trained SAE analyzed over held-out text of the embedded corpus (shared, read-only in tests)."""
    import featurelens as fl
    from builders import ANALYSIS_TOKENS

    out = tmp_path_factory.mktemp("analysis")
    return fl.analyze(gemma, trained_sae, n_tokens=ANALYSIS_TOKENS, batch_size=16, out=out, progress=False)


@pytest.fixture(scope="session")
def smollm():
    import featurelens as fl

    return fl.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def shared_corpus() -> Path:
    if not SHARED_CORPUS.is_file():
        pytest.fail(f"the corpus copy is missing: the tests expect it at {SHARED_CORPUS} (../shared beside the repo)")
    return SHARED_CORPUS


@pytest.fixture
def sigint_default():
    """SIGINT handled as in an interactive Python (a KeyboardInterrupt), whatever the test runner inherited: CI may
    start the suite with SIGINT ignored, as shells do for background jobs."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def pytest_report_header(config):
    return [f"featurelens test data: temporary directory per run; models cached in {TEST_CACHE}; "
            f"corpus {SHARED_CORPUS}" + ("" if SHARED_CORPUS.is_file() else " (MISSING)")]


# ----------------------------------------------------------------------------------------------- store backends
POSTGRES_VAR = "FEATURELENS_TEST_POSTGRES"  # a postgresql:// URL of a server the tests may create schemas on
SKIP_POSTGRES_VAR = "FEATURELENS_SKIP_POSTGRES"
_pg_names = itertools.count()


def postgres_url() -> str:
    """The test server's URL. Without one the PostgreSQL tests fail (CI must test both backends); a developer may
    skip them with FEATURELENS_SKIP_POSTGRES=1, never CI."""
    url = os.environ.get(POSTGRES_VAR, "").strip()
    if url:
        return url
    if os.environ.get(SKIP_POSTGRES_VAR) == "1" and os.environ.get("CI", "").lower() not in ("true", "1"):
        pytest.skip(f"PostgreSQL store tests skipped ({SKIP_POSTGRES_VAR}=1)")
    pytest.fail(f"the PostgreSQL store tests need a server: set {POSTGRES_VAR}=postgresql://user@host/db (a database "
                f"the tests may create schemas in; .ci/postgres starts a throw-away one: `source .ci/postgres`), or "
                f"on a developer machine set {SKIP_POSTGRES_VAR}=1 to skip them" +
                (" (CI=true: they may not be skipped)" if os.environ.get("CI") else ""), pytrace=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request, tmp_path):
    """A function making a new, empty store location on each backend: a SQLite path, or a PostgreSQL URL naming an
    analysis of its own (its schema is dropped after the test)."""
    if request.param == "sqlite":
        names = itertools.count()
        yield lambda: tmp_path / f"store-{next(names)}.sqlite"
        return
    url = postgres_url()
    import psycopg

    made: list[str] = []

    def new() -> str:
        name = f"t{os.getpid()}-{next(_pg_names)}"
        made.append(name)
        return f"{url}#{name}"

    yield new
    with psycopg.connect(url, autocommit=True) as conn:
        for name in made:
            conn.execute(f'DROP SCHEMA IF EXISTS "fl_{name}" CASCADE')


@pytest.fixture
def postgres_db():
    """The test server's URL (see `postgres_url`); the analyses (schemas) a test makes there, and the graphs' schema
    when the test made it, are dropped after it."""
    url = postgres_url()
    import psycopg

    def schemas() -> set[str]:
        with psycopg.connect(url, autocommit=True) as conn:
            return {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'fl\\_%' "
                                                    "OR nspname = 'featurelens_graphs'")}

    before = schemas()
    yield url
    with psycopg.connect(url, autocommit=True) as conn:
        for s in schemas() - before:
            conn.execute(f'DROP SCHEMA IF EXISTS "{s}" CASCADE')
