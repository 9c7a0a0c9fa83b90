"""`cytopipe gate` runs through the pipeline's plan: the population_stats of `cytopipe run`."""

from __future__ import annotations

import pandas as pd

from tests.pipeline_support import TEMPLATE


def test_gate_and_run_give_identical_population_stats(sim_run, sim_trial, tmp_path, capsys):
    from cytopipe.cli import main

    out = tmp_path / "gate"
    rc = main(["gate", "--manifest", str(sim_trial / "manifest.csv"), "--template", str(TEMPLATE),
               "--out", str(out), "--quiet"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    # the same tables as the run of the same files and template (QC, pooling, column order)
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "population_stats.parquet"),
        pd.read_parquet(sim_run / "population_stats.parquet"),
    )
    assert (out / "population_stats.parquet").read_bytes() == (
        sim_run / "population_stats.parquet"
    ).read_bytes()
    # the event QC ran: the injected clog is flagged as in the run, and written atomically with the rest
    samples = pd.read_parquet(out / "samples.parquet")
    pd.testing.assert_frame_equal(samples, pd.read_parquet(sim_run / "samples.parquet"))
    assert samples.loc[samples["sample_id"] == "P001_W04", "qc_time_events"].iloc[0] > 0
    # the gate command's own files
    flags = pd.read_parquet(out / "gate_flags.parquet")
    assert list(flags.columns) == ["sample_id", "population", "flag"]
    fits = pd.read_parquet(out / "gate_fits.parquet")
    assert set(fits["sample_id"]) == set(samples.loc[samples["control"].fillna("") == "", "sample_id"])
    assert not (out / "clusters.parquet").exists() and not (out / "report.html").exists()


def test_gate_options_the_pipeline_does_not_do_use_single_process_gating(tmp_path):
    import argparse

    from cytopipe.pipeline.gate_command import add_arguments, not_through_pipeline

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--template", str(TEMPLATE), "--out", str(tmp_path)]
    assert not_through_pipeline(parser.parse_args([*base, "--manifest", "m.csv"])) is None
    assert not_through_pipeline(parser.parse_args([*base, "a.fcs"])) == "FCS files without a manifest"
    assert not_through_pipeline(parser.parse_args([*base, "--manifest", "m.csv", "--flowjo"])) == "--flowjo"
