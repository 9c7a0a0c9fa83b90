"""Benchmark: a rerun of a finished run with nothing changed (issue 15: < 10 s, and it says so).

    python bench/rerun.py [WORKFLOW] [--out DIR]

Runs ``cytopipe run WORKFLOW`` (default: workflows/sle_il2.yaml, the sample trial) into a fresh
folder, then again with nothing changed, each in a fresh process as a user would; prints both
wall times, their ratio, and whether the rerun printed that it reused everything.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(workflow: Path, out: Path) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cytopipe", "run", str(workflow), "--out", str(out), "--no-progress"],
                          env=env, capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode not in (0, 3):
        raise SystemExit(proc.stderr)
    return time.perf_counter() - t0, proc.stderr


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workflow", nargs="?", default=str(REPO / "workflows" / "sle_il2.yaml"))
    parser.add_argument("--out")
    args = parser.parse_args()
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cytopipe-rerun-")) / "run"
    first, _ = _run(Path(args.workflow), out)
    second, err = _run(Path(args.workflow), out)
    print(
        f"first run {first:.1f} s; rerun with nothing changed {second:.1f} s ({first / second:.0f}x faster)"
    )
    print("rerun said it reused everything:", "nothing changed: reused every output" in err)


if __name__ == "__main__":
    main()
