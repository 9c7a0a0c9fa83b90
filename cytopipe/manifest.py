"""The study manifest: one CSV row per FCS file.

Columns (docs/DEVELOPING.md, "Manifest and clinical table"):

* required: ``file`` (path relative to the manifest's folder, or absolute), ``sample_id``,
  ``patient_id``, ``visit`` (study week, an integer; negative for screening; or written as
  ``W4``, ``Week 4``, ``Day 28``, ``BL``: :func:`parse_visit`), ``arm``;
* optional: ``panel``, ``batch``, ``site``, ``acquired_at`` (ISO 8601), ``control``
  (``unstained``, ``single:<marker>``, ``fmo:<marker>``). Control rows may leave
  ``patient_id``, ``visit`` and ``arm`` blank. Other columns are kept as they are; one named
  like a known column the header lacks (``bacth``) is logged as a warning (a likely typo).

:func:`load_manifest` returns a DataFrame with those columns (blank optional values are
``""``, ``visit`` is a nullable integer), plus ``path`` (the absolute file path) and ``row``
(the line of the CSV the row came from, header = line 1). Problems in a row are collected,
not stopped at: ``load_manifest(path, strict=False)`` / :func:`check_manifest` keep every
row with ``ok``/``problem`` columns so callers can report bad rows and go on with the good
ones. Header names are matched case-insensitively (``Sample ID`` = ``sample_id``); UTF-8
(with or without BOM), UTF-16 and Windows-1252 files, comma/semicolon/tab separators and
old-Mac CR line endings are all read.
"""

from __future__ import annotations

import csv
import difflib
import io
import logging
import re
from pathlib import Path

import pandas as pd

from cytopipe.errors import ManifestError

logger = logging.getLogger(__name__)

__all__ = [
    "OPTIONAL",
    "REQUIRED",
    "VISIT_FORMS",
    "check_manifest",
    "input_folders",
    "load_manifest",
    "parse_control",
    "parse_visit",
    "refuse_output_in_input_folder",
    "unsafe_name",
]

REQUIRED = ("file", "sample_id", "patient_id", "visit", "arm")
OPTIONAL = ("panel", "batch", "site", "acquired_at", "control")
_SAMPLE_ONLY = ("patient_id", "visit", "arm")  # may be blank on control rows
_ISO = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?")
_CONTROL_KINDS = ("single", "fmo")


def load_manifest(path: str | Path, strict: bool = True, check_files: bool = True) -> pd.DataFrame:
    """Read and check a manifest CSV.

    ``strict=True`` raises a :class:`ManifestError` listing every problem (its ``problems``
    attribute holds one ManifestError per problem, with ``row`` and ``column``).
    ``strict=False`` returns every row with an ``ok`` column and a ``problem`` message;
    ``df[df.ok]`` are the usable rows. Problems with the file as a whole (unreadable, no
    rows, missing or duplicate columns) always raise. ``check_files=False`` skips the
    check that each ``file`` exists.
    """
    table, problems = check_manifest(path, check_files=check_files)
    if not strict:
        return table
    if problems:
        if len(problems) == 1:
            error = problems[0]
        else:
            lines = "\n".join(f"  {_short(p)}" for p in problems)
            error = ManifestError(f"{len(problems)} problems:\n{lines}", file=Path(path))
        error.problems = problems
        raise error
    return table.drop(columns=["ok", "problem"])


def check_manifest(path: str | Path, check_files: bool = True) -> tuple[pd.DataFrame, list[ManifestError]]:
    """Every row of the manifest (with ``ok`` and ``problem`` columns) and the list of
    per-row problems, each a :class:`ManifestError` naming the row and column."""
    path = Path(path)
    header, rows = _read_rows(path)
    columns = [_normalise(h) for h in header]
    seen: dict[str, int] = {}
    for i, name in enumerate(columns):
        if not name:
            if any(r[1][i] if i < len(r[1]) else "" for r in rows):
                raise ManifestError(f"column {i + 1} has no name in the header line", file=path, row=1)
            continue
        if name in seen:
            raise ManifestError(
                f"column {name!r} appears twice in the header (columns {seen[name] + 1} and {i + 1})",
                file=path,
                column=name,
            )
        seen[name] = i
    missing = [c for c in REQUIRED if c not in seen]
    typos = misspelt_columns(list(seen))
    if missing:
        hints = "".join(f" Is {c!r} meant to be {known!r}?" for c, known in typos.items() if known in missing)
        raise ManifestError(
            f"missing required column(s) {missing}; the header has {[c for c in columns if c]}.{hints} "
            f"A manifest needs {list(REQUIRED)} (optional: {list(OPTIONAL)})",
            file=path,
            column=missing[0],
        )
    for column, known in typos.items():  # a lab's own columns are kept; a misspelt one is lost
        logger.warning(
            "manifest %s: column %r is not a known manifest column; did you mean %r? Its values are "
            "kept as an extra column and not used as %s; rename the column if they are",
            path,
            column,
            known,
            known,
        )
    if not rows:
        raise ManifestError("the manifest has a header but no rows", file=path)

    base = path.resolve().parent
    problems: list[ManifestError] = []
    records = []
    first_row_of_sample: dict[str, int] = {}
    first_row_of_file: dict[str, int] = {}
    for line, cells in rows:
        rec = {name: (cells[i].strip() if i < len(cells) else "") for name, i in seen.items()}
        for name in OPTIONAL:
            rec.setdefault(name, "")
        row_problems: list[ManifestError] = []

        def problem(column: str | None, message: str, line=line, out=row_problems) -> None:
            out.append(ManifestError(message, file=path, row=line, column=column))

        if len(cells) > len(header) and any(c.strip() for c in cells[len(header) :]):
            problem(
                None, f"has {len(cells)} values but the header has {len(header)} columns (a stray separator?)"
            )
        is_control = bool(rec["control"])
        if is_control:
            try:
                parse_control(rec["control"])
            except ValueError as exc:
                problem("control", str(exc))
        for name in REQUIRED:
            if not rec[name] and not (is_control and name in _SAMPLE_ONLY):
                who = (
                    "sample row needs one (control rows may leave it blank)"
                    if name in _SAMPLE_ONLY
                    else "row needs one"
                )
                problem(name, f"{name} is blank; every {who}")
        visit = None
        if rec["visit"]:
            visit = _parse_visit(rec["visit"])
            if visit is None:
                problem("visit", visit_problem(rec["visit"]))
        if rec["acquired_at"] and not _is_iso(rec["acquired_at"]):
            problem(
                "acquired_at",
                f"acquired_at is {rec['acquired_at']!r}; write an ISO 8601 date/time, e.g. 2021-03-04T09:30",
            )
        sid = rec["sample_id"]
        if sid and (why := unsafe_name(sid)):
            problem("sample_id", f"sample_id {sid!r} cannot be used as a file name ({why}); {_SAFE_HINT}")
        if sid:
            if sid in first_row_of_sample:
                problem("sample_id", f"sample_id {sid!r} is already used on row {first_row_of_sample[sid]}")
            else:
                first_row_of_sample[sid] = line
        file_path = ""
        if rec["file"]:
            resolved = _resolve(base, rec["file"])
            file_path = str(resolved)
            if file_path in first_row_of_file:
                problem("file", f"file {rec['file']!r} is also listed on row {first_row_of_file[file_path]}")
            else:
                first_row_of_file[file_path] = line
            if check_files:
                if resolved.is_dir():
                    problem("file", f"file {rec['file']!r} is a folder, not an FCS file")
                elif not resolved.exists():
                    problem("file", f"file {rec['file']!r} not found (looked for {resolved})")
        rec["visit"] = visit
        rec["path"] = file_path
        rec["row"] = line
        rec["ok"] = not row_problems
        rec["problem"] = "; ".join(_short(p, with_row=False) for p in row_problems)
        problems += row_problems
        records.append(rec)

    _warn_repeated_visits(path, records)
    extras = [c for c in columns if c and c not in REQUIRED and c not in OPTIONAL]
    order = [*REQUIRED, *OPTIONAL, *extras, "path", "row", "ok", "problem"]
    table = pd.DataFrame.from_records(records, columns=order)
    table["visit"] = table["visit"].astype("Int64")
    return table, problems


def _warn_repeated_visits(path: Path, records: list[dict]) -> None:
    """A warning for each patient and visit that two or more sample rows claim (a mislabelled
    file, or replicates): the statistics refuse them unless told to average them."""
    seen: dict[tuple[str, int], list[dict]] = {}
    for rec in records:
        if rec["ok"] and not rec["control"] and rec["visit"] is not None:
            seen.setdefault((rec["patient_id"], rec["visit"]), []).append(rec)
    for (patient, visit), recs in seen.items():
        if len(recs) > 1:
            logger.warning(
                "manifest %s: patient %r, visit %s is claimed by %d samples: %s; if a file is "
                "mislabelled, correct its patient_id or visit; replicates are refused by the "
                "statistics unless `statistics: {duplicates: mean}` averages them",
                path,
                patient,
                visit,
                len(recs),
                ", ".join(f"{r['sample_id']} (row {r['row']}, {r['file']})" for r in recs),
            )


def misspelt_columns(columns: list[str]) -> dict[str, str]:
    """Unknown (normalised) column names that look like a known one the header lacks: ``{'bacth':
    'batch'}``. Other extra columns (a lab's own, e.g. ``notes``, ``operator``) are not listed."""
    known = [c for c in (*REQUIRED, *OPTIONAL) if c not in columns]
    out = {}
    for column in columns:
        if column in REQUIRED or column in OPTIONAL:
            continue
        close = difflib.get_close_matches(column, known, n=1, cutoff=_TYPO_CUTOFF)
        if close:
            out[column] = close[0]
    return out


_TYPO_CUTOFF = 0.75  # bacth, btach, smaple_id, vist, panle, stie, contorl: typos; path (0.67), plate: not

_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}
_SAFE_HINT = "use letters, digits, '_', '-' and '.' (e.g. P001_W04)"


def unsafe_name(name: str) -> str | None:
    """Why ``name`` cannot be a file name on every system (exports write ``<sample_id>.fcs``),
    or None. Refused: path separators, '.'/'..', control characters (NUL included), Windows
    reserved names (CON, NUL, COM1, ...), a trailing dot or space, more than 200 bytes."""
    if "/" in name or "\\" in name:
        return "it contains a path separator '/' or '\\'"
    if name in (".", ".."):
        return f"{name!r} names a folder"
    bad = sorted({c for c in name if ord(c) < 32 or ord(c) == 127})
    if bad:
        return "it contains control characters " + ", ".join(f"U+{ord(c):04X}" for c in bad)
    if name.split(".")[0].strip().upper() in _RESERVED:
        return f"{name.split('.')[0]!r} is a reserved device name on Windows"
    if name.endswith((".", " ")):
        return "it ends with a dot or a space"
    if len(name.encode("utf-8", "surrogateescape")) > 200:
        return "it is longer than 200 bytes"
    return None


# --- where outputs may go: never into a folder the FCS files are read from ----------------------
def input_folders(fcs_files) -> set[Path]:
    """The folders (resolved) that hold these input FCS files, as they are listed."""
    return {Path(p).absolute().parent.resolve() for p in fcs_files if str(p).strip()}


def refuse_output_in_input_folder(out: str | Path, folders, option: str = "--out") -> None:
    """Refuse an output (a folder or a file) that is, or is inside, one of ``folders`` (those of
    the input FCS files, :func:`input_folders`): derived files would sit beside the raw ones, where
    ``cytopipe validate`` of the folder (searched recursively) takes an FCS file for a sample.
    A :class:`~cytopipe.errors.StoreError` (exit 2), raised before any work."""
    from cytopipe.errors import StoreError

    real = Path(out).absolute().resolve()  # a symlink is judged by where it points
    for folder in sorted(folders):
        if real == folder or real.is_relative_to(folder):
            raise StoreError(
                f"is inside {folder}, the folder the run's input FCS files are read from (its manifest "
                "lists them there); derived files written there would sit beside the raw ones, and a "
                "later `cytopipe validate` of that folder would take exported FCS files for samples. "
                f"Choose an {option} outside {folder}",
                file=Path(out),
            )


def parse_control(value: str) -> tuple[str, str | None]:
    """``'unstained'`` -> ``('unstained', None)``, ``'single:CD4'`` -> ``('single', 'CD4')``,
    ``'fmo:CD25'`` -> ``('fmo', 'CD25')``; anything else raises ValueError with a hint."""
    text = value.strip()
    if text.lower() == "unstained":
        return "unstained", None
    kind, sep, marker = text.partition(":")
    if sep and kind.strip().lower() in _CONTROL_KINDS and marker.strip():
        return kind.strip().lower(), marker.strip()
    raise ValueError(
        f"control is {value!r}; write 'unstained', 'single:<marker>' or 'fmo:<marker>' (e.g. single:CD4)"
    )


# --------------------------------------------------------------------------------------------
def _read_rows(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    from cytopipe.files import open_regular

    try:
        with open_regular(path, ManifestError, "a manifest CSV") as fh:  # a FIFO would block
            raw = fh.read()
    except IsADirectoryError:
        raise ManifestError("is a folder, not a manifest CSV", file=path) from None
    except OSError as exc:
        raise ManifestError(f"cannot read the manifest: {exc.strerror or exc}", file=path) from None
    text = _decode(raw, path)
    if not text.strip():
        raise ManifestError("the manifest is empty", file=path)
    first = text.lstrip("\ufeff").splitlines()[0] if text.splitlines() else ""
    delimiter = max((",", ";", "\t"), key=first.count) if first else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    rows: list[tuple[int, list[str]]] = []
    header: list[str] | None = None
    start = 1
    try:
        for cells in reader:
            line = start
            start = reader.line_num + 1
            if not any(c.strip() for c in cells):
                continue  # blank line or a row of empty cells (spreadsheet exports)
            if header is None:
                header = cells
            else:
                rows.append((line, cells))
    except csv.Error as exc:
        raise ManifestError(f"cannot parse the CSV near line {reader.line_num}: {exc}", file=path) from None
    if header is None:
        raise ManifestError("the manifest is empty", file=path)
    return header, rows


def _decode(raw: bytes, path: Path) -> str:
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    for encoding in ("utf-8-sig", "cp1252"):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            continue
        if encoding == "cp1252":  # Excel's "CSV" on Windows: say so, names with accents may differ
            logger.warning("%s is not UTF-8; read it as Windows-1252 (save it as CSV UTF-8 to be sure)", path)
        return text
    logger.warning("%s is neither UTF-8 nor Windows-1252; read it as Latin-1", path)
    return raw.decode("latin-1")


def _normalise(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip().lstrip("\ufeff").strip().lower())


#: the visit forms :func:`parse_visit` accepts (said in every visit error)
VISIT_FORMS = (
    "a study week (0, 4, -2), W4 / Wk 4 / Week 4 / 4 weeks, D28 / Day 28 (whole weeks of days: "
    "Day 0 = week 0, Day 28 = week 4) or BL / Baseline (week 0)"
)
_NUMBER = r"([+-]?\d+)(?:\.0*)?"  # spreadsheets write 4 as 4.0
_SEP = r"[\s_.]*"  # W4, W 4, W_4, W.4 (not W-4: that is week -4, as in screening W-2)
_WEEKS = re.compile(rf"(?:w|wk|wks|week|weeks){_SEP}{_NUMBER}|{_NUMBER}{_SEP}(?:w|wk|wks|week|weeks)", re.I)
_DAYS = re.compile(rf"(?:d|dy|day|days){_SEP}{_NUMBER}|{_NUMBER}{_SEP}(?:d|days?)", re.I)
_MONTHS = re.compile(rf"(?:m|mo|mon|month|months){_SEP}{_NUMBER}|{_NUMBER}{_SEP}(?:m|mo|months?)", re.I)
_BASELINE = re.compile(r"bl|base[\s_-]?line", re.I)


def parse_visit(text: object) -> int:
    """The study week of a visit as a manifest or clinical table writes it: a number (``4``,
    ``4.0``, ``-2``), a week (``W04``, ``Wk 4``, ``Week 4``, ``4 weeks``; ``W-2`` is week -2), days
    that make whole weeks (``D28``, ``Day 28`` -> 4; ``Day 0`` -> 0) or the baseline (``BL``,
    ``Baseline`` -> 0, the default ``baseline_visit``). Anything else raises ``ValueError`` saying
    why: months (``M3``: week 12 or 13 depends on the protocol), days that are no whole week (``Day
    1``: in many protocols the baseline), visit numbers (``V2``), screening, fractions."""
    raw = str(text).strip()
    if re.fullmatch(_NUMBER, raw):
        return int(re.fullmatch(_NUMBER, raw).group(1))
    if _BASELINE.fullmatch(raw):
        return 0
    m = _WEEKS.fullmatch(raw)
    if m:
        return int(m.group(1) or m.group(2))
    m = _DAYS.fullmatch(raw)
    if m:
        days = int(m.group(1) or m.group(2))
        if days % 7:
            hint = " (if day 1 is your baseline, write BL or 0)" if days == 1 else ""
            raise ValueError(f"day {days} is not a whole study week{hint}")
        return days // 7
    if _MONTHS.fullmatch(raw):
        raise ValueError(
            "months are no whole number of weeks (month 3 is week 12 or 13 as the protocol says)"
        )
    if re.fullmatch(r"(?:v|visit)[\s_.]*\d+", raw, re.I):
        raise ValueError("a visit number, not a study week")
    if re.fullmatch(r"scr|screen|screening", raw, re.I):
        raise ValueError("screening has no study week (write its week, e.g. -2)")
    if re.fullmatch(r"[+-]?\d*\.\d+", raw):
        raise ValueError("not a whole study week")
    raise ValueError("not a study week")


def visit_problem(text: object) -> str:
    """The message of a visit :func:`parse_visit` refuses: the value, why and the accepted forms."""
    try:
        parse_visit(text)
    except ValueError as exc:
        return f"visit is {str(text).strip()!r}: {exc}; write {VISIT_FORMS}"
    return ""


def _parse_visit(text: str) -> int | None:
    try:
        return parse_visit(text)
    except ValueError:
        return None


def _is_iso(text: str) -> bool:
    if not _ISO.fullmatch(text):
        return False
    try:
        pd.Timestamp(text)
    except ValueError:
        return False
    return True


def _resolve(base: Path, file: str) -> Path:
    candidate = Path(file)
    if not candidate.is_absolute():
        candidate = base / candidate
    if not candidate.exists() and "\\" in file:  # a path typed on Windows
        alt = Path(file.replace("\\", "/"))
        alt = alt if alt.is_absolute() else base / alt
        if alt.exists():
            return alt
    return candidate


def _short(error: ManifestError, with_row: bool = True) -> str:
    """A problem without the file prefix: 'row 4, column 'visit': ...'."""
    parts = []
    if with_row and "row" in error.context:
        parts.append(f"row {error.context['row']}")
    if error.context.get("column"):
        parts.append(f"column {error.context['column']!r}")
    return f"{', '.join(parts)}: {error.message}" if parts else error.message
