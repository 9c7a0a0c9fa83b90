"""Helpers shared by the pipeline tests: a small simulated trial and run comparisons."""

from __future__ import annotations

import os
import random
import shutil
import socket
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


# clustering of the simulated trial: CD4 T cells on the helper markers, a small SOM (fast); the
# report is written only where a test asks for it
CLUSTERING = {
    "enabled": True,
    "population": "CD4 T",
    "markers": ["CD25", "CD127", "FOXP3", "CD45RA", "CXCR5", "PD-1", "CXCR3", "CCR6"],
    "grid": [6, 6],
    "metaclusters": 8,
    "embedding": {"enabled": False},
}
SECTIONS = {"clustering": CLUSTERING, "report": {"enabled": False}}


def make_trial(folder: Path) -> Path:
    """The simulated trial, with ``workflow.yaml`` (its manifest, clinical table, the template and
    SECTIONS) for command-line runs."""
    import yaml

    from cytopipe.simulate import simulate_trial

    simulate_trial(folder, **TRIAL)
    spec = {"study": "simulated trial", "manifest": "manifest.csv", "clinical": "clinical.csv",
            "template": str(TEMPLATE), **SECTIONS}  # fmt: skip
    (folder / "workflow.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
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


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning on (the current) standard error, as Python prints one."""
    import warnings

    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """``cytopipe ARGS`` through the command's own entry point (``cytopipe.cli.main``, which
    ``python -m cytopipe`` calls) in this process, its standard output and error captured, as
    :func:`cli` returns them. Only for a test about what a command does or says (its files, its
    messages, its exit code), never one about the process itself (start-up, imports, signals, the
    environment a fresh interpreter gets): it saves the ~1 s of CPU a fresh process spends importing
    pandas, Dask and SciPy before any work, which a refusal "before any work" is almost all of.

    Standard error gets what a fresh process would print there, so that a test finding no arm name
    (or no traceback) in it checks as much: log records no handler takes (logging's last resort,
    WARNING and above; pytest's own handlers are set aside meanwhile) and Python warnings, under a
    fresh interpreter's warning filters and each printed once per place, as in a new process."""
    import contextlib
    import io
    import logging
    import warnings

    from cytopipe.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
        warnings.resetwarnings()
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=category, append=True)
        warnings.showwarning = _print_warning  # pytest's recorder set aside: printed, as a process does
        root.handlers, root.level = [], logging.WARNING  # unhandled records: logging.lastResort
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors exit as the process would
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        finally:
            root.handlers, root.level = handlers, level
    return subprocess.CompletedProcess(["cytopipe", *args], code, out.getvalue(), err.getvalue())


def free_port() -> int:
    """A free TCP port on the loopback. Under pytest-xdist each worker takes only ports of its own
    residue (port % workers == its number), so two workers never pick the same port in the moment
    between choosing it and a server binding it."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    mine = int(worker[2:]) % workers if worker.startswith("gw") and worker[2:].isdigit() else 0
    if workers == 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    # A port of our residue chosen here, below Linux's ephemeral range (32768-60999): the kernel's
    # own choice for port 0 has one parity only (odd on 6.18), so a worker waiting for a port of the
    # other residue waited for ever (it hung `-n 2` in a serve test's setup).
    rng = random.Random()
    for _ in range(10_000):
        port = rng.randrange(10_000 // workers, 32_000 // workers) * workers + mine
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free TCP port of residue {mine} (mod {workers}) below 32000")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def read_outputs(run_dir: Path) -> dict[str, pd.DataFrame]:
    return {name: pd.read_parquet(run_dir / f"{name}.parquet") for name in ("population_stats", "samples")}


CATALOG_TABLES = ("population_stats", "samples", "clusters", "statistics")
# every data output of a run (not run.json, which records timings, nor the report)
OUTPUT_FILES = (
    "population_stats.parquet", "samples.parquet", "gate_review.parquet", "clusters.parquet",
    "statistics.parquet", "clustering/model.npz", "clustering/nodes.parquet", "clustering/metaclusters.parquet",
    "clustering/concordance.parquet", "clustering/concordance_summary.parquet", "clustering/umap.parquet",
)  # fmt: skip


def assert_same_outputs(a: Path, b: Path) -> None:
    """Identical outputs: every data file byte for byte (present in both or in neither), and the
    DuckDB catalogs' tables row for row."""
    for name in OUTPUT_FILES:
        fa, fb = a / name, b / name
        assert fa.is_file() == fb.is_file(), f"{name}: in one run folder only"
        if fa.is_file() and fa.read_bytes() != fb.read_bytes():
            if name.endswith(".parquet"):
                pd.testing.assert_frame_equal(pd.read_parquet(fa), pd.read_parquet(fb))
            raise AssertionError(f"{name}: different bytes")
    with (
        duckdb.connect(str(a / "catalog.duckdb"), read_only=True) as ca,
        duckdb.connect(str(b / "catalog.duckdb"), read_only=True) as cb,
    ):
        names_a = {r[0] for r in ca.execute("select table_name from information_schema.tables").fetchall()}
        names_b = {r[0] for r in cb.execute("select table_name from information_schema.tables").fetchall()}
        assert names_a == names_b
        for name in CATALOG_TABLES:
            if name in names_a:
                pd.testing.assert_frame_equal(
                    ca.execute(f"select * from {name}").df(), cb.execute(f"select * from {name}").df()
                )


def forget_rerun_record(run: Path) -> None:
    """Remove run.json's rerun record, so the next run of the folder takes the normal path even
    with nothing changed (docs/reports.md, "Reruns")."""
    import json

    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    info.pop("rerun", None)
    (run / "run.json").write_text(json.dumps(info), encoding="utf-8")


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
    """The trial's workflow (clinical table, clustering, statistics; no report); ``kw`` replaces
    settings (``workers=1``) or whole sections (``clustering={...}``)."""
    from cytopipe.workflow import workflow_from_options

    sections = {**SECTIONS, **kw}
    return workflow_from_options(
        trial / "manifest.csv", TEMPLATE, out, clinical=trial / "clinical.csv", **sections
    )


def reference_run(trial: Path, out: Path) -> Path:
    """The trial run in this process, no Dask (the synchronous scheduler)."""
    from cytopipe.pipeline import EXIT_OK, run_workflow

    result = run_workflow(workflow(trial, out), scheduler="synchronous", progress=False)
    assert result.exit_code == EXIT_OK, result.summary()
    return out
