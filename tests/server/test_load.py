"""The server on loopback under a bounded load (benchmarks/server_load.py): 1,000 mixed requests from 16 clients
(dashboards, listings, searches, label edits, graph uploads, steering) while graph jobs run one after another;
no server error, every upload answered 2xx is listed and every label answered 2xx reads back after a restart."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

import builders as web  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _driver():
    spec = importlib.util.spec_from_file_location("server_load", REPO / "benchmarks" / "server_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_server_under_load_loses_nothing(tmp_path_factory, tmp_path):
    data, model = web.shared_data(tmp_path_factory)
    mine = tmp_path / "data"
    shutil.copytree(data, mine, symlinks=True)
    out = _driver().run_load(mine, model, n_requests=1000, n_clients=16, sae_id=web.SAE_ID, tc_id=web.TC_ID)
    print(out)
    assert out["requests"] == 1000
    assert not out["server_errors"], out["server_errors"][:5]
    assert not any(s.startswith("5") for s in out["by_status"]), out["by_status"]
    assert out["labels_checked"] > 50 and not out["lost_labels"], list(out["lost_labels"].items())[:5]
    assert out["graph_jobs"] >= 1 and out["light_during_job"] > 0
    assert out["uploads_2xx"] > 100
    assert not out["lost_uploads"], f"{len(out['lost_uploads'])} of {out['uploads_2xx']} uploads answered 201 " \
                                    f"are not listed after a restart"
