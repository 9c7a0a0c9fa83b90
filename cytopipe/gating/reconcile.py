"""Reconciliation of a FlowJo workspace: does cytopipe reproduce the counts FlowJo stored?

``cytopipe reconcile WORKSPACE FCS_DIR`` imports every sample's gates from the workspace, gates the
sample's FCS file with cytopipe's engine and compares each population's count with the count FlowJo
stored in the workspace. It writes ``reconcile.csv`` and ``reconcile.parquet`` (one row per sample
and population: FlowJo's count, cytopipe's, the difference, the % difference and the likely reason)
and ``reconcile.html`` (a summary and the worst gates drawn: FlowJo's gate over cytopipe's events,
events close to the gate's edge marked). Exit code 0 when every gate is within the tolerance, 3
when some are not, 2 on a usage or input error.

The reasons are measured, not guessed: a population whose parent already differs inherits that
difference; for a polygon or ellipse the events lying within a hair of the gate's edge (where
FlowJo's and cytopipe's arithmetic may disagree) are counted and the difference is explained when
it is no larger; a file whose event count is not the one FlowJo stored is named; a FlowJo ellipse
is evaluated as FlowKit's polygon version of it (as FlowJo itself does).

Why one module: one command's comparison, its measured reasons and its CSV/HTML output; nothing
else imports its helpers.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cytopipe.errors import CytopipeError, TemplateError
from cytopipe.gating.gates import BooleanGate, EllipsoidGate, PolygonGate, RectangleGate
from cytopipe.store import check_output_folder
from cytopipe.tabular import escape_cell

logger = logging.getLogger(__name__)

COLUMNS = [
    "sample",
    "file",
    "population",
    "population_path",
    "parent_path",
    "gate_type",
    "flowjo_count",
    "cytopipe_count",
    "difference",
    "pct_difference",
    "boundary_events",
    "flowkit_count",
    "within_tolerance",
    "explained",
    "reason",
]
RESOLUTION = 256  # FlowJo's gate resolution (gateResolution): its display grid has 256 steps per axis


@dataclass(frozen=True)
class Tolerance:
    """A count agrees when it is off by at most ``events`` events or at most ``percent`` % of
    FlowJo's count (whichever is larger)."""

    events: int = 2
    percent: float = 0.5

    def ok(self, difference: int, flowjo: int) -> bool:
        return abs(difference) <= self.events or (
            flowjo > 0 and 100.0 * abs(difference) / flowjo <= self.percent
        )

    @classmethod
    def parse(cls, text: str) -> Tolerance:
        """``"2"`` (events), ``"0.5%"``, or both: ``"2,0.5%"``."""
        events, percent = 0, 0.0
        for part in str(text).replace(" ", "").split(","):
            if not part:
                continue
            try:
                if part.endswith("%"):
                    percent = float(part[:-1])
                else:
                    events = int(part)
            except ValueError:
                raise CytopipeError(
                    f"--tolerance {text!r}: give events, a percentage or both, e.g. '2,0.5%'"
                ) from None
            if events < 0 or percent < 0:
                raise CytopipeError(f"--tolerance {text!r} must not be negative")
        return cls(events, percent)

    def __str__(self) -> str:
        return f"{self.events} events or {self.percent:g}%"


@dataclass
class Reconciliation:
    table: pd.DataFrame
    tolerance: Tolerance
    workspace: Path
    figures: dict[tuple[str, str], str]  # (sample, path) -> PNG (base64) of the worst gates

    @property
    def ok(self) -> bool:
        return bool(self.table["within_tolerance"].all())


def find_fcs(fcs_dir: Path) -> dict[str, Path]:
    """File name -> path of every FCS file under ``fcs_dir`` (recursively)."""
    found: dict[str, Path] = {}
    for p in sorted(fcs_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in (".fcs", ".lmd") and not p.name.startswith("._"):
            found.setdefault(p.name, p)
    return found


def reconcile(
    workspace: str | Path,
    fcs_dir: str | Path,
    tolerance: Tolerance | None = None,
    group: str | None = None,
    worst: int = 6,
) -> Reconciliation:
    """Gate every sample of a FlowJo workspace with cytopipe and compare with FlowJo's counts."""
    from cytopipe.fcs import read_fcs
    from cytopipe.gating.engine import NOT_MEASURED, gate
    from cytopipe.gating.flowjo import FlowJoWorkspace

    tolerance = tolerance or Tolerance()
    fcs_dir = Path(fcs_dir)
    if not fcs_dir.is_dir():
        raise CytopipeError("FCS folder not found", file=fcs_dir)
    ws = FlowJoWorkspace(workspace)
    files = find_fcs(fcs_dir)
    samples = ws.samples if group is None else [s for s in ws.samples if s.name in ws.groups.get(group, [])]
    if group is not None and group not in ws.groups:
        raise TemplateError(f"no sample group {group!r}; groups are {sorted(ws.groups)}", file=ws.path)
    rows: list[dict] = []
    drawn: list[tuple[float, dict, object, object]] = []
    matched = 0
    for s in samples:
        fcs = next((files[n] for n in s.file_names if n in files), None)
        template = ws.template(s.name) if len(s.counts) > 1 else None
        if fcs is None:
            for path, count in s.counts.items():
                rows.append(_row(s.name, "", path, "", "", count, None, tolerance, 0,
                                 f"no FCS file named {' or '.join(map(repr, s.file_names))} in {str(fcs_dir)!r}"))  # fmt: skip
            continue
        matched += 1
        sample = read_fcs(fcs, preprocess=True)
        n = sample.events.shape[0]
        file_note = ""
        if s.counts.get("root", -1) >= 0 and s.counts["root"] != n:
            file_note = (
                f"the FCS file has {n} events but FlowJo's sample had {s.counts['root']}: a different file, "
                "or events removed or added in FlowJo"
            )
        rows.append(
            _row(s.name, fcs.name, "root", "", "root", s.counts.get("root", -1), n, tolerance, 0, file_note)
        )
        if template is None:
            continue
        result = gate(sample, template, medians=False)
        comp_note = _compensation_note(template, sample)
        diffs: dict[str, int] = {"root": n - s.counts.get("root", n)}
        for pop in template:
            p = template.path_of(pop.name)
            parent_path = template.path_of(pop.parent)
            got = result.populations[pop.name].count
            stored = s.counts.get(p, -1)
            kind = _kind(pop.gate)
            if result.populations[pop.name].source == NOT_MEASURED:  # no count: not 0 events
                why = "; ".join(result.populations[pop.name].flags) or NOT_MEASURED
                rows.append(_row(s.name, fcs.name, p, pop.name, parent_path, stored, None, tolerance, 0,
                                 f"{why} (cytopipe has no count to compare)", kind))  # fmt: skip
                continue
            boundary = 0
            if isinstance(pop.gate, (PolygonGate, EllipsoidGate, RectangleGate)):
                boundary = _edge_events(result, sample, pop, template)
            diff = got - stored if stored >= 0 else 0
            diffs[p] = diff
            reason, explained = _reason(
                diff, stored, kind, boundary, diffs.get(parent_path, 0), parent_path, file_note, pop, template
            )
            if not explained and comp_note and any(d.compensation for d in pop.gate.dims):
                reason += "; " + comp_note
            row = _row(
                s.name, fcs.name, p, pop.name, parent_path, stored, got, tolerance, boundary, reason, kind
            )
            row["explained"] = explained
            rows.append(row)
            if diff != 0 and not isinstance(pop.gate, BooleanGate):
                pd_ = diffs.get(parent_path, 0)
                own = abs(diff - min(max(diff, min(0, pd_)), max(0, pd_)))  # not inherited from the parent
                score = (not explained, own, abs(diff))
                drawn.append((score, row, (sample, result, pop), template))
    _add_peer(ws, rows, files)
    if not matched:
        raise CytopipeError(
            f"none of the workspace's {len(samples)} samples has its FCS file in the folder; looked for "
            f"{[n for s in samples[:3] for n in s.file_names]}...",
            file=fcs_dir,
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("flowjo_count", "cytopipe_count", "difference", "boundary_events", "flowkit_count"):
        table[col] = table[col].astype("Int64")
    figures = {}
    for _, row, (sample, result, pop), template in sorted(drawn, key=lambda d: d[0], reverse=True)[:worst]:
        figures[(row["sample"], row["population_path"])] = _draw(sample, result, pop, template, row)
    return Reconciliation(table, tolerance, Path(workspace), figures)


def _add_peer(ws, rows: list[dict], files: dict[str, Path]) -> None:
    """FlowKit's counts (its own reading of the workspace and file) for samples where cytopipe and
    FlowJo differ: when FlowKit agrees with cytopipe, the gates were applied as written."""
    differing = sorted({r["sample"] for r in rows if r["difference"] not in (None, 0) and r["file"]})
    if not differing:
        return
    fcs = {r["sample"]: files[r["file"]] for r in rows if r["sample"] in differing}
    counts = flowkit_counts(ws, fcs)
    for r in rows:
        if r["sample"] not in counts:
            continue
        r["flowkit_count"] = counts[r["sample"]].get(r["population_path"])
        if r["difference"] and r["flowkit_count"] == r["cytopipe_count"]:
            r["reason"] = (r["reason"] + "; " if r["reason"] else "") + (
                "FlowKit reads the same workspace and file to cytopipe's count"
            )


def flowkit_counts(ws, fcs: dict[str, Path]) -> dict[str, dict[str, int]]:
    """Sample -> population path -> FlowKit's count (samples FlowKit cannot analyse are left out)."""
    import warnings

    import flowkit as fk

    source = io.BytesIO(ws._xml) if ws._xml is not None else str(ws.path)
    out: dict[str, dict[str, int]] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            samples = [fk.Sample(str(path), sample_id=name) for name, path in fcs.items()]
            peer = fk.Workspace(source, fcs_samples=samples)
    except Exception as exc:  # the peer is evidence, not a requirement
        logger.info("FlowKit could not read %s: %s", ws.path, exc)
        return out
    for name in fcs:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peer.analyze_samples(sample_id=name, use_mp=False)
                report = peer.get_gating_results(name).report
        except Exception as exc:
            logger.info("FlowKit could not analyse %s: %s", name, exc)
            continue
        out[name] = {
            "/" + "/".join(ws.renamed.get(p, p) for p in (*r.gate_path[1:], r.gate_name)): int(r.count)
            for r in report.itertuples()
        }
    return out


def _row(
    sample, file, path, name, parent_path, stored, got, tol: Tolerance, boundary, reason, kind=""
) -> dict:
    compared = stored is not None and stored >= 0 and got is not None
    diff = got - stored if compared else None
    if not compared:
        pct = float("nan")
    elif stored:
        pct = 100.0 * diff / stored
    else:
        pct = 0.0 if not diff else float(np.sign(diff)) * float("inf")
    if stored is not None and stored < 0 and got is not None and not reason:
        reason = "FlowJo stored no count for this population (never computed in FlowJo): not compared"
    return {
        "sample": sample,
        "file": file,
        "population": name or ("root" if path == "root" else ""),
        "population_path": path,
        "parent_path": parent_path,
        "gate_type": kind or ("sample" if path == "root" else ""),
        "flowjo_count": stored if stored is not None and stored >= 0 else None,
        "cytopipe_count": got,
        "difference": diff,
        "pct_difference": pct,
        "boundary_events": boundary,
        "within_tolerance": bool(tol.ok(diff, stored))
        if compared
        else got is not None and stored is not None,
        "explained": not diff,
        "reason": reason if (diff or not compared or reason) else "",
    }


def _compensation_note(template, sample) -> str:
    """How the workspace's compensation matrix differs from the file's spillover keyword, if it does
    (FlowJo used the workspace's; a difference there moves events between compensated gates)."""
    spill = getattr(sample, "spillover", None)
    if not template.matrices:
        return ""
    if spill is None:
        return "the workspace compensates with its own matrix; the FCS file has no spillover keyword"
    notes = []
    for mid, m in template.matrices.items():
        common = [c for c in m.detectors if c in spill.channels]
        if not common:
            continue
        a = m.matrix[np.ix_([m.detectors.index(c) for c in common], [m.detectors.index(c) for c in common])]
        b = np.asarray(spill.matrix)[
            np.ix_([spill.channels.index(c) for c in common], [spill.channels.index(c) for c in common])
        ]
        worst = float(np.max(np.abs(a - b)))
        if worst > 1e-6:
            notes.append(
                f"the workspace's matrix {mid!r} differs from the file's {spill.keyword} by up to {worst:.3g}"
            )
    return "; ".join(notes)


def _kind(g) -> str:
    if isinstance(g, RectangleGate):
        return "rectangle"
    if isinstance(g, PolygonGate):
        return "polygon"
    if isinstance(g, EllipsoidGate):
        return "ellipse"
    if isinstance(g, BooleanGate):
        return f"boolean ({g.op})"
    return type(g).__name__


def _display_step(result, sample, template, dim) -> float:
    """One step of FlowJo's display grid on a gate axis: the axis (0 to the channel's $PnR, on the
    gate's transform) divided into ``RESOLUTION`` steps, as FlowJo draws and tests gates."""
    from cytopipe.gating._adapters import apply_transform

    channel = result.channel_of.get(dim.name, dim.name)
    rows = sample.channels[sample.channels["pnn"] == channel]
    top = float(rows["pnr"].iloc[0]) if len(rows) and pd.notna(rows["pnr"].iloc[0]) else 262144.0
    spec = template.transforms.get(dim.transform) if dim.transform else None
    ends = apply_transform(spec, np.array([0.0, top], dtype=np.float64))
    span = float(abs(ends[1] - ends[0])) or 1.0
    return span / RESOLUTION


def _edge_events(result, sample, pop, template) -> int:
    """Parent events closer to the gate's edge than one step of FlowJo's display grid (per axis)."""
    g = pop.gate
    values = result.event_values(sample)
    steps = [_display_step(result, sample, template, d) for d in g.dims]
    xs = [np.asarray(values.values(d, pop.parent), dtype=np.float64) / st for d, st in zip(g.dims, steps)]
    if isinstance(g, RectangleGate):
        near = np.zeros(len(xs[0]), dtype=bool)
        for x, lo, hi, st in zip(xs, g.lower, g.upper, steps):
            for b in (lo, hi):
                if b is not None:
                    near |= np.abs(x - b / st) <= 1.0
        return int(near.sum())
    if isinstance(g, EllipsoidGate):
        scale = np.asarray(steps)
        d = np.stack(xs, axis=1) - g.center / scale
        inv = g.inverse * np.outer(scale, scale)
        q = np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, inv, d), 0))
        r = np.sqrt(g.distance_square)
        # distance to the edge along the ray from the centre, in grid steps (first order)
        norm = np.linalg.norm(d, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = np.abs(q - r) * norm / np.where(q > 0, q, np.inf)
        return int((dist <= 1.0).sum())
    v = g.vertices / np.asarray(steps[:2])
    px, py = xs[0], xs[1]
    best = np.full(len(px), np.inf)
    for i in range(len(v)):
        ax, ay, bx, by = v[i - 1, 0], v[i - 1, 1], v[i, 0], v[i, 1]
        if not np.isfinite([ax, ay, bx, by]).all():
            continue
        ex, ey = bx - ax, by - ay
        L = ex * ex + ey * ey
        t = np.clip(((px - ax) * ex + (py - ay) * ey) / L, 0, 1) if L else np.zeros_like(px)
        best = np.minimum(best, np.hypot(px - ax - t * ex, py - ay - t * ey))
    return int((best <= 1.0).sum())


def _reason(
    diff, stored, kind, boundary, parent_diff, parent_path, file_note, pop, template
) -> tuple[str, bool]:
    """(likely reason, explained?) for a population's difference from FlowJo's count.

    Explained: the events the parent already gains or loses account for it (a child can inherit
    between 0 and all of them), and whatever is left is no more than the events lying within one
    step of FlowJo's display grid of the gate's edge (or the file is not FlowJo's)."""
    if stored < 0 or diff == 0:
        return "", True
    parts = []
    if file_note:
        parts.append(file_note)
    inherited = min(max(diff, min(0, parent_diff)), max(0, parent_diff))
    excess = diff - inherited
    if inherited:
        parts.append(f"the parent {parent_path!r} already differs by {parent_diff:+d} events")
    stale = bool(excess) and stored == 0 and diff > 0
    if stale:
        parts.append(
            f"FlowJo stored 0 but the gate holds {diff} events: the workspace was probably saved before "
            "FlowJo recomputed this gate (a stale count); recompute it in FlowJo"
        )
    elif excess and kind not in ("polygon", "ellipse", "rectangle"):
        pass
    elif excess and boundary >= abs(excess):
        parts.append(
            f"{boundary} parent {_events(boundary)} within one step of FlowJo's {RESOLUTION}-step display grid of the "
            f"gate's edge; FlowJo tests {kind} membership on that grid, cytopipe on the exact values"
        )
    elif excess and boundary:
        parts.append(
            f"only {boundary} parent {_events(boundary)} within one display step of the edge, for {excess:+d}"
        )
    explained = (
        stale
        or bool(file_note)
        or excess == 0
        or (kind in ("polygon", "ellipse", "rectangle") and boundary >= abs(excess))
    )
    if not explained:
        transforms = {
            template.transforms.get(d.transform, {}).get("type") for d in pop.gate.dims if d.transform
        }
        if transforms & {"biex", "flowjo_log"}:
            parts.append(
                "the gate is drawn on a FlowJo-specific transform ("
                + ", ".join(sorted(t for t in transforms if t))
                + ") that cytopipe evaluates with FlowKit's implementation of it"
            )
        if not parts:
            parts.append("unexplained: inspect the gate in the report")
    return "; ".join(parts), explained


def _draw(sample, result, pop, template, row) -> str:
    """PNG (base64) of the parent's events on the gate's axes with the gate drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = pop.gate
    values = result.event_values(sample)
    xs = [np.asarray(values.values(d, pop.parent), dtype=np.float64) for d in g.dims[:2]]
    inside = (
        result.mask(pop.name)[result.indices(pop.parent)] if pop.parent != "root" else result.mask(pop.name)
    )
    fig, ax = plt.subplots(figsize=(4.6, 4.0), dpi=90)
    if len(xs) == 1:
        xs.append(np.random.default_rng(0).uniform(0, 1, len(xs[0])))
    ax.scatter(xs[0][~inside], xs[1][~inside], s=2, c="#9aa5b1", lw=0, label="outside (cytopipe)")
    ax.scatter(xs[0][inside], xs[1][inside], s=2, c="#1f6feb", lw=0, label="inside (cytopipe)")
    if isinstance(g, PolygonGate):
        v = np.vstack([g.vertices, g.vertices[:1]])
        ax.plot(v[:, 0], v[:, 1], c="#d1242f", lw=1.2, label="FlowJo gate")
    elif isinstance(g, RectangleGate) and len(g.dims) >= 1:
        lo = [(-np.inf if v is None else v) for v in g.lower] + [-np.inf]
        hi = [(np.inf if v is None else v) for v in g.upper] + [np.inf]
        xl = np.clip([lo[0], hi[0]], *ax.get_xlim())
        yl = np.clip([lo[1], hi[1]], *ax.get_ylim()) if len(g.dims) > 1 else ax.get_ylim()
        ax.plot([xl[0], xl[1], xl[1], xl[0], xl[0]], [yl[0], yl[0], yl[1], yl[1], yl[0]], c="#d1242f", lw=1.2)
    elif isinstance(g, EllipsoidGate) and len(g.dims) == 2:
        t = np.linspace(0, 2 * np.pi, 200)
        w, vecs = np.linalg.eigh(g.covariance * g.distance_square)
        pts = (vecs @ np.diag(np.sqrt(np.maximum(w, 0))) @ np.vstack([np.cos(t), np.sin(t)])).T + g.center
        ax.plot(pts[:, 0], pts[:, 1], c="#d1242f", lw=1.2)
    ax.set_xlabel(g.dims[0].name)
    ax.set_ylabel(g.dims[1].name if len(g.dims) > 1 else "(jitter)")
    ax.set_title(
        f"{row['population']}\nFlowJo {row['flowjo_count']}, cytopipe {row['cytopipe_count']}", fontsize=8
    )
    ax.legend(fontsize=6, loc="best", markerscale=4)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def _atomic(path: Path, data: bytes) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    if tmp.stat().st_size != len(data):  # pragma: no cover - disk trouble
        raise CytopipeError("could not write the file completely", file=path)
    os.replace(tmp, path)


def write_report(rec: Reconciliation, out: str | Path) -> dict[str, Path]:
    """``reconcile.csv``, ``reconcile.parquet`` and ``reconcile.html`` in folder ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t = rec.table
    text = t.copy()
    for c in text.columns:
        if text[c].dtype == object:
            text[c] = text[c].map(escape_cell)
    paths = {
        "csv": out / "reconcile.csv",
        "parquet": out / "reconcile.parquet",
        "html": out / "reconcile.html",
    }
    _atomic(paths["csv"], text.to_csv(index=False, lineterminator="\n").encode("utf-8"))
    buf = io.BytesIO()
    t.to_parquet(buf, index=False)
    _atomic(paths["parquet"], buf.getvalue())
    _atomic(paths["html"], _html(rec).encode("utf-8"))
    return paths


def _html(rec: Reconciliation) -> str:
    t = rec.table
    compared = t[t["flowjo_count"].notna() & t["cytopipe_count"].notna() & (t["population_path"] != "root")]
    exact = int((compared["difference"] == 0).sum())
    bad = t[~t["within_tolerance"]]
    e = html.escape
    head = (
        f"<h1>Reconciliation of {e(rec.workspace.name)}</h1>"
        f"<p><b>{'Every gate is' if rec.ok else f'{len(bad)} gate(s) are not'} within the tolerance</b> "
        f"({e(str(rec.tolerance))}). {t['sample'].nunique()} samples, {len(compared)} populations compared: "
        f"{exact} exact, {len(compared) - exact} differ.</p>"
    )
    figs = "".join(
        f"<figure><img alt='{e(p)}' src='data:image/png;base64,{png}'><figcaption>{e(s)}: {e(p)}</figcaption></figure>"
        for (s, p), png in rec.figures.items()
    )
    shown = t[(t["difference"].fillna(0) != 0) | ~t["within_tolerance"] | (t["reason"] != "")]
    rows = "".join(
        "<tr" + ("" if r.within_tolerance else " class='bad'") + ">"
        + "".join(f"<td>{e('' if pd.isna(v) else str(v))}</td>" for v in (
            r.sample, r.population_path, r.gate_type, r.flowjo_count, r.cytopipe_count, r.difference,
            f"{r.pct_difference:.3f}" if pd.notna(r.pct_difference) else "", r.reason))
        + "</tr>"
        for r in shown.itertuples()
    )  # fmt: skip
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>cytopipe reconcile</title><style>"
        "body{font-family:sans-serif;margin:2em}td,th{border-bottom:1px solid #ddd;padding:2px 6px;font-size:13px}"
        "tr.bad{background:#ffe3e3}figure{display:inline-block;margin:4px}figcaption{font-size:11px}</style></head>"
        f"<body>{head}<h2>Worst gates</h2>{figs or '<p>No gate differs.</p>'}"
        "<h2>Populations that differ (every row is in reconcile.csv)</h2><table><tr><th>sample</th><th>population"
        "</th><th>gate</th><th>FlowJo</th><th>cytopipe</th><th>difference</th><th>% difference</th><th>likely reason"
        f"</th></tr>{rows}</table></body></html>"
    )


# --------------------------------------------------------------------------------------------
# command
# --------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("workspace", type=Path, help="FlowJo 10 workspace (.wsp)")
    p.add_argument("fcs_dir", type=Path, help="folder with the workspace's FCS files (searched recursively)")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: ./reconcile-<workspace name>)"
    )
    p.add_argument(
        "--tolerance",
        default="2,0.5%",
        help="allowed difference per gate: events, percent or both (default 2,0.5%%)",
    )
    p.add_argument("--group", default=None, help="only the samples of this FlowJo sample group")


def _events(n: int) -> str:
    return "event lies" if n == 1 else "events lie"


def run(args: argparse.Namespace) -> int:
    tolerance = Tolerance.parse(args.tolerance)
    out = args.out or Path(f"reconcile-{args.workspace.stem}")
    check_output_folder(out)  # a file, or a folder with someone else's files: exit 2 before any work
    rec = reconcile(args.workspace, args.fcs_dir, tolerance, group=args.group)
    paths = write_report(rec, out)
    t = rec.table
    bad = t[~t["within_tolerance"]]
    print(
        f"{t['sample'].nunique()} samples, {int((t['population_path'] != 'root').sum())} populations: "
        f"{'all within' if rec.ok else f'{len(bad)} outside'} the tolerance ({tolerance}); report {paths['html']}"
    )
    shown = 20
    for r in bad.head(shown).itertuples():
        print(
            f"  {r.sample} {r.population_path}: FlowJo {r.flowjo_count}, cytopipe {r.cytopipe_count} ({r.reason})"
        )
    if len(bad) > shown:
        print(f"  ... and {len(bad) - shown} more: every row is in {paths['csv']} and {paths['html']}")
    return 0 if rec.ok else 3
