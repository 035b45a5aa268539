import { h, clear, fmt, pct, tokenRow, showToken, errorBox, labelScore } from "./dom.js";
import { get, post, enc } from "./api.js";

function featureLink(d, f, label, strength) {
  return h("a", { class: "feature-link", href: `#/feature/${enc(d)}/${f}${strength ? `?s=${strength}` : ""}` },
    h("b", { text: `#${f}` }), " ", h("span", { text: label || "(no label)" }), h("span", { class: "muted", text: `  ${d}` }));
}

export async function searchPage(root, parts, query) {
  const overview = await get("/api/overview");
  const analyzed = overview.dictionaries.filter((d) => d.analyzed);
  let tab = query.get("tab") || "concept";
  const chosen = new Set((query.get("d") || "").split(",").filter(Boolean));
  const boxes = h("div", { class: "dict-choice" }, h("span", { class: "muted", text: "dictionaries: " }),
    analyzed.map((d) => h("label", {}, h("input", { type: "checkbox", value: d.id, checked: chosen.size === 0 || chosen.has(d.id) }),
      " " + d.id)));
  const tabs = h("div", { class: "tabs", role: "tablist" });
  const input = h("textarea", { rows: 2, name: "q", "aria-label": "query" });
  input.value = query.get("q") || "";
  const go = h("button", { type: "submit", text: "Search" });
  const fast = h("input", { type: "checkbox", name: "fast", checked: query.get("fast") === "1" });
  const steerBox = h("label", { class: "steer-check", title: "skip the steering check: by default the 10 best matches " +
    "are steered on neutral prompts in match order, and the first that makes the model say the concept's words leads" },
    fast, " fast (no steering check)");
  const form = h("form", { class: "search", onsubmit: (e) => { e.preventDefault(); run(); } }, input, go, steerBox);
  const out = h("div", { class: "results" });
  const hints = { concept: "what the features are about, e.g. \"animals\" or \"legal documents\"",
                  text: "a sentence: see which features fire on each token", token: "an output token, e.g. \" Paris\" (mind the leading space)" };
  for (const t of ["concept", "text", "token"]) {
    tabs.appendChild(h("button", { type: "button", role: "tab", class: t === tab ? "tab active" : "tab", text: t === "concept" ? "By concept" : t === "text" ? "By text" : "By token",
      "data-tab": t, onclick: () => { tab = t; input.placeholder = hints[t]; steerBox.hidden = t !== "concept";
        tabs.querySelectorAll("button").forEach((b) => b.classList.toggle("active", b.dataset.tab === t)); } }));
  }
  input.placeholder = hints[tab];
  steerBox.hidden = tab !== "concept";
  root.append(h("h1", { text: "Search features" }), tabs, boxes, form, out);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); run(); } });

  function dictParam() {
    return [...boxes.querySelectorAll("input:checked")].map((b) => b.value);
  }

  async function run() {
    const q = input.value;
    const ds = dictParam();
    const steer = tab === "concept" && !fast.checked;
    history.replaceState(null, "", `#/search?tab=${tab}&q=${enc(q)}${ds.length && ds.length < analyzed.length ? `&d=${enc(ds.join(","))}` : ""}${fast.checked ? "&fast=1" : ""}`);
    clear(out).appendChild(h("p", { class: "muted", text: steer ? "searching, then steering the best matches…" : "searching…" }));
    try {
      if (tab === "concept") {
        const r = await get(`/api/search/concept?q=${enc(q)}&dictionaries=${enc(ds.join(","))}&k=${steer ? 10 : 20}&steerable=${steer}`);
        clear(out);
        if (!r.hits.length) out.appendChild(h("p", { text: "No feature matches." }));
        if (steer && r.hits.length) {
          const words = r.hits[0].steer_words;
          out.appendChild(h("p", { class: "muted", text: words.length ? `steering measured on the concept's words: ${words.join(", ")}`
            : "no words of the concept found in the matches' examples: steering could not be checked" }));
        }
        for (const hit of r.hits) {
          out.appendChild(h("div", { class: "hit" }, featureLink(hit.dictionary, hit.feature, hit.label, hit.steer_strength),
            labelScore(hit.label_score, hit.label_clear, hit.label_score_method),
            h("span", { class: "muted", text: `  match ${fmt(hit.match_score ?? hit.score)} (${hit.method})` }),
            hit.steer_ratio == null ? null : h("span", { class: hit.score > 1 ? "steer-ratio good" : "steer-ratio",  // over 1: the check's leader
              title: `next-token probability of the concept's words, steered at strength ${hit.steer_strength} / unsteered (median over neutral prompts)`,
              text: `  steered: ${fmt(hit.steer_ratio, 2)}x at ${hit.steer_strength}` }),
            hit.steer_promotes && hit.steer_promotes.length ? h("span", { class: "muted steer-promotes",
              title: "the words whose next-token probability steering raised most", text: `  steering promotes: ${hit.steer_promotes.join(", ")}` }) : null,
            hit.max_tokens.length ? h("span", { class: "muted", text: `  peaks on: ${[...new Set(hit.max_tokens)].join(", ")}` }) : null,
            hit.snippets.map((s) => h("div", { class: "snippet", text: s }))));
        }
      } else if (tab === "text") {
        const r = await post("/api/search/text", { text: q, dictionaries: ds, k: 10 });
        clear(out);
        for (const res of r.results) {
          const detail = h("div", { class: "tok-detail muted", text: "hover a token to see its features" });
          const best = res.per_token.map((row) => (row.length ? row[0].relative : 0));
          const row = tokenRow(res.tokens, best, 1);
          row.querySelectorAll(".tok").forEach((span, i) => {
            span.addEventListener("mouseenter", () => {
              clear(detail).append(h("b", { text: `${JSON.stringify(res.tokens[i])}: ` }),
                ...(res.per_token[i].length ? res.per_token[i].map((f) => h("span", { class: "chip" },
                  featureLink(res.dictionary, f.feature, f.label), ` ${fmt(f.act)} (${pct(f.relative, 0)} of max)`))
                  : [h("span", { text: "nothing fires" })]));
            });
          });
          out.append(h("h3", { text: res.dictionary }), h("div", { class: "text-acts" }, row), detail,
            h("h4", { text: "Strongest features on this text" }),
            ...res.overall.map((x) => h("div", { class: "hit" }, featureLink(res.dictionary, x.feature, x.label),
              h("span", { class: "muted", text: `  max ${fmt(x.max_act)} (${pct(x.relative, 0)} of its max) on ` }),
              h("code", { text: showToken(res.tokens[x.token_index]) }),
              h("div", {}, tokenRow(res.tokens, x.acts, Math.max(...x.acts))))));
        }
      } else {
        const r = await get(`/api/search/token?token=${enc(q)}&dictionaries=${enc(ds.join(","))}&k=20`);
        clear(out);
        for (const x of r.hits) out.appendChild(h("div", { class: "hit" }, featureLink(x.dictionary, x.feature, x.label),
          h("span", { class: "muted", text: `  logit +${fmt(x.logit)} (z ${fmt(x.zscore, 2)})` })));
        if (!r.hits.length) out.appendChild(h("p", { text: "No feature promotes this token." }));
      }
    } catch (e) {
      clear(out).appendChild(errorBox(e));
    }
  }
  if (input.value) run();
}
