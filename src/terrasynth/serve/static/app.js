// terrasynth serve: the map app's page (plain JavaScript and Leaflet, no build step).
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  settings: null,
  inputs: [], // {record, modality, bands}
  layers: [], // {key, name, kind, modality, presets, bands, preset, band, opacity, visible, url, tile, pane, samples}
  job: null, // {id, info}
  sample: 0,
  poll: null,
};
let map = null;
let basemap = null;

function showMessage(text, note) {
  const box = $("message");
  box.textContent = text;
  box.className = note ? "note" : "";
  box.hidden = !text;
}

async function api(path, options) {
  const response = await fetch(path, options);
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : null;
  if (!response.ok) {
    throw new Error((body && body.error) || `${response.status} ${response.statusText}`);
  }
  return body;
}

function postJson(path, body) {
  return api(path, { method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" } });
}

function element(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el) el[k] = v;
    else el.setAttribute(k, v);
  }
  for (const c of children) el.append(c);
  return el;
}

function fmt(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  return a !== 0 && (a < 0.01 || a >= 1e5) ? v.toExponential(2) : v.toFixed(a < 10 ? 3 : 1);
}

// ---- layers -------------------------------------------------------------------------
function tileUrl(layer) {
  const q = new URLSearchParams({ preset: layer.preset });
  if (layer.band) q.set("band", layer.band);
  if (layer.kind === "input") {
    q.set("modality", layer.modality);
    q.set("bands", layer.bands.join(","));
    return `/api/inputs/${layer.inputId}/tiles/{z}/{x}/{y}.png?${q}`;
  }
  const stem = layer.stem.replace("{i}", String(state.sample));
  return `/api/jobs/${state.job.id}/tiles/${stem}/{z}/{x}/{y}.png?${q}`;
}

const SINGLE_BAND = ["db", "terrain", "spread", "probability", "grey"];

function addLayer(layer) {
  removeLayer(layer.key);
  layer.preset = layer.preset || layer.presets[0];
  layer.opacity = layer.opacity ?? 1;
  layer.visible = layer.visible ?? true;
  layer.pane = `pane-${state.layers.length}-${Math.random().toString(36).slice(2, 8)}`;
  map.createPane(layer.pane).style.zIndex = String(300 + state.layers.length);
  layer.tile = L.tileLayer(tileUrl(layer), {
    pane: layer.pane, maxZoom: 22, maxNativeZoom: 18, opacity: layer.opacity,
    className: `layer-${layer.key}`, bounds: layer.bounds ? L.latLngBounds(layer.bounds) : undefined,
  });
  if (layer.visible) layer.tile.addTo(map);
  state.layers.push(layer);
  renderLayers();
}

function removeLayer(key) {
  const i = state.layers.findIndex((l) => l.key === key);
  if (i < 0) return;
  const old = state.layers[i];
  if (map.hasLayer(old.tile)) map.removeLayer(old.tile);
  state.layers.splice(i, 1);
  renderLayers();
}

function refreshLayer(layer) {
  layer.tile.setUrl(tileUrl(layer));
}

function renderLayers() {
  const list = $("layer-list");
  list.replaceChildren();
  for (const layer of state.layers) {
    const visible = element("input", { type: "checkbox", checked: layer.visible, className: "visible" });
    visible.addEventListener("change", () => {
      layer.visible = visible.checked;
      if (layer.visible) layer.tile.addTo(map); else map.removeLayer(layer.tile);
      updateSwipe();
      renderLegend();
    });
    const preset = element("select", { className: "preset", title: "colour preset" },
      ...layer.presets.map((p) => element("option", { value: p, textContent: p })));
    preset.value = layer.preset;
    const band = element("select", { className: "band", title: "band",
      hidden: !SINGLE_BAND.includes(layer.preset) },
      ...layer.bands.map((b) => element("option", { value: b, textContent: b })));
    band.value = layer.band || defaultBand(layer);
    preset.addEventListener("change", () => {
      layer.preset = preset.value;
      band.hidden = !SINGLE_BAND.includes(layer.preset);
      layer.band = band.hidden ? null : band.value;
      refreshLayer(layer);
      renderLegend();
    });
    band.addEventListener("change", () => { layer.band = band.value; refreshLayer(layer); });
    const opacity = element("input", { type: "range", min: 0, max: 1, step: 0.05,
      value: layer.opacity, className: "opacity", title: "opacity" });
    opacity.addEventListener("input", () => {
      layer.opacity = Number(opacity.value);
      layer.tile.setOpacity(layer.opacity);
    });
    list.append(element("li", { className: "layer-item", dataset: { key: layer.key } },
      visible, element("span", { className: "name", textContent: layer.name, title: layer.name }),
      preset, band, opacity));
  }
  const sampled = state.layers.find((l) => l.samples);
  $("sample-box").hidden = !sampled;
  if (sampled) $("sample").max = String(sampled.samples - 1);
  for (const id of ["swipe-left", "swipe-right"]) {
    const select = $(id);
    const keep = select.value;
    select.replaceChildren(...state.layers.map((l) => element("option", { value: l.key, textContent: l.name })));
    if (state.layers.some((l) => l.key === keep)) select.value = keep;
  }
  if (!$("swipe-right").value || $("swipe-right").value === $("swipe-left").value) {
    const other = state.layers.find((l) => l.key !== $("swipe-left").value);
    if (other) $("swipe-right").value = other.key;
  }
  updateSwipe();
  renderLegend();
}

function defaultBand(layer) {
  const mod = state.settings.modalities[layer.modality];
  return layer.bands[0] || (mod && mod.bands[0]);
}

function renderLegend() {
  const box = $("legend");
  const top = [...state.layers].reverse().find((l) => l.visible);
  box.replaceChildren();
  if (!top) { box.hidden = true; return; }
  const mod = state.settings.modalities[top.modality];
  box.append(element("strong", { textContent: `${top.name}: ${top.preset}` }));
  if (top.preset === "classes" && mod) {
    for (const e of mod.legend) {
      const swatch = element("span", { className: "swatch" });
      swatch.style.background = e.color;
      box.append(element("div", {}, swatch, `${e.code} ${e.name}`));
    }
  } else {
    const ranges = { db: "dB: -25 (black) to 0 (white)", spread: "std: 0 (dark) to 98th percentile",
      truecolor: "red, green, blue", falsecolor: "near infrared, red, green",
      terrain: "elevation, shaded", probability: "0 to 1", grey: "2–98 % stretch" };
    box.append(element("div", { textContent: ranges[top.preset] || "" }));
  }
  box.hidden = false;
}

// ---- swipe --------------------------------------------------------------------------
function clipPane(pane, left, right) {
  const el = map.getPane(pane);
  if (!el) return;
  if (left === null) { el.style.clip = ""; return; }
  const nw = map.containerPointToLayerPoint([0, 0]);
  const se = map.containerPointToLayerPoint(map.getSize());
  el.style.clip = `rect(${nw.y}px, ${nw.x + right}px, ${se.y}px, ${nw.x + left}px)`;
}

function updateSwipe() {
  const on = $("swipe-on").checked;
  $("swipe").hidden = !on;
  let line = $("swipe-line");
  if (!line) {
    line = element("div", { id: "swipe-line" });
    document.querySelector("main").append(line);
  }
  line.hidden = !on;
  const width = map.getSize().x;
  const x = (width * Number($("swipe").value)) / 100;
  line.style.left = `${x}px`;
  for (const layer of state.layers) {
    if (!on) clipPane(layer.pane, null);
    else if (layer.key === $("swipe-left").value) clipPane(layer.pane, 0, x);
    else if (layer.key === $("swipe-right").value) clipPane(layer.pane, x, width);
    else clipPane(layer.pane, null);
  }
}

// ---- inputs -------------------------------------------------------------------------
function addInput(record, modality, bands) {
  const input = { record, modality: modality || record.modality, bands: bands || record.bands };
  state.inputs = state.inputs.filter((i) => i.record.id !== record.id).concat([input]);
  renderInputs();
  inputLayer(input);
  const b = record.bounds;
  map.fitBounds([[b[1], b[0]], [b[3], b[2]]]);
}

function inputLayer(input) {
  const mod = state.settings.modalities[input.modality];
  const b = input.record.bounds;
  addLayer({
    key: `input-${input.record.id}`, name: `input ${input.record.name}`, kind: "input",
    inputId: input.record.id, modality: input.modality, bands: input.bands,
    presets: mod ? mod.presets : ["grey"], bounds: [[b[1], b[0]], [b[3], b[2]]],
  });
}

function renderInputs() {
  const list = $("input-list");
  list.replaceChildren();
  for (const input of state.inputs) {
    const r = input.record;
    const modality = element("select", { className: "modality", title: "modality" },
      ...state.settings.inputs.map((m) => element("option", { value: m, textContent: m })));
    modality.value = input.modality;
    const bands = element("input", { className: "bands", value: input.bands.join(","),
      title: "band names in file order" });
    modality.addEventListener("change", () => {
      input.modality = modality.value;
      const guess = r.guesses.find((g) => g.modality === modality.value);
      const all = state.settings.modalities[modality.value].bands;
      input.bands = guess ? guess.bands : all.slice(0, r.count);
      bands.value = input.bands.join(",");
      inputLayer(input);
    });
    bands.addEventListener("change", () => {
      input.bands = bands.value.split(",").map((s) => s.trim()).filter(Boolean);
      inputLayer(input);
    });
    const remove = element("button", { type: "button", textContent: "✕", title: "remove" });
    remove.addEventListener("click", async () => {
      state.inputs = state.inputs.filter((i) => i !== input);
      removeLayer(`input-${r.id}`);
      renderInputs();
      if (["upload", "stac"].includes(r.source) && !state.job) await api(`/api/inputs/${r.id}`, { method: "DELETE" });
    });
    const best = r.guesses[0];
    const guess = best ? `guessed ${best.modality}: ${best.reason}` : "";
    list.append(element("li", { className: "input-item", dataset: { id: r.id } },
      element("div", {}, element("strong", { textContent: r.name }),
        ` ${r.width} × ${r.height} px, ${r.count} band(s), ${r.dtype}, ${r.crs} `, remove),
      element("div", {}, modality, " ", bands),
      element("div", { className: "guess", textContent: guess })));
  }
}

async function uploadFiles(files) {
  for (const file of files) {
    showMessage(`uploading ${file.name} …`, true);
    try {
      const limit = state.settings.limits.max_bytes;
      if (file.size > limit) throw new Error(`${file.name}: larger than the server's limit of ${Math.round(limit / 2 ** 20)} MiB`);
      const record = await api(`/api/inputs?name=${encodeURIComponent(file.name)}`, {
        method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" },
      });
      addInput(record);
      showMessage("");
    } catch (err) {
      showMessage(`Upload refused: ${err.message}`);
      return;
    }
  }
}

// ---- catalogue search ---------------------------------------------------------------
function setHash(key, value) {
  const params = new URLSearchParams(location.hash.slice(1));
  if (value) params.set(key, value); else params.delete(key);
  location.hash = params.toString();
}

async function startSearch(e) {
  e.preventDefault();
  const value = (id) => $(id).value.trim();
  const body = {
    url: value("stac-url"), collections: value("stac-collections"), bbox: value("stac-bbox"),
    datetime: value("stac-datetime") || null, resolution: value("stac-resolution") || null,
  };
  try {
    const { id } = await postJson("/api/stac", body);
    showMessage("");
    followSearch(id);
  } catch (err) {
    showMessage(`Search refused: ${err.message}`);
  }
}

function followSearch(id) {
  setHash("stac", id);
  $("stac-search").disabled = true;
  pollSearch(id);
}

async function pollSearch(id) {
  let s;
  try {
    s = await api(`/api/stac/${id}`);
  } catch (err) {
    s = { status: "failed", message: err.message };
  }
  const running = !["done", "failed"].includes(s.status);
  $("stac-progress").hidden = !running;
  if (s.total) { $("stac-progress").max = s.total; $("stac-progress").value = s.done; }
  else $("stac-progress").removeAttribute("value");
  const step = s.total ? ` ${s.done}/${s.total}` : "";
  $("stac-status").textContent = running ? `${s.phase || s.status}${step}`
    : s.status === "done" ? s.message : "search failed (see above)";
  $("stac-status").dataset.status = s.status;
  if (running) { setTimeout(() => pollSearch(id), 500); return; }
  $("stac-search").disabled = false;
  setHash("stac", null);
  if (s.status === "done") { for (const record of s.inputs) addInput(record); showMessage(""); }
  else showMessage(`Search failed: ${s.message}`);
}

function mapViewBbox() {
  const b = map.getBounds();
  const clamp = (v, lim) => Math.max(-lim, Math.min(lim, v)).toFixed(5);
  $("stac-bbox").value = [clamp(b.getWest(), 180), clamp(b.getSouth(), 90),
    clamp(b.getEast(), 180), clamp(b.getNorth(), 90)].join(",");
}

// ---- jobs ---------------------------------------------------------------------------
async function startJob() {
  const targets = [...document.querySelectorAll("#targets input:checked")].map((i) => i.value);
  const body = {
    targets,
    inputs: state.inputs.map((i) => ({ id: i.record.id, modality: i.modality, bands: i.bands })),
    num_samples: Number($("samples").value),
    steps: $("steps").value ? Number($("steps").value) : null,
    seed: Number($("seed").value),
  };
  try {
    const { id } = await postJson("/api/jobs", body);
    showMessage("");
    followJob(id);
  } catch (err) {
    showMessage(`Cannot start: ${err.message}`);
  }
}

function followJob(id) {
  state.job = { id, info: null, shown: false };
  setHash("job", id);
  for (const l of [...state.layers]) if (l.kind !== "input") removeLayer(l.key);
  $("downloads").replaceChildren();
  clearTimeout(state.poll);
  pollJob();
}

async function pollJob() {
  const job = state.job;
  let info;
  try {
    info = await api(`/api/jobs/${job.id}`);
  } catch (err) {
    showMessage(`Job ${job.id.slice(0, 8)}: ${err.message}`);
    $("status").textContent = "";
    return;
  }
  job.info = info;
  const s = info.state;
  const running = !["done", "failed", "cancelled"].includes(s.status);
  $("cancel").hidden = !running;
  $("generate").disabled = running;
  $("progress").hidden = !running;
  if (s.total) { $("progress").max = s.total; $("progress").value = s.done; }
  else $("progress").removeAttribute("value");
  const step = s.total ? ` ${s.done}/${s.total}` : "";
  $("status").textContent = `job ${job.id.slice(0, 8)}: ${s.status}${s.phase && running ? ` (${s.phase}${step})` : ""}${s.message ? ` — ${s.message}` : ""}`;
  $("status").dataset.status = s.status;
  if (!state.inputs.length && info.job.inputs.length) await restoreInputs(info.job);
  if (running) { state.poll = setTimeout(pollJob, 500); return; }
  if (s.status === "done" && !job.shown) { job.shown = true; showResults(info); }
  if (s.status === "failed") showMessage(`Generation failed: ${s.message}`);
}

async function restoreInputs(job) {
  for (const item of job.inputs) {
    try {
      const record = await api(`/api/inputs/${item.id}`);
      addInput(record, item.modality, item.bands);
    } catch (err) { /* an input removed since: its layer is left out */ }
  }
}

function showResults(info) {
  state.sample = 0;
  $("sample").value = "0";
  $("sample-label").textContent = "1";
  const bounds = state.inputs[0] ? state.inputs[0].record.bounds : null;
  for (const layer of info.layers) {
    // samples shown, statistics listed (tick them to show them)
    addLayer({ ...layer, kind: "output", visible: Boolean(layer.samples), bounds: bounds ? [[bounds[1], bounds[0]], [bounds[3], bounds[2]]] : undefined });
  }
  const list = $("downloads");
  list.replaceChildren();
  const base = `/api/jobs/${info.id}`;
  for (const f of info.files.filter((f) => f.endsWith(".tif") || f === "item.json" || f.endsWith(".png"))) {
    list.append(element("li", {}, element("a", { href: `${base}/files/${f}`, textContent: f,
      download: f, dataset: { file: f } })));
  }
  list.append(element("li", {}, element("a", { href: `${base}/run.zip`, textContent: "everything (ZIP)",
    download: "", dataset: { file: "run.zip" } })));
}

// ---- values at a pixel --------------------------------------------------------------
async function showValues(e) {
  const box = $("values");
  const { lat, lng } = e.latlng;
  if (!state.job) { box.textContent = `${lat.toFixed(5)}, ${lng.toFixed(5)}: generate first to read values`; return; }
  let report;
  try {
    report = await api(`/api/jobs/${state.job.id}/point?lon=${lng}&lat=${lat}`);
  } catch (err) { showMessage(err.message); return; }
  box.replaceChildren(element("div", { textContent: `lat ${lat.toFixed(5)}, lon ${lng.toFixed(5)}` }));
  for (const input of report.inputs) {
    const rows = input.bands.map((b, i) => element("tr", {}, element("td", { textContent: b }),
      element("td", { textContent: input.values ? fmt(input.values[i]) : "outside" })));
    box.append(element("table", { className: "input-values" },
      element("caption", { textContent: `${input.name} (${input.modality})` }), ...rows));
  }
  for (const [target, t] of Object.entries(report.targets)) {
    const table = element("table", { className: "target-values", dataset: { target } },
      element("caption", { textContent: `${target}: ${t.samples.length} samples` }));
    if (t.classes) {
      table.append(element("tr", {}, element("th", { textContent: "sample" }), element("th", { textContent: "class" })));
      t.classes.forEach((c, i) => table.append(element("tr", {}, element("td", { textContent: String(i + 1) }),
        element("td", { textContent: c || "–" }))));
    } else {
      table.append(element("tr", {}, ...["band", "mean", "std", "range", `sample ${state.sample + 1}`]
        .map((h) => element("th", { textContent: h }))));
      t.bands.forEach((b, i) => table.append(element("tr", {},
        element("td", { textContent: b }), element("td", { textContent: fmt(t.mean[i]) }),
        element("td", { textContent: fmt(t.std[i]) }),
        element("td", { textContent: `${fmt(t.min[i])} … ${fmt(t.max[i])}` }),
        element("td", { textContent: fmt(t.samples[state.sample] ? t.samples[state.sample][i] : null) }))));
    }
    box.append(table);
  }
}

// ---- start --------------------------------------------------------------------------
async function start() {
  map = L.map("map", { zoomControl: true, attributionControl: true }).setView([20, 0], 2);
  map.on("click", showValues);
  map.on("move zoom resize", updateSwipe);
  state.settings = await api("/api/settings");
  const s = state.settings;
  const targets = $("targets");
  for (const m of s.targets) {
    targets.append(element("label", {}, element("input", { type: "checkbox", value: m, checked: m === "s2l2a" }), ` ${m}`));
  }
  $("upload").addEventListener("change", (e) => uploadFiles([...e.target.files]).then(() => { e.target.value = ""; }));
  $("generate").addEventListener("click", startJob);
  $("cancel").addEventListener("click", async () => {
    if (state.job) await api(`/api/jobs/${state.job.id}/cancel`, { method: "POST" });
  });
  $("sample").addEventListener("input", () => {
    state.sample = Number($("sample").value);
    $("sample-label").textContent = String(state.sample + 1);
    for (const l of state.layers) if (l.samples) refreshLayer(l);
  });
  for (const id of ["swipe-on", "swipe-left", "swipe-right"]) $(id).addEventListener("change", updateSwipe);
  $("swipe").addEventListener("input", updateSwipe);
  if (s.basemap) {
    $("basemap-box").hidden = false;
    basemap = L.tileLayer(s.basemap, { maxZoom: 19, attribution: "basemap" });
    $("basemap-on").addEventListener("change", () => {
      if ($("basemap-on").checked) basemap.addTo(map); else map.removeLayer(basemap);
    });
  }
  if (s.folder) {
    const { files } = await api("/api/folder");
    $("folder-files").replaceChildren(...files.map((f) => element("option", { value: f, textContent: f })));
    $("folder-picker").hidden = !files.length;
    $("folder-add").addEventListener("click", async () => {
      try {
        const record = await postJson("/api/folder/pick", { path: $("folder-files").value });
        addInput(record);
        showMessage("");
      } catch (err) { showMessage(`Cannot use it: ${err.message}`); }
    });
  }
  if (s.stac.available) {
    $("stac-form").addEventListener("submit", startSearch);
    $("stac-view").addEventListener("click", mapViewBbox);
  } else {
    $("stac-form").hidden = true;
    $("stac-missing").textContent = s.stac.missing;
    $("stac-missing").hidden = false;
  }
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("job")) followJob(hash.get("job")); // a reload finds its job again
  if (hash.get("stac") && s.stac.available) followSearch(hash.get("stac")); // and its search
  document.body.dataset.ready = "1";
}

start().catch((err) => showMessage(err.message));
