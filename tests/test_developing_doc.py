"""docs/DEVELOPING.md, "Where a change goes": every worked example runs as written and gives the
right answer (checked here against an independent count, statsmodels, the run's own tables and the
file catalogue's event count)."""

from __future__ import annotations

import re
import sys
import types

import pandas as pd
import pytest

from tests.conftest import REPO, shared_path


def _example(heading: str) -> str:
    text = (REPO / "docs" / "DEVELOPING.md").read_text(encoding="utf-8")
    part = text.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", part, re.S)
    assert len(blocks) == 1, heading
    return blocks[0]


def _run(code: str, heading: str, **names) -> dict:
    scope = {"__name__": "developing_doc_example", **names}
    exec(compile(code, f"docs/DEVELOPING.md ({heading})", "exec"), scope)
    return scope


def test_new_gate_type_example(monkeypatch, capsys):
    from cytopipe.gating.template import GATE_TYPES

    shared_path("FlowKit", "data", "100715.fcs")
    monkeypatch.chdir(REPO)
    monkeypatch.setitem(GATE_TYPES, "outside", None)  # the example registers it; undone after the test
    scope = _run(_example("A new gate type"), "gate type")  # asserts the counts against numpy itself
    tails = scope["result"].populations["CD3 tails"]
    assert 0 < tails.count < len(scope["sample"].events)
    assert tails.gate.geometry() == {"min": 0.0, "max": 2.0}
    assert re.match(r"CD3 tails \d+, CD3 mid \d+ of 65016 events", capsys.readouterr().out)


def test_new_statistic_example(monkeypatch):
    from statsmodels.stats.weightstats import ttest_ind

    monkeypatch.chdir(REPO)
    scope = _run(_example("A new statistic"), "statistic")
    table, dyn = scope["table"], scope["dyn"]
    post = dyn[dyn["visit"] > 0]
    active = sorted(set(dyn["arm"]) - {"placebo"})
    assert len(table) == post.groupby(["population", "visit"]).ngroups * len(active)
    assert set(table["family"]) == {"welch_arm_visit"}
    checked = 0
    for r in table[table["population"].isin(["Treg", "CD4 T"])].itertuples():
        d = post[(post["population"] == r.population) & (post["visit"] == r.visit)]
        x = d.loc[d["arm"] == r.comparison.split(" vs ")[0], "change"].dropna()
        ref = d.loc[d["arm"] == "placebo", "change"].dropna()
        stat, p, _ = ttest_ind(x, ref, usevar="unequal")  # statsmodels' Welch test, the peer
        assert r.statistic == pytest.approx(stat, rel=1e-9) and r.p == pytest.approx(p, rel=1e-9)
        assert r.estimate == pytest.approx(x.mean() - ref.mean())
        checked += 1
    assert checked == 2 * len(active) * post["visit"].nunique()


def test_new_report_section_example(sample_run):
    scope = _run(_example("A new report section"), "report section", RUN_DIR=sample_run)
    counts = scope["builder"].tables["samples_per_arm"]
    stats = pd.read_parquet(sample_run / "population_stats.parquet")
    expected = stats.drop_duplicates("sample_id").groupby(["arm", "visit"]).size()
    visits = [c for c in counts.columns if c != "arm"]
    assert sorted(visits) == sorted(stats["visit"].unique())
    got = counts.set_index("arm")[visits].stack()
    assert int(got.sum()) == stats["sample_id"].nunique() == int(expected.sum())
    for (arm, visit), n in expected.items():
        assert got[(arm, visit)] == n
    assert scope["section"].title == "Samples per arm and visit"
    assert f"{stats['sample_id'].nunique()} samples were gated" in "".join(scope["section"].body)


def test_new_command_example(monkeypatch, capsys):
    from cytopipe import cli

    path = shared_path("FlowKit", "data", "100715.fcs")
    module = types.ModuleType("cytopipe.events_command")
    exec(compile(_example("A new command"), "docs/DEVELOPING.md (command)", "exec"), module.__dict__)
    monkeypatch.setitem(sys.modules, "cytopipe.events_command", module)
    monkeypatch.setitem(cli.COMMANDS, "events", ("cytopipe.events_command", "print the number of events"))
    assert cli.main(["events", str(path)]) == 0
    out = capsys.readouterr().out
    assert out == "100715.fcs\t65016\n"  # 65 016 events: ../shared/data/CATALOG.md
    doc = (REPO / "docs" / "DEVELOPING.md").read_text(encoding="utf-8")
    assert "prints `100715.fcs\t65016`" in doc
