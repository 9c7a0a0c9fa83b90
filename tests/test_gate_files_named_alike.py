"""`cytopipe gate FILES` without a manifest names each sample by its file name: the same file
listed twice is gated once, and two files of one name (two sites' ``P01.fcs``) are refused
before any work instead of mixing two samples' rows under one sample id."""

from __future__ import annotations

import shutil

import pandas as pd

from tests.conftest import shared_path

TEMPLATE = "gating/sle_il2_tcell_nk.yaml"


def _donors():
    folder = shared_path("CytoPipeline", "inst", "extdata")
    return folder / "Donor1.fcs", folder / "Donor2.fcs"


def test_the_same_file_listed_twice_is_gated_once(tmp_path, capsys):
    from cytopipe.cli import main

    donor1, _ = _donors()
    copy = tmp_path / "fcs" / "D1.fcs"
    copy.parent.mkdir()
    shutil.copyfile(donor1, copy)
    out = tmp_path / "gated"
    # a shell glob and a typed name: one file, two spellings
    rc = main(["gate", str(copy), str(tmp_path / "fcs" / "." / "D1.fcs"), "--template", TEMPLATE,
               "--out", str(out), "--missing-markers", "skip", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "is listed more than once; it is gated once" in err
    stats = pd.read_parquet(out / "population_stats.parquet")
    # one sample, one row per population (before: every population twice under 'D1')
    assert not stats.duplicated(["sample_id", "population"]).any()
    assert set(stats["sample_id"]) == {"D1"}


def test_two_files_of_one_name_are_refused_before_any_work(tmp_path, capsys):
    from cytopipe.cli import main

    donor1, donor2 = _donors()
    for site, src in (("siteA", donor1), ("siteB", donor2)):
        (tmp_path / site).mkdir()
        shutil.copyfile(src, tmp_path / site / "P01.fcs")
    out = tmp_path / "gated"
    rc = main(["gate", str(tmp_path / "siteA" / "P01.fcs"), str(tmp_path / "siteB" / "P01.fcs"),
               "--template", TEMPLATE, "--out", str(out), "--missing-markers", "skip", "--gatingml",
               "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    # before: exit 0, 34 rows of two samples under 'P01' and siteB's Gating-ML over siteA's
    assert rc == 2, err
    assert "the one sample 'P01'" in err and "siteA" in err and "siteB" in err and "--manifest" in err
    assert not out.exists()
