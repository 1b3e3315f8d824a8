// raresift labelling page: plain JavaScript, no dependencies.
// Every action (key or click) goes through one queue, so keys pressed quickly are handled in
// order and each label is committed by the server before the page moves on.
"use strict";

const $ = (sel) => document.querySelector(sel);
const body = document.body;
const MODE = body.dataset.mode; // label | grid | evaluate
const PURPOSE = MODE === "evaluate" ? "evaluate" : "label";
const GRID = parseInt(body.dataset.grid, 10) || 16;   // the grid's page size (raresift.settings)
const BATCH = parseInt(body.dataset.batch, 10) || 25; // photos per round (raresift.settings)
const CONCEPT = body.dataset.concept || "default";     // the rare class this page labels (?concept=NAME)

const state = {
  items: [],          // queued photos not labelled yet, in order; items[0] is on screen (single mode)
  undo: [],           // stack of pages: [{item, event}] committed by this tab
  skipped: new Set(), // photos skipped in this tab (they stay queued)
  conflict: null,     // {item, value, current} while a conflict is shown
  marks: new Set(),   // grid: image ids marked positive
  cursor: 0,          // grid: focused tile
  strategies: [],
  status: null,
  evalK: 50,
  // Replies that carry counts also carry `seq`, the id of the newest label event when the server
  // read them. Replies can arrive out of order (a /api/status read before a label may land after
  // the label's own reply), so counts are applied only from a reply at least as new as the newest
  // one applied: seq never decreases on the server.
  seq: -1,            // highest seq applied to the counts (labels, positives)
  statusSeq: -1,      // seq of the /api/status reply applied (chart, round numbers, estimates)
  statusRound: -1,    // its current round id: a reply with the same seq but an older round is older
  stale: 0,           // replies not applied because a newer one had been (body[data-stale])
  // Evidence: where in the photo the score comes from (item.region, in the original file's pixels).
  showRegion: localStorage.getItem("raresift.region") !== "0", // h: the region's box over the photo
  zoom: false,        // z: the photo on screen is the region, decoded from the original file
  whole: false,       // grid, w: whole photos instead of the zoomed regions
};

// ------------------------------------------------------------------ helpers
function who() {
  return ($("#who").value || "").trim() || body.dataset.who;
}

class ApiError extends Error {
  constructor(status, error) {
    super((error && error.message) || `HTTP ${status}`);
    this.status = status;
    this.code = (error && error.code) || "error";
    this.details = error && error.details;
  }
}

// Every API call names the page's concept (labels, rounds and models are per concept).
function withConcept(url) {
  if (CONCEPT === "default" || !url.startsWith("/api/") || url.includes("/file") || url.includes("/crop")) return url;
  return url + (url.includes("?") ? "&" : "?") + "concept=" + encodeURIComponent(CONCEPT);
}

async function api(method, url, data) {
  url = withConcept(url);
  const opts = { method, credentials: "same-origin", headers: {} };
  if (data !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(data);
  }
  const r = await fetch(url, opts);
  let payload = null;
  try { payload = await r.json(); } catch (e) { payload = null; }
  if (!r.ok) throw new ApiError(r.status, payload && payload.error);
  return payload;
}

let pending = 0;
let chain = Promise.resolve();
function run(fn) {
  pending += 1;
  body.dataset.busy = String(pending);
  chain = chain.then(fn).catch(showError).finally(() => {
    pending -= 1;
    body.dataset.busy = String(pending);
  });
  return chain;
}

function banner(html, kind) {
  const b = $("#banner");
  if (!html) { b.hidden = true; b.innerHTML = ""; return; }
  b.className = "banner " + (kind || "info");
  b.innerHTML = html;
  b.hidden = false;
}

function esc(s) {
  return String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function showError(err) {
  if (err instanceof ApiError && err.code === "label_conflict") return; // handled where it happens
  banner(`<b>${esc(err.code || "error")}</b>: ${esc(err.message)}`, "error");
}

function fmtPct(x) { return x == null ? "–" : (100 * x).toFixed(x < 0.1 ? 1 : 0) + "%"; }
function fmtInterval(iv) { return iv ? ` [${fmtPct(iv[0])}, ${fmtPct(iv[1])}]` : ""; }
function photoUrl(item) { return `/api/images/${item.image_id}/file`; }
// The region, cut on the server from the original file and resampled to the size it is shown at
// (not a thumbnail upscaled by the browser).
function zoomSize() {
  const wrap = document.querySelector(".photo-wrap");
  const r = wrap ? wrap.getBoundingClientRect() : { width: 1024, height: 1024 };
  const px = Math.max(r.width, r.height) * (window.devicePixelRatio || 1);
  return Math.min(2048, Math.max(256, Math.ceil(px / 128) * 128)); // in steps, so the browser cache can serve it
}
function cropUrl(item, size) {
  const r = item.region;
  return `/api/images/${item.image_id}/crop?x=${r.x}&y=${r.y}&width=${r.width}&height=${r.height}&size=${size || zoomSize()}`;
}
// A region small enough to be worth zooming to in the grid: at most a quarter of the photo.
function smallRegion(item) {
  if (!item.region || !item.tiles || !item.tiles.length) return false;
  const t = item.tiles;
  const W = Math.max(...t.map((b) => b.x + b.width)), H = Math.max(...t.map((b) => b.y + b.height));
  return item.region.width * item.region.height <= 0.25 * W * H + 1;
}
function ago(t) {
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 60 ? `${Math.round(s)} s ago` : s < 3600 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
}

// ------------------------------------------------------------------ status, estimates, chart
// body[data-status-pending]: status refreshes scheduled or in flight (0: the side panel is up to date
// with the newest reply it asked for).
let statusTimer = null;
let statusInFlight = 0;
function markStatus() {
  body.dataset.statusPending = String((statusTimer === null ? 0 : 1) + statusInFlight);
}

function refreshStatusSoon() {
  clearTimeout(statusTimer);
  statusTimer = setTimeout(() => {
    statusTimer = null;
    refreshStatus().catch(showError);
  }, 150);
  markStatus();
}

// A reply's seq; a reply without one (an older server) counts as the newest, as before.
function seqOf(reply) {
  return reply && typeof reply.seq === "number" ? reply.seq : Math.max(state.seq, 0);
}

function stale() {
  state.stale += 1;
  body.dataset.stale = String(state.stale);
}

async function refreshStatus() {
  statusInFlight += 1;
  markStatus();
  try {
    applyStatus(await api("GET", "/api/status"));
  } finally {
    statusInFlight -= 1;
    markStatus();
  }
}

function applyStatus(s) {
  if (!state.strategies.length) fillStrategies(s.strategies);
  const seq = typeof s.seq === "number" ? s.seq : seqOf(s.project);
  const roundId = s.estimates && s.estimates.round ? s.estimates.round.id : 0;
  // Apply only a reply at least as new as every one applied: by label events first, then, for
  // replies read between the same two label events, by round (a new round adds no label event).
  if (seq < state.seq || (seq === state.statusSeq && roundId < state.statusRound)) { stale(); return; }
  state.status = s;
  state.statusSeq = seq;
  state.statusRound = roundId;
  body.dataset.statusSeq = String(seq);
  showCounts(s.project, seq);
  const est = s.estimates;
  const r = est.round;
  $("#n-left").textContent = r ? String(Math.max(r.left, 0)) : "–";
  $("#e-round").textContent = r && r.labelled
    ? `${r.positives}/${r.labelled} positive (${r.strategy})` : r ? `round ${r.id}, ${r.strategy}` : "–";
  $("#e-prevalence").textContent = est.prevalence
    ? fmtPct(est.prevalence.estimate) + fmtInterval(est.prevalence.interval) : "needs random labels";
  drawChart(s.history, est.prevalence && est.prevalence.estimate);
}

// Show the counts of a reply (`p`: labels, positives, seq) unless a newer reply was shown already.
function showCounts(p, seq) {
  if (seq === undefined) seq = seqOf(p);
  if (seq < state.seq) { stale(); return false; }
  state.seq = seq;
  body.dataset.seq = String(seq);
  $("#n-labels").textContent = String(p.labels);
  $("#n-positives").textContent = String(p.positives);
  return true;
}

function fillStrategies(names) {
  names = names.filter((n) => n !== "similar"); // "more like these" (m) picks its own examples
  state.strategies = names;
  const sel = $("#strategy");
  const saved = localStorage.getItem(`raresift.strategy.${MODE}`);
  sel.innerHTML = names.map((n) => `<option>${esc(n)}</option>`).join("");
  let pick = saved && names.includes(saved) ? saved : "default";
  if (!saved && MODE === "grid" && names.includes("top")) pick = "top"; // a grid page collects positives fastest
  sel.value = pick;
}

function drawChart(points, prevalence) {
  const svg = $("#chart");
  const W = 300, H = 170, L = 34, R = 8, T = 8, B = 24;
  const maxX = Math.max(10, ...points.map((p) => p[0]));
  const maxY = Math.max(2, ...points.map((p) => p[1]));
  const x = (v) => L + (v / maxX) * (W - L - R);
  const y = (v) => H - B - (v / maxY) * (H - T - B);
  let out = `<line x1="${L}" y1="${H - B}" x2="${W - R}" y2="${H - B}" class="axis"/>`;
  out += `<line x1="${L}" y1="${T}" x2="${L}" y2="${H - B}" class="axis"/>`;
  for (const v of [0, Math.round(maxX / 2), maxX]) {
    const anchor = v === 0 ? "start" : v === maxX ? "end" : "middle";
    out += `<text x="${x(v)}" y="${H - 8}" class="tick" text-anchor="${anchor}">${v}</text>`;
  }
  for (const v of [0, Math.round(maxY / 2), maxY]) out += `<text x="${L - 5}" y="${y(v) + 4}" class="tick" text-anchor="end">${v}</text>`;
  if (prevalence) {
    const endX = Math.min(maxX, maxY / Math.max(prevalence, 1e-9));
    out += `<line x1="${x(0)}" y1="${y(0)}" x2="${x(endX)}" y2="${y(prevalence * endX)}" class="random"><title>random sampling at the estimated prevalence</title></line>`;
  }
  const pts = points.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  out += `<polyline points="${pts}" class="found"/>`;
  out += `<text x="${L + 6}" y="${T + 10}" class="legend found-text">— found</text>`;
  if (prevalence) out += `<text x="${L + 6}" y="${T + 22}" class="legend">┄ random at the estimated prevalence</text>`;
  svg.innerHTML = out;
}

// ------------------------------------------------------------------ queue
async function loadQueue(limit) {
  const data = await api("GET", `/api/queue?purpose=${PURPOSE}&limit=${limit}`);
  const fresh = data.items.filter((it) => !state.skipped.has(it.image_id));
  const skipped = data.items.filter((it) => state.skipped.has(it.image_id));
  state.items = fresh.concat(skipped);
  if (!fresh.length) state.skipped.clear();
  return state.items;
}

async function newRound(extra) {
  const n = parseInt($("#batch").value, 10) || (MODE === "label" ? BATCH : GRID);
  const req = Object.assign({ n, strategy: $("#strategy").value || "default", who: who() }, extra || {});
  const q = ($("#query").value || "").trim();
  if (q && req.query === undefined && !req.examples && !req.evaluate) req.query = q;
  banner("Training and choosing the next photos…", "info");
  const data = await api("POST", "/api/rounds", req);
  banner(null);
  refreshStatusSoon();
  return data.items;
}

async function ensureItems(limit) {
  if (state.items.length) return;
  await loadQueue(limit);
  if (!state.items.length && PURPOSE === "label" && ($("#auto").checked || !state.status || !state.status.project.labels)) {
    await newRound();
    await loadQueue(limit);
  }
}

// ------------------------------------------------------------------ single-photo mode
function preload(items) {
  for (const it of items) {
    const im = new Image(); im.src = photoUrl(it);
    if (it.region) { const c = new Image(); c.src = cropUrl(it); } // z never waits on the server
  }
}

function drawRegion() {
  const el = $("#region");
  if (!el) return;
  const it = state.items[0];
  const img = $("#photo");
  const on = !!(it && it.region && state.showRegion && !state.zoom && img.naturalWidth);
  body.dataset.region = on ? "1" : "0";
  if (!on) { el.hidden = true; return; }
  const g = photoGeometry();
  const wrap = img.parentElement.getBoundingClientRect();
  const r = it.region;
  Object.assign(el.style, { left: `${g.left - wrap.left + r.x * g.scale}px`, top: `${g.top - wrap.top + r.y * g.scale}px`,
    width: `${r.width * g.scale}px`, height: `${r.height * g.scale}px` });
  el.hidden = false;
}

function toggleRegion() {
  state.showRegion = !state.showRegion;
  localStorage.setItem("raresift.region", state.showRegion ? "1" : "0");
  drawRegion();
}

function toggleZoom() {
  const it = state.items[0];
  if (!it) return;
  if (!it.region && !state.zoom) { banner("This photo has no region yet: the model needs labels of both kinds (and tiles).", "info"); return; }
  state.zoom = !state.zoom;
  clearBox(); // a box drawn on the whole photo means nothing on the zoomed one
  const img = $("#photo");
  img.src = state.zoom ? cropUrl(it) : photoUrl(it);
  body.dataset.zoom = state.zoom ? "1" : "0";
  drawRegion();
}

function showCurrent() {
  const it = state.items[0];
  const img = $("#photo");
  if (img.dataset.imageId !== String(it ? it.image_id : "")) clearBox(); // a box belongs to its photo
  if (!it) {
    img.removeAttribute("src");
    img.dataset.imageId = "";
    $("#photo-caption").textContent = "";
    const e = $("#empty");
    e.innerHTML = "Nothing left to label in this round. Press <kbd>t</kbd> to train and queue the next round.";
    e.hidden = false;
    $("#single").classList.add("idle");
    return;
  }
  $("#empty").hidden = true;
  $("#single").classList.remove("idle");
  if (img.dataset.imageId !== String(it.image_id)) { state.zoom = false; body.dataset.zoom = "0"; }
  img.src = state.zoom && it.region ? cropUrl(it) : photoUrl(it);
  img.dataset.imageId = String(it.image_id);
  drawRegion();
  $("#photo-caption").textContent = it.path;
  $("#f-score").textContent = it.score == null ? "–" : it.score.toFixed(3);
  $("#f-strategy").textContent = it.strategy || "–";
  $("#f-round").textContent = it.round == null ? "–" : String(it.round);
  $("#f-split").textContent = it.split || "–";
  preload(state.items.slice(1, 4));
}

async function commit(pairs) {
  // pairs: [{item, value}]; resolves to the events, or null after a conflict (shown to the person)
  const items = pairs.map((p) => ({ image_id: p.item.image_id, value: p.value, expected: p.item.event }));
  try {
    const res = await api("POST", "/api/labels", { items, who: who() });
    showCounts(res.status);
    refreshStatusSoon();
    return res.events;
  } catch (err) {
    if (err instanceof ApiError && err.code === "label_conflict") {
      const d = err.details || {};
      const p = pairs.find((x) => x.item.image_id === d.image_id) || pairs[0];
      state.conflict = { item: p.item, value: p.value, current: d.current, pairs };
      const cur = d.current;
      const what = !cur || cur.value == null ? "had its label withdrawn"
        : `was labelled <b>${cur.value === "unsure" ? "unsure" : cur.value ? "yes" : "no"}</b>`;
      banner(`Photo <code>${esc(p.item.path)}</code> ${what}${cur ? ` by <b>${esc(cur.who)}</b> ${ago(cur.at)}` : ""}
        since you loaded it. Nothing was overwritten.
        <button data-key="k">Keep theirs <kbd>k</kbd></button> <button data-key="r">Use mine <kbd>r</kbd></button>`, "conflict");
      return null;
    }
    throw err;
  }
}

async function labelCurrent(value) {
  const it = state.items[0];
  if (!it) return;
  const events = await commit([{ item: it, value }]);
  if (!events) return;
  banner(null);
  state.undo.push([{ item: it, event: events[0].id }]);
  state.items.shift();
  await ensureItems(50);
  showCurrent();
}

async function resolveConflict(useMine) {
  const c = state.conflict;
  if (!c) return;
  state.conflict = null;
  banner(null);
  if (useMine) {
    for (const p of c.pairs) if (p.item.image_id === c.item.image_id) p.item.event = c.current ? c.current.id : null;
    const events = await commit(c.pairs);
    if (!events) return;
    state.undo.push(c.pairs.map((p, i) => ({ item: p.item, event: events[i].id })));
  } else if (MODE !== "label") {
    // keep theirs: drop that photo from this page; the rest of the page is not written yet
    state.items = state.items.filter((x) => x.image_id !== c.item.image_id);
    renderGrid();
    return;
  }
  if (MODE === "label") {
    state.items = state.items.filter((x) => x.image_id !== c.item.image_id);
    await ensureItems(50);
    showCurrent();
  } else {
    state.items = state.items.filter((x) => !c.pairs.some((p) => p.item.image_id === x.image_id));
    await nextGridPage();
  }
}

async function undoLast() {
  const page = state.undo.pop();
  const back = [];
  if (!page) {
    // nothing undone in this tab yet: withdraw this person's newest label
    const res = await api("POST", "/api/undo", { who: who() });
    if (res.status) showCounts(res.status);
    back.push(res.item);
  } else {
    for (const entry of page.slice().reverse()) {
      try {
        const res = await api("POST", "/api/undo", { who: who(), image_id: entry.item.image_id, expected: entry.event });
        if (res.status) showCounts(res.status);
        back.unshift(res.item);
      } catch (err) {
        if (err instanceof ApiError && err.code === "label_conflict") {
          const cur = err.details && err.details.current;
          banner(`Not undone: <code>${esc(entry.item.path)}</code> was relabelled by <b>${esc(cur ? cur.who : "someone")}</b> since.`, "conflict");
          continue;
        }
        throw err;
      }
    }
  }
  refreshStatusSoon();
  const ids = new Set(back.map((x) => x.image_id));
  state.items = back.concat(state.items.filter((x) => !ids.has(x.image_id)));
  if (MODE === "label") showCurrent();
  else { state.marks = new Set((page || []).filter((e) => e.item.label === 1).map((e) => e.item.image_id)); renderGrid(); }
}

function skipCurrent() {
  const it = state.items.shift();
  if (!it) return;
  state.skipped.add(it.image_id);
  state.items.push(it);
  showCurrent();
}

// ------------------------------------------------------------------ search with a photo (examples)
// Drop or paste an image anywhere, or drag a box on the photo and press x: the image (or the box of
// the original photo, cut on the server) becomes an example of the project, and photos like it are
// queued first.
async function searchWithExample(req, what) {
  banner("Adding the example and choosing photos like it…", "info");
  const res = await api("POST", "/api/examples", req);
  const items = await newRound({ examples: [res.key], strategy: "default" });
  const ids = new Set(items.map((x) => x.image_id));
  state.items = items.concat(state.items.filter((x) => !ids.has(x.image_id)));
  state.skipped.clear();
  banner(`Queued ${items.length} photos like ${esc(what)}.`, "info");
  body.dataset.example = res.key;
  if (MODE === "label") { clearBox(); showCurrent(); } else { state.marks.clear(); state.cursor = 0; renderGrid(); }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function exampleFromFile(file) {
  if (!file || !/^image\//.test(file.type)) { banner("Drop or paste an image file (jpg, png, ...).", "error"); return; }
  const data = await readFile(file);
  await searchWithExample({ data: data.split(",", 2)[1], name: file.name || "pasted image" }, `<code>${esc(file.name || "the pasted image")}</code>`);
}

const drag = { on: false, x0: 0, y0: 0, box: null }; // box: [x, y, w, h] in the photo's original pixels

function photoGeometry() {
  // The photo is drawn with object-fit: contain inside its element box.
  const img = $("#photo");
  const r = img.getBoundingClientRect();
  const scale = Math.min(r.width / img.naturalWidth, r.height / img.naturalHeight);
  const w = img.naturalWidth * scale, h = img.naturalHeight * scale;
  return { img, r, scale, left: r.left + (r.width - w) / 2, top: r.top + (r.height - h) / 2, w, h };
}

function clearBox() { drag.box = null; const b = $("#box"); if (b) b.hidden = true; body.dataset.box = ""; }

function drawBox(x1, y1, x2, y2) {
  const g = photoGeometry();
  const cx = (v) => Math.max(g.left, Math.min(g.left + g.w, v));
  const cy = (v) => Math.max(g.top, Math.min(g.top + g.h, v));
  const l = cx(Math.min(x1, x2)), t = cy(Math.min(y1, y2)), rgt = cx(Math.max(x1, x2)), btm = cy(Math.max(y1, y2));
  const wrap = $("#photo").parentElement.getBoundingClientRect();
  const b = $("#box");
  Object.assign(b.style, { left: `${l - wrap.left}px`, top: `${t - wrap.top}px`, width: `${rgt - l}px`, height: `${btm - t}px` });
  b.hidden = false;
  drag.box = [(l - g.left) / g.scale, (t - g.top) / g.scale, (rgt - l) / g.scale, (btm - t) / g.scale].map((v) => Math.round(v));
  body.dataset.box = drag.box.join(",");
}

async function searchWithBox() {
  const it = state.items[0];
  if (!it || !drag.box || drag.box[2] < 4 || drag.box[3] < 4) { banner("Drag a box on the photo first, then press <kbd>x</kbd>.", "info"); return; }
  await searchWithExample({ image_id: it.image_id, box: drag.box }, `the box of <code>${esc(it.path)}</code>`);
}

function bindExamples() {
  document.addEventListener("dragover", (e) => { e.preventDefault(); body.classList.add("dropping"); });
  document.addEventListener("dragleave", () => body.classList.remove("dropping"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    body.classList.remove("dropping");
    const file = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    run(() => exampleFromFile(file));
  });
  document.addEventListener("paste", (e) => {
    const t = e.target;
    if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA")) return;
    const file = [...((e.clipboardData && e.clipboardData.files) || [])][0];
    if (file) { e.preventDefault(); run(() => exampleFromFile(file)); }
  });
  const img = $("#photo");
  if (!img) return;
  img.addEventListener("load", drawRegion);
  window.addEventListener("resize", drawRegion);
  img.addEventListener("mousedown", (e) => { e.preventDefault(); if (state.zoom) return; drag.on = true; drag.x0 = e.clientX; drag.y0 = e.clientY; clearBox(); });
  document.addEventListener("mousemove", (e) => { if (drag.on) drawBox(drag.x0, drag.y0, e.clientX, e.clientY); });
  document.addEventListener("mouseup", (e) => {
    if (!drag.on) return;
    drag.on = false;
    drawBox(drag.x0, drag.y0, e.clientX, e.clientY);
    if (!drag.box || drag.box[2] < 4 || drag.box[3] < 4) clearBox();
  });
}

async function moreLikeThis() {
  const it = state.items[0];
  if (!it) return;
  const items = await newRound({ examples: [it.image_id], strategy: "default" });
  const ids = new Set(items.map((x) => x.image_id));
  const now = await api("GET", `/api/images/${it.image_id}`);
  const rest = state.items.slice(1).filter((x) => !ids.has(x.image_id));
  if (now.label === 1) {
    // an example photo is a positive: the learning loop records it as one (undo withdraws it)
    state.undo.push([{ item: now, event: now.event }]);
    state.items = items.filter((x) => x.image_id !== it.image_id).concat(rest);
  } else {
    state.items = [it].concat(items.filter((x) => x.image_id !== it.image_id), rest);
  }
  banner(`Queued ${items.length} photos like <code>${esc(it.path)}</code>.`, "info");
  refreshStatusSoon();
  showCurrent();
}

// Grid: more like the marked photos (they are saved as positives), unlike the others on the page.
async function moreLikeMarked() {
  const shown = page();
  const marked = shown.filter((it) => state.marks.has(it.image_id));
  if (!marked.length) { banner("Mark the photos you want more of (<kbd>Space</kbd> or <kbd>1</kbd>), then press <kbd>m</kbd>.", "info"); return; }
  const others = shown.filter((it) => !state.marks.has(it.image_id));
  const items = await newRound({ strategy: "similar", examples: marked.map((it) => it.image_id),
    counter_examples: others.map((it) => it.image_id), n: GRID });
  const gone = new Set(marked.map((it) => it.image_id)); // labelled positive by the round
  const fresh = new Set(items.map((it) => it.image_id));
  state.items = items.concat(state.items.filter((it) => !gone.has(it.image_id) && !fresh.has(it.image_id)));
  state.marks.clear();
  state.cursor = 0;
  body.dataset.similar = String(items.length);
  banner(`Queued ${items.length} photos like the ${marked.length} marked; each shows its similarity to them.`, "info");
  renderGrid();
}

async function trainNext(extra) {
  const k = parseInt(($("#eval-k") || {}).value, 10) || state.evalK;
  const items = await newRound(MODE === "evaluate" ? Object.assign({ evaluate: true, n: k, strategy: "default" }, extra || {}) : {});
  const ids = new Set(items.map((x) => x.image_id));
  state.items = items.concat(state.items.filter((x) => !ids.has(x.image_id)));
  state.skipped.clear();
  if (MODE === "label") showCurrent(); else { state.marks.clear(); state.cursor = 0; renderGrid(); }
}

async function queueBaseline() {
  const n = parseInt($("#eval-random").value, 10) || 100;
  await trainNext({ strategy: "random", n });
}

// ------------------------------------------------------------------ grid mode
function page() { return state.items.slice(0, GRID); }

function renderGrid() {
  const grid = $("#grid");
  const items = page();
  grid.innerHTML = items.map((it, i) => {
    const zoomed = !state.whole && smallRegion(it); // the region, the whole photo on hover
    return `
    <figure class="tile${state.marks.has(it.image_id) ? " marked" : ""}${i === state.cursor ? " cursor" : ""}${zoomed ? " zoomed" : ""}"
            data-i="${i}" data-image-id="${it.image_id}">
      <img src="${zoomed ? cropUrl(it, 512) : photoUrl(it)}" alt="" loading="eager"${zoomed ? ` data-whole="${photoUrl(it)}" data-crop="${cropUrl(it, 512)}"` : ""}>
      <figcaption>${it.score == null ? "" : it.score.toFixed(2)} <span>${esc(it.strategy || "")}</span></figcaption>
    </figure>`;
  }).join("");
  body.dataset.whole = state.whole ? "1" : "0";
  const e = $("#empty");
  if (!items.length) {
    e.innerHTML = MODE === "evaluate"
      ? "No test photos queued for evaluation. Press <kbd>e</kbd> to queue the model's top-K test photos."
      : "Nothing left to label in this round. Press <kbd>t</kbd> to train and queue the next round.";
    e.hidden = false;
  } else e.hidden = true;
  preload(state.items.slice(GRID, 2 * GRID));
}

function toggle(i, value) {
  const it = page()[i];
  if (!it) return;
  const on = value === undefined ? !state.marks.has(it.image_id) : value;
  if (on) state.marks.add(it.image_id); else state.marks.delete(it.image_id);
  state.cursor = i;
  renderGrid();
}

async function submitGrid() {
  const items = page();
  if (!items.length) return;
  const pairs = items.map((it) => ({ item: it, value: state.marks.has(it.image_id) ? 1 : 0 }));
  const events = await commit(pairs);
  if (!events) return;
  banner(null);
  state.undo.push(pairs.map((p, i) => ({ item: Object.assign({}, p.item, { label: p.value }), event: events[i].id })));
  const done = new Set(items.map((x) => x.image_id));
  state.items = state.items.filter((x) => !done.has(x.image_id));
  await nextGridPage();
  if (MODE === "evaluate") loadEvaluation().catch(showError);
}

async function nextGridPage() {
  state.marks.clear();
  state.cursor = 0;
  if (state.items.length < GRID) {
    await loadQueue(GRID * 2);
    if (!state.items.length && PURPOSE === "label" && $("#auto").checked) {
      await newRound();
      await loadQueue(GRID * 2);
    }
  }
  renderGrid();
}

function moveCursor(dx, dy) {
  const n = page().length;
  if (!n) return;
  const cols = 4;
  let i = state.cursor + dx + dy * cols;
  i = Math.max(0, Math.min(n - 1, i));
  state.cursor = i;
  renderGrid();
}

// ------------------------------------------------------------------ evaluation view
async function loadPrecision() {
  // precision@K of the last evaluation, for the side panel (not queued: it must not hold up labelling)
  const k = parseInt(localStorage.getItem("raresift.evalK"), 10) || 50;
  try {
    const r = await api("GET", `/api/evaluation?k=${k}`);
    if (typeof r.precision_at_k === "number") showPrecision(r, r.k || k);
  } catch (err) { /* no test labels yet: the panel keeps its dash */ }
}

async function loadEvaluation() {
  const k = parseInt($("#eval-k").value, 10) || 50;
  state.evalK = k;
  localStorage.setItem("raresift.evalK", String(k));
  const box = $("#eval-result");
  let r;
  try {
    r = await api("GET", `/api/evaluation?k=${k}`);
  } catch (err) {
    box.innerHTML = `<p class="hint">${esc(err.message)}</p>`;
    return;
  }
  box.innerHTML = renderEvaluation(r, k);
  showPrecision(r, k);
}

function pick(obj, names) {
  for (const n of names) if (obj && obj[n] !== undefined && obj[n] !== null) return obj[n];
  return undefined;
}

function asInterval(v) {
  // raresift.evaluate gives intervals as [low, high]
  return Array.isArray(v) && v.length === 2 ? v : null;
}

function evalNumbers(r) {
  // field names of raresift.evaluate.evaluate()
  return {
    prec: pick(r, ["precision_at_k"]),
    precIv: asInterval(pick(r, ["precision_at_k_ci"])),
    rnd: pick(r, ["random_precision"]),
    rndIv: asInterval(pick(r, ["random_precision_ci"])),
    lift: pick(r, ["lift"]),
    liftIv: asInterval(pick(r, ["lift_ci"])),
  };
}

function showPrecision(r, k) {
  const n = evalNumbers(r);
  $("#e-k").textContent = String(k);
  $("#e-precision").textContent = typeof n.prec === "number" ? fmtPct(n.prec) + fmtInterval(n.precIv) : "–";
}

function renderEvaluation(r, k) {
  const n = evalNumbers(r);
  let html = "";
  if (typeof n.prec === "number") {
    const nRand = typeof r.random_labels === "number" ? ` (${r.random_labels} photos)` : "";
    const bars = [["model top-" + k, n.prec, n.precIv, "model"], ["random" + nRand, n.rnd, n.rndIv, "rand"]]
      .filter((b) => typeof b[1] === "number");
    const W = 420, H = 200, L = 40, B = 28, T = 10;
    const y = (v) => H - B - v * (H - B - T);
    let svg = `<svg class="bars" viewBox="0 0 ${W} ${H}" role="img" aria-label="precision at K, model against random">`;
    for (const v of [0, 0.25, 0.5, 0.75, 1]) svg += `<line x1="${L}" x2="${W - 10}" y1="${y(v)}" y2="${y(v)}" class="gridline"/><text x="${L - 6}" y="${y(v) + 4}" class="tick" text-anchor="end">${v * 100}%</text>`;
    bars.forEach((b, i) => {
      const bx = L + 30 + i * 170, bw = 110;
      svg += `<rect x="${bx}" y="${y(b[1])}" width="${bw}" height="${y(0) - y(b[1])}" class="bar ${b[3]}"/>`;
      if (b[2]) svg += `<line x1="${bx + bw / 2}" x2="${bx + bw / 2}" y1="${y(b[2][0])}" y2="${y(b[2][1])}" class="whisker"/>
        <line x1="${bx + bw / 2 - 12}" x2="${bx + bw / 2 + 12}" y1="${y(b[2][0])}" y2="${y(b[2][0])}" class="whisker"/>
        <line x1="${bx + bw / 2 - 12}" x2="${bx + bw / 2 + 12}" y1="${y(b[2][1])}" y2="${y(b[2][1])}" class="whisker"/>`;
      svg += `<text x="${bx + bw / 2}" y="${H - 8}" class="tick" text-anchor="middle">${esc(b[0])}: ${fmtPct(b[1])}</text>`;
    });
    svg += "</svg>";
    html += svg;
    html += `<p class="headline">precision@${k} = <b>${fmtPct(n.prec)}</b>${fmtInterval(n.precIv)}`;
    if (typeof n.rnd === "number") html += ` against <b>${fmtPct(n.rnd)}</b>${fmtInterval(n.rndIv)} at random`;
    if (typeof n.lift === "number") html += ` — <b>${n.lift.toFixed(1)}×</b> lift${n.liftIv ? ` [${n.liftIv[0]}×, ${n.liftIv[1]}×]` : ""}`;
    html += "</p>";
  }
  if (Array.isArray(r.hints) && r.hints.length) html += `<ul class="hints">${r.hints.map((h) => `<li>${esc(h)}</li>`).join("")}</ul>`;
  const rows = Object.entries(r).filter(([, v]) => v === null || ["number", "string", "boolean"].includes(typeof v) || asInterval(v));
  html += `<details><summary>all numbers</summary><table class="kv">${rows.map(([key, v]) => {
    const iv = asInterval(v);
    const txt = iv ? `[${iv.map((x) => (typeof x === "number" ? x.toFixed(3) : x)).join(", ")}]` : typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(3)) : esc(v);
    return `<tr><th>${esc(key)}</th><td>${txt}</td></tr>`;
  }).join("")}</table></details>`;
  return html;
}

// ------------------------------------------------------------------ keys and clicks
function onKey(key) {
  if (state.conflict) {
    if (key === "k") return run(() => resolveConflict(false));
    if (key === "r") return run(() => resolveConflict(true));
  }
  if (key === "t") return run(() => trainNext());
  if (key === "Backspace" || key === "u") return run(undoLast);
  if (MODE === "label") {
    if (key === "1" || key === "y") return run(() => labelCurrent(1));
    if (key === "0" || key === "n") return run(() => labelCurrent(0));
    if (key === "?") return run(() => labelCurrent("unsure"));
    if (key === "s") return run(async () => skipCurrent());
    if (key === "m") return run(moreLikeThis);
    if (key === "x") return run(searchWithBox);
    if (key === "h") return run(async () => toggleRegion());
    if (key === "z") return run(async () => toggleZoom());
    if (key === "g") { window.location.href = pageUrl("/grid"); return; }
    return;
  }
  if (key === "e" && MODE === "evaluate") return run(() => trainNext());
  if (key === "b" && MODE === "evaluate") return run(queueBaseline);
  if (key === "Enter") return run(submitGrid);
  if (key === "w") return run(async () => { state.whole = !state.whole; renderGrid(); });
  if (key === "m" && MODE === "grid") return run(moreLikeMarked);
  if (key === " " || key === "1" || key === "y") return run(async () => toggle(state.cursor, key === " " ? undefined : true));
  if (key === "0" || key === "n") return run(async () => toggle(state.cursor, false));
  if (key === "ArrowLeft" || key === "h") return run(async () => moveCursor(-1, 0));
  if (key === "ArrowRight" || key === "l") return run(async () => moveCursor(1, 0));
  if (key === "ArrowUp" || key === "k") return run(async () => moveCursor(0, -1));
  if (key === "ArrowDown" || key === "j") return run(async () => moveCursor(0, 1));
}

const HANDLED = new Set(["1", "y", "0", "n", "?", "Backspace", "u", "s", "m", "x", "z", "w", "t", "g", "e", "b", "k", "r", "Enter", " ",
  "ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "h", "j", "l"]);

document.addEventListener("keydown", (ev) => {
  const t = ev.target;
  if (t && (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA")) {
    if (ev.key === "Escape") t.blur();
    return;
  }
  if (ev.ctrlKey || ev.metaKey || ev.altKey || !HANDLED.has(ev.key)) return;
  ev.preventDefault(); // Backspace must not navigate back, Space must not scroll
  onKey(ev.key);
});

// Grid: a zoomed cell shows the whole photo while the pointer is over it.
document.addEventListener("mouseover", (ev) => {
  const im = ev.target.closest && ev.target.closest(".tile.zoomed img");
  if (im && im.dataset.whole) im.src = im.dataset.whole;
});
document.addEventListener("mouseout", (ev) => {
  const im = ev.target.closest && ev.target.closest(".tile.zoomed img");
  if (im && im.dataset.crop) im.src = im.dataset.crop;
});

document.addEventListener("click", (ev) => {
  const btn = ev.target.closest("button[data-key]");
  if (btn) { btn.blur(); onKey(btn.dataset.key); return; }
  const tile = ev.target.closest(".tile");
  if (tile) run(async () => toggle(parseInt(tile.dataset.i, 10)));
});

// ------------------------------------------------------------------ concepts
function pageUrl(path) {
  return CONCEPT === "default" ? path : `${path}?concept=${encodeURIComponent(CONCEPT)}`;
}

async function loadConcepts() {
  const sel = $("#concept");
  if (!sel) return;
  const res = await api("GET", "/api/concepts");
  const names = res.concepts.map((c) => c.concept);
  if (!names.includes(CONCEPT)) names.push(CONCEPT);
  sel.innerHTML = names.map((n) => `<option${n === CONCEPT ? " selected" : ""}>${esc(n)}</option>`).join("")
    + `<option value="">new concept…</option>`;
  body.dataset.concepts = names.join(",");
}

function switchConcept(name) {
  name = (name || "").trim();
  if (!name || name === CONCEPT) return;
  const url = new URL(window.location.href);
  if (name === "default") url.searchParams.delete("concept"); else url.searchParams.set("concept", name);
  window.location.href = url.toString();
}

// ------------------------------------------------------------------ start
function bindForms() {
  for (const a of document.querySelectorAll("header nav a[data-page]")) a.href = pageUrl(a.dataset.page);
  const sel = $("#concept");
  if (sel) sel.addEventListener("change", () => {
    if (sel.value) { switchConcept(sel.value); return; }
    const name = window.prompt("Name of the new concept (letters, digits, _ . -):", "");
    if (name) switchConcept(name); else sel.value = CONCEPT;
  });
  bindExamples();
  const w = $("#who");
  w.value = localStorage.getItem("raresift.who") || "";
  w.placeholder = body.dataset.who;
  w.addEventListener("change", () => localStorage.setItem("raresift.who", w.value.trim()));
  $("#strategy").addEventListener("change", (e) => localStorage.setItem(`raresift.strategy.${MODE}`, e.target.value));
  $("#next-round").addEventListener("click", (e) => { e.target.blur(); run(() => trainNext()); });
  $("#export").addEventListener("click", (e) => {
    e.target.blur();
    run(async () => {
      const top = parseInt($("#export-top").value, 10) || 100;
      const res = await api("POST", "/api/export", { top, fmt: $("#export-fmt").value });
      $("#export-result").textContent = `written to ${res.path}`;
    });
  });
  if (MODE === "evaluate") {
    $("#eval-start").addEventListener("click", (e) => { e.target.blur(); run(() => trainNext()); });
    $("#eval-baseline").addEventListener("click", (e) => { e.target.blur(); run(queueBaseline); });
    $("#eval-refresh").addEventListener("click", (e) => { e.target.blur(); run(loadEvaluation); });
    $("#eval-k").addEventListener("change", () => run(loadEvaluation));
  }
}

async function start() {
  bindForms();
  try {
    await boot();
  } finally {
    body.dataset.ready = "1"; // also after an error (shown in the banner), so the page stays usable
  }
  if (MODE !== "evaluate") loadPrecision();
}

async function boot() {
  await loadConcepts();
  await refreshStatus();
  if (MODE === "label") {
    await ensureItems(50);
    showCurrent();
  } else {
    await loadQueue(GRID * 2);
    if (!state.items.length && MODE === "grid") { await newRound(); await loadQueue(GRID * 2); }
    renderGrid();
    if (MODE === "evaluate") {
      const saved = parseInt(localStorage.getItem("raresift.evalK"), 10);
      if (saved) $("#eval-k").value = String(saved);
      await loadEvaluation();
    }
  }
}

run(start);
