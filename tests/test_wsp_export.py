"""Export to FlowJo 10: the fitted gates of a run of sample_data as a ``.wsp`` that FlowKit's
``Workspace`` (the peer) and cytopipe's importer re-read to the same events, sample by sample and
population by population, as the run itself gated."""

from __future__ import annotations

import re
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


INTERMEDIATE = re.compile(r"(?P<population>.+) \[(?P<markers>[^\[\]]+)\]")


def run_paths(template, run_names) -> dict[str, str]:
    """Re-imported population's full path -> the run's full path of it. An AND gate is exported as a
    chain of intermediate populations named ``"<population> [<markers>]"`` (wsp_export.intermediate_name)
    whose last child is the run's population: only those may be extra, and they are left out."""
    out = {}
    for name in template.names:
        path = template.path_of(name)
        segments = path.strip("/").split("/")
        kept = []
        for i, seg in enumerate(segments):
            m = INTERMEDIATE.fullmatch(seg)
            if seg in run_names or m is None:
                kept.append(seg)
                continue
            # an intermediate: one child only, followed by intermediates of the same population and then
            # that population itself (a run population)
            rest = segments[i + 1 :]
            if not rest:  # the intermediate's own path: checked through its child's below
                break
            end = next(
                (j for j, r in enumerate(rest) if not INTERMEDIATE.fullmatch(r) or r in run_names), None
            )
            assert end is not None, f"chain from {path!r} does not end at a population of the run"
            assert all(INTERMEDIATE.fullmatch(r)["population"] == m["population"] for r in rest[:end]), path
            assert rest[end] == m["population"] and rest[end] in run_names, f"unexpected population {path!r}"
            assert m["markers"].strip(), path
        if segments[-1] in run_names:
            out[path] = "/" + "/".join(kept)
    for name in template.names:  # an intermediate has exactly one child, the next link of its chain
        if name not in run_names:
            assert len(template.children(name)) == 1, name
    return out


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
        to_run = run_paths(template, set(run["population"]))
        assert set(to_run.values()) == set(run.index)  # every population of the run, by full path
        assert len(to_run) == len(run.index)
        for gate_name, gate_path in peer.get_gate_ids(name):
            path = "/" + "/".join((*gate_path[1:], gate_name))
            theirs = peer.get_gate_membership(name, gate_name, gate_path=gate_path)
            mine = result.mask(by_path[path])
            assert np.array_equal(theirs, mine), (name, path)
            if path not in to_run:  # an AND gate's intermediate population: FlowKit agrees, the run has none
                continue
            assert mine.sum() == run.loc[to_run[path], "count"], (name, path)  # and as the run gated it
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
    to_run = run_paths(template, set(result.populations))
    assert sorted(to_run.values()) == sorted(result.template.path_of(n) for n in result.populations)
    assert len(to_run) < len(template.names)  # Treg's AND gate was written as a chain
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


def test_gate_with_a_workspace_gates_each_file_with_its_own_samples_gates(exported, tmp_path):
    """`cytopipe gate FILES --template gates.wsp`: the export holds every sample's own fitted gates, so
    each file listed in the workspace is gated with its own sample's gates (not the first sample's for
    all of them: P001_W04 and P002_W12 then come out with the run's counts); a file the workspace does
    not list gets the first sample's gates, with a warning naming it."""
    import pandas as pd

    from tests.pipeline_support import cli

    fcs = REPO / "sample_data" / "fcs"
    files = [fcs / "P001_W04.fcs", fcs / "P002_W12.fcs", fcs / "P003_W00.fcs"]
    wsp, out = str(exported / "gates.wsp"), str(tmp_path / "g")
    proc = cli("gate", *map(str, files), "--template", wsp, "--out", out)
    assert proc.returncode == 0, proc.stderr
    key = ["sample_id", "population"]
    run = pd.read_parquet(exported / "population_stats.parquet").set_index(key)["count"]
    again = pd.read_parquet(tmp_path / "g" / "population_stats.parquet").set_index(key)["count"]
    for sid in ("P001_W04", "P002_W12"):
        theirs = run.loc[sid]
        assert (again.loc[sid].reindex(theirs.index) == theirs).all(), sid
    first = run.loc["P001_W00"]  # P003_W00 was gated with these (fixed) gates, not its own
    assert set(first.index) <= set(again.loc["P003_W00"].index)
    assert "P003_W00.fcs' is not a sample of the FlowJo workspace 'gates.wsp'" in proc.stderr
    assert "first sample, 'P001_W00.fcs'" in proc.stderr


def test_a_workspace_of_several_samples_as_one_template_says_whose_gates(exported, caplog):
    with caplog.at_level("WARNING", logger="cytopipe"):
        template = load_template(exported / "gates.wsp")
    assert "(P001_W00.fcs)" in template.name
    assert "holds 8 samples; its template is the gates of sample 'P001_W00.fcs'" in caplog.text


def test_run_with_a_workspace_gates_each_file_with_its_own_samples_gates(exported, tmp_path):
    """`cytopipe run` with `template: gates.wsp` (a workspace of several samples) on a real Dask
    LocalCluster: each manifest file is gated with its own workspace sample's gates, so its counts are
    `cytopipe gate`'s for the same file and template (it used the first sample's gates for every file);
    a file the workspace does not list gets the first sample's gates, with a warning naming the file,
    and run.json records whose gates each file got."""
    import json

    import pandas as pd
    import yaml

    from tests.pipeline_support import cli

    sids = ["P001_W04", "P002_W12", "P003_W00"]  # P003_W00: not a sample of the workspace
    manifest = pd.read_csv(REPO / "sample_data" / "manifest.csv", dtype=str, keep_default_na=False)
    manifest = manifest[manifest["sample_id"].isin(sids)].copy()
    manifest["file"] = [str(REPO / "sample_data" / f) for f in manifest["file"]]
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    wsp = str(exported / "gates.wsp")
    spec = {"study": "workspace", "manifest": "manifest.csv", "template": wsp, "clustering": {"enabled": False},
            "statistics": {"enabled": False}, "report": {"enabled": False}}  # fmt: skip
    (tmp_path / "w.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    proc = cli(
        "run", str(tmp_path / "w.yaml"), "--out", str(tmp_path / "run"), "--workers", "2", "--no-progress"
    )
    assert proc.returncode == 0, proc.stderr
    files = [str(REPO / "sample_data" / "fcs" / f"{sid}.fcs") for sid in sids]
    gated = cli("gate", *files, "--template", wsp, "--out", str(tmp_path / "g"), "--quiet")
    assert gated.returncode == 0, gated.stderr
    key = ["sample_id", "population"]
    run = pd.read_parquet(tmp_path / "run" / "population_stats.parquet").set_index(key)["count"]
    gate_counts = pd.read_parquet(tmp_path / "g" / "population_stats.parquet").set_index(key)["count"]
    assert sorted(run.index) == sorted(gate_counts.index)
    assert (run == gate_counts.reindex(run.index)).all(), (run - gate_counts.reindex(run.index))[
        lambda d: d != 0
    ]
    first = pd.read_parquet(exported / "population_stats.parquet").set_index(key)["count"]
    for sid in ("P001_W04", "P002_W12"):  # the exported run's own counts, not the first sample's gates'
        assert (run.loc[sid].reindex(first.loc[sid].index) == first.loc[sid]).all(), sid
    assert "file '" + files[
        2
    ] + "' (sample P003_W00) is not a sample of the FlowJo workspace 'gates.wsp'" in (proc.stderr)
    assert "first sample, 'P001_W00.fcs'" in proc.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())["study_state"]["flowjo_workspace"]
    assert record["gates_of"] == {
        "P001_W04": "P001_W04.fcs",
        "P002_W12": "P002_W12.fcs",
        "P003_W00": "P001_W00.fcs",
    }
    assert record["not_in_workspace"] == ["P003_W00"] and record["first_sample"] == "P001_W00.fcs"
