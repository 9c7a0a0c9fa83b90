"""A batch of the committed sample files with a few bad ones among them, run once: every bad
file ends with its own clear status (failed or flagged, never silently half-processed), and the
good files, the tables and the report stand."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cytopipe.errors import PanelError
from cytopipe.fcs import FCSWarning, read_fcs, write_fcs

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "sample_data" / "fcs"
TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"
GOOD = ["P001_W00", "P001_W04", "P002_W00", "P002_W04", "P003_W00", "P003_W04"]


def _bad_files(folder: Path) -> None:
    """Copies of sample files with one defect each (the originals are never touched)."""
    # every event at the FSC-A detector maximum: QC removes all of them
    s = read_fcs(SAMPLES / "P006_W12.fcs")
    events = s.events.copy()
    events[:, 0] = float(s.channels.pnr[0])
    write_fcs(folder / "ALLQC.fcs", events, s.channels, keywords=s.keywords, spillover=s.spillover)
    # NaN on one channel of every 50th event, +inf on another of every 70th
    s = read_fcs(SAMPLES / "P005_W04.fcs")
    events = s.events.copy()
    events[::50, 3] = np.nan
    events[1::70, 4] = np.inf
    write_fcs(folder / "NAN.fcs", events, s.channels, keywords=s.keywords, spillover=s.spillover)
    # FSC-H renamed FSC-A (same length, so the offsets still hold): two channels named FSC-A
    raw = (SAMPLES / "P006_W00.fcs").read_bytes()
    assert raw.count(b"|FSC-H|") == 1
    (folder / "DUPPNN.fcs").write_bytes(raw.replace(b"|FSC-H|", b"|FSC-A|"))
    # P001_W00's bytes under another name (and, in the manifest, another patient)
    shutil.copy(SAMPLES / "P001_W00.fcs", folder / "COPY.fcs")
    # HEADER's DATA offsets one byte late (TEXT's are right): read with TEXT's, and said so
    raw = bytearray((SAMPLES / "P002_W12.fcs").read_bytes())
    begin, end = int(raw[26:34]), int(raw[34:42])
    raw[26:42] = b"%8d%8d" % (begin + 1, end + 1)
    (folder / "OFFSETS.fcs").write_bytes(bytes(raw))


@pytest.fixture(scope="module")
def bad_batch(tmp_path_factory) -> Path:
    from cytopipe.pipeline import run_workflow
    from cytopipe.workflow import workflow_from_options

    folder = tmp_path_factory.mktemp("bad_batch")
    for name in GOOD:
        shutil.copy(SAMPLES / f"{name}.fcs", folder / f"{name}.fcs")
    _bad_files(folder)
    rows = [(n, n[:4], int(n[-2:])) for n in GOOD] + [("ALLQC", "P006", 12), ("NAN", "P005", 4),
                                                      ("DUPPNN", "P006", 0), ("COPY", "P004", 0),
                                                      ("OFFSETS", "P002", 12)]  # fmt: skip
    lines = ["file,sample_id,patient_id,visit,arm"]
    lines += [
        f"{s}.fcs,{s},{p},{v},{'placebo' if p in ('P001', 'P003', 'P005') else 'IL-2'}" for s, p, v in rows
    ]
    (folder / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    wf = workflow_from_options(
        folder / "manifest.csv", TEMPLATE, folder / "run", seed=1, clustering={"enabled": False}
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_workflow(wf, scheduler="synchronous", progress=False)
    (folder / "problems.txt").write_text("\n".join(result.problems), encoding="utf-8")
    fcs_warnings = [str(w.message) for w in caught if issubclass(w.category, FCSWarning)]
    (folder / "fcs_warnings.txt").write_text("\n".join(fcs_warnings), encoding="utf-8")
    return folder / "run"


def _samples(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "samples.parquet").set_index("sample_id")


def test_the_good_files_of_a_batch_with_bad_ones_are_all_processed(bad_batch):
    samples = _samples(bad_batch)
    assert set(samples.index) == set(GOOD) | {"ALLQC", "NAN", "DUPPNN", "COPY", "OFFSETS"}
    assert samples.loc[GOOD, "status"].isin(["ok", "flagged"]).all()


def test_a_sample_whose_events_qc_removes_all_still_gets_its_report(bad_batch):
    """Its pooled diagonal gates miss the (empty) panel: the gallery drew them and failed."""
    samples = _samples(bad_batch)
    assert samples.loc["ALLQC", "status"] == "flagged"
    assert samples.loc["ALLQC", "events_after_qc"] == 0
    assert (bad_batch.parent / "problems.txt").read_text(encoding="utf-8") == ""
    assert (bad_batch / "report.html").is_file()


def test_events_with_nan_or_infinite_values_are_removed_counted_and_flagged(bad_batch):
    raw = read_fcs(bad_batch.parent / "NAN.fcs").events
    n_bad = int((~np.isfinite(raw)).any(axis=1).sum())
    assert n_bad > 0
    row = _samples(bad_batch).loc["NAN"]
    assert row["status"] == "flagged"
    assert f"nonfinite_events: {n_bad} event(s)" in row["flags"]
    assert row["events_after_qc"] <= row["events_before_qc"] - n_bad
    # no event is lost between QC and the first gate on a fluorescence channel (Live): the
    # gated counts add up to the events QC kept, none vanish as NaN through compensation
    stats = pd.read_parquet(bad_batch / "population_stats.parquet")
    mine = stats[stats.sample_id == "NAN"].set_index("population")
    assert mine.loc["Lymphocytes", "parent_count"] == row["events_after_qc"]


def test_duplicate_channel_names_fail_the_file_instead_of_gating_one_of_them(bad_batch):
    row = _samples(bad_batch).loc["DUPPNN"]
    assert row["status"] == "failed"
    assert "DUPPNN.fcs" in row["error"]
    assert "'FSC-A' is ambiguous" in row["error"] and "parameters [1, 2]" in row["error"]


def test_gating_a_file_with_two_channels_of_one_name_is_a_panel_error(tmp_path):
    import cytopipe

    _bad_files(tmp_path)
    sample = read_fcs(tmp_path / "DUPPNN.fcs")
    with pytest.raises(PanelError, match="'FSC-A' is ambiguous"):
        cytopipe.gate(sample, cytopipe.load_template(TEMPLATE))


def test_one_file_registered_as_two_samples_flags_both(bad_batch):
    samples = _samples(bad_batch)
    assert samples.loc[["COPY", "P001_W00"], "status"].tolist() == ["flagged", "flagged"]
    assert (
        "duplicate_file: the same bytes as sample(s) P001_W00 (P001_W00.fcs)" in samples.loc["COPY", "flags"]
    )
    assert "duplicate_file: the same bytes as sample(s) COPY (COPY.fcs)" in samples.loc["P001_W00", "flags"]
    assert samples.loc["COPY", "sha256"] == samples.loc["P001_W00", "sha256"]


def test_what_the_reader_noted_about_a_file_is_said_once_in_run_log(bad_batch):
    """A quirk the reader handled (HEADER's DATA offsets disagree with TEXT's) is a warning in
    run.log naming the sample and file, once (it is on stderr through the same logger), and the
    sample is read in full. Before, each pass's read issued a raw Python FCSWarning (three on a
    Dask run's stderr, with source lines) and run.log had nothing on a worker-run pass."""
    note = "HEADER and TEXT disagree on the DATA segment"
    log = [line for line in (bad_batch / "run.log").read_text(encoding="utf-8").splitlines() if note in line]
    assert len(log) == 1, log
    assert " WARNING " in log[0] and "sample OFFSETS (file OFFSETS.fcs)" in log[0]
    assert (bad_batch.parent / "fcs_warnings.txt").read_text(encoding="utf-8") == ""
    row = _samples(bad_batch).loc["OFFSETS"]
    original = read_fcs(SAMPLES / "P002_W12.fcs")
    assert row["status"] in ("ok", "flagged") and row["events_before_qc"] == original.n_events
    assert "reader_notes" not in _samples(bad_batch).columns
