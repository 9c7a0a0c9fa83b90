// cytopipe gate review: the queue, a gate over its parent's density (server-made SVG), dragging a
// threshold with the new frequency shown live (from the panel's histogram, then exact from the
// server), keyboard navigation, approve / override / pooled / revert, sign-off. No build step.
"use strict";

(function () {
  const controls = document.getElementById("review-controls");
  if (!controls) return;
  const runId = controls.dataset.run;
  const canReview = controls.dataset.canReview === "1" && controls.dataset.locked !== "1";
  const q = JSON.parse(document.getElementById("queue-data").textContent);
  const csrf = () => document.body.dataset.csrf;
  let items = q.items.slice();
  let shown = [];
  let cur = 0;
  let view = null;          // the current gate (GET /review/gate)
  let pending = {};         // dragged gate numbers, e.g. {"CD25 >=": 3.1}
  let previewSeq = 0;

  async function call(method, url, body) {
    const opts = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf() } };
    if (body !== undefined) { opts.body = JSON.stringify(body); opts.headers["Content-Type"] = "application/json"; }
    const res = await fetch(url, opts);
    let data = null;
    try { data = await res.json(); } catch (e) { data = { detail: res.statusText }; }
    return { ok: res.ok, status: res.status, data };
  }
  const $ = (id) => document.getElementById(id);
  const pct = (v) => (v == null || isNaN(v)) ? "–" : v.toFixed(2) + "%";
  function say(text, bad) { const m = $("action-message"); if (m) { m.textContent = text; m.className = bad ? "error small" : "small"; } }

  // ---- filters -------------------------------------------------------------------------------
  function fillFilter(id, values) {
    const sel = $(id); if (!sel) return;
    for (const v of [...new Set(values)].sort((a, b) => String(a).localeCompare(String(b), undefined, { numeric: true }))) {
      const o = document.createElement("option"); o.value = String(v); o.textContent = String(v); sel.appendChild(o);
    }
    sel.addEventListener("change", () => { cur = 0; render(); });
  }
  fillFilter("f-patient", items.map((i) => i.patient_id));
  fillFilter("f-visit", items.map((i) => i.visit));
  fillFilter("f-arm", items.filter((i) => i.arm != null).map((i) => i.arm));
  $("f-flag").addEventListener("change", () => { cur = 0; render(); });
  $("population").addEventListener("change", (e) => {
    window.location = `/runs/${runId}/review?population=${encodeURIComponent(e.target.value)}`;
  });

  function filtered() {
    const p = $("f-patient").value, v = $("f-visit").value, f = $("f-flag").value, a = $("f-arm") ? $("f-arm").value : "";
    return items.filter((i) => (!p || i.patient_id === p) && (!v || String(i.visit) === v) && (!a || i.arm === a) &&
      (!f || (f === "flagged" ? (i.flagged || i.outlier) : i.status === "unreviewed")));
  }

  // ---- the queue -----------------------------------------------------------------------------
  function render() {
    shown = filtered();
    const tbody = document.querySelector("#queue tbody");
    tbody.textContent = "";
    shown.forEach((it, k) => {
      const tr = document.createElement("tr");
      tr.dataset.sample = it.sample_id;
      tr.className = [k === cur ? "current" : "", (it.flagged || it.outlier) ? "flagged" : "", "st-" + it.status].join(" ");
      const cells = [it.sample_id, it.patient_id, it.visit];
      if (q.arms_visible) cells.push(it.arm);
      cells.push(pct(it.pct_parent), it.flagged ? "flagged" : (it.outlier ? "outlier" : ""), it.status);
      for (const c of cells) { const td = document.createElement("td"); td.textContent = c == null ? "" : String(c); tr.appendChild(td); }
      tr.addEventListener("click", () => { cur = k; render(); });
      tbody.appendChild(tr);
    });
    if (shown.length) { load(shown[cur]); const row = tbody.children[cur]; if (row && row.scrollIntoView) row.scrollIntoView({ block: "nearest" }); }
  }

  async function load(item) {
    pending = {};
    $("new-freq").textContent = "–"; $("new-exact").textContent = "";
    const r = await call("GET", `/api/runs/${runId}/review/gate?sample_id=${encodeURIComponent(item.sample_id)}&population=${encodeURIComponent(q.population)}`);
    if (!r.ok) { say(r.data.detail, true); return; }
    view = r.data;
    $("current-title").textContent = `${view.sample_id} · ${view.population}`;
    $("current-freq").textContent = `${view.population}: ${pct(view.pct_parent)} of ${view.parent} (${view.count} of ${view.parent_count} events; gate ${view.source})`;
    $("current-flags").textContent = [item.flags, item.reasons].filter(Boolean).join(" · ");
    const panels = $("panels");
    panels.textContent = "";
    view.panels.forEach((p, i) => {
      const div = document.createElement("div");
      div.className = "panel"; div.dataset.panel = String(i);
      div.innerHTML = p.svg;  // server-made SVG (no script; escaped text)
      if (p.condition) { const c = document.createElement("p"); c.className = "small"; c.textContent = "showing " + p.condition; div.appendChild(c); }
      panels.appendChild(div);
      if (canReview) makeDraggable(div.querySelector("svg"), p);
    });
    others(item);
  }

  async function others(item) {
    const box = $("other-visits"); box.textContent = "";
    for (const o of items.filter((i) => i.patient_id === item.patient_id && i.sample_id !== item.sample_id)
                         .sort((a, b) => a.visit - b.visit)) {
      const r = await call("GET", `/api/runs/${runId}/review/gate?sample_id=${encodeURIComponent(o.sample_id)}&population=${encodeURIComponent(q.population)}`);
      if (!r.ok) continue;
      const fig = document.createElement("figure");
      fig.className = "other-visit"; fig.dataset.sample = o.sample_id;
      fig.innerHTML = r.data.panels[0].svg;
      const cap = document.createElement("figcaption"); cap.className = "small";
      cap.textContent = `visit ${o.visit}: ${pct(r.data.pct_parent)}`;
      fig.appendChild(cap); box.appendChild(fig);
    }
  }

  // ---- dragging a threshold ---------------------------------------------------------------------
  function makeDraggable(svg, panel) {
    if (!svg) return;
    const d = svg.dataset;
    const x0 = +d.x0, x1 = +d.x1, y0 = +d.y0, y1 = +d.y1, left = +d.left, top = +d.top, pw = +d.pw, ph = +d.ph;
    const vb = svg.viewBox.baseVal;
    let dragging = null;
    svg.querySelectorAll("line.thr").forEach((line) => {
      line.addEventListener("pointerdown", (e) => { dragging = line; line.setPointerCapture(e.pointerId); e.preventDefault(); });
      line.addEventListener("pointermove", (e) => {
        if (dragging !== line) return;
        const box = svg.getBoundingClientRect();
        if (line.dataset.axis === "x") {
          const sx = (e.clientX - box.left) * vb.width / box.width;
          const px = Math.min(Math.max(sx, left), left + pw);
          line.setAttribute("x1", px); line.setAttribute("x2", px);
          pending[line.dataset.param] = x0 + (px - left) / pw * (x1 - x0);
        } else {
          const sy = (e.clientY - box.top) * vb.height / box.height;
          const py = Math.min(Math.max(sy, top), top + ph);
          line.setAttribute("y1", py); line.setAttribute("y2", py);
          pending[line.dataset.param] = y0 + (top + ph - py) / ph * (y1 - y0);
        }
        live(panel);
      });
      line.addEventListener("pointerup", () => { if (dragging === line) { dragging = null; exact(); } });
    });
  }

  // share of a bin [a, b) that lies inside [lo, hi)
  function part(a, b, lo, hi) {
    const l = lo == null ? -Infinity : lo, h = hi == null ? Infinity : hi;
    return Math.max(0, Math.min(b, h) - Math.max(a, l)) / (b - a);
  }
  function inside(panel, shape) {
    const nx = panel.x_bins, ny = panel.y_bins, c = panel.counts;
    const bx = (panel.x_range[1] - panel.x_range[0]) / nx;
    const xs = shape.x || [null, null];
    let total = 0;
    if (!ny) { for (let i = 0; i < nx; i++) total += c[i] * part(panel.x_range[0] + i * bx, panel.x_range[0] + (i + 1) * bx, xs[0], xs[1]); return total; }
    const by = (panel.y_range[1] - panel.y_range[0]) / ny, ys = shape.y || [null, null];
    for (let j = 0; j < ny; j++) {
      const fy = part(panel.y_range[0] + j * by, panel.y_range[0] + (j + 1) * by, ys[0], ys[1]);
      if (!fy) continue;
      for (let i = 0; i < nx; i++) if (c[j * nx + i]) total += c[j * nx + i] * fy * part(panel.x_range[0] + i * bx, panel.x_range[0] + (i + 1) * bx, xs[0], xs[1]);
    }
    return total;
  }
  // approximate new frequency while dragging: the panel's binned events inside the moved gate vs the old gate
  function live(panel) {
    const shapes = JSON.parse(panel.shapes);
    const s = shapes.find((x) => x.kind === "rect" || x.kind === "range");
    if (!s) return;
    const moved = JSON.parse(JSON.stringify(s));
    for (const [name, v] of Object.entries(pending)) {
      const [dim, op] = [name.slice(0, name.lastIndexOf(" ")), name.slice(name.lastIndexOf(" ") + 1)];
      const k = op === ">=" ? 0 : 1;
      if (dim === panel.x) moved.x[k] = v; else if (dim === panel.y && moved.y) moved.y[k] = v;
    }
    const before = inside(panel, s);
    const ratio = before > 0 ? inside(panel, moved) / before : 1;
    $("new-freq").textContent = "≈ " + pct(view.pct_parent * ratio);
    $("new-exact").textContent = "(from the plot; exact value follows)";
  }
  async function exact() {
    const seq = ++previewSeq;
    const r = await call("POST", `/api/runs/${runId}/review/preview`, { sample_id: view.sample_id, population: view.population, kind: "override", params: pending, reason: "preview" });
    if (seq !== previewSeq) return;
    if (!r.ok) { say(r.data.detail, true); return; }
    $("new-freq").textContent = pct(r.data.after_pct);
    $("new-exact").textContent = `(exact: ${r.data.count} of ${r.data.parent_count} events; now ${pct(r.data.before_pct)})`;
  }

  // ---- actions -------------------------------------------------------------------------------
  function reason() { return { category: $("reason-category").value, reason: $("reason-text").value.trim() }; }
  async function change(kind) {
    const why = reason();
    if (!why.reason && !why.category) { say("A reason is required: choose one from the list and/or write it.", true); return; }
    if (kind === "override" && !Object.keys(pending).length) { say("Drag a gate line first.", true); return; }
    say("Saving and re-gating this sample…");
    const r = await call("POST", `/api/runs/${runId}/review/change`, { sample_id: view.sample_id, population: view.population, kind,
      params: kind === "override" ? pending : {}, reason: why.reason || why.category, category: why.category });
    if (!r.ok) { say(r.data.detail, true); return; }
    const it = shown[cur];
    it.pct_parent = r.data.after_pct; it.status = kind === "revert" ? "unreviewed" : (kind === "pooled" ? "pooled" : "overridden");
    say(`Saved (audit entry ${r.data.audit_entry}): ${view.population} ${pct(r.data.before_pct)} → ${pct(r.data.after_pct)}.`);
    $("reason-text").value = ""; $("reason-category").value = "";
    render();
  }
  async function approve(scope) {
    const body = { scope, population: q.population, sample_id: scope === "one" ? shown[cur].sample_id : null };
    const r = await call("POST", `/api/runs/${runId}/review/approve`, body);
    if (!r.ok) { say(r.data.detail, true); return false; }
    say(`Approved ${r.data.approved} gate(s) (audit entry ${r.data.audit_entry}).`);
    return true;
  }
  if ($("save-override")) {
    $("save-override").addEventListener("click", () => change("override"));
    $("use-pooled").addEventListener("click", () => change("pooled"));
    $("revert").addEventListener("click", () => change("revert"));
    $("approve-one").addEventListener("click", approveAndNext);
    $("approve-unflagged").addEventListener("click", async () => { if (await approve("unflagged")) window.location.reload(); });
    $("approve-run").addEventListener("click", async () => { if (await approve("run")) window.location.reload(); });
  }
  async function approveAndNext() {
    if (!canReview || !shown.length) return;
    const it = shown[cur];
    if (await approve("one")) {
      if (it.status === "unreviewed") it.status = "approved";
      if (cur < shown.length - 1) cur++;
      render();
    }
  }
  document.addEventListener("keydown", (e) => {
    const tag = (e.target.tagName || "").toLowerCase();
    if (tag === "input" || tag === "textarea" || tag === "select" || e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "j" || e.key === "ArrowDown") { if (cur < shown.length - 1) { cur++; render(); } e.preventDefault(); }
    else if (e.key === "k" || e.key === "ArrowUp") { if (cur > 0) { cur--; render(); } e.preventDefault(); }
    else if (e.key === "a") { approveAndNext(); e.preventDefault(); }
  });
  if ($("signoff")) {
    $("signoff").addEventListener("click", async () => {
      const r = await call("POST", `/api/runs/${runId}/signoff`, { password: $("signoff-password").value, meaning: "reviewed and approved" });
      $("signoff-password").value = "";
      const st = $("signoff-state");
      if (!r.ok) { st.textContent = "Not signed off: " + r.data.detail; st.className = "error"; return; }
      st.textContent = `Signed off “${r.data.meaning}” by ${r.data.signed_by} at ${r.data.at.slice(0, 19)} UTC: the gates are locked.`;
      st.className = "note";
      $("signoff-form").hidden = true;
    });
  }
  if ($("new-version")) {
    $("new-version").addEventListener("click", async () => {
      const r = await call("POST", `/api/runs/${runId}/versions`);
      if (r.ok) window.location = `/runs/${r.data.id}/review?population=${encodeURIComponent(q.population)}`;
    });
  }
  render();
})();
