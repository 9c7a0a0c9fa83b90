// cytopipe gate review: the queue, a gate over its parent's density (server-made SVG), dragging a
// threshold with the new frequency shown live (from the panel's histogram, then exact from the
// server), dragging polygon vertices / the ellipse's centre and size / the quadrant's crossing (the
// exact frequency from the server while moving), keyboard navigation, approve / override / pooled /
// revert for one sample or a group, sign-off. No build step.
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
  const NOT_MEASURED = "not measured";  // a population whose gate needs a marker the file lacks
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
      cells.push(it.status === NOT_MEASURED ? NOT_MEASURED : pct(it.pct_parent), it.flagged ? "flagged" : (it.outlier ? "outlier" : ""), it.status);
      for (const c of cells) { const td = document.createElement("td"); td.textContent = c == null ? "" : String(c); tr.appendChild(td); }
      tr.addEventListener("click", () => { cur = k; render(); });
      tbody.appendChild(tr);
    });
    if (shown.length) { load(shown[cur]); const row = tbody.children[cur]; if (row && row.scrollIntoView) row.scrollIntoView({ block: "nearest" }); }
  }

  // Each selection's load is numbered: an answer that arrives after a later selection is dropped, so
  // a sample clicked while another is still loading is the one shown (and the one a drag and a save
  // apply to). The previous sample's panels go at once: nothing of it can be dragged meanwhile.
  let loadSeq = 0;
  async function load(item) {
    const seq = ++loadSeq;
    pending = {};
    view = null;
    $("new-freq").textContent = "–"; $("new-exact").textContent = "";
    for (const id of ["current-title", "current-freq", "current-flags", "current-change", "gate-numbers", "panels", "other-visits"]) $(id).textContent = "";
    const r = await call("GET", `/api/runs/${runId}/review/gate?sample_id=${encodeURIComponent(item.sample_id)}&population=${encodeURIComponent(q.population)}`);
    if (seq !== loadSeq) return;
    if (!r.ok) { say(r.data.detail, true); return; }
    view = r.data;
    $("current-title").textContent = `${view.sample_id} · ${view.population}`;
    measuredView(view.measured !== false);
    if (view.measured === false) {  // no events, no gate: nothing to draw, approve or move
      $("current-freq").textContent = `${view.population}: not measured in this sample (${String(view.flags).replace(/^not measured: /, "")}). ` +
        "There is no gate to approve or change here; go on with the next sample (j).";
      others(item, seq);
      return;
    }
    $("current-freq").textContent = `${view.population}: ${pct(view.pct_parent)} of ${view.parent} (${view.count} of ${view.parent_count} events; gate ${view.source})`;
    $("current-flags").textContent = [item.flags, item.reasons].filter(Boolean).join(" · ");
    $("current-change").textContent = item.changed_by || "";  // who changed the gate in force (a carried-over one too)
    // the gate's numbers under the names an override takes (`cytopipe review --set "FOXP3 >= 1.7"`)
    const numbers = Object.entries(view.params || {});
    $("gate-numbers").textContent = numbers.length ?
      "Gate numbers (as cytopipe review --set takes them): " + numbers.map(([n, v]) => `${n} ${Number(v).toFixed(3)}`).join(" · ") : "";
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
    others(item, seq);
  }

  async function others(item, seq) {
    const box = $("other-visits"); box.textContent = "";
    for (const o of items.filter((i) => i.patient_id === item.patient_id && i.sample_id !== item.sample_id)
                         .sort((a, b) => a.visit - b.visit)) {
      const r = await call("GET", `/api/runs/${runId}/review/gate?sample_id=${encodeURIComponent(o.sample_id)}&population=${encodeURIComponent(q.population)}`);
      if (seq !== loadSeq) return;  // another sample was selected meanwhile
      if (!r.ok) continue;
      const fig = document.createElement("figure");
      fig.className = "other-visit"; fig.dataset.sample = o.sample_id;
      if (r.data.panels.length) fig.innerHTML = r.data.panels[0].svg;
      const cap = document.createElement("figcaption"); cap.className = "small";
      cap.textContent = `visit ${o.visit}: ${r.data.measured === false ? NOT_MEASURED : pct(r.data.pct_parent)}`;
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
    // a gate of several panels or one drawn from the sample (a diagonal): its lines only
    if (view.panels.length === 1 && !view.drawn_from_sample) addHandles(svg, panel);
  }

  // ---- handles: polygon vertices, the ellipse's centre and size, the quadrant's crossing ----------
  const NS = "http://www.w3.org/2000/svg";
  function addHandles(svg, panel) {
    const d = svg.dataset, vb = svg.viewBox.baseVal;
    const x0 = +d.x0, x1 = +d.x1, y0 = +d.y0, y1 = +d.y1, left = +d.left, top = +d.top, pw = +d.pw, ph = +d.ph;
    const toPx = (x, y) => [Math.min(Math.max(left + (x - x0) / (x1 - x0) * pw, left), left + pw),
                            Math.min(Math.max(top + ph - (y - y0) / (y1 - y0) * ph, top), top + ph)];
    const toData = (sx, sy) => [x0 + (sx - left) / pw * (x1 - x0), y0 + (top + ph - sy) / ph * (y1 - y0)];
    const pointer = (e) => { const b = svg.getBoundingClientRect();
      return [Math.min(Math.max((e.clientX - b.left) * vb.width / b.width, left), left + pw),
              Math.min(Math.max((e.clientY - b.top) * vb.height / b.height, top), top + ph)]; };
    function handle(cx, cy, kind, index, onMove) {
      const c = document.createElementNS(NS, "circle");
      c.setAttribute("class", "handle"); c.setAttribute("r", "6"); c.dataset.kind = kind; c.dataset.index = String(index);
      c.setAttribute("cx", cx); c.setAttribute("cy", cy);
      c.setAttribute("fill", "#fff"); c.setAttribute("stroke", "#c92a2a"); c.setAttribute("stroke-width", "2");
      let on = false;
      c.addEventListener("pointerdown", (e) => { on = true; c.setPointerCapture(e.pointerId); e.preventDefault(); });
      c.addEventListener("pointermove", (e) => { if (!on) return; const [sx, sy] = pointer(e);
        c.setAttribute("cx", sx); c.setAttribute("cy", sy); onMove(sx, sy); serverLive(); });
      c.addEventListener("pointerup", () => { if (on) { on = false; dirty = false; exact(); } });  // the last word
      svg.appendChild(c);
      return c;
    }
    const shapes = JSON.parse(panel.shapes);
    const gates = svg.querySelectorAll("polygon.gate");
    shapes.forEach((s, k) => {
      if (s.kind === "polygon" && gates[k]) {
        const poly = gates[k], verts = s.vertices.map((v) => v.slice());
        const clip = (v) => Math.min(Math.max(v, -1e6), 1e6);  // as the server draws it (handles stay on the plot)
        const draw = () => poly.setAttribute("points", verts.map((v) =>
          `${(left + (clip(v[0]) - x0) / (x1 - x0) * pw).toFixed(1)},${(top + ph - (clip(v[1]) - y0) / (y1 - y0) * ph).toFixed(1)}`).join(" "));
        verts.forEach((v, i) => { const [hx, hy] = toPx(v[0], v[1]);
          handle(hx, hy, "vertex", i, (sx, sy) => { verts[i] = toData(sx, sy); pending = { vertices: verts }; draw(); }); });
      } else if (s.kind === "ellipse" && gates[k]) {
        const poly = gates[k], c0 = s.center.slice(), ds0 = s.distance_square || 1, cov = s.covariance;
        const pts0 = poly.getAttribute("points").trim().split(/\s+/).map((p) => p.split(",").map(Number));
        const [pcx, pcy] = toPx(c0[0], c0[1]);
        let center = c0.slice(), ds = ds0;
        const draw = () => { const [cx, cy] = toPx(center[0], center[1]), f = Math.sqrt(ds / ds0);
          poly.setAttribute("points", pts0.map(([a, b]) => `${(cx + (a - pcx) * f).toFixed(1)},${(cy + (b - pcy) * f).toFixed(1)}`).join(" ")); };
        // the size handle sits where the ellipse meets its major axis
        const a = cov[0][0], b = cov[0][1], dd = cov[1][1], l1 = (a + dd) / 2 + Math.sqrt(((a - dd) / 2) ** 2 + b * b);
        let ux = Math.abs(b) > 1e-12 ? l1 - dd : (a >= dd ? 1 : 0), uy = Math.abs(b) > 1e-12 ? b : (a >= dd ? 0 : 1);
        const n = Math.hypot(ux, uy); ux /= n; uy /= n;
        const r0 = Math.sqrt(ds0 * l1), det = a * dd - b * b;
        const size = handle(...toPx(c0[0] + r0 * ux, c0[1] + r0 * uy), "ellipse-size", 1, (sx, sy) => {
          const [x, y] = toData(sx, sy), dx = x - center[0], dy = y - center[1];
          ds = Math.max((dd * dx * dx - 2 * b * dx * dy + a * dy * dy) / det, 1e-6);
          pending = { center, covariance: cov, distance_square: ds }; draw(); });
        handle(pcx, pcy, "ellipse-centre", 0, (sx, sy) => {
          const moved = toData(sx, sy), dx = moved[0] - center[0], dy = moved[1] - center[1];
          center = moved; pending = { center, covariance: cov, distance_square: ds }; draw();
          size.setAttribute("cx", +size.getAttribute("cx") + dx / (x1 - x0) * pw);
          size.setAttribute("cy", +size.getAttribute("cy") - dy / (y1 - y0) * ph); });
      } else if (s.kind === "rect" && s.x && s.y && s.x.filter((v) => v != null).length === 1 && s.y.filter((v) => v != null).length === 1) {
        const xi = s.x[0] != null ? 0 : 1, yi = s.y[0] != null ? 0 : 1;
        const xp = `${panel.x} ${xi ? "<" : ">="}`, yp = `${panel.y} ${yi ? "<" : ">="}`;
        const xl = svg.querySelector(`line.thr[data-param="${CSS.escape(xp)}"]`), yl = svg.querySelector(`line.thr[data-param="${CSS.escape(yp)}"]`);
        handle(...toPx(s.x[xi], s.y[yi]), "crossing", 0, (sx, sy) => {
          const [x, y] = toData(sx, sy); pending[xp] = x; pending[yp] = y;
          if (xl) { xl.setAttribute("x1", sx); xl.setAttribute("x2", sx); }
          if (yl) { yl.setAttribute("y1", sy); yl.setAttribute("y2", sy); } });
      }
    });
  }
  // the exact frequency from the server while a handle moves: one request at a time, the latest wins
  let inFlight = false, dirty = false;
  async function serverLive() {
    if (inFlight) { dirty = true; return; }
    inFlight = true;
    try { await exact(true); } finally { inFlight = false; }
    if (dirty) { dirty = false; serverLive(); }
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
  async function exact(live) {
    if (!view) return;
    const seq = ++previewSeq;
    const r = await call("POST", `/api/runs/${runId}/review/preview`, { sample_id: view.sample_id, population: view.population, kind: "override", params: pending, reason: "preview" });
    if (seq !== previewSeq) return;
    if (!r.ok) { say(r.data.detail, true); return; }
    $("new-freq").textContent = pct(r.data.after_pct);
    $("new-exact").textContent = `(exact${live ? ", while moving" : ""}: ${r.data.count} of ${r.data.parent_count} events; now ${pct(r.data.before_pct)})`;
  }

  // ---- actions -------------------------------------------------------------------------------
  // a population not measured in the sample has no gate: its approve / change buttons are disabled
  function measuredView(measured) {
    for (const id of ["save-override", "use-pooled", "revert", "approve-one"]) if ($(id)) $(id).disabled = !measured;
  }
  function reason() { return { category: $("reason-category").value, reason: $("reason-text").value.trim() }; }
  // the samples a change applies to: this one, the patient's visits, or every sample the filters show
  function group() {
    const to = $("apply-to") ? $("apply-to").value : "one", it = shown[cur];
    if (to === "patient") return items.filter((i) => i.patient_id === it.patient_id).map((i) => i.sample_id);
    if (to === "shown") return shown.map((i) => i.sample_id);
    return [it.sample_id];
  }
  async function change(kind) {
    if (!view) { say("The sample is still loading.", true); return; }
    const why = reason();
    if (!why.reason && !why.category) { say("A reason is required: choose one from the list and/or write it.", true); return; }
    if (kind === "override" && !Object.keys(pending).length) { say("Drag the gate (a line or a handle) first.", true); return; }
    const samples = group();
    say(samples.length > 1 ? `Saving and re-gating ${samples.length} samples…` : "Saving and re-gating this sample…");
    const body = { sample_id: view.sample_id, population: view.population, kind,
      params: kind === "override" ? pending : {}, reason: why.reason || why.category, category: why.category };
    if (samples.length > 1) body.sample_ids = samples;
    const r = await call("POST", `/api/runs/${runId}/review/change`, body);
    if (!r.ok) { say(r.data.detail, true); return; }
    const status = kind === "revert" ? "unreviewed" : (kind === "pooled" ? "pooled" : "overridden");
    const changedNow = (k, entry) => k === "revert" ? "" : `${k === "pooled" ? "Pooled gate used" : "Overridden"} by you just now (audit entry ${entry}).`;
    if (r.data.group) {
      for (const i of items) { const g = r.data.group[i.sample_id]; if (g) { i.pct_parent = g.after_pct; i.status = status; i.changed_by = changedNow(kind, r.data.audit_entry); } }
      const parts = Object.entries(r.data.group).map(([sid, g]) => `${sid} ${pct(g.before_pct)} → ${pct(g.after_pct)}`);
      say(`Saved for ${parts.length} samples (audit entry ${r.data.audit_entry}): ${view.population} ${parts.join("; ")}.`);
      $("reason-text").value = ""; $("reason-category").value = "";
      render();
      return;
    }
    const it = shown[cur];
    it.pct_parent = r.data.after_pct; it.status = status; it.changed_by = changedNow(kind, r.data.audit_entry);
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
    if (it.status === NOT_MEASURED) { if (cur < shown.length - 1) { cur++; render(); } return; }  // nothing to approve
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
      // one signature request at a time: a second click while the first is checked would race it
      $("signoff").disabled = true;
      const r = await call("POST", `/api/runs/${runId}/signoff`, { password: $("signoff-password").value, meaning: "reviewed and approved" });
      $("signoff").disabled = false;
      $("signoff-password").value = "";
      const st = $("signoff-state");
      if (!r.ok) { st.textContent = "Not signed off: " + r.data.detail; st.className = "error"; return; }
      st.textContent = `Signed off “${r.data.meaning}” by ${r.data.signed_by} at ${r.data.at.slice(0, 19)} UTC: the gates are locked.`;
      st.className = "note";
      $("signoff-form").hidden = true;
      for (const id of ["override-form", "approve-all"]) if ($(id)) $(id).hidden = true;  // locked now
    });
  }
  if ($("new-version")) {
    $("new-version").addEventListener("click", async () => {
      const r = await call("POST", `/api/runs/${runId}/versions`);
      if (r.ok) window.location = `/runs/${r.data.id}/review?population=${encodeURIComponent(q.population)}`;
      else { const st = $("signoff-state"); st.textContent = "No new version was made: " + r.data.detail; st.className = "error"; }
    });
  }
  render();
})();
