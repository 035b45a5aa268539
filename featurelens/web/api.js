// The JSON API (the same one scripts use; the API page, #/api, describes it) and server-sent events.

const params = new URLSearchParams(location.search);
export const TOKEN = params.get("token") || "";

function headers(extra = {}) {
  const h = { ...extra };
  if (TOKEN) h["X-Featurelens-Token"] = TOKEN;
  return h;
}

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
  }
}

async function check(r) {
  if (r.ok) return r;
  let detail = "";
  try { detail = (await r.json()).detail; } catch { detail = await r.text().catch(() => ""); }
  throw new ApiError(r.status, typeof detail === "string" ? detail : JSON.stringify(detail));
}

export async function get(path) {
  return (await check(await fetch(path, { headers: headers() }))).json();
}

export async function send(method, path, body) {
  const r = await fetch(path, { method, headers: headers({ "Content-Type": "application/json" }),
                                body: body === undefined ? undefined : JSON.stringify(body) });
  return (await check(r)).json();
}

export const post = (p, b) => send("POST", p, b);
export const put = (p, b) => send("PUT", p, b);

// POST that answers with text/event-stream: calls onEvent(name, data) for each event as it arrives.
export async function postStream(path, body, onEvent, signal) {
  const r = await check(await fetch(path, { method: "POST", signal,
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }), body: JSON.stringify(body) }));
  const reader = r.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const chunk = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let name = "message", data = "";
      for (const line of chunk.split("\n")) {
        if (line.startsWith("event: ")) name = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) onEvent(name, JSON.parse(data));
    }
  }
}

// GET server-sent events (EventSource): a job's progress.
export function events(path, handlers) {
  const url = TOKEN ? `${path}${path.includes("?") ? "&" : "?"}token=${encodeURIComponent(TOKEN)}` : path;
  const es = new EventSource(url);
  for (const [name, fn] of Object.entries(handlers)) es.addEventListener(name, (ev) => fn(JSON.parse(ev.data)));
  return es;
}

export const enc = encodeURIComponent;
