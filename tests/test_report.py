"""`cytopipe report`: the offline HTML report, its CSV tables, blinded mode, and what it shows."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytopipe.errors import ReportError
from cytopipe.report import write_report
from tests.conftest import SAMPLE_DATA
from tests.pipeline_support import cli_in_process
from tests.report_support import ARMS, REPO, arm_mismatch, build_cohort_run

SECTIONS = ["overview", "qc", "gates", "dynamics", "clinical", "correlations", "models", "files"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_texts(png: bytes) -> list[str]:
    """Every text chunk (tEXt, zTXt, iTXt) of a PNG, decoded."""
    assert png.startswith(PNG_SIGNATURE)
    out, pos = [], len(PNG_SIGNATURE)
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        data = png[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + data) & 0xFFFFFFFF == crc, kind
        if kind == b"tEXt":
            out.append(data.decode("latin-1"))
        elif kind == b"zTXt":
            key, rest = data.split(b"\0", 1)
            out.append(key.decode("latin-1") + " " + zlib.decompress(rest[1:]).decode("latin-1"))
        elif kind == b"iTXt":
            key, rest = data.split(b"\0", 1)
            compressed, rest = rest[0], rest[2:]
            _lang, rest = rest.split(b"\0", 1)
            _translated, text = rest.split(b"\0", 1)
            text = zlib.decompress(text) if compressed else text
            out.append(key.decode("latin-1") + " " + text.decode("utf-8"))
        pos += 12 + length
    return out


def embedded_pngs(html: str) -> dict[str, bytes]:
    found = re.findall(r'<figure id="fig-([^"]+)"><img src="data:image/png;base64,([^"]+)"', html)
    return {name: base64.b64decode(data) for name, data in found}


@pytest.fixture(scope="module")
def report(sample_report):
    """The unblinded report of the sample trial (written into a copy of the run folder)."""
    run, path = sample_report
    return run, path, path.read_text(encoding="utf-8")


@pytest.fixture()
def small_run(tmp_path):
    """A tables-only run folder of 8 simulated patients (fast to report on)."""
    return build_cohort_run(tmp_path / "small", n_patients=8)


def test_report_has_every_section_figure_and_table(report):
    run, path, html = report
    assert path == run / "report.html"
    for section in SECTIONS:
        assert f'<section id="{section}">' in html
        assert f'href="#{section}"' in html  # in the table of contents
    figures = embedded_pngs(html)
    populations = pd.read_parquet(run / "population_stats.parquet")["population"].unique()
    for pop in populations:  # one gallery figure per gate (Treg has two panels)
        slug = re.sub(r"[^a-z0-9]+", "-", pop.lower()).strip("-")
        assert f"gate-{slug}-0" in figures
    assert "gate-treg-1" in figures
    for name in ("qc-events", "dynamics", "dynamics-change", "clinical-rates", "correlation-heatmap"):
        assert name in figures
    for png in figures.values():
        texts = png_texts(png)
        assert any(t.startswith("Description ") for t in texts)  # the figure's text, searchable
    # the statistics were computed by the report (no statistics.parquet in the run) and it says so
    assert "the report computed the statistics itself" in html
    tables = run / "report_tables"
    listed = re.findall(r'href="(report_tables/[^"]+\.csv)"', html)
    assert listed and all((run / f).is_file() for f in listed)
    for name in ("samples", "failures", "flags", "gate_review", "dynamics_by_arm", "dynamics_per_sample",
                 "response_rates", "response_tests", "correlations", "model_arm_visit", "model_joint_tests"):  # fmt: skip
        assert (tables / f"{name}.csv").is_file(), name


def test_run_summary_shows_failures_flags_and_events(report):
    run, _, html = report
    tables = run / "report_tables"
    failures = pd.read_csv(tables / "failures.csv")
    assert failures["sample_id"].tolist() == ["P005_W12"]
    assert "FCS header is damaged" in failures["error"].iloc[0]
    assert "FCS header is damaged" in html
    samples = pd.read_csv(tables / "samples.csv")
    controls = pd.read_csv(tables / "controls.csv")
    manifest = pd.read_csv(SAMPLE_DATA / "manifest.csv")
    # every sample and control of the manifest: the controls in their own table
    assert len(samples) + len(controls) == len(manifest)
    assert set(controls["sample_id"]) == set(manifest.loc[manifest["control"].notna(), "sample_id"])
    ok = samples[samples["status"] != "failed"]
    assert (ok["removed_pct"] == 0).all()  # these test runs apply no event QC ...
    assert "Event QC removed no event from any sample." in html  # ... and the report says so
    flagged = pd.read_parquet(run / "samples.parquet").query("status == 'flagged'")
    flags = pd.read_csv(tables / "flags.csv")
    assert set(flags["sample_id"]) == set(flagged["sample_id"])
    # a gating flag containing "; " stays one flag, named by its population (not twice)
    assert len(flags) == sum(f.count("; gate ") + 1 for f in flagged["flags"])
    pops = set(pd.read_parquet(run / "population_stats.parquet")["population"])
    assert set(flags["concerns"]) <= pops


def test_gallery_orders_flagged_then_outlying_gates_first(report, tmp_path):
    run, _, html = report
    review = pd.read_csv(run / "report_tables" / "gate_review.csv")
    ps = pd.read_parquet(run / "population_stats.parquet")
    assert len(review) == len(ps)  # one row per sample x gate
    flagged = pd.read_parquet(run / "samples.parquet").query("status == 'flagged'")
    assert set(review.loc[review["flagged"], "sample_id"]) == set(flagged["sample_id"])
    # make one CD4 T gate flagged and another one's CD4 threshold an outlier, then look at the gallery
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    gr = pd.read_parquet(copy / "gate_review.parquet")
    cd4 = gr["population"] == "CD4 T"
    gr.loc[cd4 & (gr["sample_id"] == "P002_W04"), "flags"] = "CD4 T: test flag"
    moved = gr.index[cd4 & (gr["sample_id"] == "P007_W12")][0]
    gr.at[moved, "params"] = np.asarray(gr.at[moved, "params"]) + [1.5, 0.0]
    gr.to_parquet(copy / "gate_review.parquet")
    html = write_report(copy, max_gallery=12).read_text(encoding="utf-8")
    out = pd.read_csv(copy / "report_tables" / "gate_review.csv").query("population == 'CD4 T'")
    out = out.set_index("sample_id")
    assert out.loc["P002_W04", "flagged"] and out["flagged"].sum() == 1
    assert out.loc["P007_W12", "outlier"] and "CD4 >=" in out.loc["P007_W12", "reasons"]
    assert "vs the patient's other visits" in out.loc["P007_W12", "reasons"]
    png = embedded_pngs(html)["gate-cd4-t-0"]
    description = next(t for t in png_texts(png) if t.startswith("Description "))
    titles = [line for line in description.splitlines() if re.match(r"P\d{3}_W\d{2} ", line)]
    assert len(titles) == 12  # max_gallery
    assert titles[0].startswith("P002_W04") and titles[0].endswith("(flag)")
    assert titles[1].startswith("P007_W12") and "(z " in titles[1]
    assert not any("(flag)" in t or "(z " in t for t in titles[2:])
    caption = re.search(r'<h3 id="gate-cd4-t">.*?<figcaption>([^<]+)</figcaption>', html, re.S).group(1)
    n_gated = int(pd.read_csv(SAMPLE_DATA / "manifest.csv")["control"].isna().sum()) - 1  # one failed
    assert "1 flagged, 1 outlying" in caption and f"Showing 12 of {n_gated} samples" in caption


def test_dynamics_tables_carry_wilson_intervals(report):
    run, *_ = report
    per_sample = pd.read_csv(run / "report_tables" / "dynamics_per_sample.csv")
    row = per_sample.iloc[0]
    from statsmodels.stats.proportion import proportion_confint

    lo, hi = proportion_confint(row["count"], row["parent_count"], alpha=0.05, method="wilson")
    assert row["pct_ci_low"] == pytest.approx(100 * float(lo))
    assert row["pct_ci_high"] == pytest.approx(100 * float(hi))
    assert (per_sample["pct_ci_low"] <= per_sample["pct_parent"]).all()
    summary = pd.read_csv(run / "report_tables" / "dynamics_by_arm.csv")
    assert set(summary["arm"]) == set(ARMS)
    assert summary.groupby("population").size().eq(4 * 4).all()  # 4 arms x 4 visits


def test_html_is_self_contained(report):
    _, _, html = report
    assert "<script" not in html.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert not re.search(r"url\(", html)  # no fonts or images pulled in by the style sheet
    for src in re.findall(r'<img[^>]+src="([^"]+)"', html):
        assert src.startswith("data:image/png;base64,")


def test_the_report_uses_the_run_statistics_when_present(report, tmp_path):
    run, *_ = report
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    table = pd.read_csv(run / "report_tables" / "model_arm_visit.csv")
    from cytopipe.clinical import load_clinical
    from cytopipe.stats import run_statistics

    stats = run_statistics(pd.read_parquet(copy / "population_stats.parquet"), load_clinical(
        REPO / "sample_data" / "clinical.csv"), {"families": ["mixed_arm_visit", "response_rate"]})  # fmt: skip
    stats.to_parquet(copy / "statistics.parquet")
    html = write_report(copy).read_text(encoding="utf-8")
    assert "computed the statistics itself" not in html
    assert not (copy / "report_tables" / "correlations.csv").exists()  # no such family in this table
    again = pd.read_csv(copy / "report_tables" / "model_arm_visit.csv")
    assert len(again) == len(table)


# ------------------------------------------------------------------------------------------------
# blinded mode
# ------------------------------------------------------------------------------------------------
def report_outputs(run: Path, html_path: Path) -> dict[str, str]:
    """Every file the report wrote, as text, with the text chunks of every embedded PNG."""
    html = html_path.read_text(encoding="utf-8")
    # the page's own text, and (decoded) the text chunks of every embedded PNG: base64 data itself
    # is not text (any three letters occur in it by chance)
    out = {html_path.name: re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", html)}
    assert len(embedded_pngs(html)) == html.count("data:image/png;base64,")
    for name, png in embedded_pngs(html).items():
        out[f"png {name}"] = "\n".join(png_texts(png))
    tables = html_path.parent / f"{html_path.stem}_tables"
    for f in sorted(tables.iterdir()):
        out[f.name] = f.read_text(encoding="utf-8")
    return out


def assert_blinded(copy: Path, path: Path) -> dict[str, str]:
    """No arm name in any file of the blinded report (page, CSV tables, text in every figure), the
    codes everywhere instead, the same codes every time, and no file hash shown."""
    outputs = report_outputs(copy, path)
    assert len(outputs) > 20
    for where, text in outputs.items():
        for arm in ARMS + ["placebo", "MIU"]:
            assert arm.lower() not in text.lower(), f"{arm!r} in {where}"
    html = outputs["report.html"]
    assert "(blinded)" in html
    for code in ("Arm A", "Arm B", "Arm C", "Arm D"):
        assert code in html
    summary = pd.read_csv(copy / "report_tables" / "dynamics_by_arm.csv")
    assert set(summary["arm"]) == {"Arm A", "Arm B", "Arm C", "Arm D"}
    # the same run always gets the same codes (seeded by its file hashes, which the report never shows)
    from cytopipe.report.data import load_run

    shown = pd.read_csv(copy / "report_tables" / "samples.csv").set_index("sample_id")["arm"].dropna()
    again = load_run(copy, blinded=True, statistics=pd.DataFrame()).samples.set_index("sample_id")["arm"]
    assert shown.to_dict() == again[shown.index].to_dict()
    sha = pd.read_parquet(copy / "samples.parquet")["sha256"].dropna()
    assert not any(h in text for h in sha for text in outputs.values())
    return outputs


def test_blinded_run_leaks_no_arm_name(pipeline_run, tmp_path):
    """`cytopipe run ... --blinded` on the sample trial (every section, clusters included): its report
    replaces the unblinded one and shows no arm name anywhere."""
    from cytopipe.pipeline import run_workflow
    from cytopipe.workflow import load_workflow

    run, _ = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)  # the per-sample results are reused; the unblinded report must be replaced
    wf = load_workflow(REPO / "workflows" / "sle_il2.yaml", output=copy)
    wf.report = dict(wf.report, blinded=True)
    result = run_workflow(wf, scheduler="synchronous", progress=False)
    assert result.exit_code == 0, result.summary()
    outputs = assert_blinded(copy, copy / "report.html")
    assert "cluster_statistics.csv" in outputs and "png cluster-umap" in outputs
    step = next(s for s in result.info["steps"] if s["step"] == "report")
    assert step["written"] and step["blinded"]


def test_blinding_key_gives_the_codes(small_run, tmp_path):
    run, clinical = small_run
    key = tmp_path / "key.csv"
    pd.DataFrame({"arm": ARMS, "code": ["K", "L", "M", "N"]}).to_csv(key, index=False)
    out = tmp_path / "elsewhere" / "blind.html"
    path = write_report(run, blinded=True, out=out, blind_key=key)
    assert path == out and not (run / "report.html").exists()
    per_sample = pd.read_csv(tmp_path / "elsewhere" / "blind_tables" / "dynamics_per_sample.csv")
    shown = dict(zip(per_sample["patient_id"], per_sample["arm"]))
    truth = dict(zip(clinical["patient_id"], clinical["arm"]))
    code = dict(zip(ARMS, ["K", "L", "M", "N"]))
    assert shown == {p: code[truth[p]] for p in shown}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"placebo": "Arm A", "IL-2 0.2 MIU": "Arm B"}))
    with pytest.raises(ReportError, match="no code for arm"):
        write_report(run, blinded=True, blind_key=bad)
    bad.write_text(json.dumps({a: f"{a} group" for a in ARMS}))
    with pytest.raises(ReportError, match="contains an arm name"):
        write_report(run, blinded=True, blind_key=bad)


def test_blinded_tables_do_not_list_the_arms_in_dose_order(small_run, tmp_path):
    """The statistics are computed in dose order (rows '0.2 MIU vs placebo', '0.5 MIU vs placebo',
    ...; texts 'placebo=2, IL-2 0.2 MIU=2, ...'). Coded with codes in reverse dose order, the blinded
    report listed 'Arm D=2, Arm C=2, Arm B=2, Arm A=2' and the rows C, B, A vs D: the dose of every
    code. Every list of codes and every test's rows must be in code order instead."""
    run, _ = small_run
    key = dict(zip(ARMS, ["Arm D", "Arm C", "Arm B", "Arm A"]))  # placebo = D, ..., 1.0 MIU = A
    path = write_report(run, blinded=True, out=tmp_path / "blind.html", blind_key=key)
    html = path.read_text(encoding="utf-8")
    texts = {"report.html": re.sub(r"data:image/png;base64,[^\"]+", "", html)}
    texts |= {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "blind_tables").glob("*.csv")}
    lists = []
    for name, text in texts.items():
        for m in re.finditer(r"Arm [A-D](?:=\d+)?'?(?:, '?Arm [A-D](?:=\d+)?'?)+", text):
            lists.append((name, re.findall(r"Arm ([A-D])", m.group(0))))
    assert len(lists) > 10  # the dose-trend and model rows name every arm
    assert [x for x in lists if x[1] != sorted(x[1])] == []
    for name in ("response_tests.csv", "model_arm_visit.csv"):
        table = pd.read_csv(tmp_path / "blind_tables" / name)
        keys = [c for c in ("family", "population", "endpoint", "visit") if c in table.columns]
        coded = table[table["comparison"].str.match(r"Arm [A-D] vs")]
        for _, rows in coded.groupby(keys, sort=False):
            assert rows["comparison"].tolist() == sorted(rows["comparison"]), name
    shown = re.findall(r"<td[^>]*>(Arm [A-C]) vs Arm D</td>", html)
    assert shown[:3] == ["Arm A", "Arm B", "Arm C"]


def test_leak_check_fails_closed(small_run, monkeypatch):
    """If any arm name would reach a blinded report (here: a run problem that names one and a
    blinding step that misses it), nothing is written. (A study name showing an arm is refused
    before, by armcheck.refuse_study_names: tests/test_blinding_uncodable_arms.py.)"""
    run, _ = small_run
    import cytopipe.report.data as data_module

    monkeypatch.setattr(data_module, "_blind_str", lambda text, codes: text)
    info = json.loads((run / "run.json").read_text())
    info["problems"] = [*(info.get("problems") or []), "P004: the placebo tube was relabelled"]
    (run / "run.json").write_text(json.dumps(info))
    with pytest.raises(ReportError, match="would show arm names"):
        write_report(run, blinded=True)
    assert not (run / "report.html").exists() and not (run / "report_tables").exists()


# ------------------------------------------------------------------------------------------------
# a simulated trial with a known IL-2 effect
# ------------------------------------------------------------------------------------------------
def test_report_shows_treg_rising_with_dose(tmp_path):
    run, _ = build_cohort_run(tmp_path / "run", n_patients=60, seed=5, effect=1.0)
    html = write_report(run).read_text(encoding="utf-8")
    assert "no gate-review data" in html  # a tables-only run: the gallery says why it is empty
    assert '<section id="clusters">' not in html  # no clusters.parquet, no cluster section
    assert "model-effects" in html
    model = pd.read_csv(run / "report_tables" / "model_arm_visit.csv")
    treg = model[(model["population"] == "Treg") & (model["comparison"] == "IL-2 1.0 MIU vs placebo")]
    assert len(treg) == 3  # weeks 4, 12, 24
    assert (treg["estimate"] > 0).all() and (treg["ci_low"] > 0).all() and (treg["q"] < 0.05).all()
    at12 = model[(model["population"] == "Treg") & (model["visit"] == 12)].set_index("comparison")["estimate"]
    assert 0 < at12["IL-2 0.2 MIU vs placebo"] < at12["IL-2 1.0 MIU vs placebo"]
    joint = pd.read_csv(run / "report_tables" / "model_joint_tests.csv")
    trend = joint[(joint["population"] == "Treg") & (joint["family"] == "mixed_dose_trend")].iloc[0]
    assert trend["estimate"] > 0 and trend["q"] < 0.05
    dyn = pd.read_csv(run / "report_tables" / "dynamics_by_arm.csv")
    change = dyn[(dyn["population"] == "Treg") & (dyn["visit"] == 12)].set_index("arm")["mean_change"]
    assert change["placebo"] < change["IL-2 0.2 MIU"] and change["placebo"] < change["IL-2 1.0 MIU"]
    assert change["IL-2 1.0 MIU"] == max(change)


# ------------------------------------------------------------------------------------------------
# command line and errors
# ------------------------------------------------------------------------------------------------
def test_cli_writes_the_report(small_run, tmp_path):
    run, _ = small_run
    out = tmp_path / "cli.html"
    proc = subprocess.run(
        [sys.executable, "-m", "cytopipe", "report", str(run), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"report written: {out}" in proc.stdout
    assert out.is_file() and (tmp_path / "cli_tables" / "dynamics_by_arm.csv").is_file()
    missing = subprocess.run(
        [sys.executable, "-m", "cytopipe", "report", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert missing.returncode == 2
    assert "run folder not found" in missing.stderr


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(ReportError, match="no population_stats.parquet"):
        write_report(tmp_path)
    run, _ = build_cohort_run(tmp_path / "run", n_patients=8)
    with pytest.raises(ReportError, match="must end in .html"):
        write_report(run, out=tmp_path / "report.pdf")
    (run / "samples.parquet").write_bytes(b"not parquet")
    with pytest.raises(ReportError, match="cannot read samples.parquet"):
        write_report(run)


def test_clinical_problems_do_not_stop_the_report(small_run, tmp_path):
    run, clinical = small_run
    broken = tmp_path / "broken.csv"
    clinical.assign(pga=np.where(np.arange(len(clinical)) == 3, 7.0, clinical["pga"])).to_csv(
        broken, index=False
    )
    html = write_report(run, clinical=broken).read_text(encoding="utf-8")
    assert "Clinical table not used" in html and "pga" in html
    assert "No clinical endpoints" in html


def test_report_never_deletes_an_input_csv_in_its_tables_folder(small_run, tmp_path):
    # the report empties <name>_tables/ of *.csv before writing its tables: a clinical table kept
    # there (or the manifest, a compensation matrix, the blind key) would be deleted with them
    run, _ = small_run
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    tables = tmp_path / "study_tables"
    tables.mkdir()
    clinical = tables / "clinical.csv"
    shutil.copyfile(info["workflow"]["clinical"], clinical)
    info["workflow"]["clinical"] = str(clinical)
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")
    before = clinical.read_bytes()
    proc = _report_cli(run, "--out", str(tmp_path / "study.html"))
    assert proc.returncode == 2, proc.stderr
    assert "clinical.csv, the run's clinical table" in proc.stderr and str(tables) in proc.stderr
    assert "Give --out another name or folder" in proc.stderr
    assert clinical.read_bytes() == before and not (tmp_path / "study.html").exists()
    # the same table given with --clinical, beside an ordinary report place: refused too
    given = _report_cli(run, "--clinical", str(clinical), "--out", str(tmp_path / "study.html"))
    assert given.returncode == 2 and clinical.read_bytes() == before
    # elsewhere the report is written (and reads the table from there)
    ok = _report_cli(run, "--out", str(tmp_path / "other.html"))
    assert ok.returncode == 0, ok.stderr
    assert clinical.read_bytes() == before and (tmp_path / "other_tables").is_dir()


def _report_cli(run, *args):
    """`cytopipe report RUN ARGS` in this process (cli_in_process): the tests that call it check what
    the command writes and says, not the process (test_cli_writes_the_report runs it as one)."""
    return cli_in_process("report", str(run), *args)


@pytest.mark.slow  # default suite: tests/test_blinding_folder_kinds.py (a report of a run with a clinical problem exits 3) and tests/test_pipeline.py
def test_report_clinical_problems_are_printed_and_exit_3_as_in_the_run(small_run, tmp_path):
    """`cytopipe report --clinical` checks the table as `cytopipe run` does, against the run's
    patients and arms: an arm that differs (it used to move the patient to the clinical table's arm
    silently) and a patient of the run without clinical rows (silent) are problems with the run's
    message, printed on stderr (exit 3: the report is written without the clinical endpoints), also
    when the report is reused; a good table exits 0; a missing --clinical file is an input error."""
    from cytopipe.clinical import check_clinical

    run, clinical = small_run
    ps = pd.read_parquet(run / "population_stats.parquet")
    patient, mismatch = arm_mismatch(clinical, tmp_path)
    missing = tmp_path / "missing_patient.csv"
    clinical[clinical["patient_id"] != patient].to_csv(missing, index=False)
    for path in (mismatch, missing):
        table = pd.read_csv(path, dtype={"patient_id": str, "arm": str})
        [expected] = [
            str(p) for p in check_clinical(table, ps[["patient_id", "arm"]], row_offset=2, file=path)
        ]
        for attempt in ("written", "reused"):
            proc = _report_cli(run, "--clinical", str(path), "--out", str(tmp_path / f"{path.stem}.html"))
            assert proc.returncode == 3, proc.stderr
            assert f"report {attempt}" in proc.stdout
            assert f"cytopipe report: warning: clinical table not used: {expected}" in proc.stderr
            assert "(exit code 3)" in proc.stderr
        html = (tmp_path / f"{path.stem}.html").read_text(encoding="utf-8")
        assert "Clinical table not used" in html and patient in html
        assert not (tmp_path / f"{path.stem}_tables" / "response_rates.csv").exists()  # no arm moved
    good = _report_cli(run, "--out", str(tmp_path / "good.html"))
    assert good.returncode == 0 and "warning" not in good.stderr, good.stderr
    gone = _report_cli(run, "--clinical", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "x.html"))
    assert gone.returncode == 2 and "nope.csv" in gone.stderr and not (tmp_path / "x.html").exists()


def test_report_blinded_clinical_problems_show_no_arm_names(small_run, tmp_path):
    run, clinical = small_run
    patient, mismatch = arm_mismatch(clinical, tmp_path)
    proc = _report_cli(run, "--blinded", "--clinical", str(mismatch))
    assert proc.returncode == 3 and f"patient {patient!r} is in arm 'Arm " in proc.stderr, proc.stderr
    assert not any(a in proc.stderr for a in ARMS), proc.stderr


def test_report_names_clinical_patients_without_flow_data(small_run, tmp_path):
    """A clinical patient with no flow data stays in the response rates (intention to treat,
    docs/statistics.md) and the report says so, naming the patient (exit 0: not a problem)."""
    run, clinical = small_run
    extra = tmp_path / "extra.csv"
    pd.concat([clinical, clinical.head(1).assign(patient_id="P099")]).to_csv(extra, index=False)
    proc = _report_cli(run, "--clinical", str(extra), "--out", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "1 patient(s) of the clinical table have no flow data (&#x27;P099&#x27;)" in html
    assert "intention to treat" in html
    rates = pd.read_csv(tmp_path / "r_tables" / "response_rates.csv")
    sri4 = rates[(rates["endpoint"] == "sri4") & (rates["arm"] == clinical["arm"].iloc[0])]
    in_arm = clinical.loc[clinical["arm"] == clinical["arm"].iloc[0], "patient_id"].nunique()
    assert (sri4["n"] == in_arm + 1).all(), sri4  # counted in its arm (NRI: a non-responder)


def test_cluster_section_appears_with_clusters(small_run):
    run, _ = small_run
    ps = pd.read_parquet(run / "population_stats.parquet")
    clusters = ps[ps["population"].isin(["Treg", "Th17", "cTfh"])].copy()
    clusters["population"] = clusters["population"].map({"Treg": "MC01", "Th17": "MC02", "cTfh": "MC03"})
    clusters["parent"] = "CD4 T"
    clusters["median_CD25"] = np.where(clusters["population"] == "MC01", 2500.0, 300.0)
    clusters["median_CD127"] = np.where(clusters["population"] == "MC01", 200.0, 1800.0)
    clusters.to_parquet(run / "clusters.parquet")
    # the pipeline's clustering folder (docs/pipeline.md); here only the concordance summary
    (run / "clustering").mkdir()
    pd.DataFrame({"population": ["Treg"], "best_metacluster": ["MC01"], "best_f1": [0.93]}).to_parquet(
        run / "clustering" / "concordance_summary.parquet"
    )
    html = write_report(run).read_text(encoding="utf-8")
    assert '<section id="clusters">' in html
    figures = embedded_pngs(html)
    assert {"cluster-heatmap", "cluster-dynamics"} <= set(figures)  # heatmap from clusters.parquet's medians
    assert (run / "report_tables" / "cluster_concordance.csv").is_file()


def test_docs_quick_start_runs(tmp_path, monkeypatch, capsys):
    """The Quick start of docs/reports.md runs as written (from a folder laid out like the repository),
    on one patient of each arm of the sample trial (16 of its 48 samples, the compensation controls
    kept in the manifest for the code to leave out; their clinical rows): every line of it runs, at a
    third of the gating (the whole sample trial is gated and reported by ``sample_report``)."""
    text = (REPO / "docs" / "reports.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "gating").symlink_to(REPO / "gating")
    data = tmp_path / "sample_data"
    data.mkdir()
    (data / "fcs").symlink_to(SAMPLE_DATA / "fcs")
    manifest = pd.read_csv(SAMPLE_DATA / "manifest.csv", dtype=str)
    samples = manifest[manifest["control"].isna()]
    kept = samples.groupby("arm")["patient_id"].unique().map(lambda p: sorted(p)[:1]).explode()
    assert len(kept) == len(ARMS) and (manifest["control"].notna()).any()
    manifest[manifest["control"].notna() | manifest["patient_id"].isin(kept)].to_csv(
        data / "manifest.csv", index=False
    )
    clinical = pd.read_csv(SAMPLE_DATA / "clinical.csv", dtype=str)
    clinical[clinical["patient_id"].isin(kept)].to_csv(data / "clinical.csv", index=False)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/reports.md", "exec"), {})
    assert capsys.readouterr().out.strip().endswith("my_run/report.html")
    html = (tmp_path / "my_run" / "report.html").read_text(encoding="utf-8")
    assert "gate-treg-0" in html and "SRI-4" in html


def test_blinding_helpers():
    from cytopipe.report.blinding import arm_codes, blind_frame, blind_text, find_leaks

    codes = arm_codes(ARMS, secret=b"run files")
    assert sorted(codes.values()) == ["Arm A", "Arm B", "Arm C", "Arm D"]
    assert arm_codes(ARMS, secret=b"run files") == codes  # seeded: the same run, the same codes
    others = [arm_codes(ARMS, secret=str(i).encode()) for i in range(20)]
    assert len({tuple(sorted(c.items())) for c in others}) > 1  # the secret decides the order
    # longest names first, case-insensitive, inside any text
    table = pd.DataFrame(
        {"arm": ["IL-2 1.0 MIU", "placebo"], "comparison": ["IL-2 1.0 MIU vs Placebo", "x"], "n": [1, 2]}
    )
    out = blind_frame(table, {"IL-2 1.0 MIU": "Arm B", "IL-2 1.0": "Arm X", "placebo": "Arm A"})
    assert out["arm"].tolist() == ["Arm B", "Arm A"]
    assert out["comparison"].iloc[0] == "Arm B vs Arm A"
    assert blind_text("PLACEBO arm", {"placebo": "Arm A"}) == "Arm A arm"
    # short arm names match as whole words only
    assert find_leaks({"a": "Arm A and B+C"}, ["B"]) == ["a: 'B'"]
    assert find_leaks({"a": "BCG vaccine"}, ["B"]) == []
    assert find_leaks({"x": "IL-2 0.5 miu"}, ARMS) == ["x: 'IL-2 0.5 MIU'"]


@pytest.mark.slow
def test_the_gallery_drawn_beside_by_a_helper_process_gives_the_same_report(report, tmp_path, monkeypatch):
    """The gate gallery's figures are drawn by a helper process while the other sections are
    built (and the rest here); the page is byte for byte the one drawn here alone, also when the
    helper dies."""
    from cytopipe.report import render_helper
    from cytopipe.report.build import build_report
    from cytopipe.report.data import load_run
    from cytopipe.report.render_helper import FigureQueue, draw
    from cytopipe.report.sections import Builder, gate_gallery

    run, path, html = report
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    alone = build_report(copy, out=tmp_path / "a" / "report.html", helper=False, reuse=False).read_bytes()
    if FigureQueue(helper=None).helper:  # the fixture's report (the default) was drawn beside by the helper
        beside = html.encode("utf-8")  # (the same build as one here with helper=True: not made twice)
    else:  # one CPU: the default draws alone
        beside = build_report(copy, out=tmp_path / "b" / "report.html", helper=True, reuse=False).read_bytes()
    assert beside == alone
    assert alone.decode("utf-8") == html  # and the report of the fixture (drawn with the default)

    builder = Builder(load_run(copy), tables_href="t", helper=False)
    gate_gallery(builder)
    jobs = builder.gallery.jobs
    assert len(jobs) >= 8
    # the helper's failures on 8 of the figures (the helper starts at the 4th, is killed after 0 or 2,
    # the other 4 come after): drawing all of them again, three times, showed nothing more
    few = jobs[:8]
    want = [draw(job).uri for job in few]
    for kill_after in (0, 2):
        q = FigureQueue(helper=True)
        for job in few[:4]:
            q.submit(*job)  # the helper starts at the 4th figure
        deadline = time.monotonic() + 120
        while q.drawn_by_helper < kill_after and time.monotonic() < deadline:
            time.sleep(0.01)
        q._proc.kill()  # a helper that dies: what it had not drawn is drawn here
        for job in few[4:]:
            q.submit(*job)
        got = q.finish()
        assert [r.uri for r in got] == want
        assert q.drawn_by_helper >= kill_after
        assert q._proc.poll() is not None
    # a helper that stops answering (here: stopped by a signal) is ended after WAIT_SECONDS
    monkeypatch.setattr(render_helper, "WAIT_SECONDS", 1.0)
    q = FigureQueue(helper=True)
    for job in few:
        q.submit(*job)
    os.kill(q._proc.pid, signal.SIGSTOP)
    got = q.finish()
    assert [r.uri for r in got] == want
    assert q._proc.poll() == -signal.SIGKILL
    # a report that fails before its figures are needed ends its helper
    q = FigureQueue(helper=True)
    for job in jobs:
        q.submit(*job)
    q.close()
    assert q._proc.poll() is not None and q._thread is None and q.drawn_by_helper < len(jobs)


def test_the_texts_a_figure_shows_are_those_findobj_finds(report):
    """The texts written into each figure's PNG (``shown_texts``, which makes no ticks) are
    matplotlib's ``findobj(Text)`` ones, in the same order: for gallery figures (whose axis is
    never drawn), panel grids with hidden tick labels and tick labels outside the view, and QC."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from cytopipe.report import figures as F
    from cytopipe.report.batches import levey_jennings_figure, tracking_table
    from cytopipe.report.data import load_run
    from cytopipe.report.sections import Builder, gate_gallery
    from cytopipe.stats import baseline_change, summarise_by_arm

    run, _, _ = report
    data = load_run(run)
    builder = Builder(data, tables_href="t", helper=False)
    gate_gallery(builder)
    ps = data.population_stats
    pops = list(dict.fromkeys(ps["population"]))
    colors = F.arm_colors(data.arms, data.reference_arm, data.dose_ordered)
    with F.style_context():
        figures = [F.gallery_figure(*args) for _, _, args in builder.gallery.jobs[:4]]
        figures += [
            F.dynamics_figure(ps, summarise_by_arm(baseline_change(ps)), pops, data.arms, colors,
                              show_sample_ci=False),
            levey_jennings_figure(tracking_table(ps, data.samples), data.measured_populations),
            F.qc_events_figure(data.samples),
        ]  # fmt: skip
        for fig in figures:
            FigureCanvasAgg(fig)
            fig.savefig(io.BytesIO(), format="png", dpi=F.DPI)
            shown = F.shown_texts(fig)  # first: findobj makes ticks
            assert shown == [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
            assert len(shown) > 3


def test_the_gallery_helper_draws_without_pandas_numba_or_scipy(report, tmp_path):
    """The helper process imports only what drawing a gallery figure needs (each of these costs
    0.1-0.5 s of CPU per report): the figures it draws from the report's own jobs are the same."""
    import pickle

    from cytopipe.report.data import load_run
    from cytopipe.report.render_helper import draw
    from cytopipe.report.sections import Builder, gate_gallery

    run, _, _ = report
    builder = Builder(load_run(run), tables_href="t", helper=False)
    gate_gallery(builder)
    jobs = builder.gallery.jobs[:3]
    (tmp_path / "jobs.pickle").write_bytes(pickle.dumps(jobs))
    script = (
        "import pickle, sys\n"
        "from cytopipe.report.render_helper import draw\n"
        f"folder = {str(tmp_path)!r}\n"
        "jobs = pickle.loads(open(folder + '/jobs.pickle', 'rb').read())\n"
        "uris = [draw(job).uri for job in jobs]\n"
        "open(folder + '/uris.pickle', 'wb').write(pickle.dumps(uris))\n"
        "print(sorted(m for m in ('pandas', 'numba', 'scipy', 'cytopipe.gating') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert pickle.loads((tmp_path / "uris.pickle").read_bytes()) == [draw(job).uri for job in jobs]


def test_the_note_says_when_the_runs_statistics_were_off(small_run):
    """A run whose statistics step did not run (`statistics: enabled: auto` without a clinical
    table) has no statistics.parquet; the report computes them and says why there were none."""
    run, _ = small_run
    info = json.loads((run / "run.json").read_text())
    info["workflow"].pop("clinical")
    info["steps"] = [{"step": "statistics", "enabled": False, "seconds": 0.0}]
    (run / "run.json").write_text(json.dumps(info))
    html = write_report(run).read_text(encoding="utf-8")
    assert "the run&#x27;s statistics were off" in html or "the run's statistics were off" in html
    assert "the report computed the statistics itself" in html and "without the clinical table" in html
