"""The server under load on loopback: mixed requests from many clients at once, nothing lost, no server errors.

    python benchmarks/server_load.py [--requests 1000] [--clients 16] [--seed 0]

Serves a copy of the tiny test data directory (tests/builders.py: a 2-layer Llama, an analyzed SAE,
transcoders, a graph) with uvicorn on 127.0.0.1 and sends a fixed mix of requests from --clients threads: dashboards,
listings, searches, label edits, graph uploads, steering, text activations, while graph jobs run one after another
in the background. Then it restarts the server on the same directory and checks that every upload answered 2xx is
listed and every label answered 2xx reads back (the last one each feature was given). Prints counts by status, the
p50 / p95 latency of the light endpoints overall and while a graph job ran, and what was lost (nothing, or it
exits 1). tests/server/test_load.py runs the same with assertions.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

LIGHT = ("health", "overview", "dashboard", "concept", "token", "graphs", "label")
# (kind, weight): the mix of requests; steering and text activations run the model, the rest read the store/files
MIX = (("health", 8), ("overview", 8), ("dashboard", 20), ("concept", 8), ("token", 6), ("graphs", 5),
       ("label", 20), ("upload", 15), ("activations", 6), ("steer", 2), ("job-status", 2))


def _p(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def run_load(data: Path, model: Any, n_requests: int = 1000, n_clients: int = 16, seed: int = 0,
             sae_id: str = "tiny-llama~sae", tc_id: str = "tiny-llama~transcoders",
             graph_file: str = "graphs/demo/tiny-prompt.json", timeout_s: float = 600.0) -> dict[str, Any]:
    """Run the load against a server on `data` (which it writes to: pass a copy). Returns the figures."""
    import httpx
    from fastapi.testclient import TestClient

    from featurelens.server import create_app

    graph = json.loads((data / graph_file).read_text())
    d_sae = 96
    app = create_app(data, model_loader=lambda name: model, host="127.0.0.1")
    import builders  # tests/builders.py: on the path under pytest, and put there by main()

    served = contextlib.ExitStack()
    base = served.enter_context(builders.serving(app))

    rng = random.Random(seed)
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    plan = [rng.choices(kinds, weights)[0] for _ in range(n_requests)]
    per_client = [plan[i::n_clients] for i in range(n_clients)]

    lock = threading.Lock()
    results: list[tuple[str, int, float, bool]] = []  # (kind, status, seconds, a graph job was running)
    uploads: list[str] = []
    labels: dict[int, str | None] = {}  # feature -> the last label a 2xx said was saved
    job_running = threading.Event()
    load_done = threading.Event()
    job_ids: list[str] = []
    errors: list[str] = []
    deadline = time.monotonic() + timeout_s

    def jobs_loop() -> None:  # one graph job after another while the load runs
        with httpx.Client(base_url=base, timeout=120) as c:
            i = 0
            while not load_done.is_set() and time.monotonic() < deadline:
                r = c.post("/api/jobs/graph", json={"transcoders": tc_id, "prompt": f"The cat sat {i}",
                                                    "max_feature_nodes": 16, "slug": f"load-job-{i}"})
                i += 1
                if r.status_code != 202:
                    with lock:
                        results.append(("job", r.status_code, 0.0, False))
                    time.sleep(0.2)
                    continue
                job = r.json()["id"]
                job_ids.append(job)
                job_running.set()
                while time.monotonic() < deadline:
                    st = c.get(f"/api/jobs/{job}").json().get("status")
                    if st not in ("queued", "running"):
                        with lock:
                            results.append(("job", 200 if st == "done" else 500, 0.0, False))
                            if st != "done":
                                errors.append(f"graph job {job} ended {st}")
                        break
                    time.sleep(0.05)
                job_running.clear()

    def client(idx: int, kinds_: list[str]) -> None:
        crng = random.Random(seed * 1000 + idx)
        mine = [f for f in range(d_sae) if f % n_clients == idx]  # each feature's labels come from one client
        with httpx.Client(base_url=base, timeout=120) as c:
            for j, kind in enumerate(kinds_):
                if time.monotonic() > deadline:
                    return
                f = crng.randrange(d_sae)
                label_f, label = None, None
                if kind == "health":
                    req = ("GET", "/api/health", None)
                elif kind == "overview":
                    req = ("GET", "/api/overview", None)
                elif kind == "dashboard":
                    req = ("GET", f"/api/dictionaries/{sae_id}/features/{f}", None)
                elif kind == "concept":
                    req = ("GET", f"/api/search/concept?q={crng.choice(['cat', 'river', 'letter', 'garden'])}"
                                  f"&dictionaries={sae_id}&method=lexical", None)
                elif kind == "token":
                    req = ("GET", f"/api/search/token?token={crng.choice([' cat', ' the', ' dog'])}"
                                  f"&dictionaries={sae_id}", None)
                elif kind == "graphs":
                    req = ("GET", "/api/graphs", None)
                elif kind == "label":
                    label_f = crng.choice(mine) if mine else f
                    label = None if crng.random() < 0.1 else f"client {idx} edit {j}"
                    req = ("PUT", f"/api/dictionaries/{sae_id}/features/{label_f}/label", {"label": label})
                elif kind == "upload":
                    g = json.loads(json.dumps(graph))
                    g["metadata"]["slug"] = f"load-{idx}-{j}"
                    req = ("POST", "/api/graphs", g)
                elif kind == "activations":
                    req = ("POST", f"/api/dictionaries/{sae_id}/features/{f}/activations", {"text": "The cat sat."})
                elif kind == "steer":
                    req = ("POST", "/api/steer", {"dictionary": sae_id, "features": [{"feature": f,
                                                  "strength": 10.0}], "prompt": "The cat", "max_new_tokens": 4,
                                                  "seed": j})
                else:
                    req = ("GET", "/api/jobs", None)
                busy = job_running.is_set()
                t0 = time.perf_counter()
                try:
                    r = c.request(req[0], req[1], json=req[2])
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = 599
                    with lock:
                        errors.append(f"{kind}: {type(e).__name__}: {e}")
                dt = time.perf_counter() - t0
                with lock:
                    results.append((kind, status, dt, busy or job_running.is_set()))
                    if status >= 500 and status != 599:
                        errors.append(f"{kind} {req[1]}: {status} {r.text[:200]}")
                    if 200 <= status < 300:
                        if kind == "upload":
                            uploads.append(r.json()["id"])
                        elif kind == "label":
                            labels[label_f] = label

    t_start = time.perf_counter()
    jt = threading.Thread(target=jobs_loop, daemon=True)
    jt.start()
    threads = [threading.Thread(target=client, args=(i, per_client[i])) for i in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load_done.set()
    jt.join(180)
    wall = time.perf_counter() - t_start
    served.close()
    app.state.runtime.close()

    # a restart on the same directory: what was acknowledged must be there
    with TestClient(create_app(data, model_loader=lambda name: model)) as c:
        listed = {g["id"] for g in c.get("/api/graphs").json()}
        lost_uploads = sorted(set(uploads) - listed)
        lost_labels = {}
        for f, want in labels.items():
            got = c.get(f"/api/dictionaries/{sae_id}/features/{f}").json()
            mine = [x for x in got.get("labels", []) if x.get("provenance") == "user"]
            have = mine[0]["label"] if mine else None
            if have != want:
                lost_labels[f] = (want, have)

    by_status: dict[str, int] = {}
    for _, s, _, _ in results:
        by_status[str(s)] = by_status.get(str(s), 0) + 1
    light = [dt for k, s, dt, _ in results if k in LIGHT and s < 500]
    light_busy = [dt for k, s, dt, busy in results if k in LIGHT and s < 500 and busy]
    return {
        "requests": len([r for r in results if r[0] != "job"]), "clients": n_clients, "wall_s": round(wall, 2),
        "by_status": dict(sorted(by_status.items())),
        "server_errors": [e for e in errors], "graph_jobs": len(job_ids),
        "uploads_2xx": len(uploads), "lost_uploads": lost_uploads,
        "labels_checked": len(labels), "lost_labels": lost_labels,
        "light_p50_ms": round(1000 * _p(light, 0.5), 1) if light else None,
        "light_p95_ms": round(1000 * _p(light, 0.95), 1) if light else None,
        "light_p95_during_job_ms": round(1000 * _p(light_busy, 0.95), 1) if light_busy else None,
        "light_during_job": len(light_busy),
        "4xx_by_kind": {k: sum(1 for kk, s, _, _ in results if kk == k and 400 <= s < 500)
                        for k in sorted({r[0] for r in results}) if any(kk == k and 400 <= s < 500
                                                                           for kk, s, _, _ in results)},
        "by_kind_p95_ms": {k: round(1000 * _p([dt for kk, s, dt, _ in results if kk == k], 0.95), 1)
                           for k in sorted({r[0] for r in results}) if k != "job"},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "tests"))
    import builders as web

    from featurelens import paths

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        paths.set_data_dir(data)
        model = web.build(data)
        print(f"load: {args.requests} requests from {args.clients} clients against {data}", flush=True)
        out = run_load(data, model, args.requests, args.clients, args.seed)
        shutil.rmtree(data, ignore_errors=True)
    print(json.dumps(out, indent=2))
    bad = out["server_errors"] or out["lost_uploads"] or out["lost_labels"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
