"""Every text of a report figure is inside it, also for the few-metacluster heatmaps of a small study.

Found on the report of CytoNorm's six CyTOF files (5 metaclusters, 2 of them empty): the marker
heatmap of 3 rows cut its colour bar's label ('median, scaled per marker (min 0, max 1)') at the top,
and the concordance heatmap of 3 columns cut its title at both sides. The report's own layout check
noted both ('... outside the figure' in the PNG's Layout text) but drew them anyway.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MARKERS = ["DNA1", "Event_length", "Viability", "CD66", "CD3", "CD4", "CD8", "CD25", "FOXP3", "CD45RA",
           "CXCR3", "CD56", "CD16"]  # fmt: skip
POPULATIONS = ["Intact cells", "Singlets", "Live", "T cells", "CD4 T", "CD8 T", "Treg", "Memory CD4", "NK",
               "CD56bright NK", "CD56dim NK"]  # fmt: skip


def test_few_metacluster_heatmaps_show_their_whole_labels_and_titles():
    from cytopipe.cluster import plot_concordance, plot_heatmap
    from cytopipe.report import figures as F

    rng = np.random.default_rng(1)
    med = pd.DataFrame(
        rng.uniform(0, 4.5, (3, len(MARKERS))), columns=MARKERS, index=["MC01", "MC02", "MC04"]
    )
    med.insert(0, "count", [1900, 2700, 1380])
    heat = F.render(plot_heatmap(med, "Metacluster median expression (display scale)"), "heat", "heatmap")
    table = pd.DataFrame(
        [(p, c, rng.uniform()) for p in POPULATIONS for c in ["MC01", "MC02", "MC04"]],
        columns=["population", "cluster", "f1"],
    )
    conc = F.render(
        plot_concordance(table, "F1 of each metacluster against each gated population"), "c", "conc"
    )
    for shown in (heat, conc):
        assert shown.overlaps == []  # nothing outside the figure, nothing over anything
    assert "median, scaled per marker (min 0, max 1)" in heat.texts
    assert "F1 of each metacluster against each gated population" in conc.texts
