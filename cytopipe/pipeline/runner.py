"""One run of a study: :func:`run_workflow` and what it leaves in the run folder.

Validates the inputs, takes the run folder's lock, logs to ``RUN_DIR/run.log``, runs
:data:`cytopipe.pipeline.steps.STEPS` on an executor, writes the tables, the catalog and
run.json atomically (blinded when the folder is), then the report (a failure of the report is a
problem of the run, never a loss of its tables). :class:`RunResult` is what the caller gets.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from cytopipe import errors
from cytopipe.config import MAX_GALLERY
from cytopipe.errors import CytopipeError
from cytopipe.pipeline.assemble import OPTIONAL_TABLES, _run_info
from cytopipe.pipeline.context import RunContext, run_steps
from cytopipe.pipeline.executors import make_executor
from cytopipe.pipeline.progress import notice
from cytopipe.pipeline.steps import STEPS
from cytopipe.pipeline.validation import validate_inputs
from cytopipe.store import RunFolder
from cytopipe.workflow import Workflow

logger = logging.getLogger(__name__)


# exit codes: one meaning per code across every command (defined in cytopipe.errors)
EXIT_OK = errors.EXIT_OK


EXIT_INTERNAL = errors.EXIT_INTERNAL


EXIT_INPUT = errors.EXIT_INPUT


EXIT_FAILURES = errors.EXIT_FAILURES


EXIT_OUTPUT = errors.EXIT_OUTPUT


EXIT_INTERRUPTED = errors.EXIT_INTERRUPTED


@dataclass
class RunResult:
    out: Path
    samples: pd.DataFrame
    population_stats: pd.DataFrame
    info: dict[str, Any]

    @property
    def n_failed(self) -> int:
        return int((self.samples["status"] == "failed").sum()) if len(self.samples) else 0

    @property
    def problems(self) -> list[str]:
        """Study-level steps that could not complete (statistics, clustering, report)."""
        return list(self.info.get("problems") or [])

    @property
    def exit_code(self) -> int:
        return EXIT_FAILURES if self.n_failed or self.problems else EXIT_OK

    def summary(self, command: str = "run", errors_only: bool = False) -> str:
        """The lines printed at the end of ``cytopipe COMMAND`` (run, gate --manifest, cluster).
        ``errors_only`` (``--quiet``): only the failed files, the problems and the closing line of
        a run that completed with failures; nothing when it did not."""
        s = self.samples
        counts = s["status"].value_counts().to_dict() if len(s) else {}
        header = (
            f"cytopipe {command}: {len(s)} files: {counts.get('ok', 0)} ok, {counts.get('flagged', 0)} flagged, "
            f"{counts.get('failed', 0)} failed ({self.info.get('cached_samples', 0)} reused from a "
            f"previous run) in {self.info.get('seconds', 0):.1f} s"
        )
        failed = s[s["status"] == "failed"]
        failures = [f"  failed  {row['sample_id']}: {row['error']}" for _, row in failed.head(50).iterrows()]
        if len(failed) > 50:
            failures.append(f"  ... {len(failed) - 50} more failed files (all errors in samples.parquet)")
        flagged = [f"  flagged {row['sample_id']}: {row['flags']}" for _, row in
                   s[s["status"] == "flagged"].head(20).iterrows()]  # fmt: skip
        if (s["status"] == "flagged").sum() > 20:
            flagged.append("  ... (all flags in samples.parquet)")
        problems = [f"  problem {problem}" for problem in self.problems]
        outputs = [name for name in ("statistics", "clusters") if (self.out / f"{name}.parquet").is_file()]
        report = next((st for st in self.info.get("steps", []) if st.get("step") == "report"), {})
        if report.get("written"):
            outputs.append(report.get("path", "report.html"))
        results = f"results: {self.out}" + (f" ({', '.join(outputs)})" if outputs else "")
        why = []
        if self.n_failed:
            why.append(f"{self.n_failed} of {len(s)} files failed")
        if self.problems:
            n = len(self.problems)
            why.append(
                f"{n} problem{'s' if n > 1 else ''} in the study-level steps (listed above, and in run.json)"
            )
        closing = [f"completed with failures: {'; '.join(why)} (exit code 3)"] if why else []
        if errors_only:
            return "\n".join(failures + problems + closing)
        return "\n".join([header, *failures, *flagged, *problems, results, *closing])


def run_workflow(
    wf: Workflow,
    scheduler: str = "local",
    address: str | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
) -> RunResult:
    """Run every step of the study; returns the assembled tables (also written to ``wf.output``)."""
    t0 = time.perf_counter()
    folder = RunFolder(wf.output)
    from cytopipe import rerun  # nothing changed since the last run: nothing to run at all

    reuse = rerun.reuse_finished_run(wf, folder)
    if reuse.outputs is not None:
        return RunResult(out=folder.path, **reuse.outputs)
    ctx = RunContext(wf=wf, folder=folder, executor=None, progress=progress)
    with _ThreadWarnings() as early:  # shown now; written to run.log once it exists
        validate_inputs(ctx)  # fail fast, before any worker starts or any folder is made
    with _run_folder_session(folder, early.records, reuse.why, mask=_arm_mask(ctx)):
        # under the run lock: a blinded run's hashes are keyed with the folder's secret (rerun.py)
        ctx.rerun = rerun.start_fingerprint(wf, ctx.jobs + ctx.controls, folder.path)
        executor = make_executor(scheduler, wf.workers, address, memory_limit)
        ctx.executor = executor
        try:
            if executor.dashboard and progress:
                notice(f"Dask dashboard: {executor.dashboard}")
            run_steps(ctx, STEPS)
            info = _run_info(ctx, executor, time.perf_counter() - t0)
        finally:
            executor.close()
        finish_run(ctx, info, t0)
    return RunResult(
        out=folder.path,
        samples=ctx.tables["samples"],
        population_stats=ctx.tables["population_stats"],
        info=info,
    )


def _arm_mask(ctx: RunContext) -> Callable[[str], str] | None:
    """For a run that writes a blinded folder (``report: {blinded: true}``, or a folder blinded
    already): every arm name of the manifest and clinical table written as ``[arm]`` in run.log,
    whose lines (a clinical table's problem, a manifest row) may quote one; ``None`` otherwise."""
    from cytopipe.report.blinding import folder_record, leak_pattern, source_arms

    if not ctx.wf.report.get("blinded") and folder_record(ctx.folder.path) is None:
        return None
    arms = (
        [str(a) for a in ctx.manifest["arm"].dropna() if str(a).strip()] if ctx.manifest is not None else []
    )
    arms += source_arms({"clinical": str(ctx.wf.clinical or "")})
    pattern = leak_pattern(set(arms))
    return lambda text: pattern.sub("[arm]", text)


class _MaskedFormatter(logging.Formatter):
    """A formatter whose lines (and tracebacks) go through ``mask``."""

    def __init__(self, fmt: str, mask: Callable[[str], str]):
        super().__init__(fmt)
        self.mask = mask

    def format(self, record: logging.LogRecord) -> str:
        return self.mask(super().format(record))


class _RunLogHandler(logging.FileHandler):
    """``RUN_DIR/run.log``: the records of this run's thread only (a server runs several studies
    in threads of one process; each run.log gets its own run's lines)."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8")
        self.thread = threading.get_ident()
        self.addFilter(lambda record: record.thread == self.thread)

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        """A full disk loses log lines, not the run's error message (no 'Logging error' traceback)."""


class _ThreadWarnings(logging.Handler):
    """Within ``with``: the warnings this thread logs under ``logger``. The run's input checks
    (e.g. a misspelt manifest column) warn before the run folder and its run.log exist: kept, and
    written to run.log when it opens; the report step's warnings tell whether it named the files
    it keeps in its tables folder (:func:`write_run_report`)."""

    def __init__(self, logger: str = "cytopipe"):
        super().__init__(logging.WARNING)
        self.logger = logger
        self.records: list[logging.LogRecord] = []
        self.thread = threading.get_ident()

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.records.append(record)

    def __enter__(self) -> _ThreadWarnings:
        logging.getLogger(self.logger).addHandler(self)
        return self

    def __exit__(self, *exc) -> bool:
        logging.getLogger(self.logger).removeHandler(self)
        return False


class _run_folder_session:
    """Create the run folder, hold its lock for the whole run, remove the temporary files a killed
    or failed earlier run left, and log to ``RUN_DIR/run.log`` (full tracebacks of failed samples
    and of an internal error)."""

    def __init__(
        self,
        folder: RunFolder,
        early: Sequence[logging.LogRecord] = (),
        rerun_why: str = "",
        mask: Callable[[str], str] | None = None,
    ):
        self.folder = folder
        self.mask = mask  # a blinded run: arm names out of run.log (_arm_mask)
        self.early = list(early)  # warnings logged before run.log existed
        self.rerun_why = rerun_why  # why an earlier run's outputs were not all reused
        self.lock = None
        self.handler = None

    def __enter__(self) -> None:
        from cytopipe.store import RunLock, remove_orphan_temps

        self.folder.create()
        self.lock = RunLock(self.folder.path, "run").acquire()
        try:
            self.handler = _RunLogHandler(self.folder.path / "run.log")
        except OSError as exc:
            self.lock.release()
            from cytopipe.errors import OutputWriteError

            raise OutputWriteError.from_oserror(self.folder.path / "run.log", exc) from None
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
        self.handler.setFormatter(
            logging.Formatter(fmt) if self.mask is None else _MaskedFormatter(fmt, self.mask)
        )
        root = logging.getLogger("cytopipe")
        root.addHandler(self.handler)
        if root.level == logging.NOTSET or root.level > logging.INFO:
            root.setLevel(logging.INFO)
        # the input checks' warnings first: run.log reads in time order (they were written after
        # "run started", with their earlier times); to run.log only: the console has shown them
        for record in self.early:
            self.handler.handle(record)
        logger.info("run started in %s (pid %d)", self.folder.path, os.getpid())
        if self.rerun_why:
            logger.info("rerun: running the steps (%s)", self.rerun_why)
        if self.lock.stale:
            logger.warning(
                "took over a stale lock of an earlier run that no longer runs: %s", self.lock.stale
            )
        removed = remove_orphan_temps(self.folder.path)
        if removed:
            logger.info("removed %d temporary files left by an interrupted run: %s", len(removed),
                        ", ".join(str(p.relative_to(self.folder.path)) for p in removed))  # fmt: skip

    def __exit__(self, kind, exc, tb) -> bool:
        try:
            if exc is not None and not isinstance(exc, CytopipeError | KeyboardInterrupt):
                logger.error("the run stopped with an internal error", exc_info=(kind, exc, tb))
            elif isinstance(exc, KeyboardInterrupt):  # its message is empty: say what happened
                logger.error(
                    "the run was interrupted (Ctrl-C or SIGINT); run the same command again to resume: "
                    "finished work is reused"
                )
            elif exc is not None:
                logger.error("the run stopped: %s", exc)
            else:
                logger.info("run finished")
        finally:
            if self.handler is not None:
                logging.getLogger("cytopipe").removeHandler(self.handler)
                self.handler.close()
            self.lock.release()
        return False


def finish_run(
    ctx: RunContext, info: dict[str, Any], t0: float, parquet: Sequence[str] | None = None
) -> None:
    """Write the tables (``parquet``: only those), the catalog and run.json, then the report (which
    reads them), then run.json and the catalog's run record again with the report's outcome; prune
    the cache."""
    folder = ctx.folder
    stale = [n for n in OPTIONAL_TABLES if n not in ctx.tables]
    for name in stale:  # e.g. clustering switched off since the last run of this folder
        folder.table_path(name).unlink(missing_ok=True)
    if "clusters" not in ctx.tables:  # the clustering tables of an earlier run (a model file stays)
        for path in (folder.path / "clustering").glob("*.parquet"):
            path.unlink()
    tables, blind = _blinded_outputs(ctx, info)
    if ctx.blinding is not None:  # checked before the work; a file put there since stops it here
        from cytopipe.report.blindfiles import check_user_files
        from cytopipe.report.blinding import find_leaks

        leaks = functools.partial(find_leaks, arms=ctx.blinding[0])
        own = {f"spillover_{ctx.state.spillover_column}_{v}.csv" for v in ctx.state.spillover_sets or {}}
        check_user_files(folder.path, leaks, name_arms=False, spillovers=own, todo="Nothing was written (the "
                         "work done is cached). Move the file out of the run folder, then run again")  # fmt: skip
    from cytopipe.report.blinding import folder_record

    newly = ctx.blinding is not None and folder_record(folder.path) is None  # before run.json says so
    logger.info("writing the tables, catalog.duckdb and run.json")
    folder.write_outputs(tables, blind(info), parquet=parquet)
    if ctx.blinding is not None:  # the folder's other files (earlier tables, study/) coded too
        from cytopipe.report.blinding import recode_folder

        # newly blinded: every report in the folder was written unblinded, and goes (also when
        # nothing else needed recoding: the tables above were written coded)
        # (the report written below names the files it keeps in report_tables/: named once)
        report = (folder.path / "report.html", folder.path / "report_tables")
        recode_folder(folder.path, ctx.blinding[0], blind(info), newly=newly,
                      report=report if ctx.wf.report.get("enabled", True) else None)  # fmt: skip
    if not ctx.wf.report.get("enabled", True):
        _remove_stale_report(folder.path)
    else:
        s0 = time.perf_counter()
        logger.info("writing the report")
        step = write_run_report(folder.path, ctx.wf, ctx.problems, progress=ctx.progress)
        ctx.steps.append({"step": "report", "seconds": round(time.perf_counter() - s0, 3), **step})
        if step.get("reused") and (message := _reuse_message(ctx)):
            notice(message)
        info.update(steps=ctx.steps, problems=list(ctx.problems), seconds=round(time.perf_counter() - t0, 3))
        from cytopipe.store import atomic_write_json, write_catalog

        write_catalog(folder.catalog, tables, blind(info))
        atomic_write_json(folder.run_json, blind(info))
    for phase, keys in ctx.keep_cache.items():
        folder.prune_cache(phase, keys)  # results of older settings/files are no longer needed
    from cytopipe.report.blinding import blind_text
    from cytopipe.rerun import record_finished_run

    codes = ctx.blinding[0] if ctx.blinding is not None else None  # the files' paths, coded like the tables'
    record_finished_run(
        folder.path,
        ctx.rerun,
        {str(j.get("path")): j.get("sha256") for j in ctx.jobs + ctx.controls},
        shown=None if codes is None else lambda path: blind_text(path, codes),
    )


def _reuse_message(ctx: RunContext) -> str | None:
    """The closing line of a run whose report was reused, when every result it computed came from
    the cache: what was reused (the gating of the samples, clustering, statistics, report), which
    failed files were tried again (a failure is never cached: failed files are always retried) and
    what is off, not computed. None when some result was computed anew."""
    steps = {st.get("step"): st for st in ctx.steps}
    alive = ctx.alive()
    if ctx.cached < len(alive):
        return None
    reused = [f"the gating of {len(alive)} sample{'s' if len(alive) != 1 else ''}"] if alive else []
    off = []
    train, mapped = steps.get("clustering-train", {}), steps.get("clustering-map", {})
    if train.get("enabled") is False:
        off.append("clustering")
    elif train.get("model") in ("trained (reused)", "given") and mapped.get("reused", -1) >= len(alive):
        reused.append("the clustering")
    elif train or mapped:
        return None  # trained or mapped anew, or it failed (a problem, listed above)
    stats = steps.get("statistics", {})
    if stats.get("enabled") is False:
        off.append("statistics")
    elif stats.get("reused"):
        reused.append("the statistics")
    else:
        return None
    reused.append("the report")
    failed = [j["sample_id"] for j in ctx.jobs if j["sample_id"] in ctx.failures]
    if not failed:
        text = f"nothing changed since the last run: every result was reused ({', '.join(reused)})"
    else:
        n = len(failed)
        text = (
            f"reused every result of the last run ({', '.join(reused)}); tried again the {n} file"
            f"{'s' if n != 1 else ''} that had failed ({', '.join(failed)}: failed files are always "
            f"retried): {'they' if n != 1 else 'it'} failed again (why: in the summary)"
        )
    if off:
        text += f"; not computed: {' and '.join(off)} (off in this run)"
    return text


def _blinded_outputs(
    ctx: RunContext, info: dict[str, Any]
) -> tuple[Mapping[str, pd.DataFrame], Callable[[dict[str, Any]], dict[str, Any]]]:
    """The tables and a run.json maker as they are written: arm names coded when the run folder is
    blinded (or the workflow blinds it now; docs/reports.md). ``ctx.blinding`` = (codes, record)."""
    from cytopipe.report.blinding import blind_frame, blinded_info, hide_arm_order, resolve_blinding
    from cytopipe.store import run_secret

    arms: list[str] = []
    for name in ("population_stats", "samples"):
        if name in ctx.tables and "arm" in ctx.tables[name].columns:
            arms += [a for a in ctx.tables[name]["arm"].dropna().astype(str).unique() if a]
    samples = ctx.tables.get("samples")
    hashes = sorted(str(h) for h in samples["sha256"].dropna()) if samples is not None and "sha256" in samples else []  # fmt: skip
    # the codes' seed: the folder's secret (the file hashes alone are in samples.parquet for all to see)
    secret = run_secret(ctx.folder.path, create=bool(ctx.wf.report.get("blinded"))) or b""
    ctx.blinding = resolve_blinding(
        ctx.folder.path,
        want=bool(ctx.wf.report.get("blinded")),
        arms=arms,
        key=ctx.wf.report.get("blind_key"),
        workflow={"manifest": str(ctx.wf.manifest or ""), "clinical": str(ctx.wf.clinical or "")},
        secret=(secret + "\n".join(hashes).encode()) or None,
        by="cytopipe "
        + (" ".join(sys.argv[1:2]) or "run")
        + " (workflow `report: {blinded: true}` or --blinded)",
    )
    if ctx.blinding is None:
        return ctx.tables, lambda i: i
    codes, record = ctx.blinding
    tables = {name: blind_frame(df, codes) for name, df in ctx.tables.items()}
    # tests computed in dose order: coded as they are, their row order told each code's dose
    tables = {n: hide_arm_order(df, codes) if "comparison" in df.columns else df for n, df in tables.items()}
    return tables, lambda i: blinded_info(i, codes, record)


def _remove_stale_report(run_dir: Path, *, failed: bool = False, named: bool = False) -> None:
    """A report of an earlier state of this run folder would contradict the new tables (or, when
    this run's report step failed, pass for this run's report): remove it (``cytopipe report
    RUN_DIR`` writes it again). Of its tables folder only the tables it wrote go; in a blinded
    folder the record of the tables kept (edited since) keeps no hash of them as written (perhaps
    unblinded, before this run blinded the folder: ``remove_tables``).

    ``failed``: this run's report step failed. Its tables folder is cleared all the same (an
    earlier report may be gone already: blinding removed it, leaving the files kept there for the
    report to name), and each file kept there is named in a warning unless the report ``named``
    them (it failed after writing its tables): once, whatever the report's outcome."""
    from cytopipe.report.blinding import folder_record
    from cytopipe.report.tables_folder import remove_tables

    earlier = (run_dir / "report.html").is_file()
    if earlier:
        (run_dir / "report.html").unlink()
    if earlier or failed:
        remove_tables(run_dir / "report_tables", warn=not named, blinding=folder_record(run_dir) is not None)
    if earlier:
        notice(
            "cytopipe run: removed the run folder's earlier report.html (it described the previous run); "
            "`cytopipe report RUN_DIR` writes a new one"
        )


def write_run_report(
    run_dir: Path, wf: Workflow, problems: list[str], progress: bool = True
) -> dict[str, Any]:
    """``report.html`` of the finished run folder. A failure is recorded in ``problems`` (and the
    step's record), never raised: the run's data outputs stand without a report."""
    settings = wf.report
    if not settings.get("enabled", True):
        return {"enabled": False}
    from cytopipe.report import write_report
    from cytopipe.report.build import report_is_current

    options = dict(
        blinded=bool(settings.get("blinded")),
        blind_key=settings.get("blind_key"),
        max_gallery=int(settings.get("max_gallery") or MAX_GALLERY),
    )
    # the report names each file it keeps in its tables folder (a warning of write_tables): a
    # failed report step names them only when the report did not get that far
    report_warnings = _ThreadWarnings("cytopipe.report.tables_folder")
    prefix = f"{run_dir / 'report_tables'}: kept "

    def named() -> bool:
        return any(r.getMessage().startswith(prefix) for r in report_warnings.records)

    try:
        if report_is_current(run_dir, **options):
            notice("report: reused (its inputs are unchanged)")
            return {"enabled": True, "written": True, "reused": True, "path": "report.html",
                    "blinded": bool(settings.get("blinded"))}  # fmt: skip
        notice("report: writing report.html ...", progress)
        with report_warnings:
            path = write_report(run_dir, **options)
    except errors.OutputWriteError:
        raise  # a full disk or read-only folder stops the run (exit 4): the rerun resumes
    except CytopipeError as exc:
        problems.append(f"report: not written: {exc}")
        # an earlier run's report must not pass for this run's; the files kept beside it are named
        _remove_stale_report(run_dir, failed=True, named=named())
        return {"enabled": True, "written": False, "error": str(exc)}
    except Exception as exc:  # a bug in the report must not cost the run's tables
        if isinstance(exc, OSError) and errors.exit_code_for(exc) == EXIT_OUTPUT:
            raise  # disk full / read-only while writing the report: exit 4, the rerun resumes
        logger.exception("the report could not be written (internal error)")  # its traceback in run.log
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        problems.append(
            f"report: not written: internal error {type(exc).__name__}: {exc}{where} (please report this)"
        )
        _remove_stale_report(run_dir, failed=True, named=named())
        return {"enabled": True, "written": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"enabled": True, "written": True, "path": path.name, "blinded": bool(settings.get("blinded"))}
