"""``cytopipe cluster RUN_DIR``: (re)train and map FlowSOM clusters on a finished run folder.

::

    cytopipe cluster runs/sle_il2                      # map onto the run's model (train one if none)
    cytopipe cluster runs/sle_il2 --retrain            # train a new model, then map
    cytopipe cluster runs/sle_il2 --workflow w.yaml    # with w.yaml's clustering/statistics/report settings

The samples are re-read and re-gated on the workers exactly as the run did (its QC, compensation,
locked transforms and pooled gate estimates, from ``run.json`` and ``study/``, as ``cytopipe
export`` does); then ``clusters.parquet``, ``RUN_DIR/clustering/``, ``statistics.parquet``, the
catalog, ``run.json`` and the report are rewritten. The population statistics are not touched.
Per-sample results are cached in ``RUN_DIR/.cache`` like the run's, so a repeated command (or one
after a ``cytopipe run`` with the same clustering settings) reuses them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from cytopipe.errors import WorkflowError
from cytopipe.pipeline.executors import add_executor_arguments
from cytopipe.report.options import add_blinding_arguments

# steps of a run that this command redoes (their earlier records in run.json are replaced)
_REDONE = ("clustering-train", "clustering-map", "statistics", "clustering-umap", "report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished `cytopipe run` folder")
    parser.add_argument(
        "--retrain",
        action="store_true",
        help="train a new model even if the run has one (RUN_DIR/clustering/model.npz) or the workflow names one",
    )
    parser.add_argument(
        "--workflow",
        metavar="W.yaml",
        help="take the clustering, statistics, report (and clinical) settings from this workflow "
        "instead of the run's; its manifest and template are not used",
    )
    add_executor_arguments(parser, "the run's, else one per core")
    add_blinding_arguments(parser)
    parser.add_argument("--no-report", action="store_true", help="do not rewrite report.html")


def run(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise WorkflowError(f"--workers is {args.workers}; it must be at least 1")
    result = cluster_run(
        args.run_dir,
        workflow=args.workflow,
        retrain=args.retrain,
        workers=args.workers,
        scheduler="distributed" if args.scheduler_address else args.scheduler,
        address=args.scheduler_address,
        memory_limit=args.memory_limit,
        progress=not args.no_progress,
        options=args,
    )
    print(result.summary("cluster"))
    return result.exit_code


def cluster_run(
    run_dir: str | Path,
    workflow: str | Path | None = None,
    retrain: bool = False,
    workers: int | None = None,
    scheduler: str = "local",
    address: str | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
    options: argparse.Namespace | None = None,
) -> Any:
    """Train (or reuse) the model and map every sample of a finished run; returns the
    :class:`~cytopipe.pipeline.runner.RunResult` of the updated run folder."""
    from cytopipe.pipeline.cluster_steps import step_umap
    from cytopipe.pipeline.command import apply_report_options
    from cytopipe.pipeline.context import RunContext, Step, run_steps
    from cytopipe.pipeline.executors import make_executor
    from cytopipe.pipeline.loaded import load_run
    from cytopipe.pipeline.runner import RunResult, finish_run
    from cytopipe.pipeline.state import plan_clustering
    from cytopipe.pipeline.statistics import step_statistics
    from cytopipe.pipeline.steps import _cluster_map, _cluster_train, _drop_unmeasured_cluster_markers
    from cytopipe.pipeline.validation import check_report_tables
    from cytopipe.store import CLUSTER_DIR, MODEL_FILE, read_table
    from cytopipe.workflow import load_workflow, statistics_enabled, statistics_settings

    t0 = time.perf_counter()
    loaded = load_run(run_dir)
    wf = loaded.wf
    if workflow is not None:
        other = load_workflow(workflow, output=loaded.folder.path)
        wf.clustering, wf.statistics, wf.report = other.clustering, other.statistics, other.report
        if other.clinical is not None:
            wf.clinical = other.clinical
        wf.spec_path = other.spec_path
    clustering = dict(wf.clustering or {})
    clustering["enabled"] = True  # what this command is for
    own = loaded.folder.path / CLUSTER_DIR / MODEL_FILE
    if retrain:
        clustering["model"] = None
    elif clustering.get("model") is None and own.is_file():
        clustering["model"] = own  # re-map onto the run's frozen model
    wf.clustering = clustering
    if options is not None:
        apply_report_options(wf, options)

    ctx = RunContext(wf=wf, folder=loaded.folder, executor=None, progress=progress)
    ctx.jobs = list(loaded.jobs)
    ctx.state = loaded.state
    ctx.hashes = dict(loaded.info.get("hashes") or {})
    ctx.state.cluster = plan_clustering(wf, ctx.state.template, ctx.state.transforms)
    if statistics_enabled(wf):
        ctx.stats_settings = statistics_settings(wf)
    ctx.tables = {name: read_table(loaded.folder.path, name) for name in ("population_stats", "samples")}
    if loaded.codes is not None:  # a blinded folder: computed with the arms, written with the codes
        from cytopipe.report.blinding import unblind_frame

        ctx.tables = {name: unblind_frame(df, loaded.codes) for name, df in ctx.tables.items()}
    samples = ctx.tables["samples"]  # a blinded report refused now, not after the clustering
    arms = [str(a) for a in samples["arm"].dropna().unique()] if "arm" in samples.columns else []
    check_report_tables(wf, loaded.folder.path, arms)
    ctx.steps = [s for s in loaded.info.get("steps") or [] if s.get("step") not in _REDONE]
    ctx.cached = int(loaded.info.get("cached_samples") or 0)
    earlier = [p for p in loaded.info.get("problems") or [] if not str(p).startswith(("clustering", "statistics", "report"))]  # fmt: skip
    ctx.problems = list(earlier)
    register = next((s for s in loaded.info.get("steps") or [] if s.get("step") == "register"), {})
    absent = register.get("markers_in_no_file") or register.get("not_measured_markers") or []
    _drop_unmeasured_cluster_markers(ctx, list(absent))  # as the run did: the same clusters' columns
    executor = make_executor(scheduler, workers or wf.workers, address, memory_limit)
    ctx.executor = executor
    try:
        run_steps(
            ctx,
            [
                Step("clustering-train", _cluster_train),
                Step("clustering-map", _cluster_map),
                Step("statistics", step_statistics),
                Step("clustering-umap", step_umap),
            ],
        )
    finally:
        executor.close()
    info = dict(loaded.info)
    info.update(
        workflow=wf.to_dict(),
        hashes=dict(ctx.hashes),
        steps=ctx.steps,
        problems=list(ctx.problems),
        clustered_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        cluster_command={"retrain": bool(retrain), "workflow": None if workflow is None else str(workflow)},
    )
    written = [name for name in ("clusters", "statistics") if name in ctx.tables]
    finish_run(ctx, info, t0, parquet=written)
    return RunResult(
        out=loaded.folder.path,
        samples=ctx.tables["samples"],
        population_stats=ctx.tables["population_stats"],
        info=info,
    )
