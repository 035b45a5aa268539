import { h, fmt, pct, table } from "./dom.js";
import { get, enc } from "./api.js";

// A dictionary's dashboards: "analyzed", or for a transcoder set or a cross-layer transcoder its layers' (all of
// them: "analyzed", with a link to each layer's feature pages).
function status(d) {
  if (d.analyzed) return h("span", { class: "ok", text: "analyzed" });
  const layers = d.layers || [], done = d.analyzed_layers || [];
  if (!layers.length || !done.length) return h("span", { class: "muted", text: "not analyzed" });
  const ids = d.layer_ids || {};
  return h("span", { class: "layer-status" },
    done.length === layers.length ? h("span", { class: "ok", text: "analyzed" }) : h("span", { class: "muted", text: `${done.length} of ${layers.length} layers analyzed` }),
    h("span", { class: "layer-links" }, " · layers ", done.map((l) => ids[String(l)]
      ? h("a", { href: `#/feature/${enc(ids[String(l)])}/0`, class: "layer-link", text: `${l} ` }) : `${l} `)));
}

// A dictionary's hook; a transcoder set's or a cross-layer transcoder's with its layer as L (each layer reads its
// own: "blocks.L.ln2.hook_normalized, L = 0–17"), where its first layer's hook alone would mislead.
function hookText(d) {
  const layers = d.layers || [];
  if (!layers.length) return d.hook_name || "";
  const first = layers[0], last = layers[layers.length - 1];
  const which = layers.length === 1 ? `${first}` : last - first + 1 === layers.length ? `${first}–${last}` : layers.join(",");
  const hook = (d.hook_name || "").replace(`blocks.${first}.`, "blocks.L.");
  return hook ? `${hook}, L = ${which}` : `layers ${which}`;
}

export async function homePage(root) {
  const o = await get("/api/overview");
  const search = h("form", { class: "bigsearch", onsubmit: (e) => {
    e.preventDefault();
    location.hash = `#/search?tab=concept&q=${enc(input.value)}`;
  } });
  const input = h("input", { type: "search", name: "q", placeholder: "Search features by concept, e.g. \"animals\"",
                             "aria-label": "search features" });
  search.append(input, h("button", { type: "submit", text: "Search" }));
  const dicts = o.dictionaries;
  root.append(
    h("h1", { text: "featurelens" }),
    h("p", { class: "muted", text: `data directory ${o.data_dir}` }),
    search,
    h("h2", { text: "Dictionaries" }),
    dicts.length ? table(["dictionary", "model", "hook", "kind", "width", "L0", "explained variance",
                          "CE loss recovered", "dashboards"],
      dicts.map((d) => [
        d.analyzed ? h("a", { href: `#/search?tab=concept&d=${enc(d.id)}`, text: d.id, class: "dict-link" })
                   : h("span", { text: d.id }),
        d.model, h("span", { class: "hook", text: hookText(d) }),
        d.cross_layer ? "cross-layer transcoder" : d.kind, d.d_sae ?? "",
        fmt(d.metrics.l0), fmt(d.metrics.explained_variance), pct(d.metrics.ce_loss_recovered),
        status(d),
      ]))
      : h("p", { class: "muted", text: "No dictionaries yet: featurelens train ... (see the README)." }),
    h("h2", { text: "Models" }),
    table(["model", "description", "converted", "dictionaries"],
      o.models.map((m) => [m.name, m.description, m.converted ? "yes" : "no", String(m.dictionaries.length)])),
    h("h2", { text: "Attribution graphs" }),
    o.graphs.length ? h("ul", { class: "graphs" }, o.graphs.map((g) => h("li", {},
      h("a", { href: `#/graph/${enc(g.id)}`, text: g.prompt || g.slug, class: "graph-link" }),
      h("span", { class: "muted", text: `  ${g.scan} · ${g.set}` }))))
      : h("p", { class: "muted", text: "No saved graphs yet." }),
    h("p", {}, h("a", { href: "#/graph", text: "Open the circuit explorer →" })),
  );
}
