// rscir web page: plain JS against the HTTP API (POST /search, POST /preview, GET /items, /info,
// /labels, /openapi.json). One request is in flight at a time; a newer one aborts the older, so
// the grid always shows the latest query. The request behind the grid is kept in
// #results[data-request] (tests and curious users can replay it against the API). The query
// state lives in the URL (?item=…&text=…), so back/forward and shared links work.
"use strict";

const FUSED = ["weicom", "weicom-x", "minmax", "harris", "basic", "average", "sum", "product"];
const NEEDS_TEXT = new Set([...FUSED, "text"]);
const NEEDS_IMAGE = new Set([...FUSED, "image"]);
// average/sum/product/image/text ignore λ
const USES_LAM = new Set(["weicom", "weicom-x", "minmax", "harris", "basic"]);
const STRIP_LAMS = [0, 0.2, 0.4, 0.6, 0.8, 1];
const STRIP_K = 8;
const BROWSE_LIMIT = 48;
const K_CHOICES = [12, 24, 48, 100, 200, 500, 1000];
const DEFAULTS = { method: "weicom", lam: 0.5, k: 24, view: "grid" };
const TIFF = /\.(tif|tiff)$/i;
// rank colours, best first (plasma-like; the last stop stays dark enough on white)
const RAMP = [[13, 8, 135], [126, 3, 168], [204, 71, 120], [248, 149, 64]];

const $ = (id) => document.getElementById(id);
const els = {
  file: $("file"), drop: $("drop"), queryImg: $("query-img"), queryCaption: $("query-caption"),
  clear: $("clear-query"), text: $("text"), lam: $("lam"), lamValue: $("lam-value"),
  lamNote: $("lam-note"), method: $("method"), labelFilter: $("label-filter"), k: $("k"),
  form: $("controls"), title: $("results-title"), status: $("status"), results: $("results"),
  info: $("archive-info"), pager: $("pager"), prev: $("prev"), next: $("next"),
  pageInfo: $("page-info"), dlFormat: $("dl-format"), download: $("download"),
  dlNote: $("dl-note"), map: $("map"), legend: $("map-legend"), draw: $("draw-area"),
  clearArea: $("clear-area"), fit: $("fit-hits"), areaInfo: $("area-info"), start: $("start"),
  end: $("end"), dateNote: $("date-note"),
};

// The current query image: an archive item, or an uploaded file (sent once, then by token).
const query = { itemId: null, file: null, token: null, objectUrl: null, name: "" };
const uploaded = new Map();  // image token -> the file it came from (back/forward to an upload)
// What the URL carries besides the query image and the form controls.
const nav = { page: 0, bpage: 0, bbox: null };
// What this server's API supports (read from /openapi.json; older servers lack some).
const features = { offset: false, format: false, dates: false };
let info = { limits: {} };
let inflight = null;
let seq = 0;
let lastRequest = null;  // the single-λ request behind the grid (for downloads)
let ready = false;  // /info and the API's features are known

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function detailText(detail) {
  if (Array.isArray(detail)) {
    return detail.map((e) => (e.loc && e.loc.length ? e.loc.join(".") + ": " : "") + e.msg)
      .join("; ");
  }
  return detail == null ? "request failed" : String(detail);
}

async function raw(path, options = {}) {
  const r = await fetch(path, options);
  if (!r.ok) {
    let body = null;
    try { body = await r.json(); } catch { body = null; }
    throw new ApiError(r.status, detailText(body && body.detail));
  }
  return r;
}

async function api(path, options = {}) { return (await raw(path, options)).json(); }

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

function fmt(x, digits = 4) { return Number(x).toFixed(digits); }
const num = (x) => x != null && Number.isFinite(Number(x));

function setStatus(msg, isError = false) {
  els.status.textContent = msg;
  els.status.classList.toggle("error", isError);
}

function note(el, text) { el.textContent = text || ""; el.hidden = !text; }

function lam() { return Number(els.lam.value); }
function view() { return document.querySelector("input[name=view]:checked").value; }
function hasQueryImage() { return query.itemId !== null || query.file !== null || !!query.token; }
function basename(p) { return String(p).split("/").pop(); }
const METHOD_SHORT = { weicom: "WeiCom", "weicom-x": "WeiCom-X", minmax: "min-max fusion",
  harris: "Harris fusion", basic: "BASIC", average: "average of similarities",
  sum: "sum of similarities", product: "product of similarities", image: "image only",
  text: "text only" };
function methodName(m) { return METHOD_SHORT[m] || m; }

function coords(lon, lat) {
  const ns = lat >= 0 ? "N" : "S";
  const ew = lon >= 0 ? "E" : "W";
  return `${fmt(Math.abs(lat), 3)}°${ns} ${fmt(Math.abs(lon), 3)}°${ew}`;
}

function rankColour(rank, n) {
  const t = n > 1 ? (rank - 1) / (n - 1) : 0;
  const x = t * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2);
  const f = x - i;
  const c = RAMP[i].map((v, j) => Math.round(v + (RAMP[i + 1][j] - v) * f));
  return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
}

// ------------------------------------------------------------------ the request
// The method actually run: without text the page shows image neighbours, without an image it
// shows text matches (the note says so).
function effective() {
  const text = els.text.value.trim();
  let method = els.method.value;
  let why = "";
  const img = hasQueryImage();
  if (!img && !text) return null;
  if (NEEDS_TEXT.has(method) && !text) {
    method = "image";
    why = "type a modifier to compose; showing image-only neighbours";
  } else if (NEEDS_IMAGE.has(method) && !img) {
    method = "text";
    why = "no query image; showing text-only matches";
  }
  return { method, why, texts: text ? [text] : [] };
}

function currentFilter() {
  const f = {};
  const label = els.labelFilter.value;
  if (label) f.labels = [label];
  if (nav.bbox) f.bbox = nav.bbox;
  if (features.dates && els.start.value) f.start = els.start.value;
  if (features.dates && els.end.value) f.end = els.end.value;
  return Object.keys(f).length ? f : null;
}

function stripLams() {
  const all = new Set([...STRIP_LAMS, lam()].map((x) => Number(x.toFixed(4))));
  return [...all].sort((a, b) => a - b);
}

function buildRequest() {
  const eff = effective();
  if (!eff) return null;
  const { method, why, texts } = eff;
  const strip = view() === "strip" && USES_LAM.has(method);
  const k = strip ? STRIP_K : Number(els.k.value);
  const req = { texts, method, k };
  if (strip) req.lams = stripLams(); else req.lam = lam();
  if (query.itemId !== null) req.item_id = query.itemId;
  else if (query.token && method !== "text") req.image_token = query.token;
  const f = currentFilter();
  if (f) req.filter = f;
  if (!strip && nav.page > 0 && features.offset) req.offset = nav.page * k;
  const upload = query.itemId === null && !req.image_token && method !== "text" && !!query.file;
  return { req, why, upload, strip };
}

async function postSearch(req, upload, signal) {
  if (upload && query.file) {
    const fd = new FormData();
    fd.append("image", query.file, query.file.name || "query");
    fd.append("query", JSON.stringify(req));
    return raw("/search", { method: "POST", body: fd, signal });
  }
  return raw("/search", {
    method: "POST", body: JSON.stringify(req), signal,
    headers: { "Content-Type": "application/json" },
  });
}

// A search; a 410 (the server forgot the upload) re-sends the file once.
async function searchWithRetry(req, upload, signal) {
  try {
    return { res: await postSearch(req, upload, signal), upload };
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 410 && query.file)) throw e;
    delete req.image_token;
    query.token = null;
    return { res: await postSearch(req, true, signal), upload: true };
  }
}

function begin() {
  if (inflight) inflight.abort();
  const ctrl = new AbortController();
  inflight = ctrl;
  els.results.setAttribute("aria-busy", "true");
  els.results.dataset.state = "loading";
  return { ctrl, mine: ++seq };
}

function finish(mine) {
  if (mine === seq) { els.results.setAttribute("aria-busy", "false"); inflight = null; }
}

// A failed request leaves no stale results behind: grid, map and pager are cleared.
function fail(message) {
  els.results.replaceChildren();
  delete els.results.dataset.request;
  els.results.dataset.state = "error";
  els.pager.hidden = true;
  lastRequest = null;
  mapView.showHits([], false);
  setStatus(message, true);
}

async function runSearch() {
  const built = buildRequest();
  if (!built) { browse(); return; }
  const { req, why, strip } = built;
  const { ctrl, mine } = begin();
  try {
    const out = await searchWithRetry(req, built.upload, ctrl.signal);
    const res = await out.res.json();
    if (mine !== seq) return;
    if (out.upload && res.query.image_token) {
      query.token = res.query.image_token;
      uploaded.set(query.token, query.file);
      syncUrl("token", true);
    }
    render(res, req);
    const hits = res.results.reduce((a, r) => a + r.hits.length, 0);
    const lamText = !USES_LAM.has(req.method) ? "λ not used"
      : req.lams ? `${req.lams.length} λ values` : `λ = ${fmt(req.lam, 2)}`;
    const first = (req.offset || 0) + 1;
    const range = strip ? `${hits} results` : hits
      ? `results ${first}–${first + hits - 1}` : "no results";
    setStatus(`${range} in ${Math.round(res.took_ms)} ms (${methodName(req.method)}, ` +
              `${lamText})` + (why ? ` · ${why}` : ""));
    if (!strip) pager(nav.page, hits === req.k, features.offset ? "" : "this server cannot page");
    else els.pager.hidden = true;
    els.results.dataset.state = "ready";
  } catch (e) {
    if (e.name === "AbortError" || mine !== seq) return;
    fail(`Search failed: ${e.message}`);
  } finally {
    finish(mine);
  }
}

const runSearchSoon = debounce(runSearch, 150);

// ------------------------------------------------------------------ rendering
function describe(h) {
  const lines = [`#${h.rank != null ? h.rank : "-"} · id ${h.id}`, h.path];
  if (h.scene) lines.push(`scene ${h.scene}${h.window ? " · window " + h.window : ""}`);
  if (h.score != null) {
    let s = `score ${fmt(h.score, 6)}`;
    if (num(h.sim_image)) s += ` · image similarity ${fmt(h.sim_image, 4)}`;
    if (num(h.sim_text)) s += ` · text similarity ${fmt(h.sim_text, 4)}`;
    lines.push(s);
  }
  const labels = h.labels && h.labels.length ? h.labels.join(", ") : (h.label || "");
  if (labels) lines.push(`class ${labels}`);
  if (num(h.lon) && num(h.lat)) lines.push(`lon ${fmt(h.lon, 5)}, lat ${fmt(h.lat, 5)}`);
  if (h.datetime) lines.push(`date ${h.datetime}`);
  lines.push(`${h.width}×${h.height} px · click to search from this image`);
  return lines.join("\n");
}

function span(cls, text) {
  const s = document.createElement("span");
  s.className = cls;
  s.textContent = text;
  return s;
}

// A file name that wraps after _ - . / rather than anywhere.
function nameSpan(text) {
  const s = span("name", "");
  for (const part of String(text).split(/(?<=[_\-./])/)) {
    s.append(part, document.createElement("wbr"));
  }
  return s;
}

function card(h, n) {
  const li = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  b.className = "hit";
  b.dataset.id = String(h.id);
  if (h.score != null) { b.dataset.score = String(h.score); b.dataset.rank = String(h.rank); }
  if (num(h.lon) && num(h.lat)) { b.dataset.lon = String(h.lon); b.dataset.lat = String(h.lat); }
  b.title = describe(h);
  const fig = document.createElement("span");
  fig.className = "fig";
  const img = document.createElement("img");
  img.src = `/items/${h.id}/thumbnail?size=256`;
  img.alt = `${h.path}${h.label ? " (" + h.label + ")" : ""}`;
  img.loading = "lazy";
  img.decoding = "async";
  fig.append(img);
  if (h.rank != null) {
    const badge = span("rank", `#${h.rank}`);
    badge.style.backgroundColor = rankColour(h.rank, n);
    fig.append(badge);
  }
  const cap = document.createElement("span");
  cap.className = "cap";
  cap.append(nameSpan(h.scene ? `${h.scene}${h.window ? " · " + h.window : ""}`
    : basename(h.path)));
  const row = document.createElement("span");
  row.className = "meta";
  row.append(span("label", h.label || `id ${h.id}`));
  if (h.score != null) row.append(span("score", fmt(h.score)));
  cap.append(row);
  if (num(h.sim_image) || num(h.sim_text)) {
    const parts = [];
    if (num(h.sim_image)) parts.push(`img ${fmt(h.sim_image, 3)}`);
    if (num(h.sim_text)) parts.push(`txt ${fmt(h.sim_text, 3)}`);
    cap.append(span("sims", parts.join(" · ")));
  }
  if (num(h.lon) && num(h.lat)) cap.append(span("coords", coords(h.lon, h.lat)));
  if (h.datetime) cap.append(span("date", String(h.datetime).slice(0, 10)));
  b.append(fig, cap);
  b.addEventListener("click", () => setQueryItem(h));
  b.addEventListener("mouseenter", () => mapView.highlight(h.id, true));
  b.addEventListener("mouseleave", () => mapView.highlight(h.id, false));
  b.addEventListener("focus", () => mapView.highlight(h.id, true));
  b.addEventListener("blur", () => mapView.highlight(h.id, false));
  li.append(b);
  return li;
}

function grid(hits, label) {
  const ol = document.createElement("ol");
  ol.className = "grid";
  ol.setAttribute("aria-label", label);
  const n = hits.reduce((a, h) => Math.max(a, h.rank || 0), 0);
  hits.forEach((h) => ol.append(card(h, n)));
  return ol;
}

function render(res, req) {
  const box = els.results;
  box.replaceChildren();
  box.dataset.request = JSON.stringify(req);
  let shown = res.results[0].hits;
  if (req.lams) {
    els.title.textContent = "λ strip";
    box.dataset.view = "strip";
    const cur = lam();
    for (const r of res.results) {
      const row = document.createElement("section");
      row.className = "strip-row";
      row.dataset.lam = String(r.lam);
      const h = document.createElement("h3");
      h.textContent = `λ = ${fmt(r.lam, 2)}`;
      if (Math.abs(r.lam - cur) < 1e-6) {
        row.classList.add("current");
        row.setAttribute("aria-current", "true");
        h.textContent += " (slider)";
        shown = r.hits;
      }
      const ol = grid(r.hits, `results for λ = ${fmt(r.lam, 2)}`);
      ol.className = "row";
      row.append(h, ol);
      box.append(row);
    }
    lastRequest = { ...req, lam: cur, k: Number(els.k.value) };
    delete lastRequest.lams;
  } else {
    els.title.textContent = "Results";
    box.dataset.view = "grid";
    box.append(grid(shown, "results, best first"));
    lastRequest = req;
  }
  box.dataset.lam = req.lams ? "" : String(req.lam);
  mapView.showHits(shown, true);
}

// Search results have no known total: "Next" while a page comes back full.
function pager(page, more, why) {
  els.pager.hidden = page === 0 && !more;
  els.prev.disabled = page === 0;
  els.next.disabled = !more || !!why;
  els.next.title = why || "";
  els.pageInfo.textContent = `page ${page + 1}${why && more ? ` (${why})` : ""}`;
}

async function browse() {
  const { ctrl, mine } = begin();
  const label = els.labelFilter.value;
  const offset = nav.bpage * BROWSE_LIMIT;
  const qs = new URLSearchParams({ limit: String(BROWSE_LIMIT), offset: String(offset) });
  if (label) qs.set("label", label);
  try {
    const page = await api(`/items?${qs}`, { signal: ctrl.signal });
    if (mine !== seq) return;
    els.title.textContent = "Archive";
    els.results.replaceChildren(grid(page.items, "archive images"));
    els.results.dataset.view = "browse";
    delete els.results.dataset.request;
    lastRequest = null;
    const n = page.items.length;
    const where = label ? ` of class ${label}` : "";
    setStatus(n ? `images ${offset + 1}–${offset + n} of ${page.total}${where}; ` +
              "click one to search from it, or drop your own."
      : `no images${where} on this page (${page.total} in all)`);
    els.pager.hidden = page.total <= BROWSE_LIMIT;
    els.prev.disabled = nav.bpage === 0;
    els.next.disabled = offset + n >= page.total;
    els.next.title = "";
    els.pageInfo.textContent =
      `page ${nav.bpage + 1} of ${Math.max(1, Math.ceil(page.total / BROWSE_LIMIT))}`;
    mapView.showHits(page.items, false);
    mapView.addSeen(page.items);
    els.results.dataset.state = "ready";
  } catch (e) {
    if (e.name === "AbortError" || mine !== seq) return;
    fail(`Could not list the archive: ${e.message}`);
  } finally {
    finish(mine);
  }
}

// ------------------------------------------------------------------ the query image
function showQuery(src, alt, caption) {
  if (src) els.queryImg.src = src; else els.queryImg.removeAttribute("src");
  els.queryImg.alt = alt;
  els.queryImg.hidden = !src;
  els.queryCaption.textContent = caption;
  els.clear.hidden = false;
}

function forgetFile() {
  if (query.objectUrl) URL.revokeObjectURL(query.objectUrl);
  Object.assign(query, { itemId: null, file: null, token: null, objectUrl: null, name: "" });
  els.queryImg.onerror = null;
  delete els.queryImg.dataset.preview;
}

function setQueryItem(h, { silent = false } = {}) {
  forgetFile();
  query.itemId = h.id;
  const what = h.path ? `${h.path}${h.label ? " (" + h.label + ")" : ""}` : `item ${h.id}`;
  showQuery(`/items/${h.id}/thumbnail?size=256`, `Query image: ${what}`,
            `Query: archive item ${h.id}, ${what}`);
  els.drop.dataset.itemId = String(h.id);
  if (!h.path) {  // from the URL: fetch the item's name for the caption
    api(`/items/${h.id}`).then((m) => {
      if (query.itemId === h.id) showQuery(els.queryImg.src, `Query image: ${m.path}`,
        `Query: archive item ${h.id}, ${m.path}${m.label ? " (" + m.label + ")" : ""}`);
    }).catch(() => {});
  }
  if (!silent) commit("item");
}

// The browser's own rendering when it can show the file (JPEG, PNG, WebP, BMP), else a PNG the
// server decodes exactly as search does (TIFF, 16-bit, multi-band).
async function serverPreview(file, mine) {
  const fd = new FormData();
  fd.append("image", file, file.name || "query");
  try {
    const blob = await (await raw("/preview", { method: "POST", body: fd })).blob();
    if (query.file !== file) return;
    if (query.objectUrl) URL.revokeObjectURL(query.objectUrl);
    query.objectUrl = URL.createObjectURL(blob);
    els.queryImg.onerror = null;
    els.queryImg.dataset.preview = "server";
    showQuery(query.objectUrl, `Query image: uploaded file ${file.name}`, mine);
  } catch (e) {
    if (query.file !== file) return;
    els.queryImg.dataset.preview = "none";
    showQuery(null, "", `${mine} (no preview: ${e.message})`);
  }
}

function setQueryFile(file, { token = null } = {}) {
  if (!file) return;
  forgetFile();
  query.file = file;
  query.token = token;
  query.name = file.name;
  const caption = `Query: ${file.name}`;
  if (TIFF.test(file.name) || file.type === "image/tiff") {
    showQuery(null, "", `${caption} (preparing a preview…)`);
    serverPreview(file, caption);
  } else {
    query.objectUrl = URL.createObjectURL(file);
    els.queryImg.dataset.preview = "browser";
    els.queryImg.onerror = () => { els.queryImg.onerror = null; serverPreview(file, caption); };
    showQuery(query.objectUrl, `Query image: uploaded file ${file.name}`, caption);
  }
  delete els.drop.dataset.itemId;
  if (!token) commit("file", { force: true });
}

function clearQuery() {
  forgetFile();
  els.queryImg.hidden = true;
  els.queryImg.removeAttribute("src");
  els.queryCaption.textContent =
    "Drop an image here, choose a file, or click any archive image.";
  els.clear.hidden = true;
  els.file.value = "";
  delete els.drop.dataset.itemId;
}

// ------------------------------------------------------------------ controls that depend on others
function updateControls() {
  const eff = effective();
  const chosen = els.method.value;
  const method = eff ? eff.method : chosen;
  let why = "";
  if (!USES_LAM.has(chosen)) why = `λ only weighs the fused methods (WeiCom, min-max, Harris); “${methodName(chosen)}” ignores it.`;
  else if (eff && !USES_LAM.has(method)) why = "λ needs both a query image and a modifier text.";
  const off = !!why;
  els.lam.disabled = off;
  note(els.lamNote, why);
  const strip = document.querySelector("input[name=view][value=strip]");
  strip.disabled = off;
  strip.closest("label").title = off ? "the λ strip needs WeiCom with an image and a text" : "";
  els.download.disabled = !features.format;
  note(els.dlNote, features.format ? "" : "This server cannot export results.");
  els.start.disabled = els.end.disabled = !features.dates;
  note(els.dateNote, features.dates ? "" : "This server cannot filter by date.");
  els.clearArea.hidden = !nav.bbox;
  els.areaInfo.textContent = nav.bbox
    ? `Area: ${nav.bbox.map((x) => fmt(x, 4)).join(", ")} (W, S, E, N)`
    : "Draw an area on the map to search only there.";
}

// ------------------------------------------------------------------ URL state
function stateToUrl() {
  const q = new URLSearchParams();
  if (query.itemId !== null) q.set("item", String(query.itemId));
  else if (query.token) q.set("upload", query.token);
  const text = els.text.value.trim();
  if (text) q.set("text", text);
  if (els.method.value !== DEFAULTS.method) q.set("method", els.method.value);
  if (lam() !== DEFAULTS.lam) q.set("lam", String(lam()));
  if (Number(els.k.value) !== DEFAULTS.k) q.set("k", els.k.value);
  if (els.labelFilter.value) q.set("label", els.labelFilter.value);
  if (view() !== DEFAULTS.view) q.set("view", view());
  if (nav.bbox) q.set("bbox", nav.bbox.join(","));
  if (els.start.value) q.set("start", els.start.value);
  if (els.end.value) q.set("end", els.end.value);
  if (nav.page) q.set("page", String(nav.page + 1));
  if (nav.bpage) q.set("browse", String(nav.bpage + 1));
  const s = q.toString();
  return s ? `?${s}` : location.pathname;
}

let lastPush = { reason: "", at: 0 };
// A new history entry per change; quick repeats of the same control (typing, sliding) replace
// the entry instead of piling up.
function syncUrl(reason, replace = false, force = false) {
  const url = stateToUrl();
  const here = location.search || location.pathname;
  if (url === here && !force) return;
  const now = Date.now();
  const coalesce = reason === lastPush.reason && now - lastPush.at < 1500 &&
    (reason === "lam" || reason === "text");
  if (replace || coalesce) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  lastPush = { reason, at: now };
}

function setSelect(sel, value, fallback) {
  const v = String(value);
  if (![...sel.options].some((o) => o.value === v)) {
    if (v && fallback === undefined) {
      const o = document.createElement("option");
      o.value = v;
      o.textContent = v;
      sel.append(o);
    } else {
      sel.value = String(fallback);
      return;
    }
  }
  sel.value = v;
}

// The controls from the URL (page load, back/forward).
function applyUrl() {
  const q = new URLSearchParams(location.search);
  const item = q.get("item");
  const upload = q.get("upload");
  if (item !== null && /^\d+$/.test(item)) {
    if (query.itemId !== Number(item)) setQueryItem({ id: Number(item) }, { silent: true });
  } else if (upload && /^[0-9a-f]{64}$/.test(upload)) {
    if (query.token !== upload && uploaded.has(upload)) {
      setQueryFile(uploaded.get(upload), { token: upload });
    } else if (query.token !== upload) {
      clearQuery();
      query.token = upload;
      showQuery(null, "", "Query: an earlier upload (kept by the server for a while)");
    }
  } else if (query.itemId !== null || query.file || query.token) {
    clearQuery();
  }
  els.text.value = q.get("text") || "";
  setSelect(els.method, q.get("method") || DEFAULTS.method, DEFAULTS.method);
  const l = Number(q.get("lam"));
  els.lam.value = String(q.has("lam") && l >= 0 && l <= 1 ? l : DEFAULTS.lam);
  els.lamValue.textContent = fmt(lam(), 2);
  setSelect(els.k, q.get("k") || DEFAULTS.k, DEFAULTS.k);
  setSelect(els.labelFilter, q.get("label") || "");
  const v = q.get("view") === "strip" ? "strip" : "grid";
  document.querySelector(`input[name=view][value=${v}]`).checked = true;
  const bb = (q.get("bbox") || "").split(",").map(Number);
  nav.bbox = bb.length === 4 && bb.every(Number.isFinite) && bb[0] <= bb[2] && bb[1] <= bb[3]
    ? bb : null;
  els.start.value = q.get("start") || "";
  els.end.value = q.get("end") || "";
  nav.page = Math.max(0, (parseInt(q.get("page"), 10) || 1) - 1);
  nav.bpage = Math.max(0, (parseInt(q.get("browse"), 10) || 1) - 1);
  mapView.showArea(nav.bbox);
}

function refresh() {
  updateControls();
  if (effective()) runSearch(); else browse();
}

// A control changed: the URL records it (new history entry) and the results follow.
function commit(reason, { keepPage = false, force = false } = {}) {
  if (!keepPage) { nav.page = 0; nav.bpage = 0; }
  syncUrl(reason, false, force);
  if (ready) refresh();
}

// ------------------------------------------------------------------ the map
// Leaflet, shipped with the package (no CDN). With no reachable basemap it draws a graticule and
// the archive's coverage outline; hits are points (or their footprints) coloured by rank.
function makeMap() {
  const none = {
    showHits() {}, highlight() {}, addSeen() {}, showArea() {}, setCoverage() {}, fit() {},
  };
  if (!window.L) {
    els.legend.textContent = "The map library did not load.";
    return none;
  }
  const L = window.L;
  const map = L.map(els.map, { worldCopyJump: true, zoomSnap: 0.5, boxZoom: false,
                               zoomControl: false });
  L.control.zoom({ position: "topright" }).addTo(map);
  map.attributionControl.setPrefix("Leaflet");
  map.setView([20, 0], 1);
  const graticule = L.layerGroup().addTo(map);
  const coverage = L.layerGroup().addTo(map);
  const hitsLayer = L.featureGroup().addTo(map);
  const areaLayer = L.layerGroup().addTo(map);
  const layers = new Map();  // item id -> its map layer
  const seen = new Map();  // item id -> [lon, lat] (for a coverage outline the page computes)
  let coverageGeom = null;
  let basemapOk = false;
  let hasBasemap = false;
  let drawGraticule = true;
  let ranked = false;
  let shown = 0;
  let allSeen = false;  // every item's position is in `seen`

  function step(span) {
    const steps = [90, 45, 30, 20, 10, 5, 2, 1, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002,
      0.001, 0.0005, 0.0002, 0.0001];
    return steps.find((s) => span / s >= 3) || steps[steps.length - 1];
  }

  function redrawGraticule() {
    graticule.clearLayers();
    if (!drawGraticule) return;
    const b = map.getBounds();
    const w = Math.max(b.getWest(), -180), e = Math.min(b.getEast(), 180);
    const s = Math.max(b.getSouth(), -85), n = Math.min(b.getNorth(), 85);
    const st = step(Math.max(e - w, n - s));
    const digits = Math.max(0, Math.ceil(-Math.log10(st)));
    const style = { color: "#8c8c8c", weight: 1, opacity: 0.6, interactive: false };
    for (let x = Math.ceil(w / st) * st; x <= e; x += st) {
      graticule.addLayer(L.polyline([[s, x], [n, x]], style));
      const lbl = L.divIcon({ className: "grat-label", html: "", iconSize: null,
                              iconAnchor: [-3, 15] });
      const m = L.marker([s, x], { icon: lbl, interactive: false, keyboard: false });
      const text = `${fmt(Math.abs(x), digits)}°${x < 0 ? "W" : "E"}`;
      m.on("add", () => { m.getElement().textContent = text; });
      graticule.addLayer(m);
    }
    for (let y = Math.ceil(s / st) * st; y <= n; y += st) {
      graticule.addLayer(L.polyline([[y, w], [y, e]], style));
      if (y - s < (n - s) * 0.06) continue;  // no label on top of the meridians' labels
      const lbl = L.divIcon({ className: "grat-label", html: "", iconSize: null,
                              iconAnchor: [-3, -2] });
      const m = L.marker([y, w], { icon: lbl, interactive: false, keyboard: false });
      const text = `${fmt(Math.abs(y), digits)}°${y < 0 ? "S" : "N"}`;
      m.on("add", () => { m.getElement().textContent = text; });
      graticule.addLayer(m);
    }
  }
  map.on("moveend", redrawGraticule);

  function setBasemap(template, attribution) {
    if (!template) return;
    hasBasemap = true;
    const tiles = L.tileLayer(template, { maxZoom: 19, attribution: attribution || "basemap" });
    let loaded = 0;
    tiles.on("tileload", () => {
      loaded += 1;
      if (!basemapOk) { basemapOk = true; drawGraticule = false; redrawGraticule(); legend(); }
    });
    tiles.on("tileerror", () => {
      if (!loaded && !drawGraticule) { drawGraticule = true; redrawGraticule(); legend(); }
    });
    tiles.addTo(map);
    tiles.bringToBack();
    legend();
  }

  // Andrew's monotone chain: the convex hull of the points seen (when /info has no coverage).
  function hull(pts) {
    const p = [...pts].sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    if (p.length < 3) return p;
    const cross = (o, a, b) => (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]);
    const half = (pts) => {
      const h = [];
      for (const q of pts) {
        while (h.length >= 2 && cross(h[h.length - 2], h[h.length - 1], q) <= 0) h.pop();
        h.push(q);
      }
      return h.slice(0, -1);
    };
    return half(p).concat(half([...p].reverse()));
  }

  const coverStyle = { color: "#444", weight: 1.5, dashArray: "5 4", fill: false,
                       interactive: false };
  function drawCoverage() {
    coverage.clearLayers();
    if (coverageGeom) {
      coverage.addLayer(L.geoJSON(coverageGeom, { style: () => coverStyle }));
      return;
    }
    const h = hull([...seen.values()]);
    if (!h.length) return;
    if (h.length < 3) {
      const lats = h.map((q) => q[1]), lons = h.map((q) => q[0]);
      const pad = 0.01;
      coverage.addLayer(L.rectangle([[Math.min(...lats) - pad, Math.min(...lons) - pad],
        [Math.max(...lats) + pad, Math.max(...lons) + pad]], coverStyle));
    } else {
      coverage.addLayer(L.polygon(h.map((q) => [q[1], q[0]]), coverStyle));
    }
  }

  function legend() {
    const parts = [];
    if (allSeen && !seen.size && !coverageGeom) {
      els.legend.textContent = "No item in this archive has coordinates.";
      return;
    }
    if (!layers.size) parts.push(shown ? "no result on this page has coordinates" : "");
    else if (ranked) parts.push("coloured by rank: dark = best");
    if (coverageGeom) parts.push("dashed: archive coverage");
    else if (seen.size) {
      parts.push(allSeen ? "dashed: outline of all items" : "dashed: outline of the items seen");
    }
    if (drawGraticule) parts.push(hasBasemap ? "basemap unreachable: lon/lat grid"
      : "no basemap: lon/lat grid");
    els.legend.textContent = parts.filter(Boolean).join(" · ");
  }

  function style(rank, n, on) {
    const c = rank ? rankColour(rank, n) : "#0b5cad";
    return { color: on ? "#ffbf47" : "#1b1b1b", weight: on ? 4 : 1, fillColor: c,
             fillOpacity: on ? 0.95 : 0.8, opacity: 1 };
  }

  function showHits(hits, isRanked) {
    hitsLayer.clearLayers();
    layers.clear();
    ranked = isRanked;
    shown = hits.length;
    const n = hits.reduce((a, h) => Math.max(a, h.rank || 0), 0);
    // draw worst first so the best rank is on top
    const order = [...hits].sort((a, b) => (b.rank || 0) - (a.rank || 0));
    for (const h of order) {
      let layer = null;
      const st = style(h.rank, n, false);
      if (h.footprint) {
        layer = L.geoJSON(h.footprint, {
          style: () => st,
          pointToLayer: (_f, ll) => L.circleMarker(ll, { ...st, radius: 7 }),
        });
      } else if (num(h.lon) && num(h.lat)) {
        layer = L.circleMarker([h.lat, h.lon], { ...st, radius: 7 });
      }
      if (!layer) continue;
      layer.hit = h;
      layer.n = n;
      const tip = document.createElement("span");
      tip.textContent = `${h.rank ? "#" + h.rank + " " : ""}${basename(h.path)}`;
      layer.bindTooltip(tip, { direction: "top", offset: [0, -6] });
      layer.on("mouseover", () => { highlight(h.id, true); linkCard(h.id, true); });
      layer.on("mouseout", () => { highlight(h.id, false); linkCard(h.id, false); });
      layer.on("click", () => linkCard(h.id, true, true));
      hitsLayer.addLayer(layer);
      layers.set(h.id, layer);
    }
    addSeen(hits);
    legend();
    els.map.dataset.hits = String(layers.size);
    if (layers.size) fit();
  }

  // Fit the hits, and the drawn area with them (so the filter stays in view).
  function fit() {
    const b = hitsLayer.getBounds();
    if (!b.isValid()) return;
    const area = areaLayer.getLayers()[0];
    if (area) b.extend(area.getBounds());
    map.fitBounds(b.pad(0.1), { maxZoom: 14, animate: false });
  }

  function linkCard(id, on, scroll = false) {
    const el = els.results.querySelector(`.hit[data-id="${id}"]`);
    if (!el) return;
    el.classList.toggle("linked", on);
    if (scroll) { el.scrollIntoView({ block: "nearest", behavior: "smooth" }); el.focus(); }
  }

  function highlight(id, on) {
    const layer = layers.get(id);
    if (!layer) return;
    layer.setStyle(style(layer.hit.rank, layer.n, on));
    if (on) { layer.bringToFront(); layer.openTooltip(); } else layer.closeTooltip();
  }

  function addSeen(items, complete = false) {
    if (coverageGeom) return;
    const before = seen.size;
    for (const h of items) if (num(h.lon) && num(h.lat)) seen.set(h.id, [h.lon, h.lat]);
    if (seen.size !== before) drawCoverage();
    if (complete) {
      allSeen = true;
      els.map.classList.toggle("empty", !seen.size);
      if (!seen.size) map.invalidateSize();
    }
    legend();
  }

  function setCoverage(geom) {
    coverageGeom = geom || null;
    drawCoverage();
    legend();
    if (!layers.size && coverage.getLayers().length) {
      const b = L.featureGroup(coverage.getLayers()).getBounds();
      if (b.isValid()) map.fitBounds(b.pad(0.1), { animate: false });
    }
  }

  function showArea(bbox) {
    areaLayer.clearLayers();
    if (!bbox) return;
    areaLayer.addLayer(L.rectangle([[bbox[1], bbox[0]], [bbox[3], bbox[2]]],
      { color: "#0b5cad", weight: 2, fillOpacity: 0.06, interactive: false }));
  }

  // Draw a rectangle: with "Draw area" pressed, drag on the map (no plugin needed).
  let drawing = false;
  let startLL = null;
  let rect = null;
  function setDrawing(on) {
    drawing = on;
    els.draw.setAttribute("aria-pressed", String(on));
    els.map.classList.toggle("drawing", on);
    if (on) map.dragging.disable(); else map.dragging.enable();
    els.draw.textContent = on ? "Drag on the map…" : "Draw area";
  }
  els.draw.addEventListener("click", () => setDrawing(!drawing));
  map.on("mousedown", (e) => {
    if (!drawing) return;
    e.originalEvent.preventDefault();  // no text selection while dragging
    startLL = e.latlng;
    rect = L.rectangle([startLL, startLL], { color: "#0b5cad", weight: 2, dashArray: "4 3",
                                             fillOpacity: 0.08, interactive: false });
    areaLayer.addLayer(rect);
  });
  map.on("mousemove", (e) => { if (drawing && startLL) rect.setBounds([startLL, e.latlng]); });
  map.on("mouseup", (e) => {
    if (!drawing || !startLL) return;
    const b = L.latLngBounds(startLL, e.latlng);
    startLL = null;
    setDrawing(false);
    const r = (x) => Math.round(x * 1e5) / 1e5;
    const w = b.getWest(), e2 = b.getEast();
    if (b.getNorth() === b.getSouth() || w === e2) { showArea(nav.bbox); return; }
    nav.bbox = [r(Math.max(w, -180)), r(Math.max(b.getSouth(), -90)),
                r(Math.min(e2, 180)), r(Math.min(b.getNorth(), 90))];
    showArea(nav.bbox);
    commit("bbox");
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && drawing) { startLL = null; setDrawing(false); showArea(nav.bbox); }
  });

  redrawGraticule();
  legend();
  window.rscirMap = map;  // for the browser tests and the curious
  return { showHits, highlight, addSeen, showArea, setCoverage, setBasemap, fit };
}

let mapView = { showHits() {}, highlight() {}, addSeen() {}, showArea() {}, setCoverage() {},
                fit() {} };

// ------------------------------------------------------------------ downloads
async function download() {
  if (!lastRequest) {
    setStatus("Run a search first; the download holds its results.", true);
    return;
  }
  const format = els.dlFormat.value;
  const req = { ...lastRequest, format };
  const image = query.itemId === null && !req.image_token && req.method !== "text";
  try {
    let r;
    if (image && query.file) {
      const fd = new FormData();
      fd.append("image", query.file, query.file.name || "query");
      fd.append("query", JSON.stringify(req));
      r = await raw("/search", { method: "POST", body: fd });
    } else {
      r = await raw("/search", { method: "POST", body: JSON.stringify(req),
                                 headers: { "Content-Type": "application/json" } });
    }
    const blob = await r.blob();
    const cd = r.headers.get("content-disposition") || "";
    const m = /filename="?([^";]+)"?/.exec(cd);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob);
    a.download = m ? m[1] : `rscir-results.${format}`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
  } catch (e) {
    setStatus(`Download failed: ${e.message}`, true);
  }
}

// ------------------------------------------------------------------ wiring
function wire() {
  els.form.addEventListener("submit", (e) => { e.preventDefault(); commit("submit"); });
  els.file.addEventListener("change", () => setQueryFile(els.file.files[0]));
  els.clear.addEventListener("click", () => { clearQuery(); commit("clear"); });
  for (const ev of ["dragenter", "dragover"]) {
    els.drop.addEventListener(ev, (e) => { e.preventDefault(); els.drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    els.drop.addEventListener(ev, () => els.drop.classList.remove("over"));
  }
  els.drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const f = e.dataTransfer && e.dataTransfer.files[0];
    if (f) setQueryFile(f);
  });
  const lamSoon = debounce(() => commit("lam"), 150);
  els.lam.addEventListener("input", () => { els.lamValue.textContent = fmt(lam(), 2); lamSoon(); });
  const textSoon = debounce(() => commit("text"), 300);
  els.text.addEventListener("input", () => { updateControls(); textSoon(); });
  els.text.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); commit("text"); }
  });
  for (const el of [els.method, els.labelFilter, els.k, els.start, els.end]) {
    el.addEventListener("change", () => commit(el.id));
  }
  document.querySelectorAll("input[name=view]").forEach((r) =>
    r.addEventListener("change", () => commit("view")));
  els.prev.addEventListener("click", () => turn(-1));
  els.next.addEventListener("click", () => turn(1));
  els.clearArea.addEventListener("click", () => {
    nav.bbox = null;
    mapView.showArea(null);
    commit("bbox");
  });
  els.fit.addEventListener("click", () => mapView.fit());
  els.download.addEventListener("click", download);
  window.addEventListener("popstate", () => { applyUrl(); if (ready) refresh(); });
}

function turn(d) {
  if (els.results.dataset.view === "browse") nav.bpage = Math.max(0, nav.bpage + d);
  else nav.page = Math.max(0, nav.page + d);
  commit("page", { keepPage: true });
  els.title.scrollIntoView({ block: "start" });
}

// What this server's API accepts: the page offers paging, dates and downloads only where it does.
async function loadFeatures() {
  try {
    const spec = await api("/openapi.json");
    const s = (spec.components && spec.components.schemas) || {};
    const props = (s.SearchRequest && s.SearchRequest.properties) || {};
    const fprops = (s.FilterSpec && s.FilterSpec.properties) || {};
    features.offset = "offset" in props;
    features.format = "format" in props;
    features.dates = "start" in fprops && "end" in fprops;
  } catch { /* an old server: the basic page still works */ }
}

async function loadInfo() {
  try {
    info = await api("/info");
    const m = info.model || {};
    els.info.textContent = `${info.items} images · model ${m.name || "?"} (dim ${info.dim}) · ` +
      `${info.backend} store`;
  } catch (e) {
    els.info.textContent = `Archive info unavailable: ${e.message}`;
  }
  const maxK = (info.limits && info.limits.max_k) || 200;
  const cur = els.k.value;
  els.k.replaceChildren(...K_CHOICES.filter((k) => k <= maxK).map((k) => {
    const o = document.createElement("option");
    o.value = String(k);
    o.textContent = String(k);
    return o;
  }));
  setSelect(els.k, cur, DEFAULTS.k);
  try {
    const { labels } = await api("/labels");
    for (const l of labels) {
      let o = [...els.labelFilter.options].find((x) => x.value === l.name);  // from the URL
      if (!o) {
        o = document.createElement("option");
        o.value = l.name;
        els.labelFilter.append(o);
      }
      o.textContent = `${l.name} (${l.count})`;
    }
  } catch { /* labels are optional */ }
}

// Without a coverage outline from /info, the outline of all item points for small archives
// (a few pages of /items), else of the points seen so far.
async function loadCoverage() {
  if (info.coverage) { mapView.setCoverage(info.coverage); return; }
  mapView.setCoverage(null);
  if (info.georeferenced === 0 || info.items === 0) { mapView.addSeen([], true); return; }
  if (!(info.items > 0 && info.items <= 5000)) return;
  for (let offset = 0; offset < info.items; offset += 500) {
    try {
      const page = await api(`/items?limit=500&offset=${offset}`);
      const last = page.items.length < 500 || offset + 500 >= page.total;
      mapView.addSeen(page.items, last);
      if (last) break;
    } catch { return; }
  }
}

// The controls follow the URL at once and answer at once; the first request waits for /info
// and the API's features (a change made meanwhile is in the state that request reads).
async function main() {
  mapView = makeMap();
  applyUrl();
  wire();
  await Promise.all([loadInfo(), loadFeatures()]);
  if (info.basemap && mapView.setBasemap) {
    mapView.setBasemap(info.basemap, info.basemap_attribution);
  }
  ready = true;
  history.replaceState(null, "", stateToUrl());
  refresh();
  loadCoverage();
}

main();
