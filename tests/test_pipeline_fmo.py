"""FMO controls of the manifest in the real `cytopipe run` (issue 10, "Thresholds from controls").

A small random-instrument study with one FMO set per site (``fmo="site"``); site S2's FMO rows are
taken out of the manifest. Through `cytopipe run` (a fresh process, Dask workers): the samples of
S1 are gated with S1's set (their own batch's where it has one, else the site's), their T-helper
gates' source is ``control`` and the fit records name the FMO file; S2's samples fall back on the
landmark rule, flagged; every threshold equals what ``gate(..., controls=...)`` gives directly with
the same set. `cytopipe gate --manifest` (now through the pipeline) writes the same table.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import cytopipe
from tests.pipeline_support import TEMPLATE, cli

FMO_GATES = ["Th17", "Th1", "cTfh", "activated cTfh"]  # `control: fmo` gates of the canonical template
FMO_KEYS = ["Th17[CXCR3]", "Th17[CCR6]", "cTfh", "activated cTfh"]


@pytest.fixture(scope="module")
def fmo_study(tmp_path_factory):
    from cytopipe.simulate import instrument_trial

    folder = tmp_path_factory.mktemp("fmo_study")
    instrument_trial(folder, instrument="random", seed=6101, patients=3, visits=(0, 12), events=3000,
                     fmo="site", fmo_events=8000)  # fmt: skip
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    is_s2_fmo = manifest["control"].str.startswith("fmo:") & (manifest["site"] == "S2")
    manifest[~is_s2_fmo].to_csv(folder / "manifest.csv", index=False)
    (folder / "study.yaml").write_text(
        f"study: FMO plumbing\nmanifest: {folder / 'manifest.csv'}\ntemplate: {TEMPLATE}\nseed: 0\n"
        "workers: 1\nclustering: {enabled: false}\nstatistics: {enabled: false}\nreport: {enabled: false}\n"
    )
    out = folder / "run"
    proc = cli("run", str(folder / "study.yaml"), "--out", str(out), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder, out


def test_run_gates_each_sample_with_the_fmo_set_of_its_batch_or_site(fmo_study):
    from cytopipe.gating import gate
    from cytopipe.pipeline import build_state, prepare_sample, split_jobs
    from cytopipe.pipeline.state import _load_manifest
    from cytopipe.workflow import load_workflow

    folder, out = fmo_study
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    samples = manifest[manifest["control"] == ""]
    fmo = manifest[manifest["control"].str.startswith("fmo:")]
    assert set(fmo["site"]) == {"S1"} and fmo["batch"].nunique() == 1
    fmo_batch = fmo["batch"].iloc[0]
    # run.json lists the FMO controls used, and how many samples each served
    info = json.loads((out / "run.json").read_text())
    register = next(s for s in info["steps"] if s["step"] == "register")
    listed = {c["file"]: c for c in register["fmo_controls"]}
    assert set(listed) == set(fmo["file"])
    n_s1 = int((samples["site"] == "S1").sum())
    assert {c["samples"] for c in listed.values()} == {n_s1}
    assert register["samples_without_fmo"] == int((samples["site"] == "S2").sum()) > 0

    ps = pd.read_parquet(out / "population_stats.parquet")
    fits = pd.read_parquet(out / "study" / "gate_fits.parquet")
    site = dict(zip(samples["sample_id"], samples["site"]))
    fmo_gated = ps[ps["population"].isin(FMO_GATES)]
    s1 = fmo_gated[fmo_gated["sample_id"].map(site) == "S1"]
    s2 = fmo_gated[fmo_gated["sample_id"].map(site) == "S2"]
    # S1: the FMO set the thresholds; where it could not (a fit on too few parent events falls
    # back on the pooled estimate), the population says so
    assert (s1["gate_source"] == "control").mean() >= 0.75, s1[["sample_id", "population", "gate_source"]]
    assert (s1.loc[s1["gate_source"] != "control", "gate_flags"] != "").all()
    # S2 (no FMO set): the landmark rule, flagged
    assert (s2["gate_source"] != "control").all()
    assert (s2["gate_flags"] != "").all()
    own = s2[s2["gate_source"] == "fitted"]  # (a failed fit's pooled fallback is flagged as such)
    assert len(own) and own["gate_flags"].str.contains("none for this sample's batch or site").all()
    for r in fits[fits["key"].isin(FMO_KEYS)].itertuples():
        marker = {"Th17[CXCR3]": "CXCR3", "Th17[CCR6]": "CCR6", "cTfh": "CXCR5", "activated cTfh": "PD-1"}[
            r.key
        ]
        want = f"FMO_{fmo_batch}_{marker}.fcs" if site[r.sample_id] == "S1" and r.status == "ok" else ""
        assert r.control == want, (r.sample_id, r.key, r.status, r.control)

    # every threshold is what the engine gives with the same FMO set given directly (the sample's
    # events after the run's event QC, the run's locked transforms)
    wf = load_workflow(folder / "study.yaml")
    state = build_state(wf, n_samples=len(samples))
    state.transforms = info["study_state"]["transforms"]
    jobs, _ = split_jobs(_load_manifest(wf.manifest))
    s1_set = {c.control[4:]: cytopipe.read_fcs(folder / c.file) for c in fmo.itertuples()}
    compared = 0
    for job in jobs:
        sid = job["sample_id"]
        prep = prepare_sample(job, state)
        direct = gate(prep.sample, state.template, transforms=state.transforms, medians=False,
                      controls=s1_set if site[sid] == "S1" else {})  # fmt: skip
        mine = {f.key: f.params for f in direct.fits}
        theirs = fits[fits["sample_id"] == sid].set_index("key")["params"]
        for key in FMO_KEYS:
            if mine[key] is None:  # a fit that failed here failed in the run too
                assert theirs[key] is None
                continue
            np.testing.assert_allclose(np.asarray(theirs[key], dtype=float), mine[key], rtol=1e-9, atol=1e-12)
            compared += 1
    assert compared >= 0.75 * len(samples) * len(FMO_KEYS)


def test_gate_command_uses_the_fmo_controls_through_the_pipeline(fmo_study, tmp_path):
    import argparse

    from cytopipe.pipeline.gate_command import add_arguments, not_through_pipeline

    folder, run = fmo_study
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--manifest", str(folder / "manifest.csv"), "--template", str(TEMPLATE),
                              "--out", str(tmp_path)])  # fmt: skip
    assert not_through_pipeline(args) is None  # FMO gates no longer need the single-process path
    out = tmp_path / "gate"
    proc = cli("gate", "--manifest", str(folder / "manifest.csv"), "--template", str(TEMPLATE), "--out", str(out),
               "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the same table as `cytopipe run` of the same files, template and seed
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "population_stats.parquet"), pd.read_parquet(run / "population_stats.parquet")
    )
    fits = pd.read_parquet(out / "gate_fits.parquet")
    assert (fits.loc[fits["key"] == "cTfh", "control"] != "").any()


def test_a_changed_fmo_regates_its_samples_and_a_bad_one_is_a_flagged_fallback(fmo_study, tmp_path):
    from cytopipe.fcs import read_fcs, write_fcs
    from cytopipe.pipeline import EXIT_FAILURES, run_workflow
    from cytopipe.pipeline.gate_command import OFF
    from cytopipe.workflow import workflow_from_options
    from tests.pipeline_support import copy_trial, truncate_fcs

    study = copy_trial(fmo_study[0], tmp_path / "study")
    out = tmp_path / "run"

    def run():
        wf = workflow_from_options(study / "manifest.csv", TEMPLATE, out, **OFF)
        return run_workflow(wf, scheduler="synchronous", progress=False)

    first = run()
    manifest = pd.read_csv(study / "manifest.csv", dtype=str, keep_default_na=False)
    samples = manifest[manifest["control"] == ""]
    n_s1 = int((samples["site"] == "S1").sum())
    fmo = manifest[manifest["control"].str.startswith("fmo:")].set_index("control")["file"]
    # a re-acquired PD-1 FMO: the samples that use it (S1) are gated again, the others reused
    path = study / fmo["fmo:PD-1"]
    s = read_fcs(path)
    write_fcs(path, s.events[:-300], s.channels, s.keywords, spillover=s.spillover)
    second = run()
    fit = next(x for x in second.info["steps"] if x["step"] == "gating-fit")
    assert fit["reused"] == len(samples) - n_s1
    before = first.population_stats.set_index(["sample_id", "population"])["pct_parent"]
    after = second.population_stats.set_index(["sample_id", "population"])["pct_parent"]
    s2 = [sid for sid in samples.loc[samples["site"] == "S2", "sample_id"]]
    assert (before.loc[s2] == after.loc[s2]).all()
    # a corrupt CXCR5 FMO: a failed control naming the file; the run goes on, S1's cTfh falls
    # back on the landmark rule (flagged) while its Th17/Th1 thresholds keep their controls
    truncate_fcs(study / fmo["fmo:CXCR5"])
    third = run()
    assert third.exit_code == EXIT_FAILURES
    ctl = third.samples.set_index("file").loc[fmo["fmo:CXCR5"]]
    assert ctl["status"] == "failed" and fmo["fmo:CXCR5"] in ctl["error"] and "truncated" in ctl["error"]
    ps = third.population_stats
    in_s1 = ps["sample_id"].isin(samples.loc[samples["site"] == "S1", "sample_id"])
    ctfh = ps[in_s1 & (ps["population"] == "cTfh")]
    assert (ctfh["gate_source"] != "control").all()
    fitted = ctfh[ctfh["gate_source"] == "fitted"]
    assert len(fitted) and fitted["gate_flags"].str.contains("has no control of CXCR5").all(), ctfh[
        "gate_flags"
    ]
    th17 = ps[in_s1 & (ps["population"] == "Th17")]
    assert (th17["gate_source"] == "control").mean() >= 0.75
    assert set(third.population_stats["sample_id"]) == set(samples["sample_id"])  # no sample lost


def test_which_sample_gets_which_fmo_set():
    """The documented rule: the sample's own batch, else its site's earliest set, else the study's
    (FMO rows with neither batch nor site), else none; a marker twice in one set is a problem."""
    from cytopipe.gating.command import assign_fmo_sets

    def fmo(marker, batch, site, when, name):
        return {"file": name, "control": f"fmo:{marker}", "batch": batch, "site": site, "acquired_at": when}

    rows = [
        fmo("CXCR5", "B2", "S1", "2020-03-01", "late_S1.fcs"),
        fmo("CXCR5", "B1", "S1", "2020-01-01", "early_S1.fcs"),
        fmo("CXCR5", None, None, "2020-01-01", "study.fcs"),
        fmo("CXCR5", "B1", "S1", "2020-01-01", "twice.fcs"),
        fmo("PD-1", "B1", "S1", "2020-01-01", "early_S1_pd1.fcs"),
    ]
    samples = [
        {"batch": "B2", "site": "S1"},  # its own batch
        {"batch": "B9", "site": "S1"},  # no set in its batch: the site's earliest
        {"batch": "B7", "site": "S2"},  # none in its site: the study's
        {"batch": None, "site": None},
    ]
    sets, problems = assign_fmo_sets(rows, samples)
    assert [(label, {m: c["file"] for m, c in members.items()}) for label, members in sets] == [
        ("batch B2", {"CXCR5": "late_S1.fcs"}),
        ("site S1", {"CXCR5": "early_S1.fcs", "PD-1": "early_S1_pd1.fcs"}),
        ("study", {"CXCR5": "study.fcs"}),
        ("study", {"CXCR5": "study.fcs"}),
    ]
    assert [(c["file"], "second FMO control of CXCR5" in why) for c, why in problems] == [("twice.fcs", True)]
    # without a study set, a sample of a site without FMOs has none
    sets, _ = assign_fmo_sets([r for r in rows if r["file"] != "study.fcs"], samples[2:3])
    assert sets == [None]


def test_fmo_controls_are_read_as_the_samples_of_an_imported_template(fmo_study, tmp_path):
    """Gates imported from Gating-ML, FlowJo or Cytobank are defined on preprocessed FCS values
    (``Template.preprocess``): the samples are preprocessed ($PnE, $PnG, $TIMESTEP) before gating, and
    so must be their FMO controls. Here the CXCR5 FMO of an S1 sample is written again as acquired
    with gain 4 (its values x4, ``$PnG`` 4: preprocessed, the file's values are the original's). The
    pipeline's gating (:func:`gate_with_fmo`) sets cTfh's threshold from the control as
    preprocessed, i.e. as the original file gives it; the control read raw (as it was, while the
    sample was preprocessed) gives another threshold."""
    import dataclasses

    from cytopipe.fcs import read_fcs, write_fcs
    from cytopipe.gating import gate, load_template
    from cytopipe.pipeline import build_state, prepare_sample, split_jobs
    from cytopipe.pipeline.fmo import gate_with_fmo
    from cytopipe.pipeline.state import _load_manifest
    from cytopipe.store import file_sha256
    from cytopipe.workflow import load_workflow

    folder, out = fmo_study
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
    fmo = manifest[manifest["control"].str.startswith("fmo:")].set_index("control")["file"]
    original = folder / fmo["fmo:CXCR5"]
    ctl = read_fcs(original)
    gained = ctl.channels.copy()
    scaled = ~gained["pnn"].str.lower().str.contains("time")
    gained.loc[scaled, "png"] = 4.0
    gained.loc[scaled, "pnr"] = gained.loc[scaled, "pnr"].astype(float) * 4
    events = ctl.events.copy()
    events[:, scaled.to_numpy()] *= 4
    keywords = {k: v for k, v in ctl.keywords.items() if not (k.startswith("$P") and k.endswith("G"))}
    path = write_fcs(tmp_path / original.name, events, gained, keywords, spillover=ctl.spillover)
    assert read_fcs(path).channels.loc[scaled, "png"].eq(4.0).all()
    np.testing.assert_array_equal(
        read_fcs(path, preprocess=True).events, read_fcs(original, preprocess=True).events
    )

    wf = load_workflow(folder / "study.yaml")
    state = build_state(wf, n_samples=6)
    state.transforms = json.loads((out / "run.json").read_text())["study_state"]["transforms"]
    imported = dataclasses.replace(load_template(TEMPLATE), preprocess=True)  # as an imported one
    state.template = imported
    jobs, _ = split_jobs(_load_manifest(wf.manifest))
    job = next(j for j in jobs if j["site"] == "S1")
    controls = {c[4:]: folder / f for c, f in fmo.items()} | {"CXCR5": path}
    job["fmo"] = {"set": "site S1", "controls": {m: {"file": p.name, "path": str(p), "sha256": file_sha256(p),
                                                     "batch": None, "site": "S1"} for m, p in controls.items()}}  # fmt: skip
    prep = prepare_sample(job, state)
    result = gate_with_fmo(gate, prep, state, imported, transforms=state.transforms, medians=False)

    def threshold(res) -> np.ndarray:
        return np.asarray(next(f.params for f in res.fits if f.key == "cTfh"), dtype=float)

    assert result.populations["cTfh"].source == "control"
    direct = {c[4:]: read_fcs(folder / f, preprocess=True) for c, f in fmo.items()}  # the original files
    expected = gate(prep.sample, imported, controls=direct, transforms=state.transforms, medians=False)
    np.testing.assert_allclose(threshold(result), threshold(expected), rtol=1e-9)
    raw = gate(prep.sample, imported, controls=direct | {"CXCR5": read_fcs(path)}, transforms=state.transforms,
               medians=False)  # fmt: skip
    assert not np.allclose(threshold(raw), threshold(expected), rtol=1e-3)
