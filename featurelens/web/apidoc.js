// The API reference, drawn from the server's own OpenAPI description (/openapi.json). FastAPI's /docs page loads
// its scripts from the web, which an offline tool cannot; this page needs nothing but the description.
import { h } from "./dom.js";
import { get } from "./api.js";

// "#/components/schemas/SteerRequest" -> the schema object
function resolve(spec, schema) {
  let s = schema || {};
  for (let i = 0; i < 8 && s.$ref; i++) s = s.$ref.split("/").slice(1).reduce((o, k) => (o || {})[k], spec) || {};
  return s;
}

function typeName(spec, schema) {
  const s = schema || {};
  if (s.$ref) return s.$ref.split("/").pop();
  if (s.anyOf) return s.anyOf.map((x) => typeName(spec, x)).join(" | ");
  if (s.type === "array") return `${typeName(spec, s.items)}[]`;
  if (s.enum) return s.enum.map((x) => JSON.stringify(x)).join(" | ");
  return s.type || "any";
}

function limits(s) {
  const parts = [];
  for (const [k, label] of [["minimum", "≥"], ["exclusiveMinimum", ">"], ["maximum", "≤"], ["exclusiveMaximum", "<"],
    ["minLength", "length ≥"], ["maxLength", "length ≤"], ["minItems", "items ≥"], ["maxItems", "items ≤"]]) {
    if (s[k] !== undefined) parts.push(`${label} ${s[k]}`);
  }
  if (s.default !== undefined) parts.push(`default ${JSON.stringify(s.default)}`);
  return parts.join(", ");
}

function fieldTable(spec, rows) {
  return h("table", { class: "api-fields" },
    h("thead", {}, h("tr", {}, ["field", "where", "type", "required", "limits", "description"].map((t) => h("th", { text: t })))),
    h("tbody", {}, rows.map((r) => h("tr", {},
      h("td", {}, h("code", { text: r.name })), h("td", { text: r.where }), h("td", { text: typeName(spec, r.schema) }),
      h("td", { text: r.required ? "yes" : "" }), h("td", { text: limits(resolve(spec, r.schema)) }),
      h("td", { text: r.description || resolve(spec, r.schema).description || "" })))));
}

function operation(spec, path, method, op) {
  const rows = (op.parameters || []).map((p) => ({ name: p.name, where: p.in, schema: p.schema, required: p.required,
    description: p.description }));
  const body = op.requestBody && op.requestBody.content && op.requestBody.content["application/json"];
  if (body) {
    const s = resolve(spec, body.schema);
    const required = new Set(s.required || []);
    for (const [name, prop] of Object.entries(s.properties || {})) {
      rows.push({ name, where: "body", schema: prop, required: required.has(name), description: prop.description });
    }
  }
  const codes = Object.keys(op.responses || {}).join(", ");
  return h("section", { class: "panel api-op", id: `${method}-${path}` },
    h("h3", {}, h("span", { class: `method method-${method}`, text: method.toUpperCase() }), " ", h("code", { text: path })),
    h("p", { text: op.summary || "" }),
    op.description && op.description !== op.summary ? h("p", { class: "muted", text: op.description }) : null,
    rows.length ? fieldTable(spec, rows) : h("p", { class: "muted", text: "no parameters" }),
    h("p", { class: "muted", text: `responses: ${codes}` }));
}

export async function apiPage(main) {
  const spec = await get("/openapi.json");
  const byTag = new Map();
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(item)) {
      const tag = (op.tags && op.tags[0]) || "other";
      if (!byTag.has(tag)) byTag.set(tag, []);
      byTag.get(tag).push([path, method, op]);
    }
  }
  main.append(
    h("h1", { text: `${spec.info.title} API ${spec.info.version}` }),
    h("p", { text: spec.info.description || "" }),
    h("p", {}, "The web app uses exactly this API; scripts can too. The machine-readable description: ",
      h("a", { href: "/openapi.json", text: "/openapi.json" }), "."),
    ...[...byTag.entries()].map(([tag, ops]) => h("div", { class: "api-tag" },
      h("h2", { text: tag }), ...ops.map(([p, m, op]) => operation(spec, p, m, op)))));
}
