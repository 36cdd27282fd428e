// The page's flow: files in, one card per file (reconstruction, facts, tokens), similarity across cards.

import * as api from "./api.js";
import { cosine, tokenFrames } from "./tokens.js";
import { showComparison, showSplats } from "./views.js";

const $ = (selector, root = document) => root.querySelector(selector);
const cards = []; // {file, root, kind, state, embedding, urls, stop, query}
let limits = {};
let queue = Promise.resolve();

// What the answer is, from the answer: the service decides the modality from the content.
function kindOfAnswer(headers) {
  const type = headers.get("content-type") || "";
  if (type.startsWith("video/")) return "video";
  if (type.startsWith("image/")) return "image";
  return "3D";
}

function fileNameOf(headers, fallback) {
  const match = /filename="([^"]+)"/.exec(headers.get("content-disposition") || "");
  return match ? match[1] : fallback;
}

function setFact(root, key, label, value) {
  if (value === null || value === undefined || value === "") return;
  const facts = $(".facts", root);
  let dd = $(`dd[data-fact="${key}"]`, facts);
  if (!dd) {
    const dt = document.createElement("dt");
    dt.textContent = label;
    dd = document.createElement("dd");
    dd.dataset.fact = key;
    facts.append(dt, dd);
  }
  dd.textContent = value;
}

function setStatus(card, state, text) {
  card.state = state;
  card.root.dataset.state = state;
  $(".status", card.root).textContent = text;
  $(".progress", card.root).hidden = state !== "working";
}

function showError(card, err) {
  const box = $(".error", card.root);
  $(".kind", card.root).textContent = card.kind || "not read";
  box.textContent = err.code ? `${err.message} (${err.status} ${err.code})` : err.message;
  box.hidden = false;
  setStatus(card, "error", "Failed");
  if (err.status === 401) showAuth(err.message);
  if (err.code === "too_large" && card.file.type.startsWith("video/") && !card.query) offerShorterClip(card);
  if (err.code === "cancelled") {
    box.hidden = true;
    setStatus(card, "cancelled", "Cancelled");
  }
}

// A clip over the frame limit can still be tried on its first frames, by the user's choice.
function offerShorterClip(card) {
  const frames = limits.max_frames || 64;
  const retry = document.createElement("button");
  retry.type = "button";
  retry.className = "retry";
  retry.textContent = `Try the first ${frames} frames`;
  retry.addEventListener("click", () => {
    retry.remove();
    $(".error", card.root).hidden = true;
    card.query = `?max_frames=${frames}`;
    queue = queue.then(() => process(card));
  });
  $(".error", card.root).after(retry);
}

function describeAnswer(card, headers, bytes, elapsedMs) {
  const root = card.root;
  setFact(root, "psnr", "Round-trip PSNR", headers.get("x-round-trip-psnr") && `${headers.get("x-round-trip-psnr")} dB`);
  setFact(root, "tokens", "Tokens", headers.get("x-tokens"));
  setFact(root, "grid", "Token grid", headers.get("x-token-grid"));
  setFact(root, "compute", "Compute", headers.get("x-compute-time-ms") && `${headers.get("x-compute-time-ms")} ms`);
  setFact(root, "queue", "Queue", headers.get("x-queue-time-ms") && `${headers.get("x-queue-time-ms")} ms`);
  setFact(root, "batch", "Batch size", headers.get("x-batch-size"));
  setFact(root, "total", "Round trip (browser)", `${elapsedMs.toFixed(0)} ms`);
  setFact(root, "bytes", "Output", `${(bytes / 1024).toFixed(1)} KiB`);
}

function addDownload(card, url, name, label) {
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.textContent = label;
  link.className = "download";
  $(".downloads", card.root).append(link);
}

async function showTokens(card) {
  setStatus(card, "working", "Tokenizing…");
  // The picture shows at most 8 latent frames: two tiles of a video are all it needs.
  const params = new URLSearchParams(card.query);
  if (card.kind === "video") params.set("max_frames", String(Math.min(32, Number(params.get("max_frames")) || 32)));
  const item = await api.tokenize(card.file, `?${params}`);
  setFact(card.root, "dims", "Latent width", item.latents ? String(item.latents.shape[1]) : null);
  if (!item.latents || item.kind === "3D") return;
  const frames = tokenFrames(item).slice(0, 8);
  frames.forEach((canvas) => canvas.classList.add("token-frame"));
  $(".token-frames", card.root).replaceChildren(...frames);
  $(".tokens", card.root).hidden = false;
}

// Videos go through the job API: a progress bar per tile and a cancel button.
async function reconstructVideo(card) {
  const bar = $(".progress", card.root);
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "cancel";
  cancel.textContent = "Cancel";
  $(".status", card.root).after(cancel);
  const job = api.reconstructJob(card.file, card.query, (state) => {
    const { done, total, unit } = state.progress;
    bar.max = Math.max(total, 1);
    bar.value = done;
    const eta = state.eta_s ? `, about ${Math.ceil(state.eta_s)} s left` : "";
    $(".status", card.root).textContent = state.status === "queued" ? "Queued on the server…"
      : `Reconstructing: ${done} of ${total} ${unit}${eta}`;
  });
  card.cancel = job.cancel;
  cancel.addEventListener("click", () => {
    cancel.disabled = true;
    job.cancel();
  });
  try {
    return await job.done;
  } finally {
    cancel.remove();
    bar.removeAttribute("value");
  }
}

async function process(card) {
  setStatus(card, "working", "Reconstructing…");
  try {
    const started = performance.now();
    const isVideo = card.file.type.startsWith("video/");
    const { blob, headers } = isVideo ? await reconstructVideo(card) : await api.reconstruct(card.file, card.query);
    card.kind = kindOfAnswer(headers);
    $(".kind", card.root).textContent = card.kind;
    describeAnswer(card, headers, blob.size, performance.now() - started);
    const url = URL.createObjectURL(blob);
    card.urls.push(url);
    addDownload(card, url, fileNameOf(headers, "reconstruction"), card.kind === "3D" ? "Download PLY" : "Download reconstruction");
    if (card.kind === "3D") card.stop = showSplats(card.root, await blob.arrayBuffer());
    else {
      const original = URL.createObjectURL(card.file);
      card.urls.push(original);
      showComparison(card.root, card.kind, original, url);
      await showTokens(card);
    }
    setStatus(card, "done", "Done");
    await refreshSimilarity();
  } catch (err) {
    showError(card, err);
  }
}

function removeCard(card) {
  card.stop?.();
  if (card.state === "working") card.cancel?.();
  card.urls.forEach((url) => URL.revokeObjectURL(url));
  card.root.remove();
  cards.splice(cards.indexOf(card), 1);
  refreshSimilarity().catch(() => {});
}

function addFile(file) {
  const root = $("#item-template").content.firstElementChild.cloneNode(true);
  const card = { file, root, kind: null, state: "queued", embedding: null, urls: [], stop: null, query: "" };
  $(".name", root).textContent = file.name;
  $(".kind", root).textContent = "…";
  $(".remove", root).addEventListener("click", () => removeCard(card));
  $("#items").prepend(root);
  cards.push(card);
  setStatus(card, "queued", "Queued");
  // One file at a time: the page is a client like any other and should not flood the queue.
  queue = queue.then(() => process(card));
}

// Embeddings are fetched only once two items can be compared.
async function refreshSimilarity() {
  const done = cards.filter((c) => c.state === "done");
  const section = $("#similarity");
  section.hidden = done.length < 2;
  if (done.length < 2) return;
  for (const card of done) {
    if (!card.embedding) card.embedding = await api.embed(card.file, card.query);
  }
  renderSimilarity(done);
}

function renderSimilarity(done) {
  const table = $("#similarity-table");
  const head = document.createElement("tr");
  head.append(document.createElement("th"), ...done.map((c) => cell("th", c.file.name)));
  const rows = done.map((a) => {
    const tr = document.createElement("tr");
    tr.append(cell("th", a.file.name), ...done.map((b) => {
      const value = cosine(a.embedding, b.embedding);
      const td = cell("td", value.toFixed(3));
      td.style.backgroundColor = `hsl(210 70% ${Math.round(95 - 45 * Math.max(0, value))}%)`;
      td.dataset.value = String(value);
      return td;
    }));
    return tr;
  });
  table.replaceChildren(head, ...rows);
}

function cell(tag, text) {
  const el = document.createElement(tag);
  el.textContent = text;
  return el;
}

function showAuth(message) {
  $("#auth").hidden = false;
  $("#key-state").textContent = message || (api.apiKey() ? "key set for this tab" : "this server needs a key");
}

function wireInputs() {
  const drop = $("#drop");
  const input = $("#files");
  input.addEventListener("change", () => {
    [...input.files].forEach(addFile);
    input.value = "";
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    [...e.dataTransfer.files].forEach(addFile);
  });
  $("#key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    api.setApiKey($("#api-key").value.trim());
    $("#api-key").value = "";
    $("#key-state").textContent = "key set for this tab";
    loadInfo();
  });
}

async function loadInfo() {
  try {
    const info = await api.info();
    $("#page-error").hidden = true;
    const model = info.model || {};
    const modes = Object.keys(model.modes || { continuous: 1 }).join(" + ");
    $("#model").textContent = `Model ${model.variant || "?"} (${modes} tokens)` +
      (model.trained === false ? ": untrained, outputs are not meaningful" : "");
    limits = info.limits || {};
    $("#limits").textContent = [
      limits.max_side && `images up to ${limits.max_side} px a side`,
      limits.max_frames && `videos up to ${limits.max_frames} frames`,
      limits.max_upload_bytes && `files up to ${(limits.max_upload_bytes / 2 ** 20).toFixed(0)} MiB`,
    ].filter(Boolean).join(" · ");
    if (info.auth) showAuth();
  } catch (err) {
    if (err.status === 401) {
      $("#model").textContent = "This server needs an API key.";
      showAuth(err.message);
      return;
    }
    const box = $("#page-error");
    box.textContent = `Could not reach the service: ${err.message}`;
    box.hidden = false;
  }
}

wireInputs();
loadInfo();
