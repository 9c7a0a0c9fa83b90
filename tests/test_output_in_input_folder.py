"""An export never writes into (or inside) a folder the run's input FCS files are read from (its
manifest, as run.json names it, lists them): the derived files would sit beside the raw ones, and a
later `cytopipe validate` of that folder (searched recursively) would take an exported FCS file for a
sample. Refused before any work (exit 2), the message naming the folder and saying what to do.

(`run`, `gate`, `report` and `reconcile` write tables, HTML and caches, never FCS files: a run
folder inside the folder of its FCS files, e.g. `study/run` beside `study/*.fcs`, stays allowed.)"""

from __future__ import annotations

import pytest

from cytopipe.errors import StoreError
from cytopipe.export import export_anndata, export_fcs
from cytopipe.validate import folder_files
from tests.pipeline_support import cli

FOLDER_MESSAGE = "the folder the run's input FCS files are read from"


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _assert_refused(proc, command: str, folder) -> None:
    assert proc.returncode == 2, proc.stderr
    assert f"cytopipe {command}: error: " in proc.stderr, proc.stderr
    assert FOLDER_MESSAGE in proc.stderr and f"outside {folder.resolve()}" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_fcs_export_into_a_folder_inside_the_raw_data_folder_is_refused(sim_run, sim_trial):
    """Before: `export fcs --out <trial>/fcs/treg` wrote treg/P001_W00.fcs among the raw files, and
    `cytopipe validate <trial>/fcs` then listed it as one more sample."""
    raw = sim_trial / "fcs"
    before = _listing(raw)
    with pytest.raises(StoreError, match=FOLDER_MESSAGE) as info:  # (the folder itself: test_export_safety)
        export_fcs(sim_run, "Treg", raw / "treg", samples=["P001_W00"], scheduler="synchronous",
                   progress=False)  # fmt: skip
    assert f"Choose an --out outside {raw.resolve()}" in str(info.value)
    assert _listing(raw) == before
    assert len(folder_files(raw)[0]) == len([n for n in before if n.endswith(".fcs")])
    proc = cli("export", "fcs", str(sim_run), "--population", "Treg", "--out", str(raw / "treg"),
               "--scheduler", "synchronous", "--samples", "P001_W00", "--no-progress")  # fmt: skip
    _assert_refused(proc, "export", raw)
    assert _listing(raw) == before


def test_anndata_export_into_the_raw_data_folder_is_refused(sim_run, sim_trial):
    raw = sim_trial / "fcs"
    before = _listing(raw)
    for out in (raw / "t.h5ad", raw / "sub" / "t.h5ad"):
        with pytest.raises(StoreError, match=FOLDER_MESSAGE):
            export_anndata(sim_run, "T cells", out, samples=["P001_W00"], max_events_per_sample=50,
                           scheduler="synchronous", progress=False)  # fmt: skip
    assert _listing(raw) == before
