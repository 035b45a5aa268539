import { h, clear, errorBox } from "./dom.js";
import { get, postStream, enc } from "./api.js";

// #/steer?d=<dictionary>&f=12:1,7:-0.5&prompt=...
// Strengths are relative to each feature's typical maximum activation; 1 is the default, the fluency limit measured
// by benchmarks/steering_strength.py (perplexity doubles by 1.5).
export async function steerPage(root, parts, query) {
  const o = await get("/api/overview");
  const dicts = o.dictionaries.filter((d) => d.kind !== "transcoders");
  const dsel = h("select", { "aria-label": "dictionary", name: "dictionary" },
    dicts.map((d) => h("option", { value: d.id, text: d.id, selected: d.id === query.get("d") })));
  const rows = h("div", { class: "steer-features" });
  function addRow(feature = 0, strength = 1) {
    const val = h("output", { text: String(strength) });
    const slider = h("input", { type: "range", min: -4, max: 4, step: 0.1, value: strength, "aria-label": "strength",
                                oninput: () => { val.textContent = slider.value; } });
    const idx = h("input", { type: "number", min: 0, value: feature, class: "feat-idx", "aria-label": "feature index" });
    const row = h("div", { class: "steer-row" }, h("label", {}, "feature ", idx), h("label", {}, " strength ", slider, val),
      h("button", { type: "button", text: "remove", onclick: () => row.remove() }));
    rows.appendChild(row);
  }
  const fs = (query.get("f") || "").split(",").filter(Boolean);
  if (fs.length) fs.forEach((s) => { const [a, b] = s.split(":"); addRow(Number(a), Number(b ?? 1)); });
  else addRow();
  const prompt = h("textarea", { rows: 2, "aria-label": "prompt", name: "prompt" });
  prompt.value = query.get("prompt") || "I think the weather today is";
  const temp = h("input", { type: "number", step: 0.1, min: 0, max: 5, value: 0.7, "aria-label": "temperature" });
  const seed = h("input", { type: "number", min: 0, value: 0, "aria-label": "seed" });
  const maxNew = h("input", { type: "number", min: 1, max: 200, value: 30, "aria-label": "max new tokens" });
  const outDefault = h("div", { class: "gen", id: "gen-default" });
  const outSteered = h("div", { class: "gen", id: "gen-steered" });
  const status = h("div", { class: "muted status" });
  let abort = null;
  const form = h("form", { class: "steer", onsubmit: async (e) => {
    e.preventDefault();
    if (abort) abort.abort();
    abort = new AbortController();
    clear(outDefault); clear(outSteered);
    const features = [...rows.querySelectorAll(".steer-row")].map((r) => ({
      feature: Number(r.querySelector(".feat-idx").value), strength: Number(r.querySelector("input[type=range]").value) }));
    const body = { dictionary: dsel.value, features, prompt: prompt.value, temperature: Number(temp.value),
                   seed: Number(seed.value), max_new_tokens: Number(maxNew.value) };
    history.replaceState(null, "", `#/steer?d=${enc(dsel.value)}&f=${features.map((x) => `${x.feature}:${x.strength}`).join(",")}&prompt=${enc(prompt.value)}`);
    status.textContent = "generating…";
    outDefault.append(h("span", { class: "prompt", text: prompt.value }));
    outSteered.append(h("span", { class: "prompt", text: prompt.value }));
    try {
      await postStream("/api/steer/stream", body, (name, data) => {
        if (name === "token") (data.side === "default" ? outDefault : outSteered).append(h("span", { class: "new", text: data.text }));
        else if (name === "done") status.textContent = "done";
        else if (name === "error") status.replaceChildren(errorBox(data.detail));
      }, abort.signal);
    } catch (err) {
      if (err.name !== "AbortError") status.replaceChildren(errorBox(err));
    }
  } },
    h("label", {}, "dictionary ", dsel), rows,
    h("button", { type: "button", text: "+ add feature", onclick: () => addRow() }),
    h("label", { class: "block" }, "prompt", prompt),
    h("div", { class: "row" }, h("label", {}, "temperature ", temp), h("label", {}, " seed ", seed), h("label", {}, " max new tokens ", maxNew)),
    h("button", { type: "submit", text: "Generate", class: "primary" }));
  root.append(h("h1", { text: "Steering playground" }), form, status,
    h("div", { class: "side-by-side" }, h("div", {}, h("h3", { text: "Default" }), outDefault),
      h("div", {}, h("h3", { text: "Steered" }), outSteered)));
  return { dispose: () => abort && abort.abort() };
}
