"""A FlowJo workspace of several samples as the run's template: each file gets its own sample's gates.

FlowJo samples often carry gates of their own (custom gates, gates moved by hand, or the per-file
fitted gates a ``cytopipe gate --flowjo`` export writes). ``cytopipe run`` with ``template:
analysis.wsp`` gates every manifest file with the gates of the workspace sample it belongs to,
matched as ``cytopipe gate`` matches them (:meth:`cytopipe.gating.flowjo.FlowJoWorkspace.sample_for_file`:
sample name, DataSet URI or ``$FIL``); a file the workspace does not list gets the first sample's
gates, with a warning naming the file. Which sample's gates each file got is recorded in run.json
(``study_state.flowjo_workspace``). The study state carries one template per workspace sample in use
(:attr:`cytopipe.pipeline.state.StudyState.own_templates`); everything study-wide (markers, FMO plan,
clustering plan, preprocessing) is the first sample's template, as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def is_workspace(path: str | Path) -> bool:
    """Whether ``path`` is a FlowJo 10 workspace (``.wsp``) template."""
    return Path(path).suffix.lower() == ".wsp"


def workspace_templates(
    path: str | Path, jobs: Sequence[dict[str, Any]], adjust: Callable[[Any], Any], warn: bool = True
) -> tuple[Any, dict[str, str], dict[str, Any], dict[str, Any] | None]:
    """``(default template, {sample_id: workspace sample}, {workspace sample: template}, record)``
    of a workspace template; with a single sample, or no jobs, only the default (its first sample's
    gates) and empty maps. ``adjust`` sets what the workflow asks of every template (compensation);
    ``warn``: a file the workspace does not list is said once per file (logging, WARNING)."""
    from cytopipe.gating.flowjo import FlowJoWorkspace

    workspace = FlowJoWorkspace(path)
    first = workspace.sample().name
    default = adjust(workspace.template(first))
    if len(workspace.samples) < 2 or not jobs:
        return default, {}, {}, None
    gates_of: dict[str, str] = {}
    outside: list[str] = []
    for job in jobs:
        if not job.get("ok", True) or not job.get("path"):  # a bad manifest row: failed, never gated
            continue
        own = workspace.sample_for_file(job["path"])
        if own is None:
            outside.append(job["sample_id"])
            if warn:
                logger.warning(
                    "file '%s' (sample %s) is not a sample of the FlowJo workspace '%s'; it is gated with "
                    "the gates of its first sample, '%s'",
                    job.get("file"),
                    job["sample_id"],
                    workspace.path.name,
                    first,
                )
        gates_of[job["sample_id"]] = own.name if own is not None else first
    templates = {first: default}
    for name in sorted(set(gates_of.values()) - {first}):
        templates[name] = adjust(workspace.template(name))
    record = {
        "file": str(workspace.path),
        "first_sample": first,
        "gates_of": dict(sorted(gates_of.items())),  # sample_id -> the workspace sample whose gates it got
        "not_in_workspace": sorted(outside),  # gated with the first sample's gates
    }
    return default, gates_of, templates, record
