"""Export to FlowJo 10: the fitted gates of a run of sample_data as a ``.wsp`` that FlowKit's
``Workspace`` (the peer) and cytopipe's importer re-read to the same events, sample by sample and
population by population, as the run itself gated."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

import cytopipe
from cytopipe.cli import main
from cytopipe.errors import GatingError
from cytopipe.gating import gate, load_template
from cytopipe.gating.flowjo import FlowJoWorkspace
from cytopipe.gating.wsp_export import write_flowjo_workspace

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`cytopipe gate FILES --manifest sample_data/manifest.csv --flowjo`: two patients' eight samples,
    with fits pooled per patient as in a run (a subset keeps the default suite fast)."""
    out = tmp_path_factory.mktemp("wsp") / "run"
    files = sorted(str(p) for p in (REPO / "sample_data" / "fcs").glob("P00[12]_W*.fcs"))
    assert len(files) == 8
    code = main(
        ["gate", *files, "--manifest", str(REPO / "sample_data" / "manifest.csv"), "--template", str(TEMPLATE),
         "--out", str(out), "--flowjo", "--quiet"]
    )  # fmt: skip
    assert code == 0
    print(f"\nexported FlowJo workspace: {out / 'gates.wsp'}")
    return out


def test_flowkit_and_cytopipe_reread_the_run_to_identical_memberships(exported):
    import flowkit as fk
    import pandas as pd

    wsp = exported / "gates.wsp"
    stats = pd.read_parquet(exported / "population_stats.parquet")
    fcs = {Path(p).name: Path(p) for p in (REPO / "sample_data" / "fcs").glob("P*.fcs")}
    ours = FlowJoWorkspace(wsp)
    names = [s.name for s in ours.samples]
    assert sorted(names) == sorted(f"{sid}.fcs" for sid in stats["sample_id"].unique())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peer = fk.Workspace(str(wsp), fcs_samples=[str(fcs[n]) for n in names])
        peer.analyze_samples(use_mp=False)
    compared = 0
    for name in names:
        template = ours.template(name)
        result = gate(cytopipe.read_fcs(fcs[name]), template, medians=False)
        by_path = {template.path_of(p): p for p in template.names}
        run = stats[stats["sample_id"] == name[: -len(".fcs")]].set_index("population_path")
        assert set(by_path) == set(run.index)  # every population of the run, by full path
        for gate_name, gate_path in peer.get_gate_ids(name):
            path = "/" + "/".join((*gate_path[1:], gate_name))
            theirs = peer.get_gate_membership(name, gate_name, gate_path=gate_path)
            mine = result.mask(by_path[path])
            assert np.array_equal(theirs, mine), (name, path)
            assert mine.sum() == run.loc[path, "count"], (name, path)  # and as the run gated it
            compared += 1
    assert compared == len(stats)
    print(f"{len(names)} samples, {compared} populations: identical per-event memberships")


def test_reconcile_of_the_export_is_exact(exported):
    """The counts the export stores are cytopipe's: reconciling the export against the files is exact."""
    from cytopipe.gating.reconcile import reconcile

    rec = reconcile(exported / "gates.wsp", REPO / "sample_data" / "fcs")
    assert rec.ok and (rec.table["difference"].fillna(0) == 0).all()


def test_the_original_run_is_reproduced_per_event(tmp_path):
    """Without pooling: one sample's masks from the run equal the re-imported workspace's, event by event
    (ellipses become 720-point polygons; no event of the sample changes side)."""
    path = REPO / "sample_data" / "fcs" / "P004_W12.fcs"
    sample = cytopipe.read_fcs(path)
    result = gate(sample, load_template(TEMPLATE))
    wsp = write_flowjo_workspace(tmp_path / "one.wsp", {path.name: (path, result)})
    template = FlowJoWorkspace(wsp).template(path.name)
    again = gate(sample, template, medians=False)
    assert {template.path_of(n) for n in template.names} == {
        result.template.path_of(n) for n in result.populations
    }
    for name in result.populations:
        assert np.array_equal(again.mask(name), result.mask(name)), name


def test_what_flowjo_cannot_hold_is_refused(tmp_path):
    path = REPO / "sample_data" / "fcs" / "P004_W12.fcs"
    data = {
        "name": "t",
        "compensation": "file",
        "transforms": {"default": {"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0}},
        "populations": [
            {"name": "A", "parent": "root", "markers": ["CD3"], "gate": {"type": "range", "min": 1.0}},
            {"name": "B", "parent": "root", "markers": ["CD4"], "gate": {"type": "range", "min": 1.0}},
            {"name": "A not B", "parent": "root", "gate": {"type": "boolean", "and": ["A", "not B"]}},
        ],
    }
    result = gate(cytopipe.read_fcs(path), load_template(data))
    with pytest.raises(GatingError, match="logicle transform .* no FlowJo workspace equivalent"):
        write_flowjo_workspace(tmp_path / "x.wsp", {path.name: (path, result)})
    data["transforms"] = {"default": {"type": "arcsinh", "cofactor": 150}}
    result = gate(cytopipe.read_fcs(path), load_template(data))
    with pytest.raises(GatingError, match="negates an operand inside 'and'") as info:
        write_flowjo_workspace(tmp_path / "x.wsp", {path.name: (path, result)})
    assert "A not B" in str(info.value)
    assert not (tmp_path / "x.wsp").exists()
