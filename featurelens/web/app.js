// featurelens web app: a hash router over the pages. No build step, no third-party code.
import { h, clear, errorBox } from "./dom.js";
import { homePage } from "./home.js";
import { searchPage } from "./search.js";
import { featurePage } from "./feature.js";
import { steerPage } from "./steer.js";
import { graphPage } from "./graph.js";
import { apiPage } from "./apidoc.js";

const main = document.getElementById("main");

// "#/feature/a~b/12?x=1" -> {parts: ["feature", "a~b", "12"], query: URLSearchParams}
export function route() {
  const raw = location.hash.replace(/^#\/?/, "");
  const [path, q] = raw.split("?");
  return { parts: path.split("/").filter(Boolean).map(decodeURIComponent), query: new URLSearchParams(q || "") };
}

let current = null;
async function render() {
  const { parts, query } = route();
  const page = parts[0] || "home";
  if (current && current.page === page && current.update && current.update(parts, query)) return;
  if (current && current.dispose) current.dispose();
  current = null;
  clear(main);
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  const pages = { home: homePage, search: searchPage, feature: featurePage, steer: steerPage, graph: graphPage, api: apiPage };
  const fn = pages[page];
  if (!fn) {
    main.appendChild(errorBox(`no page "${page}"`));
    return;
  }
  try {
    const ctl = (await fn(main, parts, query)) || {};
    current = { page, ...ctl };
  } catch (e) {
    main.appendChild(errorBox(e));
    console.warn(e);
  }
}

window.addEventListener("hashchange", render);
render();
