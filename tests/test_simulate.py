"""The simulated IL-2 trial: cohort tables, FCS files, controls, truth and faults."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import cytopipe
from cytopipe.simulate import (
    POPULATION_NAMES,
    SimulationError,
    load_labels,
    simulate_cohort,
    simulate_trial,
)
from cytopipe.simulate import params as P
from cytopipe.simulate.cohort import CLINICAL_COLUMNS, dose_response, kinetics
from cytopipe.simulate.populations import BIT, PARENT, unpack_membership
from cytopipe.simulate.truth import STATS_COLUMNS, compensate

REPO = Path(__file__).resolve().parents[1]
MANIFEST_COLUMNS = [
    "file",
    "sample_id",
    "patient_id",
    "visit",
    "arm",
    "panel",
    "batch",
    "site",
    "acquired_at",
    "control",
]
TRIAL_ARGS = dict(n_patients=8, visits=(0, 12), events=20000, seed=11, control_events=3000)
FAULTS = {"P002_W12": ["clog"], "P005_W00": ["shift"], "P007_W12": ["margin"], "P008_W00": ["clog", "margin"]}


@pytest.fixture(scope="module")
def trial(tmp_path_factory):
    out = tmp_path_factory.mktemp("trial") / "t"
    return simulate_trial(out, faults=FAULTS, **TRIAL_ARGS)


def read_csv(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def sri4(clinical: pd.DataFrame) -> pd.DataFrame:
    """SRI-4 per patient and post-baseline visit (SLEDAI drop >= 4, no new BILAG A, <= 1 new B,
    PGA not worse by >= 0.3)."""
    base = clinical[clinical["visit"] == 0].set_index("patient_id")
    out = clinical[clinical["visit"] > 0].copy()
    b = base.loc[out["patient_id"]]
    out["sledai_drop"] = b["sledai"].to_numpy() - out["sledai"].to_numpy()
    out["sri4"] = (
        (out["sledai_drop"] >= 4)
        & (out["bilag_new_a"] == 0)
        & (out["bilag_new_b"] <= 1)
        & (out["pga"] - b["pga"].to_numpy() < 0.3)
    )
    return out


def treg_change(cohort, week: int) -> pd.DataFrame:
    f = cohort.frequencies
    t = f[f["population"] == "Treg"].pivot_table(
        index=["patient_id", "arm"], columns="visit", values="pct_parent"
    )
    return np.log(t[week] / t[0]).rename("log_fc").reset_index()


# --------------------------------------------------------------------------------------------
# cohort layer
# --------------------------------------------------------------------------------------------
def test_cohort_tables_have_the_contract_columns():
    c = simulate_cohort(n_patients=12, visits=(0, 4, 12, 24), seed=1)
    assert len(c.patients) == 12 and list(c.patients["patient_id"][:2]) == ["P001", "P002"]
    assert {"patient_id", "arm", "dose_miu", "site", "sex", "age", "il2_responsiveness"} <= set(c.patients)
    assert tuple(c.clinical.columns) == CLINICAL_COLUMNS
    assert len(c.clinical) == 12 * 4
    assert list(c.frequencies.columns) == ["patient_id", "visit", "arm", "population", "parent", "pct_parent"]
    assert len(c.frequencies) == 12 * 4 * len(POPULATION_NAMES)
    assert set(c.frequencies["population"]) == set(POPULATION_NAMES)
    assert (c.frequencies["parent"] == c.frequencies["population"].map(PARENT)).all()
    assert c.frequencies["pct_parent"].between(0, 100).all()
    # 1:1:1:1 in permuted blocks of four
    assert c.patients["arm"].value_counts().to_dict() == {arm: 3 for arm in P.ARMS}
    cl = c.clinical
    base = cl[cl["visit"] == 0]
    assert (base["sledai"] >= 8).all() and (base["bilag_new_a"] == 0).all()
    assert cl["pga"].between(0, 3).all() and (cl["sledai"] % 2 == 0).all()
    assert (cl[["anti_dsdna", "c3", "c4", "proteinuria", "prednisone_mg"]] > 0).all().all()


def test_cohort_is_deterministic_and_independent_of_size():
    a = simulate_cohort(n_patients=8, seed=5)
    b = simulate_cohort(n_patients=8, seed=5)
    pd.testing.assert_frame_equal(a.clinical, b.clinical)
    pd.testing.assert_frame_equal(a.frequencies, b.frequencies)
    big = simulate_cohort(n_patients=16, seed=5)
    first = big.clinical[big.clinical["patient_id"].isin(a.patients["patient_id"])].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, a.clinical)
    other = simulate_cohort(n_patients=8, seed=6)
    assert not other.clinical["sledai"].equals(a.clinical["sledai"])


@pytest.mark.parametrize("visits", [(4, 0), (0, 0, 4), (-4, 0), ("a",)])
def test_bad_visits_are_clear_errors(visits):
    with pytest.raises(SimulationError, match="visits"):
        simulate_cohort(4, visits=visits)


def test_effect_trial_biology():
    c = simulate_cohort(n_patients=2000, visits=(0, 4, 12, 24), seed=2, effect=1.0)
    f = c.frequencies
    wide = f.pivot_table(index=["patient_id", "arm", "population"], columns="visit", values="pct_parent")
    lfc = np.log(wide[12] / wide[0]).groupby(["population", "arm"]).mean().unstack("arm")[list(P.ARMS)]
    treg = lfc.loc["Treg"].to_numpy()
    assert np.all(np.diff(treg) > 0.05), treg  # rises with dose
    assert abs(treg[0]) < 0.03 and 0.4 < np.exp(treg[3]) - 1 < 1.0  # placebo flat, 1.0 MIU ~1.5-2x
    for down in ("Th17", "cTfh"):
        assert np.all(np.diff(lfc.loc[down].to_numpy()) < 0), down
    for up in ("NK", "CD56bright NK"):
        assert np.all(np.diff(lfc.loc[up].to_numpy()) > 0), up
    assert lfc.loc["CD56bright NK", "IL-2 1.0 MIU"] > lfc.loc["NK", "IL-2 1.0 MIU"]  # CD56bright most
    assert np.all(np.abs(lfc.loc["Th1"].to_numpy()) < 0.03)  # Th1 unchanged
    # sustained, slightly lower after the switch to weekly dosing
    top = f[(f["population"] == "Treg") & (f["arm"] == "IL-2 1.0 MIU")].groupby("visit")["pct_parent"].mean()
    assert top[4] > 1.4 * top[0] and top[24] > 1.3 * top[0] and top[24] < top[12]
    # clinical response (SRI-4) by arm, like He 2020: placebo ~30-40%, 1.0 MIU ~55-65%
    s = sri4(c.clinical)
    rate = s[s["visit"].isin([12, 24])].groupby("arm")["sri4"].mean()
    assert 0.24 < rate["placebo"] < 0.44 and 0.50 < rate["IL-2 1.0 MIU"] < 0.72
    # dose order (500 per arm: sd of a rate ~0.02, neighbouring doses differ by ~0.06-0.1)
    assert rate["placebo"] + 0.05 < rate["IL-2 0.2 MIU"] < rate["IL-2 1.0 MIU"] - 0.05
    assert rate["IL-2 0.2 MIU"] < rate["IL-2 0.5 MIU"] < rate["IL-2 1.0 MIU"] + 0.04
    # within treated arms, a larger Treg rise goes with response
    tc = treg_change(c, 12).merge(s[s["visit"] == 24][["patient_id", "sri4"]], on="patient_id")
    treated = tc[tc["arm"] != "placebo"]
    assert (
        treated.loc[treated["sri4"], "log_fc"].mean() > treated.loc[~treated["sri4"], "log_fc"].mean() + 0.1
    )


def test_model_helpers():
    assert dose_response(0.0) == 0.0 and dose_response(1.0) == pytest.approx(1.0)
    assert 0 < dose_response(0.2) < dose_response(0.5) < 1
    k = kinetics(np.array([0, 4, 12, 16, 24]))
    assert k[0] == 0 and k[1] > 0.7 and k[2] > 0.95 and k[2] > k[3] > k[4] > 0.75


def test_null_trial_has_no_arm_effect_across_replicates():
    from scipy.stats import mannwhitneyu

    p_values, diffs, sri_diffs = [], [], []
    for rep in range(200):
        c = simulate_cohort(n_patients=40, visits=(0, 12), seed=1000 + rep, effect=0.0)
        assert (c.patients["treg_response"] == 0).all()
        # rows are patient-major, visit-minor: reshape instead of pivoting (fast)
        treg = c.samples["p_treg"].to_numpy().reshape(40, 2)
        log_fc = np.log(treg[:, 1] / treg[:, 0])
        arm = c.patients["arm"].to_numpy()
        hi, lo = log_fc[arm == "IL-2 1.0 MIU"], log_fc[arm == "placebo"]
        p_values.append(mannwhitneyu(hi, lo).pvalue)
        diffs.append(hi.mean() - lo.mean())
        cl = c.clinical
        sledai, pga = cl["sledai"].to_numpy().reshape(40, 2), cl["pga"].to_numpy().reshape(40, 2)
        new_a, new_b = (
            cl["bilag_new_a"].to_numpy().reshape(40, 2),
            cl["bilag_new_b"].to_numpy().reshape(40, 2),
        )
        resp = (sledai[:, 0] - sledai[:, 1] >= 4) & (new_a[:, 1] == 0) & (new_b[:, 1] <= 1)
        resp &= pga[:, 1] - pga[:, 0] < 0.3
        sri_diffs.append(resp[arm == "IL-2 1.0 MIU"].mean() - resp[arm == "placebo"].mean())
    rejection = np.mean(np.array(p_values) < 0.05)
    assert 0.01 < rejection < 0.10, rejection  # nominal 5% (binomial sd ~1.5% over 200 trials)
    assert abs(np.mean(diffs)) < 0.02
    assert abs(np.mean(sri_diffs)) < 0.045  # per-trial sd ~0.2; mean over 200 trials sd ~0.015


# --------------------------------------------------------------------------------------------
# trial folder
# --------------------------------------------------------------------------------------------
def test_trial_folder_layout_and_schemas(trial):
    out = trial.out_dir
    man = read_csv(out / "manifest.csv")
    assert list(man.columns) == MANIFEST_COLUMNS
    samples = man[man["control"].isna()]
    controls = man[man["control"].notna()]
    assert len(samples) == 16 and len(controls) == 1 + len(P.MARKERS)
    assert set(controls["control"]) == {"unstained"} | {f"single:{m}" for m in P.MARKERS}
    assert (
        controls["patient_id"].isna().all()
        and controls["visit"].isna().all()
        and controls["arm"].isna().all()
    )
    assert samples["visit"].astype(int).tolist() == [0, 12] * 8
    assert (
        set(samples["arm"]) == set(P.ARMS)
        and samples["batch"].notna().all()
        and samples["site"].notna().all()
    )
    for f in man["file"]:
        assert (out / f).is_file()
        sid = Path(f).stem
        assert (out / "truth" / "labels" / f"{sid}.npz").is_file()
    cl = read_csv(out / "clinical.csv")
    assert list(cl.columns) == list(CLINICAL_COLUMNS) and len(cl) == 16
    truth = read_csv(out / "truth" / "population_truth.csv")
    assert list(truth.columns) == STATS_COLUMNS and len(truth) == 16 * len(POPULATION_NAMES)
    spill = read_csv(out / "truth" / "spillover.csv")
    assert list(spill.columns) == list(P.DETECTORS)
    np.testing.assert_array_equal(spill.to_numpy(), P.spillover_matrix())
    for name in ("expected_frequencies.csv", "patients.csv", "samples.csv", "faults.csv", "README.txt"):
        assert (out / "truth" / name).is_file()


def test_same_seed_gives_byte_identical_folder(trial, tmp_path):
    again = simulate_trial(tmp_path / "t", faults=FAULTS, **TRIAL_ARGS)
    a = sorted(p.relative_to(trial.out_dir) for p in trial.out_dir.rglob("*") if p.is_file())
    b = sorted(p.relative_to(again.out_dir) for p in again.out_dir.rglob("*") if p.is_file())
    assert a == b and len(a) > 60
    _, mismatch, errors = filecmp.cmpfiles(trial.out_dir, again.out_dir, [str(p) for p in a], shallow=False)
    assert mismatch == [] and errors == []


def test_exact_linear_algebra_matches_lapack_and_blas():
    """The simulator's BLAS-free matmul and inverse agree with numpy's to rounding."""
    from cytopipe.simulate._exact import cholesky2, inv, matmul

    s = P.spillover_matrix()
    assert np.allclose(inv(s), np.linalg.inv(s), rtol=0, atol=1e-12)
    rng = np.random.default_rng(0)
    f = rng.lognormal(5, 2, (1000, s.shape[0])).astype(np.float32)
    got = matmul(f, s.astype(np.float32))
    assert got.dtype == np.float32
    assert np.allclose(got, f @ s.astype(np.float32), rtol=1e-5)
    cov = np.array([[4.0, 1.2], [1.2, 2.0]])
    assert np.allclose(cholesky2(cov), np.linalg.cholesky(cov), rtol=0, atol=1e-15)
    with pytest.raises(np.linalg.LinAlgError):
        inv(np.ones((3, 3)))


@pytest.mark.skipif(
    not __import__("platform").machine().lower().startswith(("x86", "amd64")),
    reason="OpenBLAS core types are x86 names",
)
def test_output_does_not_depend_on_the_blas_kernels(tmp_path):
    """sample_data must regenerate byte-identically on any CI machine: OpenBLAS picks its kernels
    by CPU (and they round differently), so the simulator keeps BLAS out of everything it writes.
    Emulated here with OpenBLAS's Nehalem and Sandybridge kernels vs this machine's own."""
    import hashlib
    import os

    digests = set()
    for coretype in (None, "Nehalem", "Sandybridge"):
        env = dict(os.environ)
        env.pop("OPENBLAS_CORETYPE", None)
        if coretype:
            env["OPENBLAS_CORETYPE"] = coretype
        out = tmp_path / (coretype or "native")
        cmd = [sys.executable, "-m", "cytopipe", "simulate", "--out", str(out), "--patients", "2"]
        cmd += ["--visits", "0,4", "--events", "3000", "--seed", "5", "--control-events", "300"]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        assert run.returncode == 0, run.stderr
        h = hashlib.sha256()
        for p in sorted(q for q in out.rglob("*") if q.is_file()):
            h.update(p.relative_to(out).as_posix().encode() + p.read_bytes())
        digests.add(h.hexdigest())
    assert len(digests) == 1


def test_fcs_files_are_valid_and_carry_the_truth_keywords(trial):
    import flowio

    man = read_csv(trial.out_dir / "manifest.csv")
    counts = []
    for row in man.itertuples():
        path = trial.out_dir / row.file
        s = cytopipe.read_fcs(path)
        assert s.version == "FCS3.1" and s.events.dtype == np.float32 and s.events.shape[1] == 18
        assert list(s.channels["pnn"]) == list(P.CHANNELS)
        fl = flowio.FlowData(str(path))
        np.testing.assert_array_equal(np.reshape(np.asarray(fl.events, np.float32), (-1, 18)), s.events)
        assert s.spillover is not None and s.spillover.channels == list(P.DETECTORS)
        np.testing.assert_array_equal(s.spillover.matrix, P.spillover_matrix())
        kw = s.keywords
        assert kw["$TIMESTEP"] == "0.01" and kw["$CYT"] and kw["$SRC"] == row.sample_id
        assert len(kw["$DATE"]) == 11 and kw["$BTIM"].count(":") == 2
        time = s.events[:, -1]
        assert np.all(np.diff(time) >= 0)
        assert s.events[:, :-1].max() <= P.PNR - 1
        if pd.isna(row.control):
            counts.append(len(s.events))
            site = row.site
            assert list(s.channels["pns"][3:17]) == [P.SITE_PNS[site][m] for m in P.MARKERS]
            assert kw["PATIENT_ID"] == row.patient_id and kw["BATCH"] == row.batch
    counts = np.array(counts)
    assert counts.min() >= 0.7 * 20000 - 1 and counts.max() <= 1.3 * 20000 + 1 and counts.std() > 1000


def test_truth_table_matches_labels_and_events(trial):
    out = trial.out_dir
    truth = read_csv(out / "truth" / "population_truth.csv")
    man = read_csv(out / "manifest.csv")
    for row in man[man["control"].isna()].itertuples():
        s = cytopipe.read_fcs(out / row.file)
        lab = load_labels(out / "truth" / "labels" / f"{row.sample_id}.npz")
        assert lab["membership"].dtype == np.uint16 and len(lab["membership"]) == len(s.events)
        assert list(lab["populations"]) == list(POPULATION_NAMES)
        keep = lab["fault"] == 0
        comp = compensate(s.events)
        t = truth[truth["sample_id"] == row.sample_id].set_index("population")
        for pop in POPULATION_NAMES:
            mask = unpack_membership(lab["membership"], pop) & keep
            parent = PARENT[pop]
            pmask = keep if parent == "root" else unpack_membership(lab["membership"], parent) & keep
            assert not np.any(mask & ~pmask), pop  # hierarchy holds per event
            r = t.loc[pop]
            assert r["parent"] == parent and r["count"] == mask.sum() and r["parent_count"] == pmask.sum()
            assert r["pct_parent"] == pytest.approx(100 * mask.sum() / pmask.sum(), rel=1e-9)
            med = np.median(comp[mask], axis=0)
            got = r[[f"median_{m}" for m in P.MARKERS]].to_numpy(float)
            np.testing.assert_allclose(got, med, rtol=1e-5, atol=0.05)  # truth medians use float32
        assert r["patient_id"] == row.patient_id and r["arm"] == row.arm and r["visit"] == row.visit


def test_sample_frequencies_follow_the_cohort(trial):
    truth = read_csv(trial.out_dir / "truth" / "population_truth.csv")
    exp = read_csv(trial.out_dir / "truth" / "expected_frequencies.csv")
    m = truth.merge(exp, on=["patient_id", "visit", "arm", "population", "parent"], suffixes=("", "_exp"))
    assert len(m) == len(truth)
    p = m["pct_parent_exp"] / 100
    z = (m["pct_parent"] / 100 - p) / np.sqrt(p * (1 - p) / m["parent_count"])
    assert np.abs(z).max() < 4.5, m.loc[np.abs(z).idxmax()]
    assert abs(z.mean()) < 0.25 and 0.6 < z.std() < 1.4
    pd.testing.assert_frame_equal(exp, trial.cohort.frequencies, check_dtype=False)


def test_faults_are_injected_and_marked(trial):
    out = trial.out_dir
    faults = read_csv(out / "truth" / "faults.csv")
    assert sorted(set(faults["sample_id"])) == sorted(FAULTS)
    assert sorted(faults["fault"]) == sorted(k for kinds in FAULTS.values() for k in kinds)
    for row in faults.itertuples():
        s = cytopipe.read_fcs(out / row.file)
        lab = load_labels(out / "truth" / "labels" / f"{row.sample_id}.npz")
        code = list(lab["faults"]).index(row.fault)
        flagged = np.flatnonzero(lab["fault"] == code)
        assert (
            len(flagged) == row.n_events and flagged[0] == row.first_event and flagged[-1] == row.last_event
        )
        ev = s.events
        if row.fault == "clog":
            gaps = np.diff(ev[:, -1].astype(np.float64))
            inside = gaps[flagged[1:] - 1].mean()
            assert inside > 2.5 * gaps.mean()  # the event rate drops during the clog
            assert np.median(ev[flagged, 0]) < 0.88 * np.median(ev[lab["fault"] == 0, 0])
        elif row.fault == "shift":
            cols = [list(P.CHANNELS).index(c) for c in row.channels.split(";")]
            ok = lab["fault"] == 0
            same_cells = lab["membership"][flagged] & (1 << BIT["T cells"]) > 0
            ref_cells = (lab["membership"] & (1 << BIT["T cells"]) > 0) & ok
            for c in cols:
                ratio = np.median(ev[flagged[same_cells], c]) / np.median(ev[ref_cells, c])
                assert abs(np.log(ratio)) > 0.3, (row.channels, ratio)
        elif row.fault == "margin":
            col = list(P.CHANNELS).index(row.channels)
            assert np.all(ev[flagged, col] == np.float32(P.PNR - 1))
    clean = read_csv(out / "manifest.csv")
    for sid in set(clean["sample_id"]) - set(FAULTS):
        assert not np.any(load_labels(out / "truth" / "labels" / f"{sid}.npz")["fault"])


def test_controls_give_back_the_spillover_matrix(trial):
    """A plain estimator (median of positives minus negatives, singlets only) recovers the true
    matrix well within 0.01: the controls are fit for the compensation helper's target."""
    out = trial.out_dir
    est = np.eye(P.N_FLUOR)
    for i, marker in enumerate(P.MARKERS):
        s = cytopipe.read_fcs(out / "fcs" / "controls" / f"CTRL_{marker}.fcs")
        fl = s.events[:, 3:17].astype(np.float64)
        single = s.events[:, 1] > 0.8 * s.events[:, 0]
        pos = single & (fl[:, i] > 8000)
        neg = single & (fl[:, i] < 3000)
        assert pos.sum() > 1000 and neg.sum() > 1000
        mp, mn = np.median(fl[pos], axis=0), np.median(fl[neg], axis=0)
        est[i] = (mp - mn) / (mp[i] - mn[i])
    err = np.abs(est - P.spillover_matrix())
    assert err.max() < 0.01
    unstained = cytopipe.read_fcs(out / "fcs" / "controls" / "CTRL_unstained.fcs")
    assert np.percentile(compensate(unstained.events), 99, axis=0).max() < 1000  # no stained beads


def test_labels_load_without_pickle(trial):
    path = trial.out_dir / "truth" / "labels" / "P001_W00.npz"
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {
            "membership", "populations", "flags", "flag_names", "category", "categories",
            "lineage", "lineages", "fault", "faults",
        }  # fmt: skip
        assert z["populations"].dtype.kind == "U" and z["flags"].dtype == np.uint32
        cat = z["categories"][z["category"]]
    assert {"lymphocyte", "debris", "monocyte", "doublet", "dead lymphocyte"} <= set(cat)


def test_oracle_gating_separates_every_population(tmp_path):
    """After compensation with the file's matrix, thresholds between the latent state
    distributions reproduce every canonical population with F1 >= 0.98 on a fresh seed."""
    from cytopipe.simulate.oracle import f1, oracle_masks

    t = simulate_trial(tmp_path / "o", n_patients=4, visits=(0,), events=50000, seed=2024, control_events=200)
    scores = {}
    for row in t.manifest[t.manifest["control"] == ""].itertuples():
        s = cytopipe.read_fcs(t.out_dir / row.file)
        lab = load_labels(t.out_dir / "truth" / "labels" / f"{row.sample_id}.npz")
        masks = oracle_masks(s)
        for pop in POPULATION_NAMES:
            scores[row.sample_id, pop] = f1(masks[pop], unpack_membership(lab["membership"], pop))
    table = pd.Series(scores).unstack()
    print("\n" + table.T.round(4).to_string())
    assert table.min().min() >= 0.98, table.min()


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
def test_cli_writes_a_trial_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "cli"
    cmd = [
        sys.executable,
        "-m",
        "cytopipe",
        "simulate",
        "--out",
        str(out),
        "--patients",
        "4",
        "--visits",
        "0,4",
    ]
    cmd += ["--events", "500", "--seed", "9", "--control-events", "200", "--faults", "0.5"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "8 sample files" in run.stdout and "faults injected into 4 files" in run.stdout
    assert len(read_csv(out / "truth" / "faults.csv")) == 4
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    # the API replaces the folder on request; bad arguments are clear errors
    simulate_trial(out, n_patients=4, visits=(0,), events=300, control_events=100, overwrite=True)
    assert len(read_csv(out / "manifest.csv")) == 4 + 15 and not (out / "fcs" / "P001_W04.fcs").exists()
    with pytest.raises(SimulationError, match="at least 100"):
        simulate_trial(tmp_path / "x", n_patients=4, events=10)


def test_bad_fault_plans_are_clear_errors(tmp_path):
    with pytest.raises(SimulationError, match="unknown sample"):
        simulate_trial(tmp_path / "a", n_patients=4, visits=(0,), events=200, faults={"P999_W00": ["clog"]})
    with pytest.raises(SimulationError, match="unknown fault kind"):
        simulate_trial(tmp_path / "b", n_patients=4, visits=(0,), events=200, faults={"P001_W00": ["smoke"]})


@pytest.mark.parametrize(
    "options, message",
    [
        # a negative count crashed with a traceback (exit 1) after writing part of the folder; 0 was
        # silently replaced by the default
        (["--instrument", "random", "--fmo", "--fmo-events", "-5"], "fmo_events must be at least 100"),
        (["--instrument", "random", "--fmo", "--fmo-events", "0"], "fmo_events must be at least 100"),
        # options that act only with another one were silently ignored
        (["--fmo-events", "60000"], "--fmo-events is used only with --fmo"),
        (["--instrument", "aurora", "--fmo-markers", "CD25"], "--fmo-markers is used only with --fmo"),
        (["--instrument-per", "batch"], "--instrument-per is used only with --instrument random"),
        (["--fmo"], "add --instrument NAME (e.g. --instrument fortessa"),
    ],
)
def test_cli_options_that_cannot_act_are_usage_errors(tmp_path, options, message):
    out = tmp_path / "sim"
    cmd = [sys.executable, "-m", "cytopipe", "simulate", "--out", str(out), "--patients", "1", "--visits", "0",
           "--events", "500", "--control-events", "200", *options]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert not out.exists()  # nothing written
