// DOM helpers. Everything from the server (corpus text, labels, tokens) goes in through textContent or
// attribute setters, never parsed as markup: the corpus holds HTML- and script-like strings.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k in el && typeof v !== "string") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function fmt(x, digits = 3) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  if (typeof x !== "number") return String(x);
  if (x !== 0 && (Math.abs(x) < 1e-3 || Math.abs(x) >= 1e5)) return x.toExponential(2);
  return Number(x.toPrecision(digits)).toString();
}

export function pct(x, digits = 1) {
  return x === null || x === undefined || Number.isNaN(x) ? "–" : (100 * x).toFixed(digits) + "%";
}

// A token as shown: newlines and tabs visible, nothing interpreted.
export function showToken(t) {
  return String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

// Tokens with a per-token value: shaded by value / max, the value on hover (title), the key token outlined.
export function tokenRow(tokens, acts, max, keyIndex = -1, hue = "orange") {
  const row = h("span", { class: "toks" });
  const top = max > 0 ? max : Math.max(1e-9, ...acts.map((a) => Math.abs(a)));
  tokens.forEach((t, i) => {
    const a = acts[i] || 0;
    const alpha = Math.max(0, Math.min(1, Math.abs(a) / top));
    const span = h("span", { class: "tok" + (i === keyIndex ? " key" : ""), text: showToken(t),
                             title: `${JSON.stringify(t)}: ${fmt(a)}` });
    span.dataset.act = String(a);
    if (a > 0) span.style.background = hue === "orange" ? `rgba(255,120,30,${alpha.toFixed(2)})`
                                                         : `rgba(40,120,255,${alpha.toFixed(2)})`;
    else if (a < 0) span.style.background = `rgba(60,120,255,${alpha.toFixed(2)})`;
    row.appendChild(span);
  });
  return row;
}

const SVG = "http://www.w3.org/2000/svg";
export function svg(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) el.setAttribute(k, String(v));
  for (const c of children.flat()) if (c) el.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
  return el;
}

// Bars as inline SVG: [{label, value, title}]
export function bars(items, { width = 320, height = 110, color = "#ff8a3d", axis = null } = {}) {
  const s = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, class: "chart" });
  if (!items.length) return s;
  const peak = Math.max(...items.map((b) => b.value)) || 1;
  const bw = width / items.length;
  const pad = axis ? 14 : 0;
  items.forEach((b, i) => {
    const bh = (height - pad) * (b.value / peak);
    const r = svg("rect", { x: (i * bw).toFixed(1), y: (height - pad - bh).toFixed(1),
                            width: Math.max(bw - 1, 1).toFixed(1), height: bh.toFixed(1), fill: color });
    const t = svg("title");
    t.textContent = b.title || `${b.label}: ${b.value}`;
    r.appendChild(t);
    s.appendChild(r);
  });
  if (axis) {
    const a = svg("text", { x: 0, y: height - 2, class: "axis" }); a.textContent = axis[0]; s.appendChild(a);
    const b = svg("text", { x: width, y: height - 2, "text-anchor": "end", class: "axis" }); b.textContent = axis[1];
    s.appendChild(b);
  }
  return s;
}

export function table(headers, rows) {
  return h("table", { class: "tbl" },
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { text: x })))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c instanceof Node ? c : String(c ?? "")))))));
}

export function errorBox(e) {
  return h("div", { class: "error", role: "alert", text: e && e.message ? e.message : String(e) });
}

// How well a label predicts where its feature fires (the server sends the score, its method and whether it is clear).
export function labelScore(score, clear, method) {
  if (score === null || score === undefined) return h("span", { class: "label-score muted", text: "label not scored" });
  return h("span", { class: `label-score ${clear ? "clear" : "unclear"}`, title: method || "",
    text: clear ? `label score ${fmt(score, 2)}` : `unclear label (score ${fmt(score, 2)})` });
}
