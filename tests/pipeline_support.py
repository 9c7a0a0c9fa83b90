"""Helpers shared by the pipeline tests: a small simulated trial and run comparisons."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "gating" / "sle_il2_tcell_nk.yaml"

# a trial the gating template was not tuned on (its own seed), with one file per fault kind
TRIAL = dict(
    n_patients=4,
    visits=(0, 4),
    events=5000,
    seed=4242,
    control_events=2000,
    faults={"P001_W04": ["clog"], "P002_W00": ["shift"], "P003_W04": ["margin"]},
)


def make_trial(folder: Path) -> Path:
    from cytopipe.simulate import simulate_trial

    simulate_trial(folder, **TRIAL)
    return folder


def cli(*args: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``cytopipe ARGS`` in a fresh process (the worktree's package, like the console script)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run(
        [sys.executable, "-m", "cytopipe", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        **kwargs,
    )


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def read_outputs(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run_dir / f"{name}.parquet") for name in ("population_stats", "samples")}


def assert_same_outputs(a: Path, b: Path) -> None:
    """Identical tables: Parquet files byte for byte, and the DuckDB catalogs row for row."""
    for name in ("population_stats", "samples"):
        fa, fb = a / f"{name}.parquet", b / f"{name}.parquet"
        if fa.read_bytes() != fb.read_bytes():
            pd.testing.assert_frame_equal(pd.read_parquet(fa), pd.read_parquet(fb))
            raise AssertionError(f"{name}.parquet: same values but different bytes")
        with duckdb.connect(str(a / "catalog.duckdb"), read_only=True) as ca:
            ta = ca.execute(f"select * from {name}").df()
        with duckdb.connect(str(b / "catalog.duckdb"), read_only=True) as cb:
            tb = cb.execute(f"select * from {name}").df()
        pd.testing.assert_frame_equal(ta, tb)


def copy_trial(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate_fcs(path: Path) -> None:
    """A corrupt file: keep the header and TEXT, cut the DATA segment in half."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def drop_marker(path: Path, marker_pns: str) -> None:
    """Rewrite an FCS file with the channel carrying ``marker_pns`` unlabelled (marker missing)."""
    from cytopipe.fcs import read_fcs, write_fcs

    s = read_fcs(path)
    ch = s.channels.copy()
    hit = ch["pns"].str.contains(marker_pns, case=False, regex=False)
    assert hit.sum() == 1, f"{marker_pns!r} not found once in {list(ch['pns'])}"
    ch.loc[hit, "pns"] = ""
    kw = {k: v for k, v in s.keywords.items() if not k.startswith("$P")}
    write_fcs(path, s.events, ch, kw)


def truth_table(trial: Path) -> pd.DataFrame:
    return pd.read_csv(trial / "truth" / "population_truth.csv", dtype={"sample_id": str})


def pct_errors(stats: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    m = stats.merge(truth, on=["sample_id", "population"], suffixes=("", "_true"))
    m["abs_error_pp"] = (m["pct_parent"] - m["pct_parent_true"]).abs()
    return m


def fault_truth(trial: Path, sample_id: str) -> np.ndarray:
    with np.load(trial / "truth" / "labels" / f"{sample_id}.npz") as z:
        return z["fault"] > 0


# --- shared fixtures (imported by the pipeline and export tests; one simulation, one reference run)
def workflow(trial: Path, out: Path, **kw):
    from cytopipe.workflow import workflow_from_options

    return workflow_from_options(trial / "manifest.csv", TEMPLATE, out, clinical=trial / "clinical.csv", **kw)


def reference_run(trial: Path, out: Path) -> Path:
    """The trial run in this process, no Dask (the synchronous scheduler)."""
    from cytopipe.pipeline import EXIT_OK, run_workflow

    result = run_workflow(workflow(trial, out), scheduler="synchronous", progress=False)
    assert result.exit_code == EXIT_OK, result.summary()
    return out
