import { h, append, clear, fmt, pct, tokenRow, bars, table, errorBox, showToken, labelScore } from "./dom.js";
import { get, post, put, enc } from "./api.js";

const QNAMES = { 0: "lowest quarter", 1: "second quarter", 2: "third quarter", 3: "top quarter" };

function examples(list, max) {
  if (!list.length) return h("p", { class: "muted", text: "none: this feature never fired on the analyzed text" });
  return h("div", { class: "examples" }, list.map((x) => h("div", { class: "ex" },
    h("span", { class: "act", text: fmt(x.act) }), tokenRow(x.tokens, x.acts, max, x.index))));
}

// #/feature/<dictionary>/<index>?s=<strength>: s (from a search hit's steering check) is where steering starts.
export async function featurePage(root, parts, query) {
  const [, dict, idx] = parts;
  const strength = Number(query.get("s")) || 1;
  const f = await get(`/api/dictionaries/${enc(dict)}/features/${enc(idx)}`);
  const labelText = h("span", { class: "label-text", text: f.label || "no label" });
  const prov = h("span", { class: "muted provenance", text: f.label_provenance ? ` (${f.label_provenance})` : "" });
  const labelInput = h("input", { type: "text", "aria-label": "label", value: f.label || "", maxlength: 500 });
  const labelMsg = h("span", { class: "muted" });
  const score = h("span", {}, labelScore(f.label_score, f.label_clear, f.label_score_method));
  const labelForm = h("form", { class: "label-edit", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const r = await put(`/api/dictionaries/${enc(dict)}/features/${f.feature}/label`, { label: labelInput.value.trim() || null });
      labelText.textContent = r.label || "no label";
      prov.textContent = r.provenance ? ` (${r.provenance})` : "";
      clear(score).appendChild(labelScore(r.label_score, r.label_clear, r.label_score_method));
      labelMsg.textContent = "saved";
    } catch (err) { labelMsg.textContent = err.message; }
  } }, labelInput, h("button", { type: "submit", text: "Save label" }), labelMsg);

  const hist = f.histogram.length
    ? bars(f.histogram.map((b) => ({ label: `${fmt(b.lo)}–${fmt(b.hi)}`, value: b.count, title: `${fmt(b.lo)} – ${fmt(b.hi)}: ${b.count}` })),
      { axis: [fmt(f.histogram[0].lo), fmt(f.histogram[f.histogram.length - 1].hi)] })
    : h("p", { class: "muted", text: "never fired" });
  const lens = table(["promotes", "", "suppresses", ""],
    Array.from({ length: Math.max(f.logit_up.length, f.logit_down.length) }, (_, i) => {
      const u = f.logit_up[i], d = f.logit_down[i];
      return [u ? h("code", { class: "pos", text: JSON.stringify(u.token) }) : "", u ? "+" + fmt(u.value) : "",
              d ? h("code", { class: "neg", text: JSON.stringify(d.token) }) : "", d ? fmt(d.value) : ""];
    }));
  const link = (i, lab) => h("a", { href: `#/feature/${enc(dict)}/${i}`, text: `#${i} ${lab || ""}` });
  const similar = table(["feature", "cosine"], f.similar.map((s) => [link(s.feature, s.label), fmt(s.cosine)]));
  const cofire = table(["feature", "jaccard", "P(other | this)"], f.cofiring.map((c) => [link(c.feature, c.label), fmt(c.jaccard), fmt(c.p, 2)]));

  // test your own text
  const ttInput = h("textarea", { rows: 2, "aria-label": "your text", placeholder: "Type a text to see this feature's activation on each token" });
  const ttOut = h("div", { class: "test-out" });
  const ttForm = h("form", { class: "test-text", onsubmit: async (e) => {
    e.preventDefault();
    clear(ttOut);
    try {
      const r = await post(`/api/dictionaries/${enc(dict)}/features/${f.feature}/activations`, { text: ttInput.value });
      ttOut.append(h("div", { class: "muted", text: `max ${fmt(r.max)} (corpus max ${fmt(r.max_act_corpus)}); BOS ignored` }),
        tokenRow(r.tokens, r.acts, Math.max(r.max_act_corpus, r.max)));
    } catch (err) { ttOut.appendChild(errorBox(err)); }
  } }, ttInput, h("button", { type: "submit", text: "Run" }));

  const quant = [...new Set(f.quantile_examples.map((x) => x.bin))].sort((a, b) => b - a).map((b) => {
    const xs = f.quantile_examples.filter((x) => x.bin === b);
    return h("div", {}, h("h4", { text: `${QNAMES[b] || "bin " + b} (activations ${fmt(Math.min(...xs.map((x) => x.act)))} – ${fmt(Math.max(...xs.map((x) => x.act)))})` }),
      examples(xs, f.max_act));
  });

  append(root, [
    h("h1", {}, `Feature ${f.feature} `, h("span", { class: "muted", text: `of ${f.d_sae} · ${f.model} · ${f.hook_name}` })),
    h("div", { class: "label" }, labelText, prov, score),
    labelForm,
    h("div", { class: "stats" }, h("span", { text: `density ${pct(f.density, 3)}` }),
      h("span", { text: `fires on ${f.n_fires.toLocaleString()} of ${f.n_tokens.toLocaleString()} tokens` }),
      h("span", { text: `max ${fmt(f.max_act)}` }), h("span", { text: `mean when firing ${fmt(f.mean_act)}` })),
    h("p", {}, h("a", { class: "button steer-button", href: `#/steer?d=${enc(dict)}&f=${f.feature}:${strength}`, text: "Steer with this feature →" })),
    h("div", { class: "boxes" },
      h("div", { class: "box" }, h("h3", { text: "Activation histogram" }), hist, h("div", { class: "muted", text: "nonzero activations, log-spaced bins" })),
      h("div", { class: "box" }, h("h3", { text: "Logit lens" }), f.logit_up.length ? lens : h("p", { class: "muted", text: "not available" })),
      h("div", { class: "box" }, h("h3", { text: "Similar features (decoder cosine)" }), similar),
      h("div", { class: "box" }, h("h3", { text: "Fires with" }), cofire)),
    h("h3", { text: "Test your own text" }), ttForm, ttOut,
    h("h3", { text: `Top activations (${f.top_examples.length} contexts)` }), examples(f.top_examples, f.max_act),
    f.quantile_examples.length ? h("h3", { text: "Across activation quantiles" }) : null, ...quant,
  ]);
}
