"""Which files of a run folder blinding rewrites, and a user's files it never touches.

Blinding a run folder (and unblinding it) rewrites only the files cytopipe wrote there, told by
their exact place and name (:func:`cytopipe.store.is_run_output`: the top-level tables,
``review.json``, ``reconcile.csv``, ``run.log``, ``clustering/``'s tables, ``study/``'s files; a
per-batch spillover matrix only when run.json's ``study_state`` records its batch); run.json, the
catalog, the reports and their tables folders (:func:`report_folders`) and ``.cache/`` have their
own handling (:func:`cytopipe.report.blinding.recode_folder`). Any other file anywhere in the run
folder (notes, an export, a copy of the clinical table, a hidden folder's files, the tables folder
of a report that is not cytopipe's) is the user's: it is never rewritten (coded, its author could
read which code stands for which arm; decoded, a literal ``Arm B`` could not be told from a coded
one). A folder to be blinded that holds such a file showing an arm name (in its content or its
name), or one whose content cannot be checked (:mod:`cytopipe.report.filecheck`: a PDF, an image),
is refused before anything is done (:func:`check_user_files`, exit 2): the blinded folder would
show the arms, or could.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from cytopipe.errors import ReportError
from cytopipe.report.filecheck import CannotCheck, shown_arm  # noqa: F401  (shown_arm: this module's API)

logger = logging.getLogger(__name__)

#: the files of cytopipe's that blinding reads and rewrites (a user's file is checked whatever it is)
RECODED_SUFFIXES = (".csv", ".json", ".txt", ".tsv", ".yaml", ".yml", ".parquet", ".log")


#: a report a command writes next: its HTML file and its tables folder (absolute or relative paths)
Report = tuple[Path, Path]


def report_folders(run_dir: str | Path, report: Report | None = None) -> list[tuple[Path, Path]]:
    """``[(report, its tables folder)]`` (relative paths) of the reports cytopipe wrote in
    ``run_dir``: ``report.html`` with ``report_tables/``, and every ``X.html`` (``--out``, anywhere
    in the folder but ``.cache/``) beside an ``X_tables/`` folder holding the report's record of
    its tables (:data:`cytopipe.report.tables_folder.MANIFEST`, which only a report writes).
    ``report``: the report the command writes next (``--out X.html``), when it is in the folder,
    with or without a record: the command replaces that file and its own tables (an earlier
    report's, e.g. of a version that kept no record, or whose record was lost; any other file of
    its tables folder stays a user's)."""
    from cytopipe.report.tables_folder import MANIFEST

    run_dir = Path(run_dir)
    found = [(Path("report.html"), Path("report_tables"))]
    if report is not None:
        try:
            here = run_dir.resolve()
            pair = (Path(report[0]).resolve().relative_to(here), Path(report[1]).resolve().relative_to(here))
        except ValueError:  # written outside the run folder: not one of its files
            pair = None
        if pair is not None and pair not in found and pair[0].parts[0] != ".cache":
            found.append(pair)
    for root, dirs, _names in os.walk(run_dir):
        if Path(root) == run_dir:
            dirs[:] = [d for d in dirs if d != ".cache"]
        for d in dirs:
            rel = (Path(root) / d).relative_to(run_dir)
            if (
                d.endswith("_tables")
                and all(rel != tables for _, tables in found)
                and (run_dir / rel / MANIFEST).is_file()
            ):
                found.append((rel.with_name(d.removesuffix("_tables") + ".html"), rel))
    return found


def spillover_names(info: Mapping | None) -> set[str]:
    """The per-batch spillover matrices a run writes into ``study/``, by run.json's record of its
    control sets (``info``'s ``study_state.spillover_sets``): ``spillover_<column>_<value>.csv``,
    as the record names them (in a blinded folder, coded)."""
    try:
        sets = info["study_state"]["spillover_sets"] or {}
        return {f"spillover_{sets['column']}_{value}.csv" for value in sets.get("sets") or {}}
    except (KeyError, TypeError, AttributeError):
        return set()


def _recorded_spillovers(run_dir: Path) -> set[str]:
    """:func:`spillover_names` of the folder's run.json."""
    try:
        return spillover_names(json.loads((run_dir / "run.json").read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return set()


def spillover_renames(run_dir: str | Path, info: Mapping, recode: Callable[[str], str]) -> dict[str, str]:
    """``{old name: new name}`` of the per-batch spillover matrices of ``study/`` whose name
    ``recode`` (arm names to codes, or back) turns into one that ``info`` (the folder's new
    run.json, coded or decoded the same way) records: a batch named like an arm (a lab's batch
    ``placebo``, or ``A`` beside arms ``A`` and ``B``) has its file named by the batch's code in a
    blinded folder, as run.json names the batch, so that no file name shows an arm, nor ties a code
    to the name it stands for."""
    targets = spillover_names(info)
    study = Path(run_dir) / "study"
    names = sorted(p.name for p in study.glob("spillover_*.csv") if p.is_file()) if study.is_dir() else []
    return {name: new for name in names if (new := recode(name)) != name and new in targets}


def folder_files(
    run_dir: str | Path, spillovers: Iterable[str] = (), report: Report | None = None
) -> tuple[list[Path], list[Path]]:
    """``(cytopipe's, the user's)``: the files of ``run_dir`` (relative paths, sorted). Cytopipe's:
    those blinding rewrites (:func:`cytopipe.store.is_run_output`, text and Parquet). Not listed:
    run.json, the catalog, the run lock, ``.cache/`` and the reports with the tables they wrote
    (:func:`report_folders`), which are handled apart. Every other file is the user's, hidden
    or not, whatever its kind, in any folder (a linked folder is not followed out of it).
    ``spillovers``: per-batch spillover matrices of ``study/`` that are cytopipe's besides those
    run.json records (a run's own, before its run.json is written; one about to be renamed).
    ``report``: the report the command writes next (:func:`report_folders`)."""
    from cytopipe.report.tables_folder import MANIFEST, own_tables
    from cytopipe.store import CATALOG, CLUSTER_DIR, LOCK, MODEL_FILE, RUN_JSON, STUDY_FILES, is_run_output

    run_dir = Path(run_dir)
    spillovers = _recorded_spillovers(run_dir) | set(spillovers)
    reports = report_folders(run_dir, report)
    apart = {Path(RUN_JSON), Path(CATALOG), Path(LOCK), *(html for html, _ in reports)}
    tables = {folder: own_tables(run_dir / folder) for _, folder in reports}
    own: list[Path] = []
    users: list[Path] = []
    for root, dirs, names in os.walk(run_dir):
        here = Path(root).relative_to(run_dir)
        if here == Path("."):
            dirs[:] = [d for d in dirs if d != ".cache"]  # cytopipe's private cache: scrub_cache
        for name in names:
            rel, path = here / name, Path(root) / name
            if rel in apart or not path.is_file():
                continue
            if here in tables:  # a report's tables folder: its record and its own tables apart
                if name != MANIFEST and name not in tables[here]:
                    users.append(rel)
                continue
            # a per-batch matrix (not spillover_quality.parquet, whose batch column is recoded)
            spillover = (
                rel.parent == Path("study") and name.startswith("spillover_") and name not in STUDY_FILES
            )
            if is_run_output(rel) and (not spillover or name in spillovers):
                if path.suffix.lower() in RECODED_SUFFIXES:
                    own.append(rel)
                elif rel != Path(CLUSTER_DIR, MODEL_FILE):  # numbers and marker names
                    users.append(rel)  # cytopipe's but never recoded (reconcile.html, gates.wsp): checked
            else:
                users.append(rel)
    return sorted(own), sorted(users)


def check_user_files(
    run_dir: str | Path,
    leaks: Callable[[Mapping[str, str]], list[str]],
    *,
    name_arms: bool,
    todo: str,
    spillovers: Iterable[str] = (),
    report: Report | None = None,
) -> None:
    """Refuse (:class:`ReportError`, exit 2) a run folder to be blinded that holds a file cytopipe
    did not write (:func:`folder_files`) showing an arm name, in its content or its name, or one
    whose content cannot be checked (:class:`~cytopipe.report.filecheck.CannotCheck`): blinding
    never rewrites it, so the blinded folder would show the arms. Named: each file and the line
    (a Parquet file: the column) that shows one, and the arm name only with ``name_arms`` (a
    message that may be written into the blinded folder must not tie a code to a name). ``leaks``:
    ``find_leaks`` with the arms (cytopipe/report/blinding.py). ``todo``: what happens now, what
    to do. ``spillovers``, ``report``: see :func:`folder_files`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    from cytopipe.store import is_run_output

    problems, theirs, unchecked = [], [], []
    for rel in folder_files(run_dir, spillovers, report)[1]:
        try:
            shown = leaks({"its name": rel.as_posix()})
            shown = shown[0] if shown else shown_arm(run_dir / rel, leaks)
        except CannotCheck as exc:
            unchecked.append(f"{rel.as_posix()} ({exc})")
            continue
        except OSError as exc:
            unchecked.append(f"{rel.as_posix()} (cannot be read: {exc.strerror or exc})")
            continue
        if shown:
            # cytopipe's but never recoded (its recoded files are not listed here: a user's file
            # named like one, e.g. study/spillover_mine.csv, is the user's)
            unrecoded = is_run_output(rel) and rel.suffix.lower() not in RECODED_SUFFIXES
            found = theirs if unrecoded else problems
            found.append(f"{rel.as_posix()} ({shown if name_arms else shown.rsplit(':', 1)[0]})")
        else:
            logger.info("%s: %s is not a file cytopipe wrote; it shows no arm name and blinding leaves it "
                        "as it is", run_dir, rel.as_posix())  # fmt: skip
    said = []
    if problems:
        said.append(f"holds a file cytopipe did not write that shows an arm name: {'; '.join(problems)}. "
                    "Blinding never rewrites your files, so the blinded run folder would show the arms.")  # fmt: skip
    if theirs:
        said.append(f"{'holds' if not said else 'It also holds'} a file cytopipe wrote but never recodes that "
                    f"shows an arm name: {'; '.join(theirs)}.")  # fmt: skip
    if unchecked:
        said.append(f"{'holds' if not said else 'It also holds'} a file cytopipe did not write whose content "
                    f"it cannot check for arm names: {'; '.join(unchecked)}. A blinded run folder keeps "
                    "only files of yours that were checked (text, Parquet, zip-based office files such as "
                    ".xlsx/.docx/.odt/.ods, FCS, HDF5/.h5ad; docs/reports.md).")  # fmt: skip
    if said:
        raise ReportError(f"{' '.join(said)} {todo}", file=run_dir)
