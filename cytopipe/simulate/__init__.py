"""Simulated low-dose IL-2 lupus trial (like NCT04077684) with per-event ground truth.

* :func:`simulate_cohort` - tables only (patients, clinical, true immune frequencies); fast.
* :func:`simulate_trial` - a whole trial folder: raw FCS files with ``$SPILLOVER``, compensation
  controls, ``manifest.csv``, ``clinical.csv`` and ``truth/`` (per-event labels, truth tables).
* ``cytopipe simulate --out DIR ...`` - the same from the command line.

See docs/simulator.md for the generative model.
"""

from cytopipe.simulate.cohort import Cohort, SimulationError, expected_frequencies, simulate_cohort
from cytopipe.simulate.command import add_arguments, run
from cytopipe.simulate.populations import POPULATION_NAMES, POPULATIONS, unpack_membership
from cytopipe.simulate.trial import Trial, simulate_trial
from cytopipe.simulate.truth import load_labels

__all__ = [
    "Cohort",
    "POPULATIONS",
    "POPULATION_NAMES",
    "SimulationError",
    "Trial",
    "add_arguments",
    "expected_frequencies",
    "load_labels",
    "run",
    "simulate_cohort",
    "simulate_trial",
    "unpack_membership",
]
