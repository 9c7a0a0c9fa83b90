"""``cytopipe run``: a whole study, one Dask task per sample, resumable and fault-isolated.

The run is a list of steps (:data:`STEPS`). Per-sample steps run as whole-sample tasks on a
local Dask cluster of processes (1 thread each, BLAS limited to 1 thread), on an existing
cluster (``--scheduler-address``) or in-process (``--scheduler synchronous``); study-level
steps (spillover from controls, transforms locked from pooled events, pooled gate
estimates) run in between as small phases on the client. Tasks receive file paths and send
back only small tables; event matrices never leave the worker.

Every per-sample result is cached in ``RUN_DIR/.cache`` under a key made of the file's
sha256 and a hash of every setting that affects it. A rerun recomputes only what is missing
or changed, so a run killed at any moment (even ``kill -9``) and started again ends with the
same tables as an uninterrupted run. A sample that cannot be processed (corrupt file, marker
missing, a worker that keeps dying) is recorded as ``failed`` with its error; the others go on.

After gating, study-level steps use the per-sample results: FlowSOM clustering (two more cached
per-sample passes, :mod:`cytopipe.pipeline.cluster_steps`), the statistics, and, once the tables are
written, the report. A study-level step that cannot complete is a *problem* of the run (recorded
in run.json, printed); it never loses the tables written before it.

Exit codes: 0 all samples processed (some may be ``flagged``), 3 completed with failures (failed
files, or problems in the study-level steps), 2 invalid input (nothing run), 130 interrupted,
1 internal error.

The package, one job per module (imports go down this list, never up; the rest of cytopipe
reads a finished run folder through :class:`cytopipe.store.RunFolder`, never through here):

- :mod:`~cytopipe.pipeline.state`: the study plan and state shipped to the workers;
- :mod:`~cytopipe.pipeline.progress`: progress of every phase (a bar, or lines in run.log);
- :mod:`~cytopipe.pipeline.executors`: in-process and Dask executors;
- :mod:`~cytopipe.pipeline.tasks`: per-sample tasks (pure functions of a job and the state);
- :mod:`~cytopipe.pipeline.context`: the run's context and its cached per-sample phases;
- :mod:`~cytopipe.pipeline.assemble`, :mod:`~cytopipe.pipeline.statistics`,
  :mod:`~cytopipe.pipeline.cluster_steps`: the tables, the statistics and the clustering;
- :mod:`~cytopipe.pipeline.steps`: the steps of a run, in order (:data:`STEPS`);
- :mod:`~cytopipe.pipeline.runner`: :func:`run_workflow` (lock, run.log, outputs, report);
- :mod:`~cytopipe.pipeline.loaded`: a finished run loaded to re-process its samples;
- :mod:`~cytopipe.pipeline.command`, :mod:`~cytopipe.pipeline.cluster_command`,
  :mod:`~cytopipe.pipeline.gate_command`: the ``cytopipe run``, ``cytopipe cluster`` and
  ``cytopipe gate`` commands.

The names below are re-exported so that ``from cytopipe.pipeline import run_workflow`` keeps
working; new code imports from the module that defines a name.
"""

from __future__ import annotations

from cytopipe.pipeline.assemble import (
    OPTIONAL_TABLES,
    SAMPLE_COLUMNS,
    _run_info,
    _study_record,
    assemble_gate_review,
    assemble_population_stats,
    assemble_samples,
)
from cytopipe.pipeline.cluster_steps import (
    _soft_phase,
    _write_umap,
    assemble_clusters,
    step_cluster_map,
    step_cluster_train,
    write_cluster_tables,
)
from cytopipe.pipeline.command import (
    add_arguments,
    apply_report_options,
)
from cytopipe.pipeline.context import (
    GATE_TASK_VERSION,
    MAP_INPUTS,
    RunContext,
    Step,
    _as_result,
    _load_result,
    _pooled_key,
    _run_cached_phase,
    _save_result,
    _settings_key,
    _version,
    run_steps,
)
from cytopipe.pipeline.executors import (
    WORKER_ENV,
    DaskExecutor,
    SyncExecutor,
    TaskFailure,
    _default_memory_limit,
    _has_bokeh,
    _progress,
    _task_failure_message,
    _task_priority,
    make_executor,
)
from cytopipe.pipeline.loaded import (
    LoadedRun,
    _folder_codes,
    load_run,
)
from cytopipe.pipeline.runner import (
    EXIT_FAILURES,
    EXIT_INPUT,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT,
    RunResult,
    _blinded_outputs,
    _remove_stale_report,
    _reuse_message,
    _run_folder_session,
    _RunLogHandler,
    finish_run,
    run_workflow,
    write_run_report,
)
from cytopipe.pipeline.state import (
    META_COLUMNS,
    ClusterPlan,
    Prepared,
    StudyState,
    _load_manifest,
    _plain,
    _pool_markers,
    _pool_size,
    _spillover_hash,
    _transform_mismatch,
    _transform_params,
    build_state,
    marker_transforms,
    plan_clustering,
    sample_meta,
    split_jobs,
)
from cytopipe.pipeline.statistics import (
    STATISTICS_VERSION,
    _statistics_key,
    _statistics_of,
    compute_statistics,
    step_statistics,
)
from cytopipe.pipeline.steps import (
    STEPS,
    _cluster_map,
    _cluster_train,
    _matrix_csv,
    _missing_everywhere,
    _plan_cluster_inputs,
    _to_engine_spec,
    step_assemble,
    step_compensation,
    step_gate,
    step_gate_fit,
    step_register,
    step_transforms,
)
from cytopipe.pipeline.tasks import (
    _check_markers,
    _check_regular,
    _compensate_events,
    _gated,
    _gated_outputs,
    _guard,
    _load_map_inputs,
    _manifest_path,
    fit_task,
    gate_prepared,
    gate_task,
    map_task,
    needs_regating,
    pool_task,
    prepare_sample,
    register_task,
    sample_cluster_inputs,
    spillover_task,
    train_task,
)
from cytopipe.pipeline.validation import _check_blind_key, _check_clinical, validate_inputs

__all__ = [
    "META_COLUMNS",
    "StudyState",
    "Prepared",
    "sample_meta",
    "split_jobs",
    "build_state",
    "_transform_params",
    "_pool_markers",
    "_pool_size",
    "_load_manifest",
    "_plain",
    "_spillover_hash",
    "ClusterPlan",
    "plan_clustering",
    "marker_transforms",
    "_transform_mismatch",
    "TaskFailure",
    "SyncExecutor",
    "WORKER_ENV",
    "DaskExecutor",
    "_task_priority",
    "_task_failure_message",
    "_default_memory_limit",
    "_has_bokeh",
    "_progress",
    "make_executor",
    "register_task",
    "_check_regular",
    "_manifest_path",
    "pool_task",
    "fit_task",
    "gate_task",
    "_gated_outputs",
    "needs_regating",
    "_guard",
    "gate_prepared",
    "prepare_sample",
    "_check_markers",
    "_compensate_events",
    "spillover_task",
    "_gated",
    "sample_cluster_inputs",
    "_load_map_inputs",
    "train_task",
    "map_task",
    "RunContext",
    "run_steps",
    "Step",
    "_settings_key",
    "GATE_TASK_VERSION",
    "_pooled_key",
    "MAP_INPUTS",
    "_run_cached_phase",
    "_as_result",
    "_save_result",
    "_load_result",
    "_version",
    "assemble_gate_review",
    "assemble_population_stats",
    "SAMPLE_COLUMNS",
    "assemble_samples",
    "_run_info",
    "_study_record",
    "OPTIONAL_TABLES",
    "step_statistics",
    "STATISTICS_VERSION",
    "_statistics_key",
    "compute_statistics",
    "_statistics_of",
    "step_cluster_train",
    "step_cluster_map",
    "_soft_phase",
    "assemble_clusters",
    "write_cluster_tables",
    "_write_umap",
    "validate_inputs",
    "_check_blind_key",
    "_check_clinical",
    "step_register",
    "_missing_everywhere",
    "step_compensation",
    "_matrix_csv",
    "step_transforms",
    "_to_engine_spec",
    "step_gate_fit",
    "step_gate",
    "_plan_cluster_inputs",
    "step_assemble",
    "_cluster_train",
    "_cluster_map",
    "STEPS",
    "EXIT_OK",
    "EXIT_INTERNAL",
    "EXIT_INPUT",
    "EXIT_FAILURES",
    "EXIT_OUTPUT",
    "EXIT_INTERRUPTED",
    "RunResult",
    "run_workflow",
    "_RunLogHandler",
    "_run_folder_session",
    "finish_run",
    "_reuse_message",
    "_blinded_outputs",
    "_remove_stale_report",
    "write_run_report",
    "LoadedRun",
    "load_run",
    "_folder_codes",
    "add_arguments",
    "apply_report_options",
]
