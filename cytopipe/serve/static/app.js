// cytopipe workspace: uploads (one streamed PUT per file), table upload, run progress polling.
// Plain JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const csrf = () => document.body.dataset.csrf;

async function api(method, url, body, headers) {
  const opts = { method, credentials: "same-origin", headers: Object.assign({ "X-CSRF-Token": csrf() }, headers || {}) };
  if (body !== undefined) opts.body = body;
  const res = await fetch(url, opts);
  let data = null;
  try { data = await res.json(); } catch (e) { data = { detail: res.statusText }; }
  return { ok: res.ok, status: res.status, data };
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text == null ? "" : String(text);
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function sizeText(n) { return n >= 1e6 ? (n / 1e6).toFixed(1) + " MB" : Math.round(n / 1e3) + " kB"; }

async function uploadBatch(zone, files) {
  const study = zone.dataset.study;
  const table = document.getElementById("upload-results");
  const tbody = table.querySelector("tbody");
  const summary = document.getElementById("batch-summary");
  table.hidden = false;
  summary.hidden = false;
  const total = Array.from(files).reduce((s, f) => s + f.size, 0);
  const counts = { ok: 0, warning: 0, rejected: 0, duplicate: 0 };
  const b = await api("POST", `/api/studies/${study}/batches`, JSON.stringify({ files: files.length, bytes: total }),
                      { "Content-Type": "application/json" });
  if (!b.ok) { summary.textContent = "Batch refused: " + b.data.detail; summary.className = "error"; return; }
  const maxFile = Number(zone.dataset.maxFile);
  let done = 0;
  const rows = new Map();
  for (const file of files) {  // one row per file, in the order dropped, before any answer
    const tr = document.createElement("tr");
    tr.dataset.name = file.name;
    cell(tr, file.name);
    const status = cell(tr, "waiting");
    const reason = cell(tr, "");
    const events = cell(tr, "", "num");
    cell(tr, sizeText(file.size), "num");
    tbody.appendChild(tr);
    rows.set(file, { tr, status, reason, events });
  }
  async function send(file) {
    const { tr, status, reason, events } = rows.get(file);
    status.textContent = "uploading…";
    let res;
    if (file.size > maxFile) {
      res = { ok: false, status: 413, data: { detail: `larger than the file limit of ${sizeText(maxFile)}` } };
    } else {
      try {
        res = await api("PUT", `/api/studies/${study}/uploads?name=${encodeURIComponent(file.name)}&batch=${b.data.batch_id}`,
                        file, { "Content-Type": "application/octet-stream" });
      } catch (e) { res = { ok: false, status: 0, data: { detail: "connection lost: " + e } }; }
    }
    let st;
    if (res.ok) {
      st = res.data.status;
      reason.textContent = res.data.duplicate ? res.data.message : [res.data.reason].concat(res.data.notes || []).filter(Boolean).join("; ");
      events.textContent = res.data.events == null ? "" : res.data.events;
      if (res.data.duplicate) counts.duplicate++;
    } else {
      st = "rejected";
      reason.textContent = res.data.detail || ("HTTP " + res.status);
    }
    counts[st] = (counts[st] || 0) + 1;
    status.textContent = st + (res.ok && res.data.duplicate ? " (already uploaded)" : "");
    tr.className = "status-" + st;
    done++;
    summary.textContent = `${done} of ${files.length} files: ${counts.ok} ok, ${counts.warning} with warnings, ${counts.rejected} rejected` +
      (counts.duplicate ? `, ${counts.duplicate} already uploaded` : "");
  }
  // two files at a time: one file's fsync and database row overlap the next one's bytes
  let next = 0;
  async function worker() { while (next < files.length) await send(files[next++]); }
  await Promise.all([worker(), worker()]);
  summary.dataset.done = "true";
  document.getElementById("to-mapping").hidden = false;
}

function setupUploads() {
  const zone = document.getElementById("drop-zone");
  if (!zone) return;
  const input = document.getElementById("fcs-files");
  input.addEventListener("change", () => { if (input.files.length) uploadBatch(zone, Array.from(input.files)); });
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) uploadBatch(zone, Array.from(e.dataTransfer.files));
  });
  const tableFile = document.getElementById("table-file");
  if (tableFile) tableFile.addEventListener("change", async () => {
    const f = tableFile.files[0];
    if (!f) return;
    const kind = document.getElementById("table-kind").value;
    const out = document.getElementById("table-result");
    const res = await api("PUT", `/api/studies/${zone.dataset.study}/tables/${kind}?name=${encodeURIComponent(f.name)}`, f,
                          { "Content-Type": "application/octet-stream" });
    out.textContent = res.ok ? `${res.data.name}: ${res.data.rows} rows stored as the ${kind} table` : "refused: " + res.data.detail;
    out.className = res.ok ? "note" : "error";
    out.dataset.done = "true";
  });
}

function setupRun() {
  const box = document.getElementById("run-status");
  if (!box) return;
  const id = box.dataset.run;
  const active = (s) => s === "queued" || s === "running";
  if (!active(box.dataset.status)) return;
  const timer = setInterval(async () => {
    let res;
    try { res = await fetch(`/api/runs/${id}`, { credentials: "same-origin" }); } catch (e) { return; }
    if (!res.ok) return;
    const r = await res.json();
    document.getElementById("run-state").textContent = r.status;
    document.getElementById("run-percent").textContent = r.progress.percent;
    document.getElementById("run-progress").value = r.progress.percent;
    document.getElementById("run-log").textContent = r.progress.log;
    const rows = document.querySelectorAll("#run-phases tbody tr");
    r.progress.phases.forEach((p, i) => { if (rows[i]) rows[i].lastElementChild.textContent = `${p.done} / ${p.total}`; });
    const chips = document.querySelectorAll("#run-samples .chip");
    r.progress.samples.forEach((s, i) => { if (chips[i]) chips[i].classList.toggle("done", s.gated); });
    if (!active(r.status)) {
      clearInterval(timer);
      box.dataset.status = r.status;
      if (r.status === "finished") document.getElementById("results-link").hidden = false;
      setTimeout(() => window.location.reload(), 500);
    }
  }, 1000);
}

function drawBars() {
  for (const bar of document.querySelectorAll(".bar[data-pct]")) {
    bar.style.width = Math.max(1, Math.min(100, Number(bar.dataset.pct))) * 0.6 + "px";
  }
}

document.addEventListener("DOMContentLoaded", () => { setupUploads(); setupRun(); drawBars(); });
