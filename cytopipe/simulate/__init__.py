"""Simulated low-dose IL-2 lupus trial (like NCT04077684) with per-event ground truth.

* :func:`simulate_cohort` - tables only (patients, clinical, true immune frequencies); fast.
* :func:`simulate_trial` - a whole trial folder: raw FCS files with ``$SPILLOVER``, compensation
  controls, ``manifest.csv``, ``clinical.csv`` and ``truth/`` (per-event labels, truth tables).
* :func:`instrument_trial` - a trial measured on instrument profiles (``instrument="random"``,
  ``"aurora"``, ``"cytof"``...): other ranges, brightness, spillover, scatter, names, drift.
* ``cytopipe simulate --out DIR ...`` - the same from the command line (``--instrument NAME``).

See docs/simulator.md for the generative model.
"""

from cytopipe.simulate.cohort import Cohort, SimulationError, expected_frequencies, simulate_cohort
from cytopipe.simulate.command import add_arguments, run
from cytopipe.simulate.instruments import Instrument, make_instrument
from cytopipe.simulate.populations import POPULATION_NAMES, POPULATIONS, unpack_membership
from cytopipe.simulate.trial import Trial, instrument_trial, simulate_trial
from cytopipe.simulate.truth import load_labels

__all__ = [
    "Cohort",
    "Instrument",
    "POPULATIONS",
    "POPULATION_NAMES",
    "SimulationError",
    "Trial",
    "add_arguments",
    "expected_frequencies",
    "instrument_trial",
    "load_labels",
    "make_instrument",
    "run",
    "simulate_cohort",
    "simulate_trial",
    "unpack_membership",
]
