"""A finished run, loaded to re-process its samples exactly as it did (exports, review, clustering).

:func:`load_run` rebuilds the study state (compensation, locked transforms, pooled gate
estimates) from run.json and ``study/``; it refuses when the template changed since the run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.pipeline.fmo import attach_loaded_fmo
from cytopipe.pipeline.state import StudyState, _load_manifest, build_state, split_jobs
from cytopipe.pipeline.tasks import prepare_sample
from cytopipe.store import RunFolder, file_sha256
from cytopipe.workflow import Workflow

logger = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    """A finished run, ready to re-process its samples exactly as it did (for exports)."""

    folder: RunFolder
    info: dict[str, Any]
    wf: Workflow
    state: StudyState
    jobs: list[dict[str, Any]]  # samples processed ok/flagged, with their manifest fields
    samples: pd.DataFrame
    codes: dict[str, str] | None = None  # arm -> code when the run folder is blinded


def load_run(run_dir: str | Path) -> LoadedRun:
    """Rebuild a finished run's study state from run.json and its study/ folder."""
    from cytopipe.errors import StoreError
    from cytopipe.store import read_run_info, read_table

    folder = RunFolder(run_dir)
    info = read_run_info(folder.path)
    codes = _folder_codes(folder.path, info)
    cases: dict[str, dict[str, str]] = {}
    if codes is not None:  # a blinded folder: its arms as the manifest names them, in memory only
        from cytopipe.report.blinding import recode_obj
        from cytopipe.report.blindrecord import source_tables
        from cytopipe.report.unblind import case_spellings, respell_info

        info = recode_obj(info, codes, unblind=True)
        # a batch spelt with an arm name in another case (``Placebo``): as the manifest spells it
        cases = case_spellings(source_tables(info.get("workflow")), codes)
        info = respell_info(info, cases, codes)
    wf = Workflow.from_dict(info["workflow"])
    for key, path in (("template", wf.template), ("manifest", wf.manifest)):
        if not Path(path).is_file():
            raise StoreError(
                f"the run's {key} {path} is gone; it is needed to re-process the samples", file=folder.path
            )
    template_hash = file_sha256(wf.template)
    if wf.examples is not None:  # learned gates: the key covers the examples too (step_gate_fit)
        from cytopipe.gating.learn import examples_key

        template_hash = examples_key(template_hash, wf.examples)
    if template_hash != info["hashes"]["template"]:
        raise StoreError(
            f"the gating template {wf.template} changed since this run; rerun `cytopipe run` first "
            "so that exported populations match population_stats",
            file=folder.path,
        )
    manifest = _load_manifest(wf.manifest)
    jobs, controls = split_jobs(manifest)
    state = build_state(wf, n_samples=len(jobs), jobs=jobs, warn=False)  # warned by the run
    record = info.get("study_state") or {}
    if record.get("spillover"):
        from cytopipe.fcs import Spillover

        sp = record["spillover"]
        state.spillover = Spillover(np.asarray(sp["matrix"], dtype=np.float64), list(sp["channels"]))
    if record.get("spillover_sets"):  # one control set per site/batch
        from cytopipe.fcs import Spillover

        sets = record["spillover_sets"]
        state.spillover_column = sets["column"]
        state.spillover_sets = {
            v: Spillover(np.asarray(sp["matrix"], dtype=np.float64), list(sp["channels"]))
            for v, sp in sets["sets"].items()
        }
    state.transforms = dict(record.get("transforms") or {})
    if record.get("gate_fits"):
        from cytopipe.gating import pool_estimates

        state.pooled = pool_estimates(pd.read_parquet(folder.path / record["gate_fits"]), manifest)
    samples = read_table(folder.path, "samples")
    if codes is not None:
        from cytopipe.report.blinding import unblind_frame

        samples = unblind_frame(samples, codes, cases)
    usable = samples[samples["status"].isin(["ok", "flagged"]) & samples["control"].fillna("").eq("")]
    sha = dict(zip(usable["sample_id"], usable["sha256"]))
    jobs = [dict(j, sha256=sha[j["sample_id"]]) for j in jobs if j["sample_id"] in sha]
    ctl = samples[samples["status"].isin(["ok", "flagged"]) & samples["control"].fillna("").ne("")]
    attach_loaded_fmo(state.template, jobs, controls, dict(zip(ctl["sample_id"], ctl["sha256"])))
    if wf.examples is not None:  # learned gates, learned again exactly as the run did
        from cytopipe.gating.learn import study_learner

        state.learner, _ = study_learner(wf.examples, state, jobs, prepare_sample, "")
    return LoadedRun(folder=folder, info=info, wf=wf, state=state, jobs=jobs, samples=samples, codes=codes)


def _folder_codes(path: Path, info: Mapping[str, Any]) -> dict[str, str] | None:
    """``{arm: code}`` of a blinded run folder (from its manifest's arms), else ``None``."""
    from cytopipe.report.blinding import codes_of_record, run_record

    record = run_record(info)
    if record is None:
        return None
    return codes_of_record(record, path, info.get("workflow"))
