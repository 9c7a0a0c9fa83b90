"""A reference ("oracle") gating of simulated files with thresholds taken from the model.

It compensates with the file's ``$SPILLOVER``, resolves markers through :mod:`cytopipe.panel`
and applies fixed thresholds that lie between the simulator's latent state distributions
(``params.THRESHOLDS``; any monotone transform such as arcsinh or logicle leaves them in place).
It shows what a good automated template can reach and is used by the separability tests.
"""

from __future__ import annotations

import numpy as np

from cytopipe.simulate import params as P
from cytopipe.simulate.events import lymph_distance


def oracle_masks(sample) -> dict[str, np.ndarray]:
    """Canonical population membership of a simulated :class:`~cytopipe.fcs.Sample`."""
    from cytopipe.panel import resolve_markers

    names = resolve_markers(sample, ["FSC-A", "FSC-H", "SSC-A", *P.MARKERS])
    col = {p: i for i, p in enumerate(sample.channels["pnn"])}
    ev = sample.events
    spill = sample.spillover
    raw = ev[:, [col[c] for c in spill.channels]].astype(np.float64)
    comp = raw @ np.linalg.inv(spill.matrix)
    x = {m: comp[:, spill.channels.index(names[m])] for m in P.MARKERS}
    t = P.THRESHOLDS
    fsc, fsch, ssc = (ev[:, col[names[c]]].astype(np.float64) for c in ("FSC-A", "FSC-H", "SSC-A"))
    m: dict[str, np.ndarray] = {}
    m["Lymphocytes"] = lymph_distance(fsc, ssc) <= P.LYMPH_REGION
    m["Singlets"] = m["Lymphocytes"] & (fsch >= P.SINGLET_MIN_RATIO * fsc)
    m["Live"] = m["Singlets"] & (x["Viability"] < t["Viability"])
    m["T cells"] = m["Live"] & (x["CD3"] > t["CD3"])
    m["CD4 T"] = m["T cells"] & (x["CD4"] > t["CD4"]) & (x["CD8"] < t["CD8"])
    m["CD8 T"] = m["T cells"] & (x["CD8"] > t["CD8"]) & (x["CD4"] < t["CD4"])
    m["Treg"] = m["CD4 T"] & (x["CD25"] > t["CD25"]) & (x["CD127"] < t["CD127"]) & (x["FOXP3"] > t["FOXP3"])
    m["Memory CD4"] = m["CD4 T"] & (x["CD45RA"] < t["CD45RA"])
    m["Th17"] = m["Memory CD4"] & (x["CXCR3"] < t["CXCR3"]) & (x["CCR6"] > t["CCR6"])
    m["Th1"] = m["Memory CD4"] & (x["CXCR3"] > t["CXCR3"]) & (x["CCR6"] < t["CCR6"])
    m["cTfh"] = m["Memory CD4"] & (x["CXCR5"] > t["CXCR5"])
    m["activated cTfh"] = m["cTfh"] & (x["PD-1"] > t["PD-1"])
    m["NK"] = m["Live"] & (x["CD3"] < t["CD3"]) & (x["CD56"] > t["CD56"])
    m["CD56bright NK"] = m["NK"] & (x["CD56"] > t["CD56bright"]) & (x["CD16"] < t["CD16"])
    m["CD56dim NK"] = m["NK"] & ~m["CD56bright NK"]
    return m


def f1(pred: np.ndarray, truth: np.ndarray) -> float:
    """F1 score of a predicted vs true boolean membership (1.0 when both are empty)."""
    tp = int(np.count_nonzero(pred & truth))
    denom = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    return 1.0 if denom == 0 else 2.0 * tp / denom
