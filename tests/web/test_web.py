"""The web app in a real headless Chromium (Debian's /usr/bin/chromium driven by Playwright), against a uvicorn
server this test starts on a free loopback port over the tiny data directory of tests/builders.py.

The walk: home -> concept search -> feature page (label edit, test your text) -> steer -> circuit explorer (compute
a graph as a background job, open the saved graph, hover, click a node, pin it, group a supernode, reload with the
state in the URL, steer from the graph). Any browser console error or page error fails the test, and corpus text
with HTML in it must never run (a hostile <img onerror> sits in the corpus and in graph labels).

Screenshots go to a temporary directory (printed); with FEATURELENS_README_SCREENSHOTS=1 they are also copied to
docs/ for the README. The performance test draws a 1,000-node, 10,000-edge graph and prints first-render and
hover-redraw times measured in the page with performance.now().
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"


def _missing(what: str) -> None:
    """Skipped on a developer's machine; in CI ($CI set, as .ci/run runs) a missing browser is a failure, so a green
    run always means the browser tests ran."""
    if os.environ.get("CI"):
        pytest.fail(f"{what}: the browser tests cannot run in CI", pytrace=False)
    pytest.skip(what, allow_module_level=True)


if not Path(CHROMIUM).exists():
    _missing(f"{CHROMIUM} is absent (apt-get install chromium; CI installs it)")
try:
    import playwright.sync_api as playwright_sync
    import uvicorn
except ImportError as e:
    _missing(f"{e.name} is not installed (pip install -e '.[test]')")

from featurelens.server import create_app  # noqa: E402

import builders as web  # noqa: E402

ARGS = ["--no-sandbox", "--disable-gpu", "--headless", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data, model = web.shared_data(tmp_path_factory)  # the tiny model, SAE, analysis and graph of test_server.py
    app = create_app(data, model_loader=lambda name: model)
    with web.serving(app) as base:
        yield base, data, model


@pytest.fixture(scope="module")
def browser():
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    pg = ctx.new_page()
    problems: list[str] = []
    pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    pg.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    pg.problems = problems
    yield pg
    ctx.close()
    assert not problems, "\n".join(problems)


class Shots:
    def __init__(self, page, where: Path):
        self.page, self.where, self.files = page, where, []
        where.mkdir(parents=True, exist_ok=True)

    def __call__(self, name: str, element: str | None = None) -> None:
        text = self.page.inner_text("main")
        assert "[object " not in text and "undefined" not in text, f"{name}: a value was rendered wrongly"
        f = self.where / f"{name}.png"
        if element:
            self.page.locator(element).first.screenshot(path=str(f))
        else:
            self.page.evaluate("window.scrollTo(0, 0)")
            self.page.screenshot(path=str(f), full_page=False)
        self.files.append(f)

    def publish(self) -> None:
        print(f"\nscreenshots: {self.where}")
        if os.environ.get("FEATURELENS_README_SCREENSHOTS"):
            DOCS.mkdir(exist_ok=True)
            for f in self.files:
                shutil.copy(f, DOCS / f"web-{f.name}")


def _no_xss(page) -> None:
    assert page.evaluate("window.__xss") is None, "corpus HTML ran as code"


def test_walkthrough(server, page, tmp_path):
    base, data, model = server
    shots = Shots(page, tmp_path / "screens")

    # ---- home: dictionaries with metrics, models, saved graphs
    page.goto(base + "/")
    page.wait_for_selector("a.dict-link")
    body = page.inner_text("main")
    assert web.SAE_ID in body and web.TC_ID in body and web.MODEL in body and web.PROMPT in body
    row = page.locator("tr", has=page.locator(f"a.dict-link:text-is('{web.SAE_ID}')"))
    assert "analyzed" in row.inner_text() and "\t4\t" in row.inner_text()  # L0 of a TopK k=4 SAE
    # the transcoder set: its analyzed layers (one of two here), each linked to its own feature pages
    tc_row = page.locator("tr", has_text=web.TC_ID).first
    assert "1 of 2 layers analyzed" in tc_row.inner_text()
    assert tc_row.locator("a.layer-link").get_attribute("href") == f"#/feature/{web.TC_ID}~layer_1/0"
    shots("home")

    # ---- concept search from the home search box
    page.fill("input[name=q]", "mat")
    page.press("input[name=q]", "Enter")
    page.wait_for_selector(".results a.feature-link")
    assert page.url.split("#")[1].startswith("/search")
    shots("search-concept")
    # by text: per-token colours, hover a token for its features; by token: logit-lens promoters
    page.click("button[data-tab=text]")
    page.fill("textarea[name=q]", "The cat sat on the mat")
    page.press("textarea[name=q]", "Enter")
    page.wait_for_selector(".text-acts .tok")
    assert page.locator(".text-acts .tok").count() == len(model.to_str_tokens("The cat sat on the mat"))
    page.locator(".text-acts .tok").nth(6).hover()
    page.wait_for_selector(".tok-detail .chip a.feature-link")
    shots("search-text")
    page.click("button[data-tab=token]")
    page.fill("textarea[name=q]", " the")
    page.press("textarea[name=q]", "Enter")
    page.wait_for_selector(".results .hit a.feature-link")
    assert "logit +" in page.inner_text(".results")
    # back to the concept results: checked by steering by default, each hit shows what steering it does to the
    # concept's words and links to its page with the strength that steered
    page.goto(base + "/#/search?tab=concept&q=mat")
    page.wait_for_selector(".results .steer-ratio")
    assert "steered:" in page.inner_text(".results") and "fast" not in page.url
    assert "label score" in page.inner_text(".results .hit") or "unclear label" in page.inner_text(".results .hit")
    # the fast box skips the check
    page.check("input[name=fast]")
    page.press("textarea[name=q]", "Enter")
    page.wait_for_function("location.hash.includes('fast=1') && document.querySelector('.results a.feature-link')")
    assert page.locator(".results .steer-ratio").count() == 0
    page.goto(base + "/#/search?tab=concept&q=mat")
    page.wait_for_selector(".results .steer-ratio")
    first = page.locator(".results a.feature-link").first
    hit_text = first.inner_text()
    strength = first.get_attribute("href").split("?s=")[1]

    # ---- feature page
    first.click()
    page.wait_for_selector(".label-edit")
    assert page.inner_text("h1").startswith("Feature ")
    feature = int(page.url.split("?")[0].rsplit("/", 1)[1])
    assert f"#{feature}" in hit_text
    assert page.locator(".examples .ex").count() > 0 and page.locator(".examples .tok").count() > 0
    assert page.locator("svg.chart rect").count() > 0  # histogram
    assert "promotes" in page.inner_text(".boxes")  # logit lens
    # a token's hover value is its activation
    tok = page.locator(".examples .tok[data-act]").first
    assert ":" in tok.get_attribute("title")
    # label edit, with markup in it shown as text
    page.fill(".label-edit input", "cats <i>and</i> mats")
    page.click(".label-edit button")
    page.wait_for_function("document.querySelector('.label-text').textContent === 'cats <i>and</i> mats'")
    assert page.inner_text(".provenance").strip() == "(user)"
    assert "score" in page.inner_text(".label .label-score")  # the user's label is scored on save and shown
    # test your own text
    page.fill(".test-text textarea", "The cat sat on the mat")
    page.click(".test-text button")
    page.wait_for_selector(".test-out .tok")
    assert [t.inner_text() for t in page.locator(".test-out .tok").all()][:2] == ["<bos>", "The"]
    _no_xss(page)
    shots("feature")
    shots("feature-examples", element=".examples")

    # ---- steer with this feature
    page.click("a.steer-button")
    page.wait_for_selector("form.steer")
    assert page.locator(".feat-idx").first.input_value() == str(feature)
    assert float(page.locator("input[type=range]").first.input_value()) == float(strength)  # where the check steered
    page.fill("textarea[name=prompt]", "The cat")
    page.locator("input[aria-label='max new tokens']").fill("12")
    page.locator("input[type=range]").first.fill("3")
    page.click("form.steer button[type=submit]")
    page.wait_for_function("document.querySelector('.status').textContent === 'done'", timeout=60_000)
    default = "".join(page.locator("#gen-default .new").all_text_contents())
    steered = "".join(page.locator("#gen-steered .new").all_text_contents())
    assert default == model.generate("The cat", max_new_tokens=12, temperature=0.7, seed=0, return_new_only=True)
    assert steered and page.locator("#gen-default .new").count() >= 2  # arrived token by token
    shots("steer")

    # ---- circuit explorer: compute a graph in the background, watch its progress, land on it
    page.goto(base + "/#/graph")
    page.wait_for_selector("form.graph-form")
    page.fill("input[aria-label='graph prompt']", "The dog sat")
    page.fill("input[aria-label='max feature nodes']", "24")
    page.fill("input[aria-label='graph target']", "no such single token")  # a bad target: the job says why
    page.click("form.graph-form button[type=submit]")
    page.wait_for_selector("#job-progress .error", timeout=60_000)
    assert "not one token" in page.inner_text("#job-progress .error")
    # traced to a chosen token (the second word's first token, so not the model's choice), faithfulness measured
    answer = model.tokenizer.decode([model.encode(" on", prepend_bos=False)[0]])
    page.fill("input[aria-label='graph target']", f'"{answer}"')
    failed = page.evaluate("location.hash")  # the failed job's id is in the URL until the new job replaces it
    page.click("form.graph-form button[type=submit]")
    page.wait_for_function(f"location.hash !== {json.dumps(failed)} && (location.hash.startsWith('#/graph?job=') || "
                           f"location.hash.startsWith('#/graph/computed'))")
    if "job=" in page.url:  # the job's id is in the URL: a reload picks its progress up again
        page.reload()
    page.wait_for_function("location.hash.startsWith('#/graph/computed')", timeout=120_000)
    page.wait_for_selector("#graph-canvas")
    assert "The dog sat" in page.inner_text(".graph-prompt")
    assert page.inner_text(".graph-target").strip() == f'target: "{answer}"'
    assert page.inner_text("#faithfulness .faith-badge").startswith("faithfulness ")
    page.click("#faithfulness summary")
    assert page.locator("#faithfulness table tbody tr").count() >= 1
    assert page.locator("#faithfulness th").all_text_contents()[2:7] == ["predicted", "gradient", "(a) local",
                                                                      "(b) attn frozen", "(c) real"]
    assert "the real model's gradient predicts (c)" in page.inner_text("#faithfulness")
    shots("graph-faithfulness", "#faithfulness")

    # ---- the saved graph: hover, click a node, pin it
    page.goto(base + f"/#/graph/{web.GRAPH_ID}")
    page.wait_for_selector("#graph-canvas")
    page.wait_for_selector(".scores .score")
    # nothing pinned yet: no subgraph score, and no stray "null" where it would go
    assert "null" not in page.inner_text(".scores") and page.locator(".scores .sub-score").count() == 0
    # the pruning and density sliders hide nodes (and their edges) and put the thresholds in the URL
    count = lambda: page.evaluate("window.__featurelens.visibleNodes")  # noqa: E731
    all_nodes = count()
    page.locator("input[aria-label='feature density threshold']").fill("-6")
    assert count() < all_nodes and '"dens":' in page.url.replace("%22", '"').replace("%3A", ":")
    page.locator("input[aria-label='feature density threshold']").fill("0")
    page.locator("input[aria-label='pruning threshold']").fill("0.05")
    assert count() < all_nodes
    page.locator("input[aria-label='pruning threshold']").fill("0.8")
    assert count() == all_nodes
    feat_id = page.evaluate("""() => { const v = window.__featurelens.view;
        return v.vis.find((n) => n.feature_type === 'cross layer transcoder' && n.clerp.includes('onerror')).node_id; }""")
    box = page.locator("#graph-canvas").bounding_box()
    pos = page.evaluate(f"window.__featurelens.view.nodePosition({feat_id!r})")
    page.mouse.move(box["x"] + pos["x"], box["y"] + pos["y"])
    page.wait_for_selector(".tip:not([hidden])")
    assert "onerror" in page.inner_text(".tip")  # hostile label shown as text
    page.mouse.click(box["x"] + pos["x"], box["y"] + pos["y"])
    page.wait_for_selector("#node-card h4")
    assert page.inner_text("#node-card .card-title").startswith("L")
    assert "Inputs" in page.inner_text("#node-card") and "Outputs" in page.inner_text("#node-card")
    page.click("#node-card .pin-button")
    page.wait_for_selector("#subgraph .pins li")
    page.wait_for_selector(".scores .sub-score")
    assert "pinned subgraph" in page.inner_text(".scores")
    # a supernode with a label
    page.check("#subgraph .pins input[type=checkbox]")
    page.fill("input[aria-label='supernode label']", "cat circuit")
    page.click("text=Group into supernode")
    page.wait_for_selector("#subgraph .supernodes li")
    shots("graph")
    # the state is in the URL: a reload brings it back
    assert "pins" in page.url and "cat%20circuit" in page.url.replace("+", "%20")
    page.reload()
    page.wait_for_selector("#subgraph .pins li")
    assert "cat circuit" in page.inner_text("#subgraph")
    assert page.inner_text("#node-card .card-title").startswith("L")

    # ---- steer from the graph: set the pinned feature
    page.select_option("#graph-steer select", "set")
    page.fill("#graph-steer input[type=number]", "25")
    page.click("#graph-steer button.primary")
    page.wait_for_selector(".probs-live table", timeout=60_000)
    for side in ("original", "frozen", "live"):
        assert page.locator(f".probs-{side} tbody tr").count() == 8
    import httpx

    api = httpx.post(f"{base}/api/graphs/{web.GRAPH_ID}/intervene", timeout=120, json={
        "interventions": [{"node_id": feat_id, "value": 25.0}], "top_k": 8, "max_new_tokens": 12}).json()
    for side in ("original", "frozen", "live"):
        assert page.inner_text(f".cont-{side} .new") == api["continuation"][side].strip("\n") or \
            page.locator(f".cont-{side} .new").text_content() == api["continuation"][side]
        shown = [t.inner_text() for t in page.locator(f".probs-{side} tbody tr td:first-child").all()]
        assert shown == [json.dumps(t["token"], ensure_ascii=False) for t in api[side]]
    _no_xss(page)
    shots("graph-steer", element="#graph-steer")

    # ---- save the subgraph with the graph, export both, import the export as a new graph, load the subgraph there
    page.fill("input[aria-label='subgraph name']", "cat subgraph")
    page.click("text=Save subgraph")
    page.wait_for_selector("#subgraph .saved button:has-text('cat subgraph')")  # not an earlier one
    with page.expect_download() as dl:
        page.click("text=Export graph + subgraphs")
    exported = tmp_path / "exported.json"
    dl.value.save_as(exported)
    saved = json.loads(exported.read_text())
    assert saved["subgraphs"][-1]["name"] == "cat subgraph" and saved["qParams"]["pinnedIds"] == [feat_id]
    page.set_input_files("input[aria-label='import graph JSON']", str(exported))
    page.wait_for_function("location.hash.startsWith('#/graph/uploads')")
    page.wait_for_selector("#subgraph .saved button:has-text('cat subgraph')")  # not an earlier one
    assert page.locator("#subgraph .pins li").count() == 0
    # other tests may have saved subgraphs of their own into the same graph: load this one by its name
    page.click("#subgraph .saved button:has-text('cat subgraph')")
    page.wait_for_selector("#subgraph .pins li")
    assert "cat circuit" in page.inner_text("#subgraph")
    shots.publish()


def test_upload_and_bad_input_shows_errors_not_crashes(server, page, tmp_path):
    base, data, _ = server
    page.goto(base + "/#/graph")
    page.wait_for_selector("input[aria-label='upload graph JSON']")
    # a graph file circuit-tracer itself wrote (its create_graph_files, from the attribution benchmark)
    ct = Path(__file__).resolve().parents[1] / "fixtures" / "circuit-tracer-graph.json"
    page.set_input_files("input[aria-label='upload graph JSON']", str(ct))
    page.wait_for_function("location.hash.startsWith('#/graph/uploads')")
    page.wait_for_selector("#graph-canvas")
    page.wait_for_selector(".scores .score")
    g = json.loads(ct.read_text())
    assert page.evaluate("window.__featurelens.view.g.nodes.length") == len(g["nodes"])
    assert page.evaluate("window.__featurelens.visibleNodes") > 0
    assert g["metadata"]["prompt"] in page.inner_text(".graph-prompt")
    # a file that is not a graph: the page says what is wrong
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"metadata": {}}))
    page.goto(base + "/#/graph")
    page.wait_for_selector("input[aria-label='upload graph JSON']")
    page.set_input_files("input[aria-label='upload graph JSON']", str(bad))
    page.wait_for_selector(".error")
    assert "metadata" in page.inner_text(".error")
    page.problems[:] = [p for p in page.problems if "422" not in p]  # the browser logs the refused upload


def test_api_page_describes_every_endpoint_offline(server, page):
    import httpx

    base, _, _ = server
    spec = httpx.get(base + "/openapi.json", timeout=30).json()
    page.goto(base + "/#/api")
    page.wait_for_selector(".api-op")
    n_ops = sum(len(item) for item in spec["paths"].values())
    assert page.locator(".api-op").count() == n_ops
    steer = page.locator("section.api-op", has_text="/api/steer/stream")
    assert "max_new_tokens" in steer.first.inner_text()  # request-body fields are listed with their limits
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.reload()
    page.wait_for_selector(".api-op")
    assert requests and all(u.startswith(base) for u in requests), [u for u in requests if not u.startswith(base)]


def test_big_graph_draws_fast(server, page):
    """1,000 nodes and 10,000 edges: first render and hover redraw, timed in the page."""
    import httpx

    base, _, _ = server
    g = web.synthetic_graph(1000, 10_000)
    gid = httpx.post(base + "/api/graphs", json=g, timeout=60).json()["id"]
    # by default only the strongest edges are drawn (plus those of hovered, clicked and pinned nodes)
    page.goto(base + f"/#/graph/{gid}?s=" + '{"nt":1}')
    page.wait_for_selector("#graph-canvas")
    page.wait_for_function("window.__featurelens.allVisibleLinks === 10000")
    assert page.evaluate("window.__featurelens.visibleLinks") == 300
    assert "300 of 10000 edges drawn" in page.inner_text(".edge-note")
    page.select_option("select[aria-label='edges drawn']", "0")  # all of them, on demand
    assert page.evaluate("window.__featurelens.visibleLinks") == 10_000 and '"ed":0' in page.url.replace("%22", '"').replace("%3A", ":")
    page.evaluate("window.__featurelens.firstRender = undefined")
    page.goto(base + f"/#/graph/{gid}?s=" + '{"nt":1,"ed":0}')
    page.reload()
    page.wait_for_selector("#graph-canvas")
    page.wait_for_function("window.__featurelens.firstRender !== undefined")
    first_in_app = page.evaluate("window.__featurelens.firstRender")
    layout_ms = page.evaluate("window.__featurelens.layoutMs")
    assert page.evaluate("window.__featurelens.visibleLinks") == 10_000
    # Canvas work is deferred: reading a pixel back forces it to finish, so these times include the rasterizing.
    flush = "v.canvas.getContext('2d').getImageData(0, 0, 1, 1)"
    first = page.evaluate(f"""() => {{ const v = window.__featurelens.view; const t = performance.now();
        v.layout(); v.draw(); {flush}; return performance.now() - t; }}""")
    # hover: real mouse events over 30 nodes (each redraw timed in the page), then timed redraws with the flush
    box = page.locator("#graph-canvas").bounding_box()
    ids = page.evaluate("window.__featurelens.view.vis.slice(0, 400).filter((n, i) => i % 13 === 0).map((n) => n.node_id)")
    for nid in ids:
        p = page.evaluate(f"window.__featurelens.view.nodePosition({nid!r})")
        # the canvas of a big graph is taller than the window: scroll the node into view, as a user would
        page.evaluate(f"window.scrollTo(0, window.scrollY + {box['y'] + p['y']} - 300)")
        box = page.locator("#graph-canvas").bounding_box()
        page.mouse.move(box["x"] + p["x"], box["y"] + p["y"])
        assert page.evaluate("window.__featurelens.view.hover && window.__featurelens.view.hover.node_id") is not None
    times = page.evaluate(f"""(ids) => {{ const v = window.__featurelens.view; return ids.map((id) => {{
        const t = performance.now(); v.hover = v.byId.get(id); v.redraw(); {flush}; return performance.now() - t; }}); }}""",
                          ids)
    times.sort()
    median, worst = times[len(times) // 2], times[-1]
    print(f"\n1,000 nodes / 10,000 edges in headless Chromium: first render {first:.0f} ms (layout + draw + raster; "
          f"{first_in_app:.0f} ms on page load, of which layout {layout_ms:.0f} ms), hover redraw median {median:.1f} ms, worst "
          f"{worst:.1f} ms over {len(times)} hovers")
    assert first < 1000 and median < 50


def _computed_graph(base: str, prompt: str, slug: str) -> str:
    """The id of a graph the server computes (a background job) with every node and edge kept."""
    import time

    import httpx

    r = httpx.post(base + "/api/jobs/graph", timeout=30, json={
        "transcoders": web.TC_ID, "prompt": prompt, "max_feature_nodes": 200, "node_threshold": 1.0,
        "edge_threshold": 1.0, "slug": slug})
    assert r.status_code == 202, r.text
    end = time.time() + 120
    while (job := httpx.get(f"{base}/api/jobs/{r.json()['id']}", timeout=30).json())["status"] in ("queued", "running"):
        assert time.time() < end, job
        time.sleep(0.2)
    assert job["status"] == "done", job
    return job["result"]["graph"]


def test_attention_panels_explain_a_clicked_edge(server, page, tmp_path):
    """Click an edge on the canvas: its heads, strongest first, with their patterns; the top head's QK panel with
    pairs of graph nodes in words and links to the analyzed features' pages; another head on demand."""
    import httpx

    base, _, _ = server
    gid = _computed_graph(base, "the cat sat on the mat", "attention-panels")
    g = httpx.get(f"{base}/api/graphs/{gid}", timeout=30).json()
    by_id = {n["node_id"]: n for n in g["nodes"]}
    # cross-position edges (attention carries them) into a feature or a logit (the nodes that read the residual)
    links = [e for e in g["links"] if by_id[e["source"]]["ctx_idx"] != by_id[e["target"]]["ctx_idx"]
             and by_id[e["target"]]["feature_type"] != "embedding" and "error" not in by_id[e["target"]]["feature_type"]]
    edge = max(links, key=lambda e: abs(e["weight"]))
    want = httpx.get(f"{base}/api/graphs/{gid}/heads", params={"source": edge["source"], "target": edge["target"]},
                     timeout=120).json()
    parts = sorted(((layer["layer"], h["head"], h["contribution"], h["pattern"]) for layer in want["layers"]
                    for h in layer["heads"]), key=lambda x: -abs(x[2]))

    page.goto(f"{base}/#/graph/{gid}")
    page.wait_for_selector("#graph-canvas")
    # the graph's scores arrive after the canvas is drawn and must not move it (a click aimed before they came
    # would land elsewhere)
    top = page.evaluate("document.querySelector('#graph-canvas').getBoundingClientRect().top")
    page.wait_for_selector(".scores .score")
    assert page.evaluate("document.querySelector('#graph-canvas').getBoundingClientRect().top") == top
    # a point on the edge that picks it and no node (edges cross; try along its length)
    point = page.evaluate("""([s, t]) => {
      const v = window.__featurelens.view, r = v.canvas.getBoundingClientRect();
      for (let u = 0.5; u > 0.05; u -= 0.05) for (const w of [u, 1 - u]) {
        // whole pixels, as the mouse clicks: two edges of nearly stacked nodes can lie under one pixel
        const p = v.edgePoint(s, t, w), ev = { clientX: Math.round(r.left + p.x), clientY: Math.round(r.top + p.y) };
        const e = v.pickEdge(ev);
        if (!v.pick(ev) && e && e.s.node_id === s && e.t.node_id === t) return { x: ev.clientX, y: ev.clientY };
      }
      return null; }""", [edge["source"], edge["target"]])
    assert point, "no point of the strongest edge is free of nodes and other edges"
    page.mouse.click(point["x"], point["y"])
    page.wait_for_selector("#edge-heads tr.head-row")
    rows = page.locator("#edge-heads tr.head-row")
    shown = [(int(rows.nth(i).get_attribute("data-layer")), int(rows.nth(i).get_attribute("data-head")))
             for i in range(rows.count())]
    assert shown == [(x[0], x[1]) for x in parts[:len(shown)]] and len(shown) == min(12, len(parts))
    first = rows.nth(0).inner_text()
    assert f"head {parts[0][0]}.{parts[0][1]}" in first
    assert first.split("\t")[-1].strip() == _fmt3(parts[0][3])  # the head's pattern from the target's position

    # the QK panel opens on the strongest head, at (target position, source position)
    page.wait_for_selector("#qk-panel table.qk-pairs tr")
    qk = httpx.get(f"{base}/api/graphs/{gid}/qk", timeout=120, params={
        "layer": parts[0][0], "head": parts[0][1], "query": want["target_pos"], "key": want["source_pos"], "top": 8}).json()
    text = page.inner_text("#qk-panel")
    assert f"head {parts[0][0]}.{parts[0][1]} attends from" in text and "sum of the terms" in text
    assert page.locator("#qk-panel table.qk-pairs tr").count() == len(qk["top_pairs"])
    first_pair = page.locator("#qk-panel table.qk-pairs tr").nth(0).inner_text()
    assert first_pair.startswith(_fmt3(qk["top_pairs"][0]["value"]))
    assert page.locator("#qk-panel table.qk-query tr").count() == len(qk["top_query"])
    assert page.locator("#qk-panel table.qk-key tr").count() == len(qk["top_key"])
    # features of the analyzed transcoder layer (layer 1) link to their pages; others are named only
    hrefs = page.eval_on_selector_all("#qk-panel a.qk-feature", "xs => xs.map(x => x.getAttribute('href'))")
    assert all(h.startswith(f"#/feature/{web.TC_ID}~layer_1/") for h in hrefs)
    terms = qk["top_pairs"] + qk["top_query"] + qk["top_key"]
    assert len(hrefs) == sum(1 for t in terms for side in ("query", "key")
                             if t[side].startswith("1_") and by_id.get(t[side], {}).get("feature_type") not in
                             (None, "logit", "embedding") and "error" not in by_id[t[side]]["feature_type"])
    # another head on demand
    rows.nth(1).locator("button").click()
    page.wait_for_function(f"document.querySelector('#qk-panel h3').textContent.includes('head {parts[1][0]}.{parts[1][1]}')")
    page.wait_for_selector("#qk-panel table.qk-pairs tr")
    Shots(page, tmp_path / "screens")("attention", element=".attention-panels")


def _fmt3(x: float) -> str:
    """The page's fmt(x): 3 significant digits, exponent form for tiny or huge values."""
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e5):
        m, e = f"{x:.2e}".split("e")
        return f"{m}e{int(e):+d}"
    return f"{float(f'{x:.3g}'):g}" if abs(x) < 1e5 else str(x)


FILM_WORDS = re.compile(r"(?i)\b(films?|movies?|cinemas?|actors?|actress(es)?|directors?|hollywood|starring|oscars?|"
                        r"screenplays?|documentar(y|ies)|box office)\b")


def test_search_movies_and_steer_toward_films(page, gemma, analyzed, tmp_path):
    """The concept search's top hit for "movies", opened and steered at the strength its steering check found,
    makes Gemma 3 270M write about films. The trained fixture SAE (tests/conftest.py's `analyzed`) is served as an
    analysis of its own."""
    data = tmp_path / "home"
    (data / "analysis").mkdir(parents=True)
    (data / "analysis" / "sae-l6").symlink_to(analyzed.dir, target_is_directory=True)
    app = create_app(data, model_loader=lambda name: gemma)
    with web.serving(app) as base:
        page.goto(base + "/#/search?tab=concept&q=movies")
        page.wait_for_selector(".results .steer-ratio", timeout=120_000)  # checked by steering, by default
        top = page.locator(".results a.feature-link").first
        strength = float(top.get_attribute("href").split("?s=")[1])
        top.click()
        page.wait_for_selector("a.steer-button")
        page.click("a.steer-button")
        page.wait_for_selector("form.steer")
        assert float(page.locator("input[type=range]").first.input_value()) == strength
        # prose to carry on: after "Here is what I think:" Gemma wrote URLs and lists, steered or not
        page.fill("textarea[name=prompt]", "My favourite way to relax is")
        page.locator("input[aria-label='max new tokens']").fill("30")
        page.click("form.steer button[type=submit]")
        page.wait_for_function("document.querySelector('.status').textContent === 'done'", timeout=120_000)
        default = "".join(page.locator("#gen-default .new").all_text_contents())
        steered = "".join(page.locator("#gen-steered .new").all_text_contents())
    assert FILM_WORDS.search(steered) and not FILM_WORDS.search(default), (strength, steered, default)
