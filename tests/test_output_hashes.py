"""The README's main command gives the same tables as when they were recorded.

`cytopipe run workflows/sle_il2.yaml` on the committed sample_data is run once per session (the
``pipeline_run`` fixture) and every data table it writes is compared with the content hashes in
``tests/data/output_hashes.json``, recorded from the code before a restructuring (issue 12: the
pipeline split must not change a single value).

What is hashed is the *content* of each table, not the file's bytes: column names, dtypes and
every value's bytes (parquet files also carry the writing library's version, which a fresh
virtual environment may change without changing a number). Float values are compared bit for
bit. Note that numpy's float32 arcsinh takes a CPU-specific SIMD path (AVX-512 vs AVX2 differ
in the last bit) and numba compiles for the host CPU, so the hashes belong to the CPU family
(vendor, family, SIMD level, numpy version) recorded next to them, one record per family;
elsewhere the test skips. The Intel Xeon record was made on 2026-12-07 from the unchanged code of
dabdc79 (the project's VM changed from an AMD EPYC to an Intel Xeon between two sessions).

When the inputs change on purpose (sample_data regenerated, a deliberate change of a result),
re-record with the documented one-liner and commit the JSON with the change that explains it::

    PYTHONPATH=. python -m tests.test_output_hashes --record
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
HASHES = REPO / "tests" / "data" / "output_hashes.json"
COMMAND = ("run", "workflows/sle_il2.yaml")

# every deterministic data table of the run (not run.json: timings; not the report: it embeds
# the run time; not catalog.duckdb: a database file, its tables are these tables)
TABLES = (
    "population_stats.parquet", "samples.parquet", "gate_review.parquet", "clusters.parquet",
    "statistics.parquet", "clustering/model.npz", "clustering/nodes.parquet",
    "clustering/metaclusters.parquet", "clustering/concordance.parquet",
    "clustering/concordance_summary.parquet", "clustering/umap.parquet",
)  # fmt: skip


def _column_bytes(values: pd.Series) -> bytes:
    arr = values.to_numpy()
    if arr.dtype.kind in "biufcmM":
        return np.ascontiguousarray(arr).tobytes()
    return "\x1f".join("\x00" if v is None or v is pd.NA or (isinstance(v, float) and np.isnan(v)) else repr(v)
                       for v in arr).encode()  # fmt: skip


def content_hash(path: Path) -> str:
    """sha256 of a table's content: names, dtypes and values (bit for bit) in stored order."""
    h = hashlib.sha256()
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            for key in sorted(z.files):
                arr = z[key]
                h.update(f"{key}|{arr.dtype.str}|{arr.shape}\n".encode())
                h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()
    frame = pd.read_parquet(path)
    h.update(f"{len(frame)} rows\n".encode())
    for name in frame.columns:
        col = frame[name]
        h.update(f"{name}|{col.dtype}\n".encode())
        h.update(_column_bytes(col))
    return h.hexdigest()


def hashes_of(run_dir: Path) -> dict[str, str | None]:
    return {name: content_hash(run_dir / name) if (run_dir / name).is_file() else None for name in TABLES}


def _machine() -> dict[str, str]:
    """The machine family the hashes belong to: architecture, CPU vendor and family, SIMD level and
    numpy's version. Two CPUs with the same SIMD flags can still differ in the last bit: numba
    compiles for the host CPU (an AMD EPYC and an Intel Xeon, both AVX-512, gave different
    population counts on 2026-12-04, an event on a gate's edge moving across it)."""
    info: dict[str, str] = {}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = " " + info.get("flags", "")
    simd = "avx512f" if " avx512f" in flags else "avx2" if " avx2" in flags else "other"
    cpu = f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')}"
    return {"machine": platform.machine(), "cpu": cpu, "simd": simd, "numpy": np.__version__}


FAMILY = ("machine", "cpu", "simd", "numpy")


def _records() -> list[dict]:
    """The recorded runs, one per machine family (older files held a single record)."""
    data = json.loads(HASHES.read_text(encoding="utf-8"))
    return data["records"] if "records" in data else [data]


def test_main_command_tables_match_the_recorded_hashes(pipeline_run):
    out, proc = pipeline_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    here = _machine()
    mine = [r for r in _records() if {k: r["machine"].get(k) for k in FAMILY} == {k: here[k] for k in FAMILY}]
    if not mine:
        # float32 arcsinh's and numba's last bit depend on the CPU and numpy's version: the
        # hashes belong to the machine family that recorded them (re-record there to compare)
        pytest.skip(f"hashes recorded on {[r['machine'] for r in _records()]}; this machine is {here}")
    (recorded,) = mine
    now = hashes_of(out)
    assert recorded["files"], "no hashes recorded"
    changed = [name for name, digest in recorded["files"].items() if now.get(name) != digest]
    assert not changed, (
        f"tables differ from the recorded run ({recorded['machine']}): {changed}. "
        "If the change is intended, re-record on every machine family listed in "
        "tests/data/output_hashes.json: PYTHONPATH=. python -m tests.test_output_hashes --record"
    )


def record(run_dir: Path | None = None) -> dict:
    """Run the README's main command into a temporary folder (or hash ``run_dir``) and write this
    machine family's record into the JSON, keeping the other families' records."""
    from tests.pipeline_support import cli

    with tempfile.TemporaryDirectory(prefix="cytopipe-hashes-") as tmp:
        if run_dir is None:
            run_dir = Path(tmp) / "sle_il2"
            proc = cli(*COMMAND, "--out", str(run_dir), "--no-progress", timeout=3600, cwd=REPO)
            if proc.returncode != 0:
                raise SystemExit(f"the run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        files = hashes_of(run_dir)
    here = _machine()
    others = [
        r
        for r in (_records() if HASHES.is_file() else [])
        if {k: r["machine"].get(k) for k in FAMILY} != {k: here[k] for k in FAMILY}
    ]
    mine = {"machine": here, "files": files}
    data = {"command": "cytopipe " + " ".join(COMMAND), "records": [*others, mine]}
    HASHES.parent.mkdir(parents=True, exist_ok=True)
    HASHES.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return mine


def test_the_run_folder_api_reads_the_run(pipeline_run):
    """The report, review and export read a run through RunFolder: its loaders give the tables."""
    from cytopipe.store import RunFolder

    out, _ = pipeline_run
    folder = RunFolder(out)
    assert folder.info()["study"] == "SLE IL-2 (simulated sample data)"
    for name in ("population_stats", "samples", "clusters", "statistics"):
        pd.testing.assert_frame_equal(folder.table(name), pd.read_parquet(out / f"{name}.parquet"))
    nodes = folder.cluster_table("nodes")
    assert nodes is not None and len(nodes) == 100 and folder.model_path.is_file()  # the 10 x 10 SOM


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"]:
        raise SystemExit("usage: PYTHONPATH=. python -m tests.test_output_hashes --record [RUN_DIR]")
    result = record(Path(sys.argv[2]) if len(sys.argv) > 2 else None)
    print(json.dumps(result, indent=1))
