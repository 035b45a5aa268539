"""Nothing lost under concurrency and crashes, nobody in from outside (issue 28).

Atomic writes from many threads at once; a dictionary save killed (SIGKILL) between any two of its renames; an
analysis rebuilt under a running server that keeps saving labels; analyses of old weights never served; two
analyses of one directory; the server's Host/Origin checks, body, upload and job limits, its instance lock, event
streams that wait instead of spinning, and graph jobs that share the model and stop when cancelled.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from featurelens.io import (LockedError, atomic_dir, atomic_write_json, clean_stale_tmp, hold_lock, is_tmp,
                            tmp_path as tmp_name)

REPO = Path(__file__).resolve().parents[2]


def _stray(root: Path) -> list[Path]:
    return [p for p in root.rglob(".*") if is_tmp(p)]


# ----------------------------------------------------------------------------------------------- atomic writes
def test_many_threads_writing_one_file_never_fail_and_leave_no_temporaries(tmp_path):
    target = tmp_path / "graph.json"
    errors: list[BaseException] = []
    start = threading.Barrier(16)

    def writer(i: int) -> None:
        start.wait()
        for j in range(40):
            try:
                atomic_write_json(target, {"writer": i, "n": j, "pad": "x" * 2000})
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert json.loads(target.read_text())["pad"] == "x" * 2000  # one writer's complete file
    assert [p.name for p in tmp_path.iterdir()] == ["graph.json"]
    assert tmp_name(target) != tmp_name(target)  # unique per write


def test_clean_stale_tmp_removes_only_dead_writers_leftovers(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / "sub").mkdir()
    stale_file = tmp_path / "sub" / f".a.json.tmp-{dead_pid}-1-abcdef01"
    stale_file.write_text("half")
    stale_dir = tmp_path / f".dict.tmp-{dead_pid}-1-abcdef01"
    stale_dir.mkdir()
    (stale_dir / "w").write_text("w")
    live = tmp_path / f".b.json.tmp-{os.getpid()}-1-abcdef01"  # a write in flight in a running process
    live.write_text("in flight")
    legacy = tmp_path / f".c.json.tmp-{dead_pid}"  # the name older versions used
    legacy.write_text("old")
    removed = clean_stale_tmp(tmp_path)
    assert set(removed) == {stale_file, stale_dir, legacy}
    assert live.exists() and not stale_file.exists() and not stale_dir.exists()


def test_atomic_dir_keeps_the_entries_it_is_told_to(tmp_path):
    final = tmp_path / "d"
    with atomic_dir(final) as t:
        (t / "w").write_text("1")
    (final / "analysis").mkdir()
    (final / "analysis" / "features.sqlite").write_text("db")
    (final / "stale").write_text("s")
    with atomic_dir(final, keep=("analysis",)) as t:
        (t / "w").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["analysis", "w"]
    assert (final / "w").read_text() == "2" and (final / "analysis" / "features.sqlite").read_text() == "db"
    assert not _stray(tmp_path)


# ----------------------------------------------------------------------------------------------- crash tests
_SAVE_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    from featurelens.dictionaries import SparseDictionary, DictionaryConfig, save_dictionary
    kill_at, version, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(version)
    d = SparseDictionary(DictionaryConfig(d_in=8, d_sae=16, arch="topk", k=version, hook_name="blocks.0.hook_resid_post"))
    real, calls = os.replace, [0]
    def replace(a, b):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)  # a power cut between two renames: nothing after this runs
        return real(a, b)
    os.replace = replace
    save_dictionary(d, path)
    print(calls[0])
""")


def _save(path: Path, version: int, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", _SAVE_SCRIPT, str(kill_at), str(version), str(path)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a dozen subprocesses
def test_a_dictionary_save_killed_anywhere_leaves_the_old_or_the_new_one(tmp_path):
    from featurelens.dictionaries import load_dictionary

    def state(path: Path) -> tuple[int, torch.Tensor]:
        d = load_dictionary(path)
        return int(d.cfg.k), d.W_enc.detach().clone()

    ref = tmp_path / "ref"
    r = _save(ref / "v3", 3)
    assert r.returncode == 0, r.stderr
    n_renames = int(r.stdout.split()[-1])
    assert _save(ref / "v5", 5).returncode == 0
    old, new = state(ref / "v3"), state(ref / "v5")
    assert old[0] == 3 and new[0] == 5 and not torch.equal(old[1], new[1])
    for kill_at in range(1, n_renames + 2):
        path = tmp_path / f"run{kill_at}" / "sae"
        assert _save(path, 3).returncode == 0
        (path / "analysis").mkdir()
        (path / "analysis" / "features.sqlite").write_text("the analysis")
        (path / "checkpoints").mkdir()
        r = _save(path, 5, kill_at)
        killed = r.returncode == -signal.SIGKILL
        assert killed or kill_at > n_renames, (kill_at, r.returncode, r.stderr)
        clean_stale_tmp(path.parent)  # what the next start of the server or of training does
        k, w = state(path)
        assert (k, True) in ((3, torch.equal(w, old[1])), (5, torch.equal(w, new[1]))), \
            f"killed at rename {kill_at}: cfg.json says k={k} beside weights of the other version"
        assert (path / "analysis" / "features.sqlite").read_text() == "the analysis"
        assert (path / "checkpoints").is_dir()
        assert not _stray(path.parent), (kill_at, _stray(path.parent))


# ----------------------------------------------------------------------------------------------- analyses
@pytest.fixture(scope="module")
def web_data(tmp_path_factory):
    import builders as web

    return web.shared_data(tmp_path_factory)


@pytest.fixture
def own_data(web_data, tmp_path):
    """A data directory of our own (the SAE and its analysis copied from the shared one), to rebuild and retrain."""
    import builders as web

    data, model = web_data
    mine = tmp_path / "data"
    src = data / "dictionaries" / web.MODEL / "sae"
    shutil.copytree(src, mine / "dictionaries" / web.MODEL / "sae")
    return mine, model


def _test_contexts(model):
    import builders as web

    ctx = web._contexts(model, web.sentences())
    return ctx[len(ctx) * 3 // 4:]


def test_labels_saved_while_the_analysis_is_rebuilt_are_kept(own_data):
    """A server has the analysis open; `analyze --overwrite` rebuilds it; a label saved through the server after
    the rebuild is still there after a restart (it used to go to the deleted file)."""
    from fastapi.testclient import TestClient

    import featurelens as fl
    import builders as web
    from featurelens.server import create_app

    data, model = own_data
    sae = data / "dictionaries" / web.MODEL / "sae"
    with TestClient(create_app(data, model_loader=lambda n: model)) as c:
        url = f"/api/dictionaries/{web.SAE_ID}/features"
        assert c.put(f"{url}/1/label", json={"label": "before the rebuild"}).status_code == 200
        fl.analyze(model, sae, _test_contexts(model), n_tokens=None, batch_size=8, embed=False, progress=False,
                   n_top=4, n_sample=8, window=(4, 2), overwrite=True)
        r = c.put(f"{url}/2/label", json={"label": "after the rebuild"})
        assert r.status_code == 200, r.text
        assert c.get(f"{url}/2").json()["label"] == "after the rebuild"
        assert c.get(f"{url}/3").json()["top_examples"].__len__() <= 4  # the rebuilt analysis is what is served
    with TestClient(create_app(data, model_loader=lambda n: model)) as c:  # a restart
        assert c.get(f"{url}/1").json()["label"] == "before the rebuild"
        assert c.get(f"{url}/2").json()["label"] == "after the rebuild"
    assert not (sae / "analysis" / "building").exists() and not _stray(sae)


def test_a_second_analysis_of_one_directory_stops_with_a_clear_error(own_data):
    import featurelens as fl
    import builders as web

    data, model = own_data
    sae = data / "dictionaries" / web.MODEL / "sae"
    with hold_lock(sae / "analysis" / "build.lock", "test"):  # as a running `featurelens analyze` does
        with pytest.raises(LockedError, match="another `featurelens analyze` is building it"):
            fl.analyze(model, sae, _test_contexts(model), n_tokens=None, batch_size=8, embed=False, progress=False,
                       overwrite=True)


def test_an_analysis_of_other_weights_is_never_served(own_data):
    """The dictionary is trained again (new weights saved over it): its old dashboards answer 409, not 200."""
    from fastapi.testclient import TestClient

    import featurelens as fl
    import builders as web
    from featurelens.server import create_app

    data, model = own_data
    sae = data / "dictionaries" / web.MODEL / "sae"
    with TestClient(create_app(data, model_loader=lambda n: model)) as c:
        url = f"/api/dictionaries/{web.SAE_ID}/features/0"
        assert c.get(url).status_code == 200
        d = fl.load_dictionary(sae)
        with torch.no_grad():
            d.W_enc.mul_(-1)
        fl.save_dictionary(d, sae)  # what training again writes; the analysis/ folder stays beside it
        r = c.get(url)
        assert r.status_code == 409 and "analyze --overwrite" in r.json()["detail"], r.text
        assert c.put(url + "/label", json={"label": "x"}).status_code == 409


def test_train_overwrite_removes_the_old_analysis(own_data):
    import featurelens as fl
    import builders as web

    data, model = own_data
    sae = data / "dictionaries" / web.MODEL / "sae"
    assert (sae / "analysis" / "features.sqlite").is_file()
    fl.train_sae(model, web.HOOK, arch="topk", k=4, width=96, tokens=512, batch_size=256,
                 contexts=_test_contexts(model), out=sae, progress=False, overwrite=True)
    assert not (sae / "analysis").exists() and not _stray(sae.parent)


# ----------------------------------------------------------------------------------------------- server limits
def _app(data, **kw):
    from featurelens.server import create_app

    return create_app(data, **kw)


def test_loopback_server_refuses_foreign_host_and_origin(tmp_path):
    from fastapi.testclient import TestClient

    with TestClient(_app(tmp_path, host="127.0.0.1"), base_url="http://127.0.0.1:8765") as c:
        assert c.get("/api/health").status_code == 200
        for host in ("localhost:8765", "[::1]:8765", "127.0.0.1"):
            assert c.get("/api/health", headers={"host": host}).status_code == 200, host
        r = c.get("/api/health", headers={"host": "attacker.example:8765"})  # DNS rebinding
        assert r.status_code == 421 and "attacker.example" in r.json()["detail"]
        r = c.post("/api/graphs", json={}, headers={"origin": "http://attacker.example"})
        assert r.status_code == 403 and "origin" in r.json()["detail"]
        assert c.get("/api/health", headers={"origin": "null"}).status_code == 403
        assert c.get("/api/health", headers={"origin": "http://127.0.0.1:8765"}).status_code == 200


def test_body_size_upload_and_job_limits(tmp_path, web_data):
    from fastapi.testclient import TestClient

    import builders as web
    from featurelens.server.security import Limits

    g = json.loads((web_data[0] / "graphs" / "demo" / "tiny-prompt.json").read_text())
    size = len(json.dumps(g))
    limits = Limits(max_body_bytes=size + 1000, max_uploads=2, max_active_jobs=1)
    with TestClient(_app(tmp_path, limits=limits)) as c:
        big = json.dumps({"pad": "x" * (size + 2000)})
        r = c.post("/api/graphs", content=big, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "FEATURELENS_MAX_BODY_BYTES" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it arrives
            for _ in range(10):
                yield b"x" * (limits.max_body_bytes // 4)

        r = c.post("/api/graphs", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert c.post("/api/graphs", json=g).status_code == 201
        assert c.post("/api/graphs", json=g).status_code == 201
        r = c.post("/api/graphs", json=g)
        assert r.status_code == 429 and "FEATURELENS_MAX_UPLOADS" in r.json()["detail"]
        assert len(c.get("/api/overview").json()["graphs"]) == 2

    data, model = web_data
    gate = threading.Event()
    app = _app(data, model_loader=lambda n: (gate.wait(30), model)[1], limits=limits)
    with TestClient(app) as c:
        body = {"transcoders": web.TC_ID, "prompt": "The cat", "max_feature_nodes": 8}
        try:
            first = c.post("/api/jobs/graph", json=body)
            assert first.status_code == 202, first.text
            r = c.post("/api/jobs/graph", json=body)
            assert r.status_code == 429 and "FEATURELENS_MAX_ACTIVE_JOBS" in r.json()["detail"]
        finally:
            gate.set()
        end = time.time() + 120
        while app.state.jobs.active() and time.time() < end:
            time.sleep(0.05)


def test_serve_off_loopback_wants_a_long_token_and_warns(monkeypatch, capsys, tmp_path):
    import uvicorn

    from featurelens import paths
    from featurelens.cli import main

    monkeypatch.setattr(paths, "_override", paths._override)
    monkeypatch.setattr(uvicorn, "run", lambda app, host, port, log_level: None)
    assert main(["serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0", "--token", "x"]) == 2
    assert "at least 16 characters" in capsys.readouterr().err
    assert main(["serve", "--data-dir", str(tmp_path), "--host", "0.0.0.0", "--token", "y" * 16]) == 0
    assert "warning: serving beyond this machine over plain HTTP" in capsys.readouterr().err
    assert main(["serve", "--data-dir", str(tmp_path), "--token", "z"]) == 0  # loopback: any token


def test_a_second_server_on_one_data_dir_refuses_and_leaves_the_first_ones_jobs(monkeypatch, capsys, tmp_path):
    import uvicorn

    from featurelens import paths
    from featurelens.cli import main

    monkeypatch.setattr(paths, "_override", paths._override)
    job = tmp_path / "server" / "jobs" / "abcdefabcdef.json"
    inner = {}

    def run(app, host, port, log_level):  # the first server runs a job when a second one starts
        job.write_text(json.dumps({"id": "abcdefabcdef", "status": "running"}))
        inner["rc"] = main(["serve", "--data-dir", str(tmp_path), "--port", "9912"])
        inner["status"] = json.loads(job.read_text())["status"]

    monkeypatch.setattr(uvicorn, "run", run)
    assert main(["serve", "--data-dir", str(tmp_path), "--port", "9911"]) == 0
    assert inner == {"rc": 2, "status": "running"}
    assert "another `featurelens serve` serves it" in capsys.readouterr().err


def test_an_event_stream_of_another_servers_job_waits_instead_of_spinning(tmp_path):
    from featurelens.server.jobs import JobManager

    jm = JobManager(tmp_path)
    # written after this manager started: a job that another server runs
    (tmp_path / "abcdefabcdef.json").write_text(json.dumps({"id": "abcdefabcdef", "status": "running",
                                                            "version": 3}))
    reads = []
    real_get = jm.get
    jm.get = lambda job_id: (reads.append(1), real_get(job_id))[1]  # type: ignore[method-assign]
    t0 = time.monotonic()
    assert jm.changes_since("abcdefabcdef", 3, timeout=1.0) == []
    took = time.monotonic() - t0
    assert took >= 0.9 and len(reads) <= 4, (took, len(reads))


def test_a_graph_job_lets_other_requests_use_the_model_and_stops_when_cancelled():
    """Between batches of attribution rows the job lets go of the model lock (another request waits a batch, not
    the whole graph), and a cancelled job stops at the next batch."""
    from featurelens.progress import ProgressEvent
    from featurelens.server.jobs import JobCancelled
    from featurelens.server.routes.jobs import attribution_progress

    class FakeJob:
        def __init__(self):
            self.cancel = threading.Event()

        def progress(self, *a, **k):
            if self.cancel.is_set():
                raise JobCancelled()

    lock, job = threading.RLock(), FakeJob()
    waited: list[float] = []
    outcome: list[str] = []
    holding = threading.Event()

    def attribution():  # 300 batches of 10 ms under the model lock, as the graph job runs attribute()
        try:
            with lock:
                report = attribution_progress(job, lock)
                holding.set()
                for i in range(300):
                    time.sleep(0.01)
                    report(ProgressEvent("attributing", i + 1, 300, "rows"))
            outcome.append("done")
        except JobCancelled:
            outcome.append("cancelled")

    t = threading.Thread(target=attribution)
    t.start()
    holding.wait(10)
    t0 = time.monotonic()
    with lock:  # a steering request's forward pass
        waited.append(time.monotonic() - t0)
    t0 = time.monotonic()
    job.cancel.set()
    t.join(10)
    assert outcome == ["cancelled"] and time.monotonic() - t0 < 1.0
    assert waited[0] < 0.5, f"another request waited {waited[0]:.2f} s for the model"


_ANALYZE_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    import featurelens as fl
    import builders as web
    model = fl.load_model(sys.argv[1])
    ctx = web._contexts(model, web.sentences())
    fl.analyze(model, sys.argv[2], ctx[len(ctx) * 3 // 4:], n_tokens=None, batch_size=8, embed=False, progress=False,
               n_top=4, n_sample=8, window=(4, 2), overwrite=True)
""")


@pytest.mark.slow  # two analyses in subprocesses
def test_an_analysis_rebuild_killed_while_publishing_leaves_the_old_one(own_data, web_data):
    """SIGKILL in the middle of copying the rebuilt analysis into the live file: the old analysis, with the user's
    label, is what opens afterwards, and the next run cleans up and completes."""
    import featurelens as fl
    import builders as web

    data, model = own_data
    sae = data / "dictionaries" / web.MODEL / "sae"
    a = fl.open_analysis(sae)
    a.set_label(5, "mine")
    before = a.store.meta().get("completed")
    a.close()
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEATURELENS_CRASH_AT": "publish:before-commit"}
    r = subprocess.run([sys.executable, "-c", _ANALYZE_SCRIPT, str(web_data[0] / "models" / web.MODEL), str(sae),
                        str(REPO / "tests")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    a = fl.open_analysis(sae)
    assert a.meta.get("completed") == before and a.feature(5).label == "mine"
    a.close()
    env.pop("FEATURELENS_CRASH_AT")
    r = subprocess.run([sys.executable, "-c", _ANALYZE_SCRIPT, str(web_data[0] / "models" / web.MODEL), str(sae),
                        str(REPO / "tests")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a = fl.open_analysis(sae)
    assert a.meta.get("completed") != before and a.feature(5).label == "mine"
    a.close()
    assert not (sae / "analysis" / "building").exists() and not _stray(sae)


def test_a_graph_write_killed_before_its_rename_is_cleaned_on_the_next_start(tmp_path):
    from featurelens.server import create_app

    f = tmp_path / "graphs" / "uploads" / "g.json"
    f.parent.mkdir(parents=True)
    atomic_write_json(f, {"version": "old"})
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEATURELENS_CRASH_AT": "atomic_save:before-replace"}
    r = subprocess.run([sys.executable, "-c", "import sys; from featurelens.io import atomic_write_json; "
                        "atomic_write_json(sys.argv[1], {'version': 'new'})", str(f)], env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert json.loads(f.read_text()) == {"version": "old"} and _stray(tmp_path)
    create_app(tmp_path)  # a server starting on the directory
    assert not _stray(tmp_path) and json.loads(f.read_text()) == {"version": "old"}
