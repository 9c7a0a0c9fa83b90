"""One source of defaults: `cytopipe run --manifest ... --template ...` without a workflow file
runs with exactly the settings of the shipped workflow, except the keys the shipped workflow
marks as its own (a comment saying the default)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cytopipe.pipeline.command import add_arguments, workflow_from_args
from cytopipe.workflow import load_workflow

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "workflows" / "sle_il2.yaml"
# the study's own values in the shipped file (each line says the default in its comment)
STUDY_KEYS = {"study", "output", "spec_path", "seed", "clustering.markers"}


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cytopipe run")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_run_without_a_workflow_file_uses_the_shipped_workflows_defaults(tmp_path):
    shipped = load_workflow(SHIPPED)
    wf = workflow_from_args(
        _args(
            "--manifest",
            str(shipped.manifest),
            "--template",
            str(shipped.template),
            "--clinical",
            str(shipped.clinical),
            "--out",
            str(tmp_path / "run"),
        )  # fmt: skip
    )
    a, b = _flat(shipped.to_dict()), _flat(wf.to_dict())
    assert set(a) == set(b)
    differ = {k for k in a if a[k] != b[k]}
    assert differ == STUDY_KEYS, {k: (a[k], b[k]) for k in differ}
    # the values the issue named: clustering on, 15 metaclusters, a 4000-cell UMAP
    assert b["clustering.enabled"] is True and b["clustering.metaclusters"] == 15
    assert b["clustering.embedding.enabled"] is True and b["clustering.embedding.cells"] == 4000
    # the shipped file says so where its value is the study's own, not the default
    text = SHIPPED.read_text(encoding="utf-8")
    for key in ("seed", "markers"):
        line = next(x for x in text.splitlines() if re.match(rf"\s*{key}:", x))
        assert "default" in line.split("#", 1)[1], line


def test_command_line_overrides_win_over_the_defaults(tmp_path):
    shipped = load_workflow(SHIPPED)
    wf = workflow_from_args(
        _args(
            "--manifest",
            str(shipped.manifest),
            "--template",
            str(shipped.template),
            "--out",
            str(tmp_path / "run"),
            "--seed",
            "5",
            "--workers",
            "2",
            "--no-report",
        )  # fmt: skip
    )
    assert (wf.seed, wf.workers, wf.report["enabled"]) == (5, 2, False)
    assert wf.clinical is None and wf.statistics["enabled"] == "auto"


def test_the_default_worker_count_and_the_report_helper_follow_the_cpus_the_process_may_use():
    """On a machine whose process may use one CPU (its affinity here; a container's CPU quota
    counts the same, as Dask counts them): one local worker, and no report helper process."""
    import os
    import subprocess
    import sys

    if len(os.sched_getaffinity(0)) < 2:
        import pytest

        pytest.skip("needs a machine with two CPUs to take one away")
    code = (
        "import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from cytopipe.report.render_helper import FigureQueue\n"
        "from cytopipe.pipeline import DaskExecutor\n"
        "if __name__ == '__main__':\n"
        "    ex = DaskExecutor()\n"
        "    try:\n"
        "        print(ex.n_workers, FigureQueue().helper)\n"
        "    finally:\n"
        "        ex.close()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "False"]
    from cytopipe.report.render_helper import FigureQueue

    assert FigureQueue().helper is True  # this process, with its two or more CPUs
