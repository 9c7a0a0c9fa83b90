"""Which files of a run folder blinding rewrites, and a user's files it never touches.

Blinding a run folder (and unblinding it) rewrites only the files cytopipe wrote there, told by
their exact place and name (:func:`cytopipe.store.is_run_output`: the top-level tables,
``review.json``, ``reconcile.csv``, ``clustering/``'s tables, ``study/``'s files); run.json, the
catalog, the report and its tables, and ``.cache/`` have their own handling
(:func:`cytopipe.report.blinding.recode_folder`). Any other file kept in the run folder (notes, an
export, a copy of the clinical table) is the user's: it is never rewritten (coded, its author could
read which code stands for which arm; decoded, a literal ``Arm B`` could not be told from a coded
one). A folder to be blinded that holds such a file showing an arm name is refused before anything
is done (:func:`check_user_files`, exit 2): the blinded folder would show the arms.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd

from cytopipe.errors import ReportError

logger = logging.getLogger(__name__)

#: the files blinding reads (and rewrites, when they are cytopipe's own)
RECODED_SUFFIXES = (".csv", ".json", ".txt", ".tsv", ".yaml", ".yml", ".parquet")


def folder_files(run_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """``(cytopipe's, the user's)``: the files of ``run_dir`` that blinding reads (relative paths,
    sorted): text and Parquet files outside hidden folders, run.json, the catalog, the reports
    (``*.html``) and their tables folders (``*_tables/``), which are handled apart."""
    from cytopipe.store import CATALOG, RUN_JSON, is_run_output

    run_dir = Path(run_dir)
    own: list[Path] = []
    users: list[Path] = []
    # os.walk, pruned: the per-sample cache (.cache/, thousands of files in a large study) and the
    # tables folders are not walked at all, and a linked folder is not followed out of the run folder
    for root, dirs, names in os.walk(run_dir):
        top = Path(root) == run_dir
        if top:
            dirs[:] = [d for d in dirs if not d.startswith(".") and not d.endswith("_tables")]
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(run_dir)
            if (top and (name.startswith(".") or name in (RUN_JSON, CATALOG))) or not path.is_file():
                continue
            suffix = path.suffix.lower()
            if suffix in RECODED_SUFFIXES:
                (own if is_run_output(rel) else users).append(rel)
    return sorted(own), sorted(users)


def shown_arm(path: Path, leaks: Callable[[Mapping[str, str]], list[str]]) -> str:
    """Where ``path`` shows an arm name: ``"line N: 'arm'"`` (a Parquet file: ``"column 'c':
    'arm'"``), the first one; ``""``: nowhere."""
    if path.suffix.lower() == ".parquet":
        try:
            df = pd.read_parquet(path)
        except Exception:  # not a table we can read: shown as bytes
            return _text_arm(path.read_bytes().decode("latin-1"), leaks)
        for column in df.columns:
            values = [str(column), *df[column].dropna().astype(str).unique()] if df[column].dtype.kind in "OUS" \
                or isinstance(df[column].dtype, (pd.StringDtype, pd.CategoricalDtype)) else [str(column)]  # fmt: skip
            if shown := leaks({f"column {str(column)!r}": "\n".join(values)}):
                return shown[0]
        return ""
    return _text_arm(path.read_text(encoding="utf-8", errors="replace"), leaks)


def _text_arm(text: str, leaks: Callable[[Mapping[str, str]], list[str]]) -> str:
    if not leaks({"file": text}):
        return ""
    for number, line in enumerate(text.splitlines(), start=1):
        if shown := leaks({f"line {number}": line}):
            return shown[0]
    return leaks({"the file": text})[0]  # not within one line (an arm name with a line break)


def check_user_files(
    run_dir: str | Path, leaks: Callable[[Mapping[str, str]], list[str]], *, name_arms: bool, todo: str
) -> None:
    """Refuse (:class:`ReportError`, exit 2) a run folder to be blinded that holds a file cytopipe
    did not write (:func:`folder_files`) showing an arm name: blinding never rewrites it, so the
    blinded folder would show the arms. Named: each file and the line (a Parquet file: the
    column) that shows one, and the arm name only with ``name_arms`` (a message that may be written
    into the blinded folder must not tie a code to a name). ``leaks``: ``find_leaks`` with the
    arms (cytopipe/report/blinding.py). ``todo``: what happens now, what to do."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    problems = []
    for rel in folder_files(run_dir)[1]:
        shown = shown_arm(run_dir / rel, leaks)
        if shown:
            problems.append(f"{rel.as_posix()} ({shown if name_arms else shown.rsplit(':', 1)[0]})")
        else:
            logger.info("%s: %s is not a file cytopipe wrote; it shows no arm name and blinding leaves it "
                        "as it is", run_dir, rel.as_posix())  # fmt: skip
    if problems:
        raise ReportError(
            f"holds a file cytopipe did not write that shows an arm name: {'; '.join(problems)}. "
            "Blinding never rewrites your files, so the blinded run folder would show the arms. "
            f"{todo}",
            file=run_dir,
        )
