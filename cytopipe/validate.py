"""``cytopipe validate PATH...``: check FCS files, folders and manifests; one row per file.

A file is *valid* when every data set in it reads completely: HEADER and TEXT parse, the
required keywords are present and consistent (``$PAR`` parameters described, ``$DATATYPE``,
``$BYTEORD``), the DATA segment has exactly ``$TOT`` x bytes-per-event bytes and lies inside
the file, and the spillover keyword (if any) is a well-formed square matrix. Quirks the
reader handles (offsets that disagree, bits above ``$PnR``, non-finite values, identical files)
are listed as notes; they do not make a file invalid. Channels sharing one ``$PnN`` do not make it
invalid either (it reads), but they are listed apart as *warnings*: ``cytopipe run`` and
``cytopipe gate`` fail such a file when its template uses that channel (which of the twins
carries the marker cannot be told), so each warning names the file, the channel and the fix, and
``cytopipe template check FILE --template T`` says whether a given template uses it.

Folders are searched recursively: every file named ``*.fcs`` (any case) is validated (an empty
or non-FCS one is reported as not valid), and so is every other file starting like an FCS file
("FCS3.1", ...), so files without an ``.fcs`` extension are found; the other files are ignored,
and how many is said. A CSV argument is read
as a manifest: its rows are checked and every file it names is validated.

Exit code 0 only when every file is valid (and every manifest row is well formed); 3 when the
check completed and some file or row is not valid (the same codes as every command: 2 usage
error, 1 internal error).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import sys
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytopipe.errors import EXIT_FAILURES, EXIT_OK

__all__ = ["FileReport", "add_arguments", "channel_warnings", "run", "validate_file", "validate_paths"]

_MANIFEST_SUFFIXES = {".csv", ".tsv"}


@dataclass
class FileReport:
    """The validation result of one file."""

    file: str
    status: str = "failed"
    version: str = ""
    datasets: int = 0
    events: int | None = None
    channels: int | None = None
    markers: list[str] = field(default_factory=list)
    spillover: str = ""
    sha256: str = ""
    error: str = ""
    error_type: str = ""
    notes: list[str] = field(default_factory=list)
    #: problems a run meets although the file reads (channels sharing one $PnN)
    warnings: list[str] = field(default_factory=list)
    sample_id: str = ""
    manifest_row: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="FCS files, folders (searched recursively: every *.fcs file, and any file starting like an "
        "FCS file; how many others were ignored is said) or manifest CSVs (every file they name is checked)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON document instead of a table")


def run(args: argparse.Namespace) -> int:
    reports, problems, inputs = validate_paths(args.paths)
    ok = bool(reports) and all(r.ok for r in reports) and not problems
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # markers such as '™' on a non-UTF-8 terminal
    if args.json:
        document = {
            "ok": ok,
            "summary": _summary(reports, problems),
            "inputs": inputs,
            "files": [asdict(r) for r in reports],
            "problems": problems,
        }
        print(json.dumps(_printable(document), indent=2, ensure_ascii=False))
    else:
        print(_table(reports, problems, inputs))
    return EXIT_OK if ok else EXIT_FAILURES  # 3: checked, some files are not valid


# --------------------------------------------------------------------------------------------
def validate_paths(paths: list[Path]) -> tuple[list[FileReport], list[dict[str, Any]], list[dict[str, Any]]]:
    """Validate every file the paths name: (file reports, problems with manifests and
    folders -- each a dict with source, row, column, message -- and the inputs seen)."""
    from cytopipe.fcs import is_fcs_file

    reports: list[FileReport] = []
    problems: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    seen: set[Path] = set()

    def add(report: FileReport, path: Path) -> None:
        key = path.resolve() if path.exists() else path
        if key not in seen:
            seen.add(key)
            reports.append(report)

    for path in paths:
        if path.is_dir():
            found, ignored = folder_files(path)
            inputs.append(
                {"path": str(path), "kind": "folder", "fcs_files": len(found), "ignored_files": ignored}
            )
            if not found:
                problems.append(
                    {"source": str(path), "row": None, "column": None, "message": "no FCS files found"}
                )
            for p in found:
                add(validate_file(p, display=_display(p, path)), p)
        elif path.is_file() and not is_fcs_file(path) and _looks_like_manifest(path):
            entry: dict[str, Any] = {"path": str(path), "kind": "manifest", "warnings": []}
            inputs.append(entry)
            with _warnings_into(entry["warnings"]):  # also on stderr, as before
                for report, file_path in _validate_manifest(path, problems):
                    add(report, file_path)
        else:
            inputs.append({"path": str(path), "kind": "file"})
            add(validate_file(path, display=str(path)), path)
    _note_duplicates(reports)
    return reports, problems, inputs


def folder_files(folder: Path) -> tuple[list[Path], int]:
    """The files of ``folder`` (searched recursively) to validate, and how many others are ignored.

    Every file named ``*.fcs`` (any case) is validated, so an empty or damaged one is reported as
    not valid (macOS's ``._*.fcs`` resource-fork companions excepted), and so is every other file
    starting like an FCS file (``FCS3.1``...), whatever its name."""
    from cytopipe.fcs import is_fcs_file

    found: list[Path] = []
    ignored = 0
    for p in sorted(folder.rglob("*")):
        if p.is_dir():
            continue
        named = p.suffix.lower() == ".fcs" and not p.name.startswith("._")
        if named or (p.is_file() and is_fcs_file(p)):
            found.append(p)
        else:
            ignored += 1
    return found, ignored


def validate_file(path: str | Path, display: str | None = None, sha256: str | None = None) -> FileReport:
    """Read every data set of one file; never raises. ``display`` is the name shown; ``sha256``
    the content's hash when the caller has it already (``cytopipe serve`` hashes while uploading)."""
    from cytopipe.errors import CytopipeError
    from cytopipe.fcs import read_fcs

    path = Path(path)
    report = FileReport(file=display or str(path))
    try:
        report.sha256 = sha256 or _sha256(path)
    except CytopipeError as exc:  # a FIFO, a device, a folder: never read (it would block or never end)
        report.error, report.error_type = _message(exc), type(exc).__name__
        return report
    except OSError as exc:
        report.error = f"cannot read the file: {exc.strerror or exc}"
        report.error_type = "OSError"
        return report
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # collected from sample.warnings instead
            first = read_fcs(path)
            samples = [first] + [read_fcs(path, dataset=i) for i in range(1, first.n_datasets)]
    except CytopipeError as exc:
        report.error, report.error_type = _message(exc), type(exc).__name__
        return report
    except Exception as exc:  # a bug in cytopipe must not stop the other files
        report.error = f"unexpected error (please report it): {type(exc).__name__}: {exc}"
        report.error_type = type(exc).__name__
        return report
    report.status = "ok"
    report.version = first.version
    report.datasets = first.n_datasets
    report.events, report.channels = first.events.shape
    report.markers = [m for m in first.markers if m]
    report.spillover = first.spillover.keyword if first.spillover is not None else ""
    for i, sample in enumerate(samples):
        prefix = f"data set {i}: " if len(samples) > 1 else ""
        report.warnings += [prefix + w for w in channel_warnings(sample.pnn)]
        report.notes += [prefix + w for w in sample.warnings if not is_duplicate_name_note(w)]
        report.notes += [prefix + w for w in keyword_notes(sample.keywords) if w not in sample.warnings]
        if sample.n_events == 0:
            report.notes.append(prefix + "the file holds no events ($TOT 0)")
        bad = int(sample.events.size - np.count_nonzero(np.isfinite(sample.events)))
        if bad:
            report.notes.append(prefix + f"{bad} event values are NaN or infinite")
    return report


#: how the reader's note on channels sharing a $PnN starts (replaced by :func:`channel_warnings`)
_DUPLICATE_NOTE = "duplicate channel names ($PnN)"


def is_duplicate_name_note(note: str) -> bool:
    """The reader's note on channels sharing a ``$PnN`` (``validate`` lists a warning instead)."""
    return note.startswith(_DUPLICATE_NOTE)


def channel_warnings(pnn: list[str]) -> list[str]:
    """One warning per ``$PnN`` that several channels share: the file reads, but ``cytopipe run``
    and ``cytopipe gate`` fail it (PanelError) when the template uses that channel, directly or
    through a marker whose ``$PnS`` is on one of them. Says what to do."""
    params: dict[str, list[int]] = {}
    for number, name in enumerate(pnn, start=1):
        if name:
            params.setdefault(name, []).append(number)
    out = []
    for name, numbers in params.items():
        if len(numbers) > 1:
            listed = ", ".join(f"$P{n}N" for n in numbers)
            out.append(
                f"channel {name!r} is named by {len(numbers)} parameters ({listed}): `cytopipe run` and "
                f"`cytopipe gate` will fail this file (PanelError, channel {name!r} is ambiguous) if the "
                f"gating template uses {name!r}, since which of them carries it cannot be told. Give "
                f"each channel a unique $PnN (correct the file's {listed} keywords, e.g. at export from "
                "the acquisition software) and validate again; `cytopipe template check FILE --template "
                "TEMPLATE` says whether a template uses the channel"
            )
    return out


def keyword_notes(keywords: dict[str, str]) -> list[str]:
    """Keyword values the reader accepts but an FCS writer should not produce: ``$PnB`` 0, 7 or
    999999999, ``$PnR`` nan/-1, ``$PnE`` nan,nan, ``$PAR`` in non-ASCII digits, a ``$BYTEORD`` that
    does not match the width of the values. Listed by ``validate`` as notes (the file stays valid)."""
    notes: list[str] = []
    par = keywords.get("$PAR", "").strip()
    if par and not (par.isascii() and par.isdigit()):
        notes.append(f"$PAR is {par!r}: not written in ASCII digits")
    try:
        n = int(par)
    except ValueError:
        return notes
    datatype = keywords.get("$DATATYPE", "").strip().upper()
    widths = set()
    for i in range(1, min(n, 10_000) + 1):
        bits = keywords.get(f"$P{i}B", "").strip()
        if bits and bits != "*":
            if not (bits.isascii() and bits.isdigit()) or int(bits) not in (8, 16, 24, 32, 48, 64):
                notes.append(
                    f"$P{i}B is {bits!r}: expected a whole number of bytes in bits (8, 16, 32 or 64)"
                )
            else:
                widths.add(int(bits))
        rng = keywords.get(f"$P{i}R", "").strip()
        if rng:
            try:
                value = float(rng)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value <= 0:
                notes.append(f"$P{i}R is {rng!r}: expected a positive range")
        amp = keywords.get(f"$P{i}E", "").strip()
        if amp:
            parts = amp.split(",")
            try:
                f1, f2 = (float(x) for x in parts)
                odd = not (math.isfinite(f1) and math.isfinite(f2)) or f1 < 0 or f2 < 0
            except ValueError:
                odd = True
            if odd:
                notes.append(
                    f"$P{i}E is {amp!r}: expected two non-negative numbers (decades,offset), e.g. 0,0"
                )
    order = keywords.get("$BYTEORD", "").strip()
    if order and datatype in ("I", "F", "D") and len(widths) == 1:
        nbytes = len(order.split(","))
        width = widths.pop() // 8
        expected = {"F": 4, "D": 8}.get(datatype, width)
        if nbytes != expected and not (datatype == "I" and nbytes in (2, 4) and width <= nbytes):
            notes.append(f"$BYTEORD is {order!r} ({nbytes} bytes) but the values are {expected}-byte numbers")
    return notes


# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _warnings_into(found: list[str]) -> Iterator[None]:
    """The manifest checks' warnings (a misspelt column, a patient and visit claimed twice, ...)
    collected for ``--json`` (they were only on stderr, so a script reading the JSON missed them)."""

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.levelno == logging.WARNING:
                found.append(record.getMessage())

    handler = _Collect()
    source = logging.getLogger("cytopipe.manifest")
    source.addHandler(handler)
    try:
        yield
    finally:
        source.removeHandler(handler)


def _validate_manifest(path: Path, problems: list[dict[str, Any]]):
    from cytopipe.errors import ManifestError
    from cytopipe.manifest import check_manifest

    try:
        table, row_problems = check_manifest(path)
    except ManifestError as exc:
        problems.append({"source": str(path), "row": None, "column": None, "message": exc.message})
        return
    for p in row_problems:
        if p.context.get("column") == "file" and "not found" in p.message:
            continue  # reported as a failed file row below
        problems.append(
            {
                "source": str(path),
                "row": p.context.get("row"),
                "column": p.context.get("column"),
                "message": p.message,
            }
        )
    for rec in table.to_dict("records"):
        if not rec["path"]:
            continue
        file_path = Path(rec["path"])
        if file_path.exists():
            report = validate_file(file_path, display=rec["file"])
        else:
            report = FileReport(
                file=rec["file"],
                error=f"not found: {file_path}",
                error_type="ManifestError",
            )
        report.sample_id = rec["sample_id"]
        report.manifest_row = rec["row"]
        yield report, file_path


def _printable(value: Any) -> Any:
    """File names that are not valid UTF-8 (kept by Python as surrogate escapes) shown with their
    bytes as ``\\xff`` instead of being printed as ``?``."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return value
    if isinstance(value, dict):
        return {_printable(k): _printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_printable(v) for v in value]
    return value


def _looks_like_manifest(path: Path) -> bool:
    if path.suffix.lower() in _MANIFEST_SUFFIXES:
        return True
    from cytopipe.errors import CytopipeError
    from cytopipe.files import open_regular

    try:
        with open_regular(path) as fh:
            head = fh.read(4096).lower()
    except (OSError, CytopipeError):
        return False
    return b"sample_id" in head and b"file" in head


def _note_duplicates(reports: list[FileReport]) -> None:
    by_hash: dict[str, list[FileReport]] = {}
    for r in reports:
        if r.sha256:
            by_hash.setdefault(r.sha256, []).append(r)
    for group in by_hash.values():
        if len(group) > 1:
            for r in group:
                others = ", ".join(o.file for o in group if o is not r)
                r.notes.append(f"identical content to {others}")


def _sha256(path: Path) -> str:
    from cytopipe.files import open_regular

    digest = hashlib.sha256()
    with open_regular(path) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _message(exc) -> str:
    """The error without the file prefix (the file is in its own column)."""
    context = {k: v for k, v in exc.context.items() if k != "file"}
    if not context:
        return exc.message
    return type(exc)(exc.message, **context).args[0]


def _display(path: Path, folder: Path) -> str:
    """A file found in a folder: relative to the working directory when it is below it,
    else the folder's name and the path inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(folder.resolve().name) / path.relative_to(folder))


def _summary(reports: list[FileReport], problems: list[dict[str, Any]]) -> dict[str, int]:
    return {
        "files": len(reports),
        "ok": sum(r.ok for r in reports),
        "failed": sum(not r.ok for r in reports),
        "warned": sum(bool(r.warnings) for r in reports),
        "problems": len(problems),
    }


def _table(reports: list[FileReport], problems: list[dict[str, Any]], inputs: list[dict[str, Any]]) -> str:
    headers = ["STATUS", "FILE", "VERSION", "EVENTS", "CH", "MARKERS", "SPILLOVER", "SHA256", "ERROR"]
    rows = []
    for r in reports:
        markers = ",".join(r.markers)
        if len(markers) > 40:
            markers = markers[:37] + "..."
        rows.append(
            [
                r.status,
                r.file + (f" [{r.datasets} data sets]" if r.datasets > 1 else ""),
                r.version or "-",
                "-" if r.events is None else str(r.events),
                "-" if r.channels is None else str(r.channels),
                markers or "-",
                r.spillover or "-",
                r.sha256[:12] or "-",
                r.error,
            ]
        )
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(headers)]
    right = {3, 4}  # numbers

    def line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    lines = [line(headers)] + [line(row) for row in rows]
    warned = [(r.file, w) for r in reports for w in r.warnings]
    if warned:
        lines += ["", "Warnings (the files read, but a run will fail them as said):"]
        lines += [f"  {file}: {w}" for file, w in warned]
    notes = [(r.file, n) for r in reports for n in r.notes]
    if notes:
        lines += ["", "Notes (handled, the files are still valid):"]
        lines += [f"  {file}: {note}" for file, note in notes]
    if problems:
        lines += ["", "Problems:"]
        for p in problems:
            where = ", ".join(
                part
                for part in (
                    p["source"],
                    f"row {p['row']}" if p["row"] else "",
                    f"column {p['column']!r}" if p["column"] else "",
                )
                if part
            )
            lines.append(f"  {where}: {p['message']}" if where else f"  {p['message']}")
    skipped = [(i["path"], i["ignored_files"]) for i in inputs if i.get("ignored_files")]
    if skipped:
        lines += ["", "Ignored (neither named *.fcs nor starting like an FCS file):"]
        lines += [f"  {folder}: {n} other file(s)" for folder, n in skipped]
    s = _summary(reports, problems)
    summary = f"{s['files']} file(s): {s['ok']} ok, {s['failed']} failed"
    if s["warned"]:
        summary += f"; {s['warned']} ok file(s) with a warning a run will fail on (listed above)"
    if problems:
        summary += f"; {len(problems)} other problem(s) listed above"
    if not reports and not problems:
        summary = "no files to validate"
    lines += ["", summary]
    return "\n".join(lines)
