"""HTML building blocks of the report: one self-contained page, no scripts, no external files.

Everything from the data is escaped. Figures are ``<img>`` with ``data:`` URIs; the style sheet is
inline; the table of contents is a plain list of anchors.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from cytopipe.report.figures import Rendered

CSS = """
:root { --ink:#212529; --muted:#6c757d; --line:#dee2e6; --accent:#1c7ed6; --bg:#f8f9fa; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--ink); background: #fff; }
nav.toc { position: fixed; top:0; left:0; bottom:0; width: 250px; overflow-y: auto; padding: 18px 14px;
          background: var(--bg); border-right: 1px solid var(--line); font-size: 13px; }
nav.toc h2 { font-size: 14px; margin: 0 0 8px; }
nav.toc ol { padding-left: 18px; margin: 0; }
nav.toc ol ol { padding-left: 14px; font-size: 12px; }
nav.toc a { color: var(--ink); text-decoration: none; }
nav.toc a:hover { color: var(--accent); text-decoration: underline; }
main { margin-left: 250px; padding: 22px 36px 60px; max-width: 1500px; }
header.top h1 { margin: 0 0 4px; font-size: 24px; }
header.top .sub { color: var(--muted); }
section { border-top: 1px solid var(--line); margin-top: 28px; padding-top: 6px; }
h2 { font-size: 20px; margin: 10px 0 6px; }
h3 { font-size: 16px; margin: 22px 0 4px; }
p.lead { color: #343a40; max-width: 980px; }
p.note { background: #fff9db; border-left: 4px solid #fab005; padding: 6px 10px; max-width: 980px; }
p.error { background: #fff5f5; border-left: 4px solid #e03131; padding: 6px 10px; max-width: 980px; }
figure { margin: 12px 0 18px; }
figure img { max-width: 100%; height: auto; border: 1px solid #f1f3f5; }
figcaption { color: #495057; font-size: 13px; max-width: 980px; margin-top: 4px; }
table.data { border-collapse: collapse; font-size: 12.5px; margin: 6px 0 4px; }
table.data th, table.data td { border-bottom: 1px solid var(--line); padding: 3px 8px; text-align: left;
                              vertical-align: top; }
table.data th { background: var(--bg); position: sticky; top: 0; }
table.data td.nw { white-space: nowrap; }
table.data td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.data tr.sig td { background: #e7f5ff; }
table.data tr.bad td { background: #fff5f5; }
table.data tr.warn td { background: #fff9db; }
div.scroll { max-height: 520px; overflow: auto; border: 1px solid var(--line); display: inline-block;
             max-width: 100%; }
details { margin: 6px 0 12px; }
details summary { cursor: pointer; color: var(--accent); }
.caption { color: #495057; font-size: 13px; max-width: 980px; }
.kpis { display: flex; flex-wrap: wrap; gap: 12px; margin: 10px 0; }
.kpi { background: var(--bg); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; min-width: 130px; }
.kpi b { display: block; font-size: 20px; }
.kpi span { color: var(--muted); font-size: 12px; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin: 0 5px -1px 12px; }
a.csv { font-size: 12px; }
nav.toc li.current > a { font-weight: 600; }
@media (max-width: 900px) { nav.toc { position: static; width: auto; } main { margin-left: 0; } }
@media print {
  @page { size: A4 landscape; margin: 12mm; }
  body { font-size: 10.5pt; }
  nav.toc { display: none; }
  main { margin: 0; padding: 0; max-width: none; }
  section { page-break-before: always; border-top: none; }
  section:first-of-type { page-break-before: auto; }
  figure, table.data tr, .kpis { page-break-inside: avoid; }
  figure img { max-width: 100%; }
  div.scroll { max-height: none; overflow: visible; border: none; }
  table.data th { position: static; }
  details > summary { display: none; }
  details > :not(summary) { display: block !important; }
  details::details-content { content-visibility: visible; display: contents; }
  a.csv { display: none; }
}
"""


def esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


@dataclass
class Section:
    """One top-level section: its anchor, title, body HTML, and sub-headings for the TOC."""

    id: str
    title: str
    body: list[str] = field(default_factory=list)
    children: list[tuple[str, str]] = field(default_factory=list)

    def add(self, fragment: str) -> None:
        self.body.append(fragment)

    def sub(self, anchor: str, title: str) -> None:
        self.children.append((anchor, title))
        self.body.append(f'<h3 id="{esc(anchor)}">{esc(title)}</h3>')


def count(n: int, one: str, many: str | None = None) -> str:
    """``1 sample``, ``3 samples`` (``many``: an irregular plural, e.g. ``batches``)."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def paragraph(text: str, kind: str = "lead") -> str:
    return f'<p class="{kind}">{esc(text)}</p>'


def figure(fig: Rendered, caption: str) -> str:
    return (
        f'<figure id="fig-{esc(fig.name)}"><img src="{fig.uri}" width="{fig.width}" height="{fig.height}" '
        f'alt="{esc(fig.alt)}"><figcaption>{esc(caption)}</figcaption></figure>'
    )


def kpis(items: Sequence[tuple[str, str]]) -> str:
    cells = "".join(f'<div class="kpi"><b>{esc(v)}</b><span>{esc(k)}</span></div>' for k, v in items)
    return f'<div class="kpis">{cells}</div>'


def swatches(colors: Mapping[str, str], arms: Sequence[str]) -> str:
    return "".join(f'<span class="swatch" style="background:{esc(colors[a])}"></span>{esc(a)}' for a in arms)


#: headers of raw column names (tables whose shown frame keeps the CSV's column names)
HEADERS = {
    "sample_id": "Sample", "patient_id": "Patient", "visit": "Week", "arm": "Arm", "population": "Population",
    "parent": "% of", "pct_parent": "% of parent", "median_pct_parent": "Median % of parent",
    "mean_pct_parent": "Mean % of parent", "count": "Events", "parent_count": "Parent events", "n": "n",
    "p": "p", "q": "q", "rate_pct": "Rate (%)", "ci_low_pct": "95% CI low (%)", "ci_high_pct": "95% CI high (%)",
    "ci_low": "95% CI low", "ci_high": "95% CI high", "mean": "Mean", "median": "Median",
    "mean_change": "Mean change", "change_ci_low": "Change 95% CI low", "change_ci_high": "Change 95% CI high",
    "median_log2fc": "Median log2 fold change", "best_f1": "Best F1", "best_precision": "Best precision",
    "best_recall": "Best recall", "best_metacluster": "Best metacluster", "union_f1": "Union F1",
    "union_metaclusters": "Union of metaclusters", "n_population": "Events in population",
    "responders": "Responders", "imputed": "Imputed non-responders", "endpoint": "Endpoint",
    "samples": "Samples", "flagged": "Flagged", "outliers": "Outliers", "metacluster": "Metacluster",
    "table": "Table", "rows": "Rows", "file": "File", "status": "Status", "note": "Note",
}  # fmt: skip


def header(column: object) -> str:
    """A human header for a column name: known names from :data:`HEADERS`; other snake_case names
    spelled out (``events_after_qc`` -> "Events after QC"); anything else unchanged."""
    text = str(column)
    if text in HEADERS:
        return HEADERS[text]
    if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", text):
        words = [{"pct": "%", "ci": "CI", "qc": "QC", "sd": "SD", "f1": "F1", "log2fc": "log2 fold change"}.get(w, w)
                 for w in text.split("_")]  # fmt: skip
        out = " ".join(words)
        return out[0].upper() + out[1:]
    return text


def format_p(v: float) -> str:
    """p- and q-values: ``< 0.001`` below 0.001, else 2 significant digits (0.012, 0.15, 1)."""
    if not np.isfinite(v):
        return ""
    if v < 0.001:
        return "< 0.001"
    return f"{v:.2g}"


def format_number(v: float) -> str:
    """One rule for every number: integers as integers (thousands separated from 10,000), others
    3 significant digits (1 decimal from 100), no exponent between 0.001 and 100,000."""
    if not np.isfinite(v):
        return ""
    if float(v).is_integer() and abs(v) < 1e15:
        return f"{int(v):,}" if abs(v) >= 10000 else str(int(v))
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        return f"{v:.2e}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    return f"{v:.3g}"


def format_value(value: object, column: str) -> tuple[str, bool]:
    """(text, numeric?) of a table cell."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
        return "", False
    if isinstance(value, (bool, np.bool_)):
        return ("yes" if value else "no"), False
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10000 else str(int(value)), True
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if column in ("p", "q") or column.startswith(("p ", "q ")):
            return format_p(v), True
        return format_number(v), True
    return str(value), False


def table(
    df: pd.DataFrame,
    *,
    csv: str | None = None,
    caption: str = "",
    collapse_over: int = 25,
    max_rows: int = 2000,
    row_class: Sequence[str] | None = None,
    summary: str | None = None,
) -> str:
    """A DataFrame as an HTML table (escaped); long tables fold into <details> and scroll; at most
    ``max_rows`` rows are shown (the CSV beside the report has them all)."""
    shown = df.head(max_rows)
    head = "".join(f"<th>{esc(header(c))}</th>" for c in shown.columns)
    body = []
    classes = list(row_class) if row_class is not None else [""] * len(df)
    for i, rec in enumerate(shown.itertuples(index=False, name=None)):
        cells = []
        for col, value in zip(shown.columns, rec):
            text, numeric = format_value(value, str(col))
            if numeric:
                cells.append(f'<td class="num">{esc(text)}</td>')
            else:  # short text stays on one line (arm names, sample ids); long text wraps
                cells.append(
                    f'<td class="nw">{esc(text)}</td>' if len(text) <= 24 else f"<td>{esc(text)}</td>"
                )
        cls = f' class="{classes[i]}"' if classes[i] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    out = f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'
    if len(df) > 12:
        out = f'<div class="scroll">{out}</div>'
    more = f" (first {max_rows} shown)" if len(df) > max_rows else ""
    link = f' <a class="csv" href="{esc(csv)}">CSV</a>' if csv else ""
    cap = f'<div class="caption">{esc(caption)}{esc(more)}{link}</div>' if caption or link else ""
    if len(df) > collapse_over or collapse_over == 0:
        label = summary or f"Show the table ({len(df)} rows)"
        return f"<details><summary>{esc(label)}</summary>{out}</details>{cap}"
    return out + cap


def page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The whole HTML document."""
    toc = []
    for s in sections:
        sub = "".join(f'<li><a href="#{esc(a)}">{esc(t)}</a></li>' for a, t in s.children)
        toc.append(
            f'<li><a href="#{esc(s.id)}">{esc(s.title)}</a>' + (f"<ol>{sub}</ol>" if sub else "") + "</li>"
        )
    body = "".join(
        f'<section id="{esc(s.id)}"><h2>{esc(s.title)}</h2>{"".join(s.body)}</section>' for s in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f'<nav class="toc" aria-label="Contents"><h2>Contents</h2><ol>{"".join(toc)}</ol></nav>'
        f'<main><header class="top"><h1>{esc(title)}</h1><div class="sub">{esc(subtitle)}</div></header>'
        f"{body}</main></body></html>\n"
    )
