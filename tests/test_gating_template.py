"""Gating templates: YAML reading, validation errors, and the engine on small known data."""

from __future__ import annotations

import copy
import textwrap

import numpy as np
import pandas as pd
import pytest

import cytopipe
from cytopipe.errors import PanelError, TemplateError, TransformError
from cytopipe.gating import Engine, gate, load_template, parse_template, template_to_dict
from cytopipe.gating.gates import points_in_polygon

BASE = {
    "name": "mini",
    "compensation": "none",
    "transforms": {"default": {"type": "arcsinh", "cofactor": 5}},
    "populations": [
        {
            "name": "Cells",
            "parent": "root",
            "markers": ["FSC-A", "SSC-A"],
            "gate": {"type": "rectangle", "min": [10, None], "max": [None, 80]},
        },
        {"name": "CD3+", "parent": "Cells", "markers": ["CD3"], "gate": {"type": "range", "min": 1.0}},
        {"name": "CD3-", "parent": "Cells", "gate": {"type": "boolean", "not": "CD3+"}},
        {
            "name": "CD4 T",
            "parent": "CD3+",
            "markers": ["CD4", "CD8"],
            "gate": {"type": "quadrant", "quadrant": "+-", "thresholds": [1.0, 1.0]},
        },
    ],
}


def _error(mutate, exc=TemplateError):
    data = copy.deepcopy(BASE)
    mutate(data)
    with pytest.raises(exc) as info:
        parse_template(data)
    return info.value


def _pop(data, name):
    return next(p for p in data["populations"] if p["name"] == name)


@pytest.mark.parametrize(
    ("mutate", "population", "key", "words"),
    [
        (lambda d: _pop(d, "CD3+").update(parent="Cels"), "CD3+", "parent", "unknown parent 'Cels'"),
        (lambda d: _pop(d, "CD3+").pop("parent"), "CD3+", "parent", "missing `parent`"),
        (lambda d: d["populations"].append(copy.deepcopy(_pop(d, "CD3+"))), "CD3+", "name", "unique"),
        (
            lambda d: _pop(d, "CD3+")["gate"].update(type="circle"),
            "CD3+",
            "gate.type",
            "unknown gate type 'circle'",
        ),
        (lambda d: _pop(d, "CD3+")["gate"].update(minimum=1), "CD3+", "gate.minimum", "unknown parameter"),
        (lambda d: _pop(d, "CD3+")["gate"].update(min="high"), "CD3+", "gate.min", "must be a number"),
        (lambda d: _pop(d, "CD3+")["gate"].pop("min"), "CD3+", "gate.min", "needs `min`, `max` or both"),
        (lambda d: _pop(d, "CD3+").update(markers=["CD3", "CD4"]), "CD3+", "markers", "takes 1 marker"),
        (lambda d: _pop(d, "CD3+").pop("markers"), "CD3+", "markers", "`markers` must list"),
        (
            lambda d: _pop(d, "CD4 T")["gate"].update(quadrant="+x"),
            "CD4 T",
            "gate.quadrant",
            "one sign per marker",
        ),
        (
            lambda d: _pop(d, "CD4 T")["gate"].update(thresholds=[1.0]),
            "CD4 T",
            "gate.thresholds",
            "needs 2 thresholds",
        ),
        (
            lambda d: _pop(d, "CD3-")["gate"].update(**{"not": "CD8+"}),
            "CD3-",
            "gate",
            "unknown population 'CD8+'",
        ),
        (
            lambda d: _pop(d, "Cells")["gate"].update(min=[100, None], max=[50, 80]),
            "Cells",
            "gate.max",
            "must exceed",
        ),
        (
            lambda d: (
                _pop(d, "CD3+")["gate"].update(type="valley", search=[2, 1], default=1.5)
                or _pop(d, "CD3+")["gate"].pop("min")
            ),
            "CD3+",
            "gate.search",
            "lo must be smaller",
        ),
        (
            lambda d: (
                _pop(d, "CD3+")["gate"].update(type="valley", search=[1, 2], pool="family")
                or _pop(d, "CD3+")["gate"].pop("min")
            ),
            "CD3+",
            "gate.pool",
            "must be one of",
        ),
        (
            lambda d: (
                _pop(d, "CD3+")["gate"].update(type="hi", bounds={"range": [0, 3], "max_shfit": 1})
                or _pop(d, "CD3+")["gate"].pop("min")
            ),
            "CD3+",
            "gate.bounds.max_shfit",
            "unknown bound",
        ),
    ],
)
def test_template_errors_name_population_and_field(mutate, population, key, words):
    err = _error(mutate)
    assert err.context.get("population") == population
    assert err.context.get("key") == key
    assert words in str(err)
    assert f"population '{population}'" in str(err)


def test_cycle_is_rejected():
    def mutate(d):
        _pop(d, "Cells")["parent"] = "CD4 T"

    err = _error(mutate)
    assert "cycle" in str(err) and "Cells" in str(err)


def test_boolean_cycle_is_rejected():
    def mutate(d):
        _pop(d, "CD3+")["parent"] = "CD3-"

    assert "cycle" in str(_error(mutate))


def test_unknown_top_level_key_and_bad_transform():
    err = _error(lambda d: d.update(transform={}))
    assert err.context["key"] == "transform" and "unknown top-level key" in str(err)
    err = _error(
        lambda d: d["transforms"].update(CD4={"type": "logicle", "T": 262144, "width": 1}), TransformError
    )
    assert err.context["marker"] == "CD4" and "no parameter 'width'" in str(err)
    assert err.context["key"] == "transforms.width"
    err = _error(lambda d: d["transforms"].update(CD4={"type": "logicool"}), TransformError)
    assert "unknown transform type 'logicool'" in str(err)


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("populations:\n  - name: A\n    parent: root\n  name: [\n")
    with pytest.raises(TemplateError, match="not valid YAML at line"):
        load_template(bad)
    dup = tmp_path / "dup.yaml"
    dup.write_text(
        textwrap.dedent(
            """\
            populations:
              - name: A
                parent: root
                markers: [CD3]
                gate: {type: range, min: 1, min: 2}
            """
        )
    )
    with pytest.raises(TemplateError, match="key 'min' appears twice") as info:
        load_template(dup)
    assert str(dup) in str(info.value)
    with pytest.raises(TemplateError, match="not found"):
        load_template(tmp_path / "missing.yaml")


def test_template_round_trips_through_yaml(tmp_path):
    import yaml

    t = parse_template(BASE)
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(template_to_dict(t), sort_keys=False))
    again = load_template(path)
    assert again.names == t.names
    assert template_to_dict(again)["populations"] == template_to_dict(t)["populations"]


# --------------------------------------------------------------------------------------------
# engine on a small synthetic sample with known answers
# --------------------------------------------------------------------------------------------
def _sample(n=20_000, seed=1, spill=True):
    rng = np.random.default_rng(seed)
    fsc = rng.uniform(0, 100, n)
    ssc = rng.uniform(0, 100, n)
    cd3 = np.where(rng.random(n) < 0.6, rng.normal(50, 10, n), rng.normal(0, 2, n))
    cd4 = np.where(rng.random(n) < 0.5, rng.normal(40, 8, n), rng.normal(0, 2, n))
    cd8 = np.where(rng.random(n) < 0.3, rng.normal(40, 8, n), rng.normal(0, 2, n))
    true = np.column_stack([fsc, ssc, cd3, cd4, cd8])
    s = np.eye(3)
    if spill:
        s[0, 1], s[1, 2] = 0.1, 0.05  # CD3 spills into CD4, CD4 into CD8
    raw = true.copy()
    raw[:, 2:] = true[:, 2:] @ s
    channels = pd.DataFrame(
        {"pnn": ["FSC-A", "SSC-A", "B1-A", "B2-A", "B3-A"], "pns": ["", "", "CD3", "CD4", "CD8"]}
    )
    sample = cytopipe.Sample(
        events=raw.astype(np.float32),
        channels=channels,
        keywords={},
        version="FCS3.1",
        spillover=cytopipe.Spillover(s, ["B1-A", "B2-A", "B3-A"]),
    )
    return sample, true


def test_engine_counts_match_direct_numpy():
    sample, true = _sample()
    data = copy.deepcopy(BASE)
    data["compensation"] = "file"
    result = gate(sample, parse_template(data))
    t = np.arcsinh(true / 5)
    cells = (true[:, 0] >= 10) & (true[:, 1] < 80)
    cd3p = cells & (t[:, 2] >= 1.0)
    cd4t = cd3p & (t[:, 3] >= 1.0) & (t[:, 4] < 1.0)
    # float32 compensation can move an event sitting on a boundary: allow a handful
    for name, want in (("Cells", cells), ("CD3+", cd3p), ("CD3-", cells & ~cd3p), ("CD4 T", cd4t)):
        got = result.mask(name)
        assert np.sum(got != want) <= 2, name
    p = result.populations["CD4 T"]
    assert p.parent_count == result.populations["CD3+"].count
    assert p.pct_parent == pytest.approx(100 * p.count / p.parent_count)


def test_population_stats_columns_and_linear_compensated_medians():
    sample, true = _sample()
    data = copy.deepcopy(BASE)
    data["compensation"] = "file"
    result = gate(sample, parse_template(data))
    meta = {"sample_id": "S1", "patient_id": "P1", "visit": 4, "arm": "placebo"}
    df = result.to_population_stats(meta)
    assert list(df.columns) == [
        "sample_id", "patient_id", "visit", "arm", "population", "parent", "count", "parent_count", "pct_parent",
        "median_CD3", "median_CD4", "median_CD8", "population_path",
    ]  # fmt: skip
    assert list(df["population"]) == ["Cells", "CD3+", "CD3-", "CD4 T"]
    assert list(df["population_path"]) == ["/Cells", "/Cells/CD3+", "/Cells/CD3-", "/Cells/CD3+/CD4 T"]
    assert list(df["parent"]) == ["root", "Cells", "Cells", "CD3+"]
    assert (df["sample_id"] == "S1").all() and (df["visit"] == 4).all()
    # medians are of compensated, untransformed values: they recover the true intensities
    idx = result.indices("CD4 T")
    for j, m in enumerate(["CD3", "CD4", "CD8"]):
        got = df.loc[df.population == "CD4 T", f"median_{m}"].item()
        assert got == pytest.approx(np.median(true[idx, 2 + j]), rel=1e-4, abs=1e-3)


def test_missing_marker_drops_only_the_populations_that_need_it():
    """(Issue 10: before, a missing marker aborted the whole sample with a PanelError.)"""
    sample, _ = _sample()
    full = gate(sample, parse_template(BASE))
    sample.channels.loc[4, "pns"] = "Ki-67"
    result = gate(sample, parse_template(BASE))
    cd4 = result.populations["CD4 T"]
    assert cd4.source == "not measured" and cd4.count == 0 and np.isnan(cd4.pct_parent)
    assert cd4.flags == ["not measured: marker CD8 is not in the file"]
    for name in ("Cells", "CD3+", "CD3-"):
        assert result.populations[name].count == full.populations[name].count > 0
    stats = result.to_population_stats().set_index("population")
    assert np.isnan(stats.loc["CD4 T", "pct_parent"]) and stats.loc["CD3+", "pct_parent"] > 0
    # an ambiguous marker is still an error naming the population
    sample.channels.loc[4, "pns"] = "CD4"
    with pytest.raises(PanelError) as info:
        gate(sample, parse_template(BASE))
    assert info.value.context["marker"] == "CD4" and "ambiguous" in info.value.message
    sample.channels.loc[4, "pns"] = "Ki-67"
    # an explicit panel mapping fixes it
    result = gate(sample, parse_template(BASE), mapping={"CD8": "B3-A"})
    assert result.populations["CD4 T"].count > 0


def test_compensation_file_without_spillover_is_an_error():
    sample, _ = _sample()
    sample.spillover = None
    data = copy.deepcopy(BASE)
    data["compensation"] = "file"
    with pytest.raises(cytopipe.errors.CompensationError, match="has none"):
        gate(sample, parse_template(data))


def test_polygon_even_odd_and_infinite_vertices():
    # a self-intersecting "bow tie": its two lobes are inside, the crossing region is not doubled
    bow = np.array([[0, 0], [2, 2], [2, 0], [0, 2]], dtype=float)
    x = np.array([0.2, 1.8, 1.0, 1.0, 3.0])
    y = np.array([1.0, 1.0, 0.2, 1.8, 1.0])
    assert points_in_polygon(x, y, bow).tolist() == [True, True, False, False, False]
    # open-ended quadrant written with infinite vertices (as cytolib stores them)
    quad = np.array([[1, 1], [np.inf, 1], [np.inf, np.inf], [1, np.inf]])
    x = np.array([0.5, 2.0, 1e30, 2.0])
    y = np.array([2.0, 2.0, 5.0, 0.5])
    assert points_in_polygon(x, y, quad).tolist() == [False, True, True, False]


def test_engine_does_not_modify_the_events():
    sample, _ = _sample()
    before = sample.events.copy()
    data = copy.deepcopy(BASE)
    data["compensation"] = "file"
    Engine(sample.events, sample.channels, parse_template(data), spillover=sample.spillover).run()
    np.testing.assert_array_equal(sample.events, before)


def test_pool_estimates_levels():
    from cytopipe.gating import pool_estimates
    from cytopipe.gating.engine import FIT_COLUMNS

    rows = []
    for sid, t, status in [
        ("A1", 1.0, "ok"),
        ("A2", 1.2, "ok"),
        ("A3", 9.0, "failed"),  # a failed fit never enters a pool
        ("B1", 2.0, "ok"),
        ("B2", 2.4, "ok"),
        ("C1", 5.0, "failed"),
    ]:
        for key, pool in (("T cells", "patient"), ("Live", "batch"), ("NK", "cohort"), ("Treg", "sample")):
            rows.append(dict(zip(FIT_COLUMNS, [sid, key, key, "valley", pool, status, "", 1000, [t]])))
    records = pd.DataFrame(rows)
    manifest = pd.DataFrame(
        {
            "sample_id": ["A1", "A2", "A3", "B1", "B2", "C1"],
            "patient_id": list("AAABBC"),
            "batch": ["b1", "b2", "b2", "b1", "b2", "b3"],
        }
    )
    pooled = pool_estimates(records, manifest)
    cohort = np.median([1.0, 1.2, 2.0, 2.4])
    p, why = pooled.lookup("T cells", "patient", {"sample_id": "A3"})
    assert p.tolist() == [1.1] and why.startswith("patient A estimate (median of 2 samples)")
    p, why = pooled.lookup("Live", "batch", {"sample_id": "B1", "batch": "b1"})
    assert p.tolist() == [1.5] and "batch b1" in why
    # no ok fit in patient C's group: the cohort estimate
    p, why = pooled.lookup("T cells", "patient", {"sample_id": "C1", "patient_id": "C"})
    assert p.tolist() == [cohort] and why.startswith("cohort estimate (median of 4 samples)")
    for key, level in (("NK", "cohort"), ("Treg", "sample")):
        p, _ = pooled.lookup(key, level, {"sample_id": "A1"})
        assert p.tolist() == [cohort]
    # a run-wide override of every gate's level
    p, why = pool_estimates(records, manifest, level="cohort").lookup(
        "T cells", "cohort", {"sample_id": "A3"}
    )
    assert p.tolist() == [cohort]


def test_locked_transforms_override_the_template():
    """Study-locked transforms (by marker or $PnN, dicts or cytopipe.transforms objects) replace
    the template's for those markers only."""
    from cytopipe.transforms import Arcsinh

    sample, true = _sample()
    data = copy.deepcopy(BASE)
    data["compensation"] = "file"
    base = gate(sample, parse_template(data), medians=False)
    # cofactor 5 -> 50 moves the CD3 >= 1.0 threshold from asinh(x/5) to asinh(x/50)
    for locked in ({"CD3": {"type": "arcsinh", "cofactor": 50}}, {"B1-A": Arcsinh(cofactor=50)}):
        result = gate(sample, parse_template(data), transforms=locked, medians=False)
        want = result.mask("Cells") & (np.arcsinh(true[:, 2] / 50) >= 1.0)
        assert np.sum(result.mask("CD3+") != want) <= 2
        assert result.populations["CD3+"].count != base.populations["CD3+"].count
        assert result.populations["Cells"].count == base.populations["Cells"].count
        assert result.transforms["B1-A"] == {"type": "arcsinh", "cofactor": 50.0}
        assert result.transforms["B2-A"] == {"type": "arcsinh", "cofactor": 5.0}
        assert result.compensation["channels"] == ["B1-A", "B2-A", "B3-A"] and "hash" in result.compensation
