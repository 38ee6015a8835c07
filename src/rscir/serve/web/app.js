// rscir web page: plain JS against the HTTP API (POST /search, GET /items, /info, /labels).
// One search is in flight at a time; a newer one aborts the older, so the grid always shows
// the latest query. The request behind the grid is kept in #results[data-request] (tests and
// curious users can replay it against the API).
"use strict";

const NEEDS_TEXT = new Set(["weicom", "average", "sum", "product", "text"]);
const NEEDS_IMAGE = new Set(["weicom", "average", "sum", "product", "image"]);
const STRIP_LAMS = [0, 0.2, 0.4, 0.6, 0.8, 1];
const STRIP_K = 8;

const $ = (id) => document.getElementById(id);
const els = {
  file: $("file"), drop: $("drop"), queryImg: $("query-img"), queryCaption: $("query-caption"),
  clear: $("clear-query"), text: $("text"), lam: $("lam"), lamValue: $("lam-value"),
  method: $("method"), labelFilter: $("label-filter"), k: $("k"), form: $("controls"),
  title: $("results-title"), status: $("status"), results: $("results"), info: $("archive-info"),
};

// The current query image: an archive item, or an uploaded file (sent once, then by token).
const query = { itemId: null, file: null, token: null, objectUrl: null, caption: "" };
let inflight = null;
let seq = 0;

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

async function api(path, options = {}) {
  const r = await fetch(path, options);
  let body = null;
  try { body = await r.json(); } catch { body = null; }
  if (!r.ok) throw new ApiError(r.status, detailText(body && body.detail));
  return body;
}

function debounce(fn, ms) {
  let t = null;
  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };
}

function fmt(x, digits = 4) { return Number(x).toFixed(digits); }

function setStatus(msg, isError = false) {
  els.status.textContent = msg;
  els.status.classList.toggle("error", isError);
}

function lam() { return Number(els.lam.value); }

function hasQueryImage() { return query.itemId !== null || query.file !== null; }

// ------------------------------------------------------------------ the request
function buildRequest() {
  const text = els.text.value.trim();
  const texts = text ? [text] : [];
  let method = els.method.value;
  let note = "";
  const img = hasQueryImage();
  if (!img && !texts.length) return null;
  if (NEEDS_TEXT.has(method) && !texts.length) {
    method = "image";
    note = "type a modifier to compose; showing image-only neighbours";
  } else if (NEEDS_IMAGE.has(method) && !img) {
    method = "text";
    note = "no query image; showing text-only matches";
  }
  const strip = document.querySelector("input[name=view]:checked").value === "strip";
  const req = { texts, method, k: strip ? STRIP_K : Number(els.k.value) };
  if (strip) req.lams = STRIP_LAMS; else req.lam = lam();
  if (query.itemId !== null) req.item_id = query.itemId;
  else if (query.token && method !== "text") req.image_token = query.token;
  if (method === "text") delete req.image_token;  // an item id still excludes itself
  const label = els.labelFilter.value;
  if (label) req.filter = { labels: [label] };
  return { req, note, upload: query.itemId === null && !req.image_token && method !== "text" };
}

async function postSearch(req, upload, signal) {
  if (upload && query.file) {
    const fd = new FormData();
    fd.append("image", query.file, query.file.name || "query");
    fd.append("query", JSON.stringify(req));
    return api("/search", { method: "POST", body: fd, signal });
  }
  return api("/search", {
    method: "POST", body: JSON.stringify(req), signal,
    headers: { "Content-Type": "application/json" },
  });
}

async function runSearch() {
  const built = buildRequest();
  if (!built) { browse(); return; }
  const { req, note } = built;
  let upload = built.upload;
  if (inflight) inflight.abort();
  const ctrl = new AbortController();
  inflight = ctrl;
  const mine = ++seq;
  els.results.setAttribute("aria-busy", "true");
  els.results.dataset.state = "loading";
  try {
    let res;
    try {
      res = await postSearch(req, upload, ctrl.signal);
    } catch (e) {
      if (!(e instanceof ApiError && e.status === 410 && query.file)) throw e;
      delete req.image_token;  // the server forgot the upload: send the file again
      query.token = null;
      upload = true;
      res = await postSearch(req, upload, ctrl.signal);
    }
    if (mine !== seq) return;
    if (upload && res.query.image_token) query.token = res.query.image_token;
    render(res, req);
    const n = res.results.reduce((a, r) => a + r.hits.length, 0);
    const lamText = req.lams ? `${req.lams.length} λ values` : `λ = ${fmt(req.lam, 2)}`;
    setStatus(`${n} results in ${Math.round(res.took_ms)} ms (${req.method}, ${lamText})` +
              (note ? ` · ${note}` : ""));
    els.results.dataset.state = "ready";
  } catch (e) {
    if (e.name === "AbortError" || mine !== seq) return;
    setStatus(`Search failed: ${e.message}`, true);
    els.results.dataset.state = "error";
  } finally {
    if (mine === seq) { els.results.setAttribute("aria-busy", "false"); inflight = null; }
  }
}

const runSearchSoon = debounce(runSearch, 150);

// ------------------------------------------------------------------ rendering
function describe(h) {
  const lines = [`#${h.rank != null ? h.rank : "-"} · id ${h.id} · ${h.path}`];
  if (h.score != null) lines.push(`score ${fmt(h.score, 6)}`);
  const labels = h.labels && h.labels.length ? h.labels.join(", ") : (h.label || "");
  if (labels) lines.push(`class ${labels}`);
  if (h.lon != null && h.lat != null) lines.push(`lon ${fmt(h.lon, 5)}, lat ${fmt(h.lat, 5)}`);
  lines.push(`${h.width}×${h.height} px · click to search from this image`);
  return lines.join("\n");
}

function card(h) {
  const li = document.createElement("li");
  const b = document.createElement("button");
  b.type = "button";
  b.className = "hit";
  b.dataset.id = String(h.id);
  if (h.score != null) { b.dataset.score = String(h.score); b.dataset.rank = String(h.rank); }
  b.title = describe(h);
  const img = document.createElement("img");
  img.src = `/items/${h.id}/thumbnail?size=256`;
  img.alt = `${h.path}${h.label ? " (" + h.label + ")" : ""}`;
  img.loading = "lazy";
  img.decoding = "async";
  const meta = document.createElement("span");
  meta.className = "meta";
  const lab = document.createElement("span");
  lab.className = "label";
  lab.textContent = h.label || `#${h.id}`;
  meta.append(lab);
  if (h.score != null) {
    const s = document.createElement("span");
    s.className = "score";
    s.textContent = fmt(h.score);
    meta.append(s);
  }
  b.append(img, meta);
  b.addEventListener("click", () => setQueryItem(h));
  li.append(b);
  return li;
}

function grid(hits, label) {
  const ol = document.createElement("ol");
  ol.className = "grid";
  ol.setAttribute("aria-label", label);
  hits.forEach((h) => ol.append(card(h)));
  return ol;
}

function render(res, req) {
  const box = els.results;
  box.replaceChildren();
  box.dataset.request = JSON.stringify(req);
  if (req.lams) {
    els.title.textContent = "λ strip";
    box.dataset.view = "strip";
    const cur = lam();
    for (const r of res.results) {
      const row = document.createElement("section");
      row.className = "strip-row";
      row.dataset.lam = String(r.lam);
      if (Math.abs(r.lam - cur) < 1e-9) row.classList.add("current");
      const h = document.createElement("h3");
      h.textContent = `λ = ${fmt(r.lam, 2)}`;
      const ol = grid(r.hits, `results for λ = ${fmt(r.lam, 2)}`);
      ol.className = "row";
      row.append(h, ol);
      box.append(row);
    }
  } else {
    els.title.textContent = "Results";
    box.dataset.view = "grid";
    box.append(grid(res.results[0].hits, "results, best first"));
  }
  box.dataset.lam = req.lams ? "" : String(req.lam);
}

async function browse() {
  if (inflight) inflight.abort();
  const mine = ++seq;
  const label = els.labelFilter.value;
  const qs = new URLSearchParams({ limit: "48" });
  if (label) qs.set("label", label);
  els.results.setAttribute("aria-busy", "true");
  try {
    const page = await api(`/items?${qs}`);
    if (mine !== seq) return;
    els.title.textContent = "Archive";
    els.results.replaceChildren(grid(page.items, "archive images"));
    els.results.dataset.view = "browse";
    delete els.results.dataset.request;
    setStatus(`${page.total} images${label ? " of class " + label : ""}; ` +
              "click one to search from it, or drop your own.");
    els.results.dataset.state = "ready";
  } catch (e) {
    if (mine === seq) setStatus(`Could not list the archive: ${e.message}`, true);
  } finally {
    if (mine === seq) els.results.setAttribute("aria-busy", "false");
  }
}

// ------------------------------------------------------------------ the query image
function showQuery(src, alt, caption) {
  els.queryImg.src = src;
  els.queryImg.alt = alt;
  els.queryImg.hidden = false;
  els.queryCaption.textContent = caption;
  els.clear.hidden = false;
}

function setQueryItem(h) {
  if (query.objectUrl) URL.revokeObjectURL(query.objectUrl);
  Object.assign(query, { itemId: h.id, file: null, token: null, objectUrl: null });
  const what = `${h.path}${h.label ? " (" + h.label + ")" : ""}`;
  showQuery(`/items/${h.id}/thumbnail?size=256`, `Query image: ${what}`,
            `Query: archive item ${h.id}, ${what}`);
  els.drop.dataset.itemId = String(h.id);
  runSearch();
}

function setQueryFile(file) {
  if (!file) return;
  if (query.objectUrl) URL.revokeObjectURL(query.objectUrl);
  const url = URL.createObjectURL(file);
  Object.assign(query, { itemId: null, file, token: null, objectUrl: url });
  showQuery(url, `Query image: uploaded file ${file.name}`, `Query: ${file.name}`);
  delete els.drop.dataset.itemId;
  runSearch();
}

function clearQuery() {
  if (query.objectUrl) URL.revokeObjectURL(query.objectUrl);
  Object.assign(query, { itemId: null, file: null, token: null, objectUrl: null });
  els.queryImg.hidden = true;
  els.queryImg.removeAttribute("src");
  els.queryCaption.textContent =
    "Drop an image here, choose a file, or click any archive image.";
  els.clear.hidden = true;
  els.file.value = "";
  delete els.drop.dataset.itemId;
  runSearch();
}

// ------------------------------------------------------------------ wiring
function wire() {
  els.form.addEventListener("submit", (e) => { e.preventDefault(); runSearch(); });
  els.file.addEventListener("change", () => setQueryFile(els.file.files[0]));
  els.clear.addEventListener("click", clearQuery);
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
  els.lam.addEventListener("input", () => {
    els.lamValue.textContent = fmt(lam(), 2);
    runSearchSoon();
  });
  els.text.addEventListener("input", debounce(runSearch, 300));
  els.text.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); runSearch(); }
  });
  for (const el of [els.method, els.labelFilter, els.k]) el.addEventListener("change", runSearch);
  document.querySelectorAll("input[name=view]").forEach((r) =>
    r.addEventListener("change", runSearch));
}

async function loadInfo() {
  try {
    const info = await api("/info");
    const m = info.model || {};
    els.info.textContent = `${info.items} images · model ${m.name || "?"} (dim ${info.dim}) · ` +
      `${info.backend} store`;
  } catch (e) {
    els.info.textContent = `Archive info unavailable: ${e.message}`;
  }
  try {
    const { labels } = await api("/labels");
    for (const l of labels) {
      const o = document.createElement("option");
      o.value = l.name;
      o.textContent = `${l.name} (${l.count})`;
      els.labelFilter.append(o);
    }
  } catch { /* labels are optional */ }
}

wire();
loadInfo();
browse();
