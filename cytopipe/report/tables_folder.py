"""The report's tables folder (``<report name>_tables/`` beside the HTML): what the report may remove.

A new report must not leave a previous report's tables behind (after blinding, an old unblinded table
must not survive), and must never delete or replace a file that is not its own (a user's notes, an
export from another tool, a table the user edited). So the report keeps a record of what it wrote:
:data:`MANIFEST` in the folder (JSON, written atomically after the tables) lists every CSV it wrote
with its sha256 and size. A later report removes or replaces only the files listed there whose
content is still what it wrote; every other CSV is kept, with a warning naming it and what to do.

Refused (a :class:`~cytopipe.errors.ReportError`, exit 2, before anything is written):

* a CSV that is not the report's own (never written by it, or changed since) where the new report
  writes a table of the same name: it would be replaced;
* a blinded report, when an old table the report wrote was changed since (it was perhaps
  written unblinded: the arm names, or the dose order of its rows; the user decides where it goes),
  or when a user's CSV in the folder shows an arm name (a blinded report's folder must show none).

A folder written before the manifest existed (no manifest): only CSV files named exactly as the
report's tables (:data:`REPORT_TABLES`, and the tables this report writes) are removed: nothing else
in the folder can be told apart from a user's file, and a report table of that name would have been
replaced by the new report anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cytopipe.errors import ReportError
from cytopipe.report.filecheck import CannotCheck, shown_arm
from cytopipe.store import atomic_write_bytes, file_sha256

logger = logging.getLogger(__name__)

#: the record of the CSV files the report wrote in its tables folder
MANIFEST = ".cytopipe-report-tables.json"
_ABOUT = (
    "written by cytopipe report: the CSV files it wrote in this folder (name, sha256, bytes). "
    "A later report removes only these, and only while unchanged; keep this file."
)
#: the "sha256" of an edited table in the record of a blinded folder (never a file's digest: the
#: table is still told apart from a user's file, and kept): :func:`remove_tables`
DROPPED = "not kept: the folder was blinded after this table was written"
#: the name of every CSV a report can write (``cytopipe/report/sections.py``, ``batches.py``,
#: ``review_section.py``): in a folder without a manifest only these are removed
REPORT_TABLES = frozenset(
    f"{name}.csv"
    for name in (
        "not_measured", "samples", "qc_removed", "failures", "flags", "controls", "gate_review",
        "dynamics_by_arm", "dynamics_per_sample", "response_rates", "response_tests", "correlations",
        "model_arm_visit", "model_joint_tests", "cluster_metaclusters", "cluster_nodes",
        "cluster_concordance_f1", "cluster_concordance", "cluster_statistics", "cluster_models",
        "cluster_arm_visit", "cluster_abundance", "batch_shifts", "westgard_flags", "site_medians", "batch_medians",
        "levey_jennings", "gate_overrides",
    )
)  # fmt: skip


@dataclass
class TablesPlan:
    """What a report does to its tables folder: ``remove`` its own old tables (name -> the sha256
    they had when checked), ``keep`` every other CSV (name -> the warning that names it),
    ``changed``: the kept tables an earlier report wrote (name -> the sha256 it wrote)."""

    folder: Path
    remove: dict[str, str] = field(default_factory=dict)
    keep: dict[str, str] = field(default_factory=dict)
    changed: dict[str, str] = field(default_factory=dict)


def _entry(text: str) -> dict[str, object]:
    data = text.encode("utf-8")
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def read_manifest(folder: Path) -> dict[str, set[str]] | None:
    """``{csv name: {sha256, ...}}`` of the files the report wrote in ``folder``; ``None`` when the
    folder has no readable manifest (written before it existed, or damaged)."""
    record = _read_record(folder)
    return None if record is None else record[0]


def _read_record(folder: Path) -> tuple[dict[str, set[str]], dict[str, set[int] | None]] | None:
    """:func:`read_manifest` and ``{csv name: {bytes, ...}}`` (``None`` for a name with an entry
    that records no size: the tables kept as changed)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        recorded: dict[str, set[str]] = {}
        sizes: dict[str, set[int] | None] = {}
        # "writing": tables being written when a report stopped; "changed": tables an earlier report
        # wrote that were edited since (kept, and still told apart from a user's own files)
        for part in ("files", "writing", "changed"):
            for name, entry in (data.get(part) or {}).items():
                recorded.setdefault(str(name), set()).add(str(entry["sha256"]))
                known = sizes.get(str(name), set())
                size = entry.get("bytes")
                sizes[str(name)] = known | {size} if known is not None and type(size) is int else None
        return recorded, sizes
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        logger.warning(
            "%s: the report's record of its tables (%s) cannot be read; only CSV files named as the "
            "report's tables are removed. Delete the record if you edited it",
            folder,
            MANIFEST,
        )
        return None


def _save_manifest(folder: Path, files: Mapping[str, Mapping], **parts: Mapping[str, Mapping]) -> None:
    data = {"about": _ABOUT, "files": dict(sorted(files.items()))}
    data |= {part: dict(sorted(entries.items())) for part, entries in parts.items() if entries}
    atomic_write_bytes(folder / MANIFEST, (json.dumps(data, indent=1) + "\n").encode("utf-8"))


@dataclass
class _Found:
    """One CSV of a tables folder, as a report tells it: ``own`` (a table it wrote, unchanged:
    ``digest`` its sha256) or not; ``changed``: a table an earlier report wrote, edited since
    (``written``: the sha256 it wrote)."""

    path: Path
    own: bool
    changed: bool = False
    digest: str = ""
    written: str = ""

    @property
    def what(self) -> str:
        return (
            "a table an earlier report wrote, changed since" if self.changed else "not written by the report"
        )


def _csv_files(folder: Path, new: Mapping[str, str]) -> list[_Found]:
    """The CSV files of ``folder`` before a report writes ``new`` there (see the module's docstring).
    A file is hashed only when it can be the report's own: a name the record does not list, or a
    size it does not record, is decided without reading the file (the same answer, as a file of
    another size cannot have the recorded sha256)."""
    record = _read_record(folder)
    recorded, known = record if record is not None else (None, {})
    found = []
    for path in sorted(folder.glob("*.csv")):
        name = path.name
        if not path.is_file():
            continue
        if recorded is None:  # an older version's table (see the docstring): by its name
            own = name in REPORT_TABLES or name in new
            found.append(_Found(path, own, digest=file_sha256(path) if own else ""))
            continue
        digests, sizes = recorded.get(name, set()), known.get(name)
        digest = file_sha256(path) if digests and (sizes is None or path.stat().st_size in sizes) else ""
        own = bool(digest) and digest in digests
        changed = not own and name in recorded
        found.append(_Found(path, own, changed, digest, sorted(digests)[0] if changed else ""))
    return found


def own_tables(folder: Path) -> set[str]:
    """The names of the CSV files in ``folder`` that a report wrote there and nobody changed since
    (:func:`_csv_files`): blinding removes them with their report (the rest is a user's)."""
    folder = Path(folder)
    return {f.path.name for f in _csv_files(folder, {}) if f.own} if folder.is_dir() else set()


def _blinding_obstacle(
    found: _Found, leaks: Callable[[Mapping[str, str]], list[str]], name_arms: bool
) -> str:
    """Why ``found`` must not stay beside the tables of a blinded report (``""``: it may). The arm
    name itself only with ``name_arms``: a message that may be written into the blinded run folder
    (run.json's problems, where it would be coded) must not tie a code to the name the file shows."""
    if found.own:
        return ""
    try:
        shown = shown_arm(found.path, leaks)
    except CannotCheck as exc:
        return f"{found.path.name} ({found.what}), which cannot be checked for arm names ({exc})"
    if shown:
        where = shown if name_arms else shown.split(":", 1)[0]
        return f"{found.path.name} ({found.what}), which shows an arm name ({where})"
    if found.changed:
        return f"{found.path.name} ({found.what}), which may show the arms (edited since a report wrote it)"
    return ""


def check_blinded_folder(
    folder: Path, leaks: Callable[[Mapping[str, str]], list[str]], *, name_arms: bool, todo: str
) -> None:
    """Refuse (:class:`ReportError`, exit 2) when ``folder`` holds a CSV that a blinded report
    refuses to write beside (:func:`plan_tables`): a user's CSV showing an arm name, or a table
    an earlier report wrote, changed since. For the checks made before any work (``cytopipe run``
    and ``cytopipe cluster`` of a blinded run, a blinded report before it builds its sections);
    ``todo``: what happens now and what to do, after the files are named."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    problems = [p for f in _csv_files(folder, {}) if (p := _blinding_obstacle(f, leaks, name_arms))]
    if problems:
        raise ReportError(
            f"holds {'; '.join(problems)}: the tables folder of a blinded report must show no arm. {todo}",
            file=folder,
        )


def check_edited_tables(folder: Path, *, todo: str) -> None:
    """Refuse (:class:`ReportError`, exit 2) when ``folder`` holds a CSV named as a report table
    (:data:`REPORT_TABLES`) that is not the report's own: a table an earlier report wrote, changed
    since, or a user's file. A new report writing a table of that name refuses it
    (:func:`plan_tables`), so a run checks it before any work. A table the new report turns out
    not to write would only be kept (with a warning); the run refuses it all the same, as it
    cannot tell before its work which of its tables the report writes."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    found = [f for f in _csv_files(folder, {}) if not f.own and f.path.name in REPORT_TABLES]
    if found:
        named = "; ".join(f"{f.path.name} ({f.what})" for f in found)
        raise ReportError(
            f"holds {named}, named as a table the run's report writes there: the report would not "
            f"replace it, so it would stop after all the work. {todo}",
            file=folder,
        )


def plan_tables(
    folder: Path, new: Mapping[str, str], leaks: Callable[[Mapping[str, str]], list[str]] | None = None
) -> TablesPlan:
    """Check ``folder`` before a report writes ``new`` (``{csv name: text}``) there and say what
    goes. ``leaks``: a blinded report's leak check (:func:`cytopipe.report.blinding.find_leaks` with
    its arm names; ``None``: not blinded). Raises :class:`ReportError` (nothing written yet) when a
    file that is not the report's own is in the way (see the module's docstring)."""
    folder = Path(folder)
    plan = TablesPlan(folder)
    if not folder.is_dir():
        return plan
    for found in _csv_files(folder, new):
        name, what = found.path.name, found.what
        if found.own:
            plan.remove[name] = found.digest
            continue
        if name in new:
            raise ReportError(
                f"holds {name}, {what}; the new report writes a table of that name and would replace it. "
                "Move or rename the file (your changes are kept), then run the report again",
                file=folder,
            )
        if leaks is not None and (why := _blinding_obstacle(found, leaks, name_arms=False)):
            raise ReportError(
                f"holds {why}, beside the tables of a blinded report; nothing was written. Move the "
                "file out of the folder (or delete it), then run the report again",
                file=folder,
            )
        if found.changed:
            plan.changed[name] = found.written
        todo = (
            "delete it if the new tables replace it"
            if found.changed
            else "move it elsewhere if it does not belong here"
        )
        plan.keep[name] = f"{folder}: kept {name} ({what}): the report removes only its own tables; {todo}"
    return plan


def write_tables(plan: TablesPlan, new: Mapping[str, str], write: Callable[[Path, str], None]) -> None:
    """Write the report's ``new`` tables (``{csv name: text}``) into ``plan.folder`` with ``write``
    (atomic): its own old tables removed (each checked again: one changed meanwhile is kept), every
    other CSV kept with a warning, and the manifest written last. Before anything else the
    manifest lists the old tables and the ones about to be written, so that a report stopped
    half-way still knows its own files."""
    folder = plan.folder
    folder.mkdir(parents=True, exist_ok=True)
    changed = {n: {"sha256": s} for n, s in plan.changed.items()}
    _save_manifest(folder, {n: {"sha256": s} for n, s in plan.remove.items()},
                   writing={n: _entry(t) for n, t in new.items()}, changed=changed)  # fmt: skip
    for name, digest in plan.remove.items():
        path = folder / name
        if name in new or not path.is_file():
            continue  # replaced below (atomically)
        if file_sha256(path) != digest:
            logger.warning("%s: kept %s (changed while the report was written)", folder, name)
            continue
        path.unlink()
    for message in plan.keep.values():
        logger.warning("%s", message)
    for name, text in new.items():
        write(folder / name, text)
    _save_manifest(folder, {n: _entry(t) for n, t in new.items()}, changed=changed)


def remove_tables(folder: Path, *, warn: bool = True, blinding: bool = False) -> list[str]:
    """Remove a report's tables folder (the report describes an earlier state of the run): the CSV
    files it wrote, unchanged, then the folder when nothing else is left in it. Every other file is
    kept, with a warning; the manifest then lists the kept tables an earlier report wrote (changed
    since), so that no later report takes them for a user's own. Returns the names kept (``warn``:
    log a warning naming each).

    ``blinding`` (the folder is being blinded): the kept tables are listed without the SHA-256 the
    report wrote (:data:`DROPPED`). That is the hash of a table written before blinding: a reader
    who knows every cell of it but the arms (its edited copy, the folder's coded tables) could
    write it once per assignment of arms to codes and find the one that hashes to it."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    plan = plan_tables(folder, {})
    for name, digest in plan.remove.items():
        path = folder / name
        if path.is_file() and file_sha256(path) == digest:
            path.unlink()
    for message in plan.keep.values() if warn else ():
        logger.warning("%s", message)
    if plan.changed:
        changed = {n: {"sha256": DROPPED if blinding else s} for n, s in plan.changed.items()}
        _save_manifest(folder, {}, changed=changed)
    else:
        (folder / MANIFEST).unlink(missing_ok=True)
    try:
        folder.rmdir()  # only when empty
    except OSError:
        pass
    return sorted(plan.keep)
