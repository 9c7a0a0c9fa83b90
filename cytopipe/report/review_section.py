"""The report's "Gate review" section: the sign-off and every override of a reviewed run, with its
reason and the % of parent before and after, read from ``RUN_DIR/review.json`` (written by
``cytopipe review`` / the workspace; the report reads it as plain JSON and imports nothing of them)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from cytopipe.report import html as H


def _utc(at: Any) -> str:
    """An ISO 8601 UTC time as people read it: 2026-12-05 22:06:47 UTC (not ...47.203545+00:00 UTC)."""
    text = str(at or "")
    return f"{text[:19].replace('T', ' ')} UTC" if len(text) >= 19 else f"{text} UTC"


def _carried(c: Any) -> str:
    """Where a change carried over into this version of the run came from, who carried it, when."""
    if not c:
        return ""
    return (f"from run {c.get('from_run')} by {c.get('by')} at {_utc(c.get('at'))} "
            f"(audit entry {c.get('audit_entry')})")  # fmt: skip


def review(b: Any) -> H.Section | None:
    path = b.data.run_dir / "review.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    decisions = data.get("decisions") or []
    s = H.Section("review", "Gate review")
    sign = data.get("signoff")
    if sign:
        s.add(H.paragraph(
            f"Signed off: \u201c{sign.get('meaning', '')}\u201d by {sign.get('user', '')} at {_utc(sign.get('at'))} "
            f"(audit entry {sign.get('audit_entry')}); the gates of this run version ({data.get('version', 1)}) "
            "are locked.", "note"))  # fmt: skip
    else:
        s.add(H.paragraph("This run's gating has not been signed off.", "note"))
    if data.get("parent_run"):  # a new version of a signed-off run: which version, made from which run
        s.add(H.paragraph(f"This is version {data.get('version')} of the run, made from run {data['parent_run']} "
                          "(its gate changes carried over, unlocked for review)."))  # fmt: skip
    approved = sum(1 for d in decisions if d.get("kind") == "approve")
    changes = [d for d in decisions if d.get("kind") in ("override", "pooled", "revert")]
    s.add(H.paragraph(f"{approved} gate approvals and {len(changes)} gate changes (overrides, pooled gates, "
                      "reverts) were recorded; each is an entry of the workspace's audit trail."))  # fmt: skip
    if changes:
        rows = [
            {
                "sample_id": d.get("sample_id"),
                "population": d.get("population"),
                "action": d.get("kind"),
                "gate": json.dumps(d.get("params") or {}, sort_keys=True)
                if d.get("kind") == "override"
                else "",
                "reason": " · ".join(x for x in (d.get("category"), d.get("reason")) if x),
                "pct_parent_before": d.get("before_pct"),
                "pct_parent_after": d.get("after_pct"),
                "user": d.get("user"),
                "at": d.get("at"),
                "audit_entry": d.get("audit_entry"),
                "carried_over": _carried(d.get("carried")),
            }
            for d in changes
        ]
        s.add(b.table(pd.DataFrame(rows), "gate_overrides", caption="Every gate override, with its reason, "
                      "the population's % of parent before and after it, who made it and, for one carried over "
                      "from the run before, who carried it over."))  # fmt: skip
    return s
