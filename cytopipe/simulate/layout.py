"""The trial folder's shared layout: what the default and the instrument-profile simulators
(:mod:`cytopipe.simulate.trial`, :mod:`cytopipe.simulate.multi`) both write and return.

Why one module: both writers import these names from here, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytopipe.simulate.cohort import Cohort

PANEL_NAME = "SLE-IL2-T-NK-v1"
MANIFEST_COLUMNS = [
    "file",
    "sample_id",
    "patient_id",
    "visit",
    "arm",
    "panel",
    "batch",
    "site",
    "acquired_at",
    "control",
]
MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


@dataclass
class Trial:
    """What :func:`~cytopipe.simulate.trial.simulate_trial` wrote."""

    out_dir: Path
    manifest: pd.DataFrame
    cohort: Cohort
    spillover: np.ndarray
    faulted: dict[str, list[str]] = field(default_factory=dict)
    instruments: dict = field(default_factory=dict)  # site -> Instrument (instrument profiles only)


def prepare_dirs(out: Path) -> None:
    """The folders every trial writes into (FCS controls, per-event labels)."""
    (out / "fcs" / "controls").mkdir(parents=True, exist_ok=True)
    (out / "truth" / "labels").mkdir(parents=True, exist_ok=True)


TRUTH_README = """Ground truth of a trial written by `cytopipe simulate` (see docs/simulator.md).

labels/<sample_id>.npz   per-event truth for every FCS file (np.load, no pickle needed):
    membership  uint16, bit i = event belongs to canonical population populations[i]
    populations names of the canonical populations in bit order
    flags       uint32, bit i = latent state flag_names[i] (in_lymph_region, doublet, dead, cd3_pos, ...)
    category    uint8 code into categories (lymphocyte, dead lymphocyte, doublet, debris, monocyte, ...)
    lineage     uint8 code into lineages (CD4 naive, Treg memory, NK CD56bright, ...)
    fault       uint8 code into faults (none, clog, shift, margin): injected acquisition faults
population_truth.csv     population_stats columns for every sample and canonical population; medians
                         are of compensated (true matrix), untransformed intensities; fault-injected
                         events are excluded
spillover.csv            the true spillover matrix (rows = fluorochrome/source detector, columns = detector)
expected_frequencies.csv expected % of parent per patient-visit from the cohort model (before sampling)
patients.csv             patient traits: arm, site, IL-2 responsiveness, latent Treg response, baselines
samples.csv              per-file composition, event count, batch gains and per-patient staining levels
faults.csv               injected faults: file, kind, first/last event index, channels, factor
"""
