"""Pooled fallbacks of a multi-instrument batch are carried in display units, on purpose.

With ``cofactor: auto`` each file's arcsinh cofactor is 3 robust SDs of its own negative
population, so a display unit is "so many negative widths" on every file: an instrument with a
10-fold larger unit scale has a 10-fold larger cofactor. A pooled threshold copied as a display
value therefore keeps its place relative to the target's negative population, which is what the
file's own fit would find. Carrying it at the same *linear* intensity instead (as a per-file
cofactor seemed to ask for) lands it where the other instruments' units put it.

Measured (2026-12-06) leave-one-out on simulated multi-instrument batches (instrument_trial,
instrument="random", 4 patients on 3 sites, 10,000 events, every single-threshold fit of
gating/sle_il2_tcell_nk.yaml): the median distance of the pooled estimate from the file's own fit,
in the file's display units, pooling the other sites' fits in display units / in linear units:
seed 8001 0.21 / 0.61, seed 8002 0.38 / 0.95; pooling the same patient's other visits (one
instrument, per-file drift) 0.071 / 0.093 and 0.084 / 0.135. This test keeps that choice.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

import cytopipe
from cytopipe.gating import fit_records, gate, load_template, pool_estimates

TEMPLATE = """
name: one_threshold
compensation: file
transforms:
  default: {type: arcsinh, cofactor: auto}
populations:
  - name: CD3+
    parent: root
    markers: [CD3]
    gate: {type: auto, bounds: {min_events: 5000}, pool: cohort}
"""


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    from cytopipe.simulate import instrument_trial

    folder = tmp_path_factory.mktemp("inst8001")
    # a tuning-style seed (not 5150, not the held-out accuracy seeds): sites S1, S2, S3, S2
    instrument_trial(folder, instrument="random", seed=8001, patients=4, visits=(0,), events=10_000)
    manifest = pd.read_csv(folder / "manifest.csv")
    manifest = manifest[manifest["control"].isna()].reset_index(drop=True)
    (folder / "t.yaml").write_text(TEMPLATE)
    samples = {r.sample_id: cytopipe.read_fcs(folder / r.file) for r in manifest.itertuples()}
    return manifest, load_template(folder / "t.yaml"), samples


def test_forced_fallback_keeps_its_place_relative_to_the_targets_negative(batch):
    manifest, template, samples = batch
    target = "P001_W00"
    assert manifest.set_index("sample_id").loc[target, "site"] == "S1"
    assert set(manifest["site"]) - {"S1"} == {"S2", "S3"}  # the pool is the other instruments'
    full = samples[target]
    # too few events for the fit's min_events: the fit fails and the cohort estimate stands in
    short = dataclasses.replace(full, events=full.events[:4000])
    records = pd.concat(
        [fit_records(short if sid == target else s, template, sid) for sid, s in samples.items()],
        ignore_index=True,
    )
    others = records[records["status"] == "ok"]
    assert set(others["sample_id"]) == set(samples) - {target}
    pooled = pool_estimates(records, manifest)
    result = gate(short, template, pooled=pooled, sample_meta={"sample_id": target})
    [(pop, flag)] = result.flags
    assert pop == "CD3+" and "used the cohort estimate (median of 3 samples)" in flag
    applied = result.populations["CD3+"].gate.lower[0]
    # the other files' thresholds, each on its own file's scale (cofactors of other instruments)
    theirs = {
        sid: gate(samples[sid], template, sample_meta={"sample_id": sid}) for sid in others["sample_id"]
    }
    cofactors = {sid: next(iter(r.transforms.values()))["cofactor"] for sid, r in theirs.items()}
    display = [r.populations["CD3+"].gate.lower[0] for r in theirs.values()]
    c = next(iter(result.transforms.values()))["cofactor"]
    assert min(cofactors.values()) > 3 * c  # the instruments' scales differ more than 3-fold
    assert applied == pytest.approx(float(np.median(display)))  # pooled as display values
    # the file's own fit on all its events: the display value lands near it, the same linear
    # intensity would not
    own = gate(full, template).populations["CD3+"].gate.lower[0]
    linear = np.arcsinh(np.median([cofactors[s] * np.sinh(d) for s, d in zip(theirs, display)]) / c)
    assert abs(applied - own) < 0.5 < abs(linear - own)
