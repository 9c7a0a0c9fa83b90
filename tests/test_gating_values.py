"""cytopipe.gating.EventValues: values on the gates' axes for any population's events, after gating."""

from __future__ import annotations

import numpy as np
import pytest

from cytopipe.errors import GatingError
from tests.report_support import TEMPLATE


@pytest.fixture(scope="module")
def gated(sample_data):
    from cytopipe.fcs import read_fcs
    from cytopipe.gating import gate, load_template

    template = load_template(TEMPLATE)
    sample = read_fcs(sample_data / "fcs" / "P002_W04.fcs")
    return sample, template, gate(sample, template)


def test_values_are_the_engines_bit_for_bit(gated):
    from cytopipe.gating import Engine

    sample, template, result = gated
    engine = Engine(sample.events, sample.channels, template, spillover=sample.spillover)
    values = result.event_values(sample)
    for marker in ("CD3", "CD4", "CD25", "FOXP3", "FSC-A"):
        dim = template.dimension(marker)
        for population in ("root", "Live", "CD4 T"):
            idx = None if population == "root" else result.indices(population)
            got = values.values(marker, population)
            np.testing.assert_array_equal(got, engine.values(dim, idx))
            expected = (
                sample.events.shape[0] if population == "root" else result.populations[population].count
            )
            assert len(got) == expected
    # the template's display scale: arcsinh with the channel's cofactor (estimated from the data:
    # `cofactor: auto`) for fluorescence, linear for scatter
    cofactor = result.transforms[result.channel_of["CD25"]]["cofactor"]
    assert values.scale("CD25") == f"arcsinh(x/{cofactor:g})" and values.scale("FSC-A") == "linear"
    # a shortcut on the result, and a matrix of several markers (float32, events x markers)
    np.testing.assert_array_equal(result.values(sample, "CD25", "Treg"), values.values("CD25", "Treg"))
    m = values.matrix(["CD3", "CD25"], "Treg")
    assert m.dtype == np.float32 and m.shape == (result.populations["Treg"].count, 2)
    np.testing.assert_array_equal(m[:, 1], values.values("CD25", "Treg"))


def test_linear_values_give_the_population_stats_medians(gated):
    sample, _, result = gated
    values = result.event_values(sample)
    for population in ("Treg", "NK", "cTfh"):
        expected = result.populations[population].medians["CD25"]
        assert np.median(values.linear("CD25", population)) == pytest.approx(expected, rel=1e-6)
    lin = values.matrix(["CD25"], "Treg", transformed=False)[:, 0]
    np.testing.assert_array_equal(lin, values.linear("CD25", "Treg"))
    # and the transformed values are the linear ones through the axis' transform
    cofactor = result.transforms[result.channel_of["CD25"]]["cofactor"]
    np.testing.assert_allclose(
        values.values("CD25", "Treg"), np.arcsinh(lin / cofactor), rtol=1e-5, atol=1e-5
    )


def test_run_level_transform_overrides_are_followed(sample_data):
    """Locked (study) transforms given to gate() win for every marker, gated or not."""
    from cytopipe.fcs import read_fcs
    from cytopipe.gating import gate, load_template

    template = load_template(TEMPLATE)
    sample = read_fcs(sample_data / "fcs" / "P002_W04.fcs")
    locked = {"CD25": {"type": "arcsinh", "cofactor": 500.0}, "CD16": {"type": "arcsinh", "cofactor": 300.0}}
    result = gate(sample, template, transforms=locked, medians=False)
    values = result.event_values(sample)
    assert values.scale("CD25") == "arcsinh(x/500)" and values.scale("CD16") == "arcsinh(x/300)"
    lin = values.linear("CD16", "NK")
    np.testing.assert_allclose(values.values("CD16", "NK"), np.arcsinh(lin / 300), rtol=1e-5, atol=1e-5)


def test_the_sample_must_be_the_gated_one(gated):
    sample, _, result = gated
    from dataclasses import replace

    shorter = replace(sample, events=sample.events[:-10])
    with pytest.raises(GatingError, match="was gated with"):
        result.event_values(shorter)


def test_the_docs_example_runs(capsys, monkeypatch):
    """docs/gating.md, 'Values on the gates' axes': the example runs from the repository root."""
    import re

    from tests.conftest import REPO

    text = (REPO / "docs" / "gating.md").read_text(encoding="utf-8")
    code = next(c for c in re.findall(r"```python\n(.*?)```", text, re.S) if "event_values" in c)
    monkeypatch.chdir(REPO)
    exec(compile(code, "docs/gating.md", "exec"), {})
    assert re.match(r"arcsinh\(x/\d+\) \(", capsys.readouterr().out)


def test_nothing_outside_gating_uses_its_private_helpers():
    from tests.conftest import REPO

    users = [
        str(p.relative_to(REPO))
        for p in (REPO / "cytopipe").rglob("*.py")
        if "gating" not in p.parts and "_adapters" in p.read_text(encoding="utf-8")
    ]
    assert users == []


def test_values_reused_from_the_engine_equal_recomputed_ones(gated):
    """``gate(..., keep_values=True)``: EventValues takes the values the engine transformed (whole
    columns and per-parent subsets) instead of transforming them again; bit for bit the same as
    an EventValues that recomputes everything."""
    from cytopipe.gating import gate
    from cytopipe.gating.values import _UNCOMPENSATED, EventValues

    sample, template, _ = gated
    result = gate(sample, template, keep_values=True)
    kept = EventValues(sample, result)
    fresh = EventValues(sample, result)
    fresh._engine_transformed = lambda *args: None  # the reference: every value transformed here
    reused = 0
    for pop in result.populations.values():
        if pop.gate is None:
            continue
        idx = None if pop.parent == "root" else result.indices(pop.parent)
        for dim in getattr(pop.gate, "dims", []):
            if dim.ratio is not None:
                continue
            lin = kept._full_linear(kept.channel(dim.name), dim.compensation not in _UNCOMPENSATED)
            reused += kept._engine_transformed(lin, kept.transform_spec(dim), idx) is not None
            np.testing.assert_array_equal(kept.at(dim, idx, pop.parent), fresh.at(dim, idx, pop.parent))
    assert reused >= 5  # taken from the engine, not recomputed
    kept.forget()  # frees them: later requests recompute
    assert result._kept_transformed is None
