// Circuit explorer: an attribution graph on a <canvas> (layers as rows, token positions as columns), with hover,
// click-for-card, pins, supernodes, pruning and density sliders, scores, subgraph save/export/import, graph
// computation as a background job, and steering from the graph. The whole view state lives in the URL hash.
import { h, append, clear, fmt, pct, table, errorBox, showToken, tokenRow } from "./dom.js";
import { get, post, put, events, enc } from "./api.js";

const perf = (window.__featurelens = window.__featurelens || {});
// Edges drawn by default: the strongest ones a reader can follow (a pruned graph of a real prompt has ~10,000); the
// edges of hovered, clicked and pinned nodes are drawn as well, and "all edges" draws the rest on demand.
const DEFAULT_EDGES = 300;

// ------------------------------------------------------------------------------------------------ state in the URL
function readState(query) {
  let s = {};
  try { s = JSON.parse(query.get("s") || "{}"); } catch { s = {}; }
  return { pins: Array.isArray(s.pins) ? s.pins : [], sn: Array.isArray(s.sn) ? s.sn : [],
           clicked: typeof s.clicked === "string" ? s.clicked : "", nt: typeof s.nt === "number" ? s.nt : 0.8,
           dens: typeof s.dens === "number" ? s.dens : 1, labels: s.labels && typeof s.labels === "object" ? s.labels : {},
           ed: typeof s.ed === "number" && s.ed >= 0 ? s.ed : DEFAULT_EDGES };
}

function writeState(gid, st) {
  const s = JSON.stringify({ pins: st.pins, sn: st.sn, clicked: st.clicked, nt: st.nt, dens: st.dens, labels: st.labels, ed: st.ed });
  history.replaceState(null, "", `#/graph/${enc(gid)}?s=${enc(s)}`);
}

// ------------------------------------------------------------------------------------------------ page
export async function graphPage(root, parts, query) {
  if (!parts[1]) return graphIndex(root, query);
  const gid = parts[1];
  const t0 = performance.now();
  const g = await get(`/api/graphs/${enc(gid)}`);
  for (const n of g.nodes) {  // circuit-tracer leaves embeddings unlabelled: name them by their token
    if (nodeKind(n) === "embedding" && !n.clerp) n.clerp = JSON.stringify(g.metadata.prompt_tokens[n.ctx_idx] ?? "");
  }
  const st = readState(query);
  const view = new GraphView(g, st, () => { writeState(gid, st); sidePanels(); });
  // on a line of its own with its height kept: the scores arrive after the canvas is drawn, and must not move it
  // under the reader's pointer
  const scoresBox = h("div", { class: "scores" }, h("span", { class: "muted", text: "graph scores: computing…" }));
  const nt = h("input", { type: "range", min: 0.05, max: 1, step: 0.01, value: st.nt, "aria-label": "pruning threshold" });
  const ntOut = h("output", { text: fmt(st.nt, 2) });
  const dens = h("input", { type: "range", min: -6, max: 0, step: 0.1, value: Math.log10(Math.max(st.dens, 1e-6)), "aria-label": "feature density threshold" });
  const densOut = h("output", { text: pct(st.dens, 3) });
  const edgeSel = h("select", { "aria-label": "edges drawn" }, [[DEFAULT_EDGES, `strongest ${DEFAULT_EDGES}`], [1000, "strongest 1000"], [0, "all"]]
    .map(([v, t]) => h("option", { value: v, text: t, selected: v === st.ed })));
  if (![DEFAULT_EDGES, 1000, 0].includes(st.ed)) edgeSel.append(h("option", { value: st.ed, text: `strongest ${st.ed}`, selected: true }));
  edgeSel.addEventListener("change", () => { st.ed = Number(edgeSel.value); view.refilter(); writeState(gid, st); });
  const edgeNote = h("span", { class: "muted edge-note" });
  view.onLayout = (shown, total) => { edgeNote.textContent = shown < total ? ` (${shown} of ${total} edges drawn; hover or pin a node for its own)` : ` (${total} edges)`; };
  nt.addEventListener("input", () => { st.nt = Number(nt.value); ntOut.textContent = fmt(st.nt, 2); view.refilter(); writeState(gid, st); });
  dens.addEventListener("input", () => { st.dens = 10 ** Number(dens.value); densOut.textContent = pct(st.dens, 3); view.refilter(); writeState(gid, st); });
  const card = h("div", { class: "panel card", id: "node-card" }, h("p", { class: "muted", text: "Click a node to see its feature card." }));
  const sub = h("div", { class: "panel subgraph", id: "subgraph" });
  const steer = h("div", { class: "panel steer-graph", id: "graph-steer" });
  const heads = h("div", { class: "panel edge-heads", id: "edge-heads" },
    h("h3", { text: "Attention heads of an edge" }), h("p", { class: "muted", text: "Click an edge (on the canvas, or “heads” beside an input or output of a node) to see which attention heads carry it." }));
  const qkBox = h("div", { class: "panel qk", id: "qk-panel" }, h("h3", { text: "Why the head attends there (QK)" }),
    h("p", { class: "muted", text: "Pick a head of the edge to split its attention score into pairs of graph nodes." }));
  const meta = g.metadata;
  root.append(
    h("h1", {}, "Circuit explorer ", h("span", { class: "muted", text: `${meta.scan}` })),
    h("div", { class: "prompt-line" }, h("b", { text: "prompt: " }), h("span", { class: "graph-prompt", text: meta.prompt })),
    h("div", { class: "controls" },
      h("label", {}, "pruning (node influence) ", nt, " ", ntOut),
      h("label", {}, " feature density ≤ ", dens, " ", densOut), h("label", {}, " edges ", edgeSel, edgeNote),
      h("span", { class: "muted", text: "  edges: blue +, red −; width ∝ |weight|" })),
    scoresBox,
    faithfulnessPanel(meta),
    h("div", { class: "graph-layout" }, h("div", { class: "canvas-wrap" }, view.canvas, view.tip),
      h("div", { class: "side" }, card, sub)),
    h("div", { class: "attention-panels" }, heads, qkBox),
    steer,
  );
  view.mount();
  view.onLayout(view.visLinks.length, view.allVisLinks);
  perf.graphLoad = performance.now() - t0;
  perf.view = view;

  view.onClick = (id) => { st.clicked = id; writeState(gid, st); showCard(id); };
  view.onEdge = (e) => showHeads(e.s, e.t, e.w);

  // Which heads carry the edge source -> target (each head's part of the edge, strongest first, and its attention
  // from the target's position to the source's), from the frozen replacement model on the server.
  let headsSeq = 0;
  async function showHeads(s, t, weight) {
    const seq = ++headsSeq;
    clear(heads).append(h("h3", { text: "Attention heads of an edge" }),
      h("div", { class: "edge-title" }, h("b", { text: nodeTitle(s, st) }), " → ", h("b", { text: nodeTitle(t, st) }),
        h("span", { class: "muted", text: `  weight ${fmt(weight)}` })),
      h("p", { class: "muted", text: "computing…" }));
    try {
      const r = await get(`/api/graphs/${enc(gid)}/heads?source=${enc(s.node_id)}&target=${enc(t.node_id)}`);
      if (seq !== headsSeq) return;
      heads.lastChild.remove();
      const parts = r.layers.flatMap((l) => l.heads.map((x) => ({ layer: l.layer, ...x })));
      parts.sort((a, b) => Math.abs(b.contribution) - Math.abs(a.contribution));
      const share = (x) => (r.edge ? ` (${pct(x / r.edge, 0)})` : "");
      const rows = parts.slice(0, 12).map((x) => {
        const tr = h("tr", { class: "head-row" },
          h("td", {}, h("button", { type: "button", class: "link head-pick", text: `head ${x.layer}.${x.head}`, title: "show why this head attends there",
            onclick: () => { heads.querySelectorAll("tr.chosen").forEach((e) => e.classList.remove("chosen")); tr.classList.add("chosen");
              showQK(x.layer, x.head, r.target_pos, r.source_pos); } })),
          h("td", { class: x.contribution >= 0 ? "pos" : "neg", text: fmt(x.contribution) + share(x.contribution) }),
          h("td", { class: "pattern", text: fmt(x.pattern) }));
        tr.dataset.layer = String(x.layer); tr.dataset.head = String(x.head);
        return tr;
      });
      heads.append(
        h("p", { class: "muted", text: `edge in the frozen model ${fmt(r.edge)}; attention from ${JSON.stringify(meta.prompt_tokens[r.target_pos] ?? "")}@${r.target_pos} to ${JSON.stringify(meta.prompt_tokens[r.source_pos] ?? "")}@${r.source_pos}` }),
        h("table", { class: "heads" }, h("thead", {}, h("tr", {}, h("th", { text: "head" }), h("th", { text: "part of the edge" }), h("th", { text: "pattern" }))), h("tbody", {}, rows)),
        h("p", { class: "muted", text: "Per layer, the heads' parts plus the part bypassing that layer's attention sum to the edge: " +
          r.layers.map((l) => `L${l.layer} bypass ${fmt(l.bypass)}`).join(", ") }));
      if (rows.length && r.source_pos !== r.target_pos) rows[0].querySelector("button").click();
    } catch (e) { if (seq === headsSeq) { heads.lastChild.remove(); heads.appendChild(errorBox(e)); } }
  }

  // The head's pre-softmax score at (query, key) as a sum over pairs of graph nodes: the top pairs, and the top
  // terms of one side against the whole other side. Features link to their feature pages where analyzed.
  let qkSeq = 0;
  async function showQK(layer, head, q, k) {
    const seq = ++qkSeq;
    clear(qkBox).append(h("h3", { text: `Why head ${layer}.${head} attends there (QK)` }), h("p", { class: "muted", text: "computing…" }));
    try {
      const r = await get(`/api/graphs/${enc(gid)}/qk?layer=${layer}&head=${head}&query=${q}&key=${k}&top=8`);
      if (seq !== qkSeq) return;
      qkBox.lastChild.remove();
      const who = (id, label) => {
        const n = view.byId.get(id);
        const text = n ? nodeTitle(n, st) : label || id;
        const parts = id.split("_");
        const dict = n && isFeature(n) && r.feature_pages[String(n.layer)];
        return dict ? h("a", { href: `#/feature/${enc(dict)}/${parts[1]}`, class: "qk-feature", text }) : h("span", { text });
      };
      const val = (v) => h("td", { class: v >= 0 ? "pos" : "neg", text: fmt(v) });
      qkBox.append(
        h("p", { class: "qk-summary", text: `head ${layer}.${head} attends from ${JSON.stringify(r.query_token)}@${q} to ${JSON.stringify(r.key_token)}@${k} ` +
          `with weight ${fmt(r.pattern)}; score ${fmt(r.score)} = sum of the terms ${fmt(r.total)}` + (r.softcap ? ` (soft-capped at ${fmt(r.softcap)})` : "") }),
        h("h4", { text: "Top pairs (query-side node × key-side node)" }),
        h("table", { class: "qk-pairs" }, h("tbody", {}, r.top_pairs.map((t) => h("tr", {}, val(t.value),
          h("td", {}, "query: ", who(t.query, t.query_label)), h("td", {}, "key: ", who(t.key, t.key_label)))))),
        h("div", { class: "side-by-side" },
          h("div", {}, h("h4", { text: "Query side (node · whole key)" }), h("table", { class: "qk-query" }, h("tbody", {},
            r.top_query.map((t) => h("tr", {}, val(t.value), h("td", {}, who(t.query, t.query_label))))))),
          h("div", {}, h("h4", { text: "Key side (whole query · node)" }), h("table", { class: "qk-key" }, h("tbody", {},
            r.top_key.map((t) => h("tr", {}, val(t.value), h("td", {}, who(t.key, t.key_label)))))))));
    } catch (e) { if (seq === qkSeq) { qkBox.lastChild.remove(); qkBox.appendChild(errorBox(e)); } }
  }

  async function showCard(id) {
    clear(card);
    if (!id) { card.appendChild(h("p", { class: "muted", text: "Click a node to see its feature card." })); return; }
    const n = view.byId.get(id);
    const pinned = st.pins.includes(id);
    card.append(h("h3", { class: "card-title", text: nodeTitle(n, st) }),
      h("div", { class: "muted", text: `${n.feature_type} · layer ${n.layer} · position ${n.ctx_idx} (${showToken(meta.prompt_tokens[n.ctx_idx] ?? "")})` +
        (n.activation != null ? ` · activation ${fmt(n.activation)}` : "") + (n.influence != null ? ` · influence ${fmt(n.influence)}` : "") }),
      nodeEffect(meta, id),
      h("button", { type: "button", class: "pin-button", text: pinned ? "Unpin" : "Pin to subgraph", onclick: () => {
        togglePin(id); showCard(id); } }));
    try {
      const c = await get(`/api/graphs/${enc(gid)}/nodes/${enc(id)}`);
      if (st.clicked !== id) return;
      const fc = c.feature_card;
      if (fc && fc.source === "analysis") {
        append(card, [h("div", { class: "label" }, h("a", { href: `#/feature/${enc(fc.dictionary)}/${fc.feature}`, text: fc.label || `feature ${fc.feature}` })),
          h("div", { class: "muted", text: `density ${pct(fc.density, 3)} · max ${fmt(fc.max_act)}` }),
          fc.logit_up.length ? h("div", {}, "promotes ", fc.logit_up.slice(0, 6).map((u) => h("code", { class: "pos", text: JSON.stringify(u.token) + " " }))) : null,
          ...fc.top_examples.slice(0, 4).map((x) => h("div", { class: "ex" }, tokenRow(x.tokens, x.acts, fc.max_act, x.index)))]);
      } else if (fc) {
        card.append(h("pre", { class: "json", text: JSON.stringify(fc, null, 1).slice(0, 2000) }));
      }
      const list = (title, xs, incoming) => h("div", {}, h("h4", { text: title }), xs.length ? h("ul", { class: "edges" }, xs.map((e) =>
        h("li", {}, h("a", { href: "#", class: e.weight >= 0 ? "pos" : "neg", text: `${fmt(e.weight)}  ${nodeTitle(e.node, st)}`,
          onclick: (ev) => { ev.preventDefault(); view.select(e.node.node_id); } }), " ",
          nodeKind(incoming ? n : e.node) === "feature" || nodeKind(incoming ? n : e.node) === "logit" ? h("button", { type: "button", class: "link edge-heads-link", text: "heads",
            title: "which attention heads carry this edge", onclick: () => incoming ? showHeads(e.node, n, e.weight) : showHeads(n, e.node, e.weight) }) : null))) : h("p", { class: "muted", text: "none" }));
      const ours = (xs) => xs.map((e) => ({ ...e, node: view.byId.get(e.node.node_id) || e.node }));  // labelled as on the canvas
      card.append(list("Inputs", ours(c.inputs), true), list("Outputs", ours(c.outputs), false));
    } catch (e) { card.appendChild(errorBox(e)); }
  }

  function togglePin(id) {
    const i = st.pins.indexOf(id);
    if (i >= 0) { st.pins.splice(i, 1); st.sn = st.sn.map((s) => s.filter((x, j) => j === 0 || x !== id)).filter((s) => s.length > 1); }
    else st.pins.push(id);
    writeState(gid, st);
    view.draw();
    sidePanels();
  }

  let scoreSeq = 0;
  async function refreshScores() {
    const seq = ++scoreSeq;
    try {
      const r = await post(`/api/graphs/${enc(gid)}/scores`, { pinnedIds: st.pins.length ? st.pins : null });
      if (seq !== scoreSeq) return;
      append(clear(scoresBox), [h("span", { class: "score", text: `graph: replacement ${pct(r.graph.replacement)} · completeness ${pct(r.graph.completeness)}` }),
        r.subgraph ? h("span", { class: "score sub-score", text: ` | pinned subgraph: replacement ${pct(r.subgraph.replacement)} · completeness ${pct(r.subgraph.completeness)}` }) : null]);
    } catch (e) { clear(scoresBox).appendChild(errorBox(e)); }
  }

  function sidePanels() {
    refreshScores();
    clear(sub).append(h("h3", { text: `Subgraph (${st.pins.length} pinned)` }));
    const grouped = new Set(st.sn.flatMap((s) => s.slice(1)));
    const checks = [];
    const ul = h("ul", { class: "pins" });
    for (const id of st.pins) {
      const n = view.byId.get(id);
      if (!n) continue;
      const cb = h("input", { type: "checkbox", value: id, "aria-label": `select ${id}` });
      checks.push(cb);
      const lab = h("input", { type: "text", value: st.labels[id] || "", placeholder: "label", class: "node-label", "aria-label": `label of ${id}`,
        onchange: () => { if (lab.value.trim()) st.labels[id] = lab.value.trim(); else delete st.labels[id]; writeState(gid, st); view.draw(); } });
      ul.appendChild(h("li", { class: grouped.has(id) ? "grouped" : "" }, cb, " ",
        h("a", { href: "#", text: nodeTitle(n, st), onclick: (e) => { e.preventDefault(); view.select(id); } }), " ", lab,
        h("button", { type: "button", text: "×", title: "unpin", onclick: () => togglePin(id) })));
    }
    const snLabel = h("input", { type: "text", placeholder: "supernode label", "aria-label": "supernode label" });
    sub.append(ul, h("div", { class: "row" }, snLabel, h("button", { type: "button", text: "Group into supernode", onclick: () => {
      const ids = checks.filter((c) => c.checked).map((c) => c.value);
      if (ids.length < 1 || !snLabel.value.trim()) { alertBox(sub, "tick pinned nodes and give the supernode a label"); return; }
      st.sn = st.sn.map((s) => [s[0], ...s.slice(1).filter((x) => !ids.includes(x))]).filter((s) => s.length > 1);
      st.sn.push([snLabel.value.trim(), ...ids]);
      writeState(gid, st); view.draw(); sidePanels();
    } })));
    if (st.sn.length) sub.append(h("h4", { text: "Supernodes" }), h("ul", { class: "supernodes" }, st.sn.map((s, i) => h("li", {},
      h("b", { text: s[0] }), h("span", { class: "muted", text: ` (${s.length - 1} nodes)` }),
      h("button", { type: "button", text: "ungroup", onclick: () => { st.sn.splice(i, 1); writeState(gid, st); view.draw(); sidePanels(); } })))));
    const name = h("input", { type: "text", placeholder: "subgraph name", "aria-label": "subgraph name" });
    const msg = h("span", { class: "muted" });
    sub.append(h("div", { class: "row" }, name, h("button", { type: "button", text: "Save subgraph", onclick: async () => {
      try {
        const r = await put(`/api/graphs/${enc(gid)}/subgraphs`, { name: name.value.trim() || "subgraph", pinnedIds: st.pins,
          supernodes: st.sn, clickedId: st.clicked, labels: st.labels });
        g.subgraphs = r.subgraphs;
        msg.textContent = `saved (${r.subgraphs.length} in this graph)`;
        savedList();
      } catch (e) { msg.textContent = e.message; }
    } }), msg));
    const saved = h("div", { class: "saved" });
    const savedList = () => clear(saved).append(...(g.subgraphs || []).map((s) => h("button", { type: "button", class: "chip", text: `load “${s.name}”`,
      onclick: () => { st.pins = [...s.pinnedIds]; st.sn = s.supernodes.map((x) => [...x]); st.labels = { ...(s.labels || {}) };
        st.clicked = s.clickedId || ""; writeState(gid, st); view.refilter(); sidePanels(); showCard(st.clicked); } })));
    savedList();
    const file = h("input", { type: "file", accept: ".json,application/json", "aria-label": "import graph JSON" });
    file.addEventListener("change", () => importGraph(file, sub));
    sub.append(saved, h("div", { class: "row" },
      h("button", { type: "button", text: "Export graph + subgraphs", onclick: () => exportGraph(g, st) }),
      h("label", { class: "file" }, " import: ", file)));
    steerPanel();
  }

  function steerPanel() {
    clear(steer).append(h("h3", { text: "Steer from the graph" }));
    const feats = st.pins.map((id) => view.byId.get(id)).filter((n) => n && isFeature(n));
    if (!feats.length) { steer.appendChild(h("p", { class: "muted", text: "Pin feature nodes to set or ablate them." })); return; }
    const rows = feats.map((n) => {
      const mode = h("select", { "aria-label": `mode for ${n.node_id}` }, h("option", { value: "ablate", text: "ablate" }),
        h("option", { value: "set", text: "set to" }));
      const val = h("input", { type: "number", step: 0.5, value: n.activation != null ? (2 * n.activation).toFixed(2) : 1, "aria-label": `value for ${n.node_id}` });
      return { n, mode, val, el: h("div", { class: "steer-row" }, h("span", { text: nodeTitle(n, st) + " " }), mode, val) };
    });
    const out = h("div", { class: "steer-out" });
    steer.append(...rows.map((r) => r.el), h("button", { type: "button", class: "primary", text: "Run intervention", onclick: async () => {
      clear(out).appendChild(h("p", { class: "muted", text: "running…" }));
      try {
        const r = await post(`/api/graphs/${enc(gid)}/intervene`, { interventions: rows.map((x) => ({ node_id: x.n.node_id,
          value: x.mode.value === "ablate" ? null : Number(x.val.value) })), top_k: 8, max_new_tokens: 12 });
        const probs = (xs, withOrig) => table(withOrig ? ["token", "p", "p before"] : ["token", "p"],
          xs.map((t) => withOrig ? [h("code", { text: JSON.stringify(t.token) }), fmt(t.prob), fmt(t.original_prob)] : [h("code", { text: JSON.stringify(t.token) }), fmt(t.prob)]));
        append(clear(out), [h("div", { class: "side-by-side three" },
          h("div", { class: "probs-original" }, h("h4", { text: "Original" }), probs(r.original, false)),
          h("div", { class: "probs-frozen" }, h("h4", { text: "Intervened, attention frozen" }), probs(r.frozen, true)),
          h("div", { class: "probs-live" }, h("h4", { text: "Intervened, attention live" }), probs(r.live, true))),
          r.continuation ? h("div", { class: "side-by-side three" },
            [["original", "Original continuation"], ["frozen", "Continuation, attention frozen"], ["live", "Continuation, attention live"]].map(([k, title]) =>
              h("div", {}, h("h4", { text: title }), h("div", { class: `gen cont-${k}` }, h("span", { class: "prompt", text: r.prompt }),
                h("span", { class: "new", text: r.continuation[k] ?? "" }))))) : null]);
      } catch (e) { clear(out).appendChild(errorBox(e)); }
    } }), out);
  }

  sidePanels();
  if (st.clicked && view.byId.has(st.clicked)) { view.clicked = st.clicked; view.draw(); showCard(st.clicked); }
  return { dispose: () => view.dispose() };
}

// How far to trust the graph: the faithfulness its maker measured (featurelens graph, the demo, a graph job) as a
// badge, and the per-feature table of predicted against measured changes of the target in tiers (a), (b), (c).
const TIER_NAMES = { a: "local replacement", b: "attention frozen", c: "real model" };
function faithfulnessPanel(meta) {
  const info = (meta.info && meta.info.featurelens) || {};
  const f = info.faithfulness;
  const target = info.target && typeof info.target.label === "string" ? info.target.label : null;
  const line = h("div", { class: "faithfulness", id: "faithfulness" });
  if (target) line.append(h("span", { class: "graph-target", text: `target: ${target} ` }));
  if (!f || typeof f !== "object" || typeof f.score !== "number") {
    line.append(h("span", { class: "faith-badge unknown", text: "faithfulness not measured" }));
    return line;
  }
  const level = f.score >= 0.5 ? "good" : f.score >= 0.2 ? "fair" : "poor";
  const tiers = f.tiers || {};
  const tierText = Object.keys(TIER_NAMES).filter((t) => tiers[t]).map((t) =>
    `${TIER_NAMES[t]}: sign ${pct(tiers[t].sign_agreement, 0)}, Spearman ${fmt(tiers[t].spearman, 2)}`).join(" · ");
  const rows = (Array.isArray(f.features) ? f.features : []).map((x) => [x.node_id, fmt(x.influence, 3), fmt(x.predicted, 3),
    fmt(x.gradient, 3), fmt(x.a, 3), fmt(x.b, 3), fmt(x.c, 3), String(x.crossings ?? "")]);
  // The real model's own first-order prediction: where it matches (c) and the graph does not, the replacement model
  // is what is wrong; where neither does, the edit is too large for any linear prediction.
  const grad = f.gradient_tiers && f.gradient_tiers.c;
  const gradText = grad ? ` · the real model's gradient predicts (c): sign ${pct(grad.sign_agreement, 0)}, Spearman ${fmt(grad.spearman, 2)}` : "";
  const what = f.scale === 0 ? "ablating" : `scaling by ${fmt(f.scale, 2)}`;
  line.append(h("span", { class: `faith-badge ${level}`, title: "agreement x coverage of measured ablations in the real model", text: `faithfulness ${fmt(f.score, 2)}` }),
    h("span", { class: "muted", text: ` ${tierText}${gradText}` }),
    h("details", { class: "faith-details" }, h("summary", { text: `per feature: predicted vs measured change of ${JSON.stringify(f.target ?? "")} when ${what}` }),
      table(["node", "influence", "predicted", "gradient", "(a) local", "(b) attn frozen", "(c) real", "crossings"], rows)));
  return line;
}

// One feature's effect on the target, as the graph predicts it and as the real model's gradient does (saved by the
// faithfulness check for every feature node): where they disagree, the node's place in the circuit is the
// replacement model's, not the model's.
function nodeEffect(meta, id) {
  const f = ((meta.info && meta.info.featurelens) || {}).faithfulness;
  const pair = f && f.node_effects && f.node_effects[id];
  if (!Array.isArray(pair) || typeof pair[0] !== "number" || typeof pair[1] !== "number") return null;
  const [graph, model] = pair;
  const what = f.scale === 0 ? "Ablating it" : `Scaling it by ${fmt(f.scale, 2)}`;
  const agree = Math.sign(graph) === Math.sign(model);
  return h("div", { class: `node-effect ${agree ? "agree" : "disagree"}`,
    text: `${what} moves ${JSON.stringify(f.target ?? "the target")} by ${fmt(graph, 3)} in the graph, ${fmt(model, 3)} by ` +
      `the real model's gradient` + (agree ? "" : " (they disagree in sign: do not trust this node's role)") });
}

function alertBox(where, text) {
  const e = errorBox(text);
  where.appendChild(e);
  setTimeout(() => e.remove(), 4000);
}

// The one node-kind test of the page, the same rule as featurelens.attribution.schema.node_kind: embeddings and logits
// by name, every "... error" type an error, anything else a feature of some dictionary.
function nodeKind(n) {
  const t = n.feature_type;
  if (t === "embedding" || t === "logit") return t;
  return t.includes("error") ? "error" : "feature";
}

function isFeature(n) {
  return nodeKind(n) === "feature";
}

const KIND_COLOR = { logit: "#2a9d3a", embedding: "#666", error: "#bbb", feature: "#f08c2e" };

function nodeTitle(n, st) {
  if (!n) return "?";
  const user = st && st.labels[n.node_id];
  if (user) return user;
  const kind = nodeKind(n);
  if (kind === "embedding") return `Emb ${n.clerp || n.node_id}`;
  if (kind === "logit") return n.clerp || `logit ${n.feature}`;
  if (kind === "error") return `Error L${n.layer} @${n.ctx_idx}`;
  const parts = n.node_id.split("_");
  return `L${n.layer} #${parts.length === 3 ? parts[1] : n.feature} @${n.ctx_idx}` + (n.clerp ? ` ${n.clerp}` : "");
}

function exportGraph(g, st) {
  const out = JSON.parse(JSON.stringify(g));
  delete out.id;
  out.qParams = { ...out.qParams, pinnedIds: st.pins, supernodes: st.sn, clickedId: st.clicked };
  const blob = new Blob([JSON.stringify(out)], { type: "application/json" });
  const a = h("a", { href: URL.createObjectURL(blob), download: `${g.metadata.slug || "graph"}.json` });
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

async function importGraph(input, where) {
  const f = input.files && input.files[0];
  if (!f) return;
  try {
    const r = await post("/api/graphs", JSON.parse(await f.text()));
    location.hash = `#/graph/${enc(r.id)}`;
  } catch (e) { where.appendChild(errorBox(e)); }
}

// ------------------------------------------------------------------------------------------------ index: pick, upload, compute
async function graphIndex(root, query) {
  const o = await get("/api/overview");
  const tcs = o.dictionaries.filter((d) => d.kind === "transcoders");
  const prompt = h("input", { type: "text", "aria-label": "graph prompt", placeholder: "The capital of France is", size: 50 });
  const tsel = h("select", { "aria-label": "transcoders" }, tcs.map((d) => h("option", { value: d.id, text: d.id })));
  const maxNodes = h("input", { type: "number", min: 1, value: 1024, "aria-label": "max feature nodes" });
  const target = h("input", { type: "text", "aria-label": "graph target", size: 24, placeholder: '" Paris" or " Paris" - " London"',
    title: 'what to trace (empty: the most likely next tokens): a token, several \'" Paris", " Rome"\' or a logit difference \'" Paris" - " London"\'' });
  const prog = h("div", { class: "job-progress", id: "job-progress" });
  const bar = h("progress", { max: 1, value: 0 });
  let es = null;
  function follow(jobId) {
    if (es) es.close();
    clear(prog).append(h("div", { class: "muted", text: `job ${jobId}` }), bar, h("div", { class: "job-stage" }));
    es = events(`/api/jobs/${jobId}/events`, {
      progress: (j) => {
        const stage = prog.querySelector(".job-stage");
        stage.textContent = `${j.status}: ${j.stage}${j.message ? " — " + j.message : ""}${j.done != null && j.total ? ` (${j.done}/${j.total})` : ""}`;
        if (j.total) { bar.max = j.total; bar.value = j.done || 0; } else bar.removeAttribute("value");
        if (j.status === "done") { es.close(); location.hash = `#/graph/${enc(j.result.graph)}`; }
        if (["failed", "interrupted", "cancelled"].includes(j.status)) { es.close(); prog.appendChild(errorBox(j.error || j.message || j.status)); }
      },
    });
    es.onerror = () => {}; // the browser reconnects by itself; the job record is the truth
  }
  const form = h("form", { class: "graph-form", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const body = { transcoders: tsel.value, prompt: prompt.value, max_feature_nodes: Number(maxNodes.value) };
      if (target.value.trim()) body.target = target.value;
      const j = await post("/api/jobs/graph", body);
      history.replaceState(null, "", `#/graph?job=${j.id}`);
      follow(j.id);
    } catch (err) { clear(prog).appendChild(errorBox(err)); }
  } }, prompt, tcs.length ? tsel : h("span", { class: "muted", text: " (no transcoders in the data directory)" }),
    h("label", {}, " target ", target), h("label", {}, " max feature nodes ", maxNodes), h("button", { type: "submit", text: "Compute graph", disabled: !tcs.length }));
  const file = h("input", { type: "file", accept: ".json,application/json", "aria-label": "upload graph JSON" });
  const upMsg = h("div");
  file.addEventListener("change", () => importGraph(file, upMsg));
  root.append(h("h1", { text: "Circuit explorer" }),
    h("h2", { text: "Saved graphs" }),
    o.graphs.length ? h("ul", { class: "graphs" }, o.graphs.map((g) => h("li", {}, h("a", { href: `#/graph/${enc(g.id)}`, class: "graph-link", text: g.prompt || g.slug }),
      h("span", { class: "muted", text: `  ${g.scan} · ${g.set}` })))) : h("p", { class: "muted", text: "none yet" }),
    h("h2", { text: "New graph" }), form, prog,
    h("h2", { text: "Upload a graph" }), h("p", { class: "muted", text: "JSON written by circuit-tracer or downloaded from Neuronpedia" }), file, upMsg);
  if (query.get("job")) follow(query.get("job"));
  return { dispose: () => es && es.close() };
}

// ------------------------------------------------------------------------------------------------ the canvas view
class GraphView {
  constructor(g, st, onChange) {
    this.g = g;
    this.st = st;
    this.onChange = onChange;
    this.byId = new Map(g.nodes.map((n) => [n.node_id, n]));
    this.canvas = h("canvas", { class: "graph-canvas", id: "graph-canvas", tabindex: 0 });
    this.tip = h("div", { class: "tip", hidden: true });
    this.hover = null;
    this.clicked = st.clicked || null;
    this.base = document.createElement("canvas");
    const layers = [...new Set(g.nodes.map((n) => String(n.layer)))];
    const rank = (l) => (l === "E" ? -1 : Number(l));
    layers.sort((a, b) => rank(a) - rank(b));
    this.rows = layers;
    this.nPos = Math.max(g.metadata.prompt_tokens.length, 1 + Math.max(...g.nodes.map((n) => n.ctx_idx)));
    const maxW = Math.max(1e-12, ...g.links.map((e) => Math.abs(e.weight)));
    this.links = g.links.map((e) => ({ s: this.byId.get(e.source), t: this.byId.get(e.target), w: e.weight, a: Math.abs(e.weight) / maxW }));
    this.out = new Map(); this.inn = new Map();
    for (const e of this.links) {
      if (!this.out.has(e.s)) this.out.set(e.s, []); this.out.get(e.s).push(e);
      if (!this.inn.has(e.t)) this.inn.set(e.t, []); this.inn.get(e.t).push(e);
    }
    this.onMove = (ev) => this.move(ev);
    this.onLeave = () => { this.hover = null; this.tip.hidden = true; this.redraw(); };
    this.onClickEv = (ev) => {
      const n = this.pick(ev);
      if (n) { this.select(n.node_id); return; }
      const e = this.pickEdge(ev);
      if (e && this.onEdge) { this.edge = e; this.redraw(); this.onEdge(e); }
    };
    this.onResize = () => { this.layout(); this.draw(); };
  }

  mount() {
    this.canvas.addEventListener("mousemove", this.onMove);
    this.canvas.addEventListener("mouseleave", this.onLeave);
    this.canvas.addEventListener("click", this.onClickEv);
    window.addEventListener("resize", this.onResize);
    const t0 = performance.now();
    this.layout();
    perf.layoutMs = performance.now() - t0;
    this.draw();
    perf.firstRender = performance.now() - t0;
  }

  dispose() {
    window.removeEventListener("resize", this.onResize);
  }

  visibleNode(n) {
    if (this.st.pins.includes(n.node_id)) return true;
    if (!isFeature(n)) return nodeKind(n) === "error" ? this.st.nt >= 0.999 || (n.influence ?? 0) <= this.st.nt : true;
    if (n.influence != null && n.influence > this.st.nt) return false;
    if (n.density != null && n.density > this.st.dens) return false;
    return true;
  }

  refilter() { this.layout(); this.draw(); }

  layout() {
    const wrap = this.canvas.parentElement;
    const W = Math.max(600, (wrap && wrap.clientWidth) || 900);
    const rowH = Math.max(34, Math.min(60, 700 / this.rows.length));
    const H = this.rows.length * rowH + 40;
    const dpr = window.devicePixelRatio || 1;
    for (const c of [this.canvas, this.base]) { c.width = W * dpr; c.height = H * dpr; }
    this.canvas.style.width = `${W}px`; this.canvas.style.height = `${H}px`;
    this.W = W; this.H = H; this.dpr = dpr;
    this.vis = this.g.nodes.filter((n) => this.visibleNode(n));
    this.visSet = new Set(this.vis);
    const colW = (W - 60) / this.nPos;
    const cells = new Map();
    for (const n of this.vis) {
      const k = `${n.layer}|${n.ctx_idx}`;
      if (!cells.has(k)) cells.set(k, []);
      cells.get(k).push(n);
    }
    this.pos = new Map();
    for (const [k, ns] of cells) {
      ns.sort((a, b) => (a.influence ?? 0) - (b.influence ?? 0));
      const [layer, ctx] = k.split("|");
      const row = this.rows.indexOf(layer);
      const y = H - 30 - row * rowH - rowH / 2 + 10;
      const x0 = 50 + Number(ctx) * colW;
      const step = Math.min(12, (colW - 8) / Math.max(ns.length, 1));
      ns.forEach((n, i) => this.pos.set(n, { x: x0 + 4 + step * (i + 0.5), y }));
    }
    this.rowH = rowH; this.colW = colW;
    // a grid for picking: 16px cells
    this.grid = new Map();
    for (const [n, p] of this.pos) {
      const key = `${Math.floor(p.x / 16)},${Math.floor(p.y / 16)}`;
      if (!this.grid.has(key)) this.grid.set(key, []);
      this.grid.get(key).push(n);
    }
    const shown = this.links.filter((e) => this.visSet.has(e.s) && this.visSet.has(e.t));
    this.allVisLinks = shown.length;
    if (this.st.ed > 0 && shown.length > this.st.ed) {
      const pins = new Set(this.st.pins);
      const strongest = new Set([...shown].sort((a, b) => b.a - a.a).slice(0, this.st.ed));
      this.visLinks = shown.filter((e) => strongest.has(e) || pins.has(e.s.node_id) || pins.has(e.t.node_id));
    } else this.visLinks = shown;
    perf.visibleNodes = this.vis.length; perf.visibleLinks = this.visLinks.length; perf.allVisibleLinks = shown.length;
    if (this.onLayout) this.onLayout(this.visLinks.length, shown.length);
  }

  // everything but the hover highlight, into the offscreen canvas
  draw() {
    const t0 = performance.now();
    const c = this.base.getContext("2d");
    c.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    c.clearRect(0, 0, this.W, this.H);
    c.font = "11px system-ui, sans-serif";
    c.fillStyle = "#888";
    c.textBaseline = "middle";
    this.rows.forEach((l, i) => {
      const y = this.H - 30 - i * this.rowH - this.rowH / 2 + 10;
      c.fillText(l === "E" ? "emb" : i === this.rows.length - 1 && this.g.nodes.some((n) => nodeKind(n) === "logit" && String(n.layer) === l) ? "logit" : `L${l}`, 4, y);
      c.strokeStyle = "#f0f0f0"; c.beginPath(); c.moveTo(44, y); c.lineTo(this.W, y); c.stroke();
    });
    c.textAlign = "center";
    const toks = this.g.metadata.prompt_tokens;
    for (let p = 0; p < this.nPos; p++) {
      c.fillStyle = "#555";
      c.fillText(showToken(toks[p] ?? "").slice(0, Math.max(2, Math.floor(this.colW / 7))), 50 + (p + 0.5) * this.colW, this.H - 10);
    }
    c.textAlign = "left";
    // edges in 8 batches (sign x 4 strength buckets): a handful of strokes for 10k edges
    const buckets = Array.from({ length: 8 }, () => new Path2D());
    for (const e of this.visLinks) {
      const a = this.pos.get(e.s), b = this.pos.get(e.t);
      const k = (e.w >= 0 ? 0 : 4) + Math.min(3, Math.floor(e.a * 4));
      buckets[k].moveTo(a.x, a.y); buckets[k].lineTo(b.x, b.y);
    }
    buckets.forEach((p, k) => {
      const s = k % 4;
      c.strokeStyle = k < 4 ? `rgba(30,100,230,${0.12 + 0.2 * s})` : `rgba(220,50,40,${0.12 + 0.2 * s})`;
      c.lineWidth = 0.4 + s * 0.9;
      c.stroke(p);
    });
    // nodes
    const pins = new Set(this.st.pins);
    const inSn = new Map();
    this.st.sn.forEach((s, i) => s.slice(1).forEach((id) => inSn.set(id, i)));
    for (const n of this.vis) {
      const p = this.pos.get(n);
      const kind = nodeKind(n);
      c.fillStyle = KIND_COLOR[kind];
      if (kind === "error") c.fillRect(p.x - 3, p.y - 3, 6, 6);
      else { c.beginPath(); c.arc(p.x, p.y, 3.5, 0, 2 * Math.PI); c.fill(); }
      if (pins.has(n.node_id)) { c.strokeStyle = "#6a1b9a"; c.lineWidth = 2; c.beginPath(); c.arc(p.x, p.y, 6, 0, 2 * Math.PI); c.stroke(); }
      if (inSn.has(n.node_id)) {
        c.fillStyle = "#6a1b9a"; c.font = "10px system-ui, sans-serif";
        c.fillText(this.st.sn[inSn.get(n.node_id)][0], p.x + 7, p.y - 8);
      } else if (this.st.labels[n.node_id]) {
        c.fillStyle = "#333"; c.font = "10px system-ui, sans-serif";
        c.fillText(this.st.labels[n.node_id], p.x + 7, p.y - 8);
      }
    }
    perf.lastDraw = performance.now() - t0;
    this.redraw();
  }

  // the cached picture plus the hovered / clicked node's edges
  redraw() {
    const t0 = performance.now();
    const c = this.canvas.getContext("2d");
    c.setTransform(1, 0, 0, 1, 0, 0);
    c.clearRect(0, 0, this.canvas.width, this.canvas.height);
    c.drawImage(this.base, 0, 0);
    c.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    for (const id of [this.clicked, this.hover && this.hover.node_id]) {
      const n = id && this.byId.get(id);
      if (!n || !this.pos.has(n)) continue;
      const p = this.pos.get(n);
      for (const e of [...(this.out.get(n) || []), ...(this.inn.get(n) || [])]) {
        if (!this.pos.has(e.s) || !this.pos.has(e.t)) continue;
        const a = this.pos.get(e.s), b = this.pos.get(e.t);
        c.strokeStyle = e.w >= 0 ? "rgba(30,100,230,0.9)" : "rgba(220,50,40,0.9)";
        c.lineWidth = 1 + 3 * e.a;
        c.beginPath(); c.moveTo(a.x, a.y); c.lineTo(b.x, b.y); c.stroke();
      }
      c.strokeStyle = id === this.clicked ? "#000" : "#444"; c.lineWidth = 2;
      c.beginPath(); c.arc(p.x, p.y, 7, 0, 2 * Math.PI); c.stroke();
    }
    const e = this.edge;
    if (e && this.pos.has(e.s) && this.pos.has(e.t)) {  // the edge whose heads are shown
      const a = this.pos.get(e.s), b = this.pos.get(e.t);
      c.strokeStyle = "rgba(106,27,154,0.9)"; c.lineWidth = 4;
      c.beginPath(); c.moveTo(a.x, a.y); c.lineTo(b.x, b.y); c.stroke();
    }
    perf.lastRedraw = performance.now() - t0;
  }

  pick(ev) {
    const r = this.canvas.getBoundingClientRect();
    const x = ev.clientX - r.left, y = ev.clientY - r.top;
    let best = null, bd = 64;
    const gx = Math.floor(x / 16), gy = Math.floor(y / 16);
    for (let i = -1; i <= 1; i++) for (let j = -1; j <= 1; j++) {
      for (const n of this.grid.get(`${gx + i},${gy + j}`) || []) {
        const p = this.pos.get(n);
        const d = (p.x - x) ** 2 + (p.y - y) ** 2;
        if (d < bd) { bd = d; best = n; }
      }
    }
    return best;
  }

  // the drawn edge nearest to the pointer, within 4 px (nodes take precedence: see onClickEv)
  pickEdge(ev) {
    const r = this.canvas.getBoundingClientRect();
    const x = ev.clientX - r.left, y = ev.clientY - r.top;
    let best = null, bd = 16;
    for (const e of this.visLinks) {
      const a = this.pos.get(e.s), b = this.pos.get(e.t);
      const dx = b.x - a.x, dy = b.y - a.y, len = dx * dx + dy * dy;
      const u = len ? Math.max(0, Math.min(1, ((x - a.x) * dx + (y - a.y) * dy) / len)) : 0;
      const d = (a.x + u * dx - x) ** 2 + (a.y + u * dy - y) ** 2;
      if (d < bd) { bd = d; best = e; }
    }
    return best;
  }

  // for tests: a point on the edge source -> target, away from both nodes
  edgePoint(source, target, u = 0.5) {
    const a = this.nodePosition(source), b = this.nodePosition(target);
    return a && b ? { x: a.x + u * (b.x - a.x), y: a.y + u * (b.y - a.y) } : null;
  }

  move(ev) {
    const n = this.pick(ev);
    if (n === this.hover) return;
    this.hover = n;
    this.redraw();
    if (n) {
      const p = this.pos.get(n);
      this.tip.hidden = false;
      this.tip.textContent = nodeTitle(n, this.st);
      this.tip.style.left = `${p.x + 10}px`; this.tip.style.top = `${p.y + 8}px`;
    } else this.tip.hidden = true;
  }

  select(id) {
    this.clicked = id;
    this.redraw();
    if (this.onClick) this.onClick(id);
  }

  // for tests: where a node is drawn, in CSS pixels relative to the canvas
  nodePosition(id) {
    const n = this.byId.get(id);
    const p = n && this.pos.get(n);
    return p ? { x: p.x, y: p.y } : null;
  }
}
