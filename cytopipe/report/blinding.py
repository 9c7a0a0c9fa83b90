"""Blinded reports: arm names replaced by codes everywhere, and a check that none leaks.

Codes are ``Arm A``, ``Arm B``, ... in an order nobody can work out from the report: a
permutation seeded by a secret the report never shows (by default the content hashes of the
run's FCS files, so the same run always gets the same codes). A code key (``arm -> code``, kept
by the unblinded statistician outside the run folder) gives codes that stay the same across runs,
e.g. from one interim analysis to the next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from collections.abc import Iterable, Mapping
from functools import partial
from pathlib import Path

import pandas as pd

from cytopipe.errors import ReportError
from cytopipe.report.armnames import any_case, find_leaks, leak_pattern  # noqa: F401  (find_leaks: this module's API)
from cytopipe.report.blindrecord import (  # noqa: F401  (the record's API, used through this module)
    RECORD,
    _read_key,
    codes_of_record,
    keyed_codes,
    record_codes,
    rekeyed,
    source_arms,
)
from cytopipe.report.options import add_blinding_arguments  # noqa: F401  (where it was; used through this module)
from cytopipe.report.respell import respeller, text_spellings

logger = logging.getLogger(__name__)


def arm_codes(
    arms: Iterable[str],
    key: Mapping[str, str] | str | Path | None = None,
    secret: bytes | None = None,
) -> dict[str, str]:
    """``{arm: code}`` for every arm.

    ``key``: a mapping, or a CSV (columns ``arm,code``) / JSON (``{"arm": "code"}``) file. Every
    arm must have a code, codes must be distinct, and no code may contain an arm name (one of one or
    two characters: as a word). Without a key, ``Arm A``, ``Arm B``, ... (``Arm 1``, ... or
    ``Group 1``, ... when an arm is named like a word of those, e.g. ``A``) are assigned by a
    permutation seeded with SHA-256 of ``secret`` (deterministic), or drawn from system entropy
    when there is no secret.
    """
    arms = sorted({str(a) for a in arms if a is not None and not pd.isna(a) and str(a) != ""})
    if key is None:
        order = list(range(len(arms)))
        if secret:
            seed = int.from_bytes(hashlib.sha256(b"cytopipe-blinding\0" + secret).digest()[:8], "big")
            random.Random(seed).shuffle(order)
        else:
            random.SystemRandom().shuffle(order)
        shown = any_case(arms)
        # arms named like a code's word (``A``, ``B``; ``Arm``) would show in ``Arm A``: other codes
        for scheme in (lambda i: f"Arm {_letter(i)}", lambda i: f"Arm {i + 1}", lambda i: f"Group {i + 1}"):
            codes = {arm: scheme(i) for arm, i in zip(arms, order)}
            if not any(shown.search(code) for code in codes.values()):
                break
        return codes
    mapping = _read_key(key) if not isinstance(key, Mapping) else {str(k): str(v) for k, v in key.items()}
    missing = [a for a in arms if a not in mapping]
    if missing:
        raise ReportError(f"the blinding key has no code for arm(s) {missing}; add them", key="blind_key")
    codes = {a: mapping[a] for a in arms}
    if len(set(codes.values())) != len(codes):
        raise ReportError(
            "the blinding key gives two arms the same code; codes must be distinct", key="blind_key"
        )
    shown = any_case(arms)  # as the leak check reads a code: short names as whole words
    for code in codes.values():
        if shown.search(code):
            raise ReportError(
                f"code {code!r} (for one arm) contains an arm name; choose neutral codes such as 'Arm A'",
                key="blind_key",
            )
        if not code.strip():
            raise ReportError("the blinding key has an empty code", key="blind_key")
    return codes


def _letter(i: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[i] if i < 26 else letters[i // 26 - 1] + letters[i % 26]


def blind_frame(table: pd.DataFrame | None, codes: Mapping[str, str]) -> pd.DataFrame | None:
    """Copy of a table with arm names replaced by codes in the ``arm`` column (exact) and inside
    every other text value (longest names first, so a name inside another leaks no fragment)."""
    if table is None:
        return None
    out = table.copy()
    pattern = _pattern(codes)
    for column in out.columns:
        col = out[column]
        if column == "arm":
            out[column] = _same_dtype(
                col.map(lambda v: codes.get(str(v), v) if isinstance(v, str) else v), col
            )
            continue
        if col.dtype == object or pd.api.types.is_string_dtype(col):
            out[column] = _same_dtype(
                col.map(lambda v: blind_text(v, codes, pattern) if isinstance(v, str) else v), col
            )
    return out


def _same_dtype(new: pd.Series, old: pd.Series) -> pd.Series:
    """``new`` in ``old``'s text dtype (``map`` gives object): a table coded and decoded again is
    the table it was, dtypes included."""
    if isinstance(old.dtype, pd.StringDtype) and new.dtype != old.dtype:  # not a category: its
        return new.astype(old.dtype)  # categories would be the old names
    return new


def blind_text(text: str, codes: Mapping[str, str], pattern: re.Pattern | None = None) -> str:
    """``text`` with every arm name replaced by its code, where :func:`leak_pattern` finds it
    (whole words for names of one or two characters; a name of one character in its own case)."""
    if not codes:
        return text
    pattern = pattern or _pattern(codes)
    lower = {k.lower(): v for k, v in codes.items()}
    return pattern.sub(lambda m: codes.get(m.group(0)) or lower[m.group(0).lower()], text)


def hide_arm_order(table: pd.DataFrame | None, codes: Mapping[str, str]) -> pd.DataFrame | None:
    """A blinded table whose order says nothing about the arms' order (dose).

    Tables computed before blinding list arms in dose (or name) order: rows ``0.2 MIU vs placebo``,
    ``0.5 MIU vs placebo``, ... and texts ``placebo=2, IL-2 0.2 MIU=2, ...`` or ``['placebo', ...]``.
    Coded as they are, they would give away which code is which dose. Here lists of codes inside a
    text (``Arm D=2, Arm C=2`` or ``'Arm D', 'Arm C'``) are sorted by code, and the rows of one test
    (same family, population, visit, ...; a per-arm subgroup counts as one test) that name a code
    in ``comparison``, ``arm`` or ``subgroup`` are sorted by it, in the places those rows held
    (cytopipe/stats/armorder.py; ``cytopipe unblind`` puts them back in the run's order with
    :func:`cytopipe.stats.armorder.in_arm_order`); every other row keeps its place."""
    from cytopipe.stats.armorder import POOLED, order_arm_lists, order_arm_rows

    if table is None or table.empty or not codes:
        return table
    names = list(codes.values())
    out = order_arm_lists(table, names, lambda code: code, follow_comparison=False)
    return order_arm_rows(out, names, lambda found: tuple((a == POOLED, a) for a in found))


def _pattern(codes: Mapping[str, str]) -> re.Pattern:
    """The arm names of ``codes`` as the leak check finds them (:func:`leak_pattern`): a name of one
    or two characters as a whole word only (``A`` not inside ``CD45RA`` nor ``FSC-A``), longer
    names anywhere."""
    return leak_pattern(codes)


# ------------------------------------------------------------------------------------------------
# blinding as a property of the run folder
# ------------------------------------------------------------------------------------------------
def run_record(info: Mapping | None) -> dict | None:
    """The blinding record of a run.json (``None`` unless the run folder is blinded now)."""
    rec = (info or {}).get(RECORD)
    return rec if isinstance(rec, dict) and rec.get("blinded") else None


def folder_record(run_dir: str | Path) -> dict | None:
    """The blinding record of a run folder's run.json, or ``None`` (not blinded, or no run.json)."""
    path = Path(run_dir) / "run.json"
    try:
        return run_record(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def _now() -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except Exception:  # no login name (containers): the log still has the time and the command
        return ""


def new_record(
    codes: Mapping[str, str], by: str, run_dir: str | Path, previous: Mapping | None = None
) -> dict:
    """A blinding record for run.json: the codes, each with a keyed hash of its arm (so the
    pipeline can match the manifest's arms to their codes without the folder holding any arm
    name, nor a hash that a guessed arm name could be checked against: cytopipe/report/blindrecord.py),
    and the log of blinding and unblinding acts (``previous``'s log is kept)."""
    # an older `cytopipe unblind` logged the key's SHA-256, which the few possible keys could be tried against
    log = [{k: v for k, v in e.items() if k != "key_sha256"} if isinstance(e, dict) else e
           for e in (previous or {}).get("log") or []]  # fmt: skip
    log.append({"action": "blinded", "at": _now(), "by": by, "user": _user()})
    return {"blinded": True, **keyed_codes(codes, run_dir), "log": log}


def _word_pattern(names: Iterable[str]) -> re.Pattern:
    names = sorted(names, key=len, reverse=True)
    body = "|".join(re.escape(n) for n in names) or "(?!)"
    return re.compile(rf"(?<![A-Za-z0-9])(?:{body})(?![A-Za-z0-9])")


def unblind_frame(
    table: pd.DataFrame | None, codes: Mapping[str, str], cases: Mapping[str, Mapping[str, str]] | None = None
) -> pd.DataFrame | None:
    """The inverse of :func:`blind_frame`: codes back to arm names (exact in ``arm``, whole words
    elsewhere, case-sensitive so ordinary words are never touched). ``cases``: the values of the
    study's inputs spelt with an arm name in another case, by column
    (:func:`cytopipe.report.unblind.case_spellings`), given back as they were written."""
    if table is None:
        return None
    inverse = {c: a for a, c in codes.items()}
    pattern = _word_pattern(inverse)
    respell = respeller(text_spellings(cases or {}, codes))  # such values inside a longer text
    out = table.copy()
    for column in out.columns:
        col = out[column]
        if column == "arm":
            out[column] = _same_dtype(
                col.map(lambda v: inverse.get(str(v), v) if isinstance(v, str) else v), col
            )
        elif col.dtype == object or pd.api.types.is_string_dtype(col):
            spelt = (cases or {}).get(str(column)) or {}

            def decode(v: str, spelt: Mapping[str, str] = spelt) -> str:
                v = pattern.sub(lambda m: inverse[m.group(0)], v)
                return spelt[v] if v in spelt else respell(v)

            out[column] = _same_dtype(col.map(lambda v: decode(v) if isinstance(v, str) else v), col)
    return out


def recode_obj(obj: object, codes: Mapping[str, str], unblind: bool = False) -> object:
    """A JSON-like value with arm names replaced by codes (or, ``unblind``, back) in every string
    and key; the blinding record itself is kept as it is."""
    if unblind:
        inverse = {c: a for a, c in codes.items()}
        pattern = _word_pattern(inverse)

        def text(s: str) -> str:
            return pattern.sub(lambda m: inverse[m.group(0)], s)
    else:
        pattern = _pattern(codes)

        def text(s: str) -> str:
            return blind_text(s, codes, pattern)

    def walk(v: object) -> object:
        if isinstance(v, str):
            return text(v)
        if isinstance(v, Mapping):
            return {
                (text(k) if isinstance(k, str) else k): (x if k == RECORD else walk(x)) for k, x in v.items()
            }
        if isinstance(v, (list, tuple)):
            return [walk(x) for x in v]
        return v

    return walk(obj)


def in_run_order(table: pd.DataFrame, codes: Mapping[str, str], info: Mapping) -> pd.DataFrame:
    """An unblinded statistics table (arm names back) in the order an unblinded run writes it:
    :func:`cytopipe.stats.armorder.in_arm_order` with the run's reference arm and doses (run.json's
    ``workflow.statistics``, already unblinded in ``info``)."""
    from cytopipe.stats import StatsSettings
    from cytopipe.stats.armorder import in_arm_order

    workflow = info.get("workflow") if isinstance(info, Mapping) else None
    stats = workflow.get("statistics") if isinstance(workflow, Mapping) else None
    stats = stats if isinstance(stats, Mapping) else {}
    reference = str(stats.get("reference_arm") or StatsSettings.reference_arm)
    doses = stats.get("arm_doses") if isinstance(stats.get("arm_doses"), Mapping) else None
    return in_arm_order(table, list(codes), reference, doses)


def _frame_changed(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    for column in a.columns:
        if a[column].dtype == object or pd.api.types.is_string_dtype(a[column]) or column == "arm":
            if not a[column].astype(object).equals(b[column].astype(object)):
                return True
    return False


def recode_folder(
    run_dir: str | Path,
    codes: Mapping[str, str],
    info: Mapping,
    *,
    unblind: bool = False,
    report: tuple[Path, Path] | None = None,
    newly: bool = False,
    cases: Mapping[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Rewrite the tables cytopipe wrote in a run folder with arm names replaced by codes (or back):
    its Parquet tables and text files (:func:`cytopipe.report.blindfiles.folder_files`: known places
    and names; a user's file is never rewritten), the DuckDB catalog and run.json (``info``, already
    holding the new blinding record); ``.cache/`` is scrubbed. A report of the earlier state is
    removed, each file of a tables folder it keeps named in a warning (``report``: the report the
    command writes next, its HTML and tables folder: removed too, with or without a record of its
    tables, as the command replaces it; the files kept in its tables folder are named by that
    report, once, not here too: :func:`remove_report`). Blinding refuses (:class:`ReportError`, nothing
    changed) a user's file showing an arm name, which the commands check before their work; here it
    can only have appeared since. ``newly``: the folder was not blinded before (a run that blinds
    it has written its tables coded already, so nothing else may need recoding): its reports are
    removed all the same, as every one of them was written unblinded. Returns the files rewritten
    (relative paths). ``cases`` (unblinding): see :func:`unblind_frame`."""
    from cytopipe.report.blindfiles import check_user_files, folder_files, spillover_names, spillover_renames
    from cytopipe.store import CATALOG, TABLES, atomic_write_bytes, atomic_write_json, atomic_write_parquet

    run_dir = Path(run_dir)
    # a per-batch spillover matrix named by a batch named like an arm: renamed as run.json names it
    # (unblinding: a batch spelt with an arm name in another case, ``Placebo``, decodes as the arm,
    # ``placebo``: named as run.json, given its spelling back, names it)
    named = {n.casefold(): n for n in spillover_names(info)} if unblind else {}

    def recode(name: str) -> str:
        new = str(recode_obj(name, codes, unblind))
        return named.get(new.casefold(), new)

    renames = spillover_renames(run_dir, info, recode)
    spillovers = spillover_names(info) | set(renames)
    if not unblind:  # the message may be kept in the blinded run.json: it names no arm
        check_user_files(run_dir, partial(find_leaks, arms=codes), name_arms=False, spillovers=spillovers, report=report,
                         todo="Its files were not recoded. Move the file out of the run folder (or take the "
                         "arm names out of it), then run the command again")  # fmt: skip
    swap = partial(unblind_frame, cases=cases) if unblind else blind_frame
    respell = respeller(text_spellings(cases or {}, codes) if unblind else {})  # run.log's texts
    tables: dict[str, pd.DataFrame] = {}
    changed: list[str] = []
    for old, new in renames.items():  # the old name's file is the current one (e.g. the run's own)
        os.replace(run_dir / "study" / old, run_dir / "study" / new)
        changed.append(f"study/{new}")
    for rel in folder_files(run_dir, spillovers, report)[0]:
        path = run_dir / rel
        if path.suffix == ".parquet":
            df = pd.read_parquet(path)
            new = swap(df, codes)
            if "comparison" in new.columns:
                # blinding: tests computed in dose order, put in code order; unblinding: back in the
                # order a run writes them
                new = in_run_order(new, codes, info) if unblind else hide_arm_order(new, codes)
            if len(rel.parts) == 1 and path.stem in TABLES:
                tables[path.stem] = new
            if _frame_changed(df, new):
                atomic_write_parquet(path, new)
                changed.append(str(rel))
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            new_text = respell(str(recode_obj(text, codes, unblind)))
            if new_text != text and rel == Path("run.log"):
                _rewrite_in_place(path, str(new_text))  # a run's log handler keeps appending to it
                changed.append(str(rel))
            elif new_text != text:
                atomic_write_bytes(path, str(new_text).encode("utf-8"))
                changed.append(str(rel))
    if (run_dir / CATALOG).is_file():
        from cytopipe.store import write_catalog

        write_catalog(run_dir / CATALOG, tables, info)
    atomic_write_json(run_dir / "run.json", dict(info))
    # a report of the earlier state would contradict the tables (any report in the folder)
    if changed or newly:
        remove_report(run_dir, blinding=not unblind, report=report)
    if not unblind:
        changed += scrub_cache(run_dir, codes)
    changed.append("run.json")
    return changed


def scrub_cache(run_dir: str | Path, arms: Iterable[str]) -> list[str]:
    """Leave no arm name in a blinded run folder's private cache (``.cache/``), which is written
    before the folder's blinding is known and is never shared knowingly, but is part of the folder.

    A cached table whose only arm names are in its ``arm`` column keeps its rows with that column
    emptied (the run takes every sample's arm from the manifest when it assembles the tables);
    any other cache file holding an arm name (e.g. the cached statistics, whose comparisons name
    the arms) is removed, so the next run computes it again. Returns the files changed."""
    from cytopipe.arrowfiles import atomic_write_arrow, read_arrow
    from cytopipe.store import RUN_SECRET, atomic_write_parquet

    cache = Path(run_dir) / ".cache"
    names = [str(a) for a in arms if str(a).strip()]
    if not cache.is_dir() or not names:
        return []
    pattern = leak_pattern(names)
    changed: list[str] = []
    # the report's figure cache (report.figcache.CACHE_DIR) goes whole: its entries are named by a
    # hash of the data each figure was drawn from, arms included before the folder was blinded
    # (one guess per arm would match it), even where the figure itself shows no arm
    figures = cache / "report-figures"
    for path in sorted(figures.rglob("*")) if figures.is_dir() else []:
        if path.is_file():
            path.unlink()
            changed.append(str(path.relative_to(run_dir)))
    for path in sorted(cache.rglob("*")):
        if not path.is_file() or path == cache / RUN_SECRET:  # the folder's key: random hex
            continue
        rel = str(path.relative_to(run_dir))
        leaks = _cache_file_leaks(path, pattern)
        if not leaks:
            continue
        if leaks == ["arm"]:
            df = read_arrow(path) if path.suffix == ".arrow" else pd.read_parquet(path)
            write = atomic_write_arrow if path.suffix == ".arrow" else atomic_write_parquet
            write(path, df.assign(arm=pd.Series([None] * len(df), index=df.index, dtype="string")))
        else:
            path.unlink()
        changed.append(rel)
    return changed


def _cache_file_leaks(path: Path, pattern: re.Pattern) -> list[str]:
    """Where a cache file holds an arm name: its table's columns (``["arm"]``: only the arm
    column), or ``["file"]`` (its bytes); ``[]``: none."""
    import numpy as np

    if path.suffix in (".parquet", ".arrow"):  # the cache's tables, of this version or an earlier one
        from cytopipe.arrowfiles import read_arrow

        try:
            df = read_arrow(path) if path.suffix == ".arrow" else pd.read_parquet(path)
        except Exception:  # unreadable: the cache recomputes it anyway
            return ["file"]
        hits = [str(c) for c in df.columns if pattern.search(str(c))]
        for column in df.columns:
            col = df[column]
            if col.dtype == object or pd.api.types.is_string_dtype(col) or str(col.dtype) == "category":
                if any(pattern.search(v) for v in col.dropna().astype(str).unique()):
                    hits.append(str(column))
        return sorted(set(hits))
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                texts = [str(z[k]) for k in z.files if z[k].dtype.kind in "US"]
        except Exception:
            return ["file"]
        return ["file"] if any(pattern.search(t) for t in texts) else []
    if path.suffix == ".npy":
        try:
            kind = np.load(path, mmap_mode="r", allow_pickle=False).dtype.kind
        except Exception:
            kind = "O"
        if kind not in "OUSV":
            return []  # numbers only
    text = path.read_bytes().decode("latin-1")
    return ["file"] if pattern.search(text) else []


def remove_report(
    run_dir: Path, *, warn: bool = True, blinding: bool = False, report: tuple[Path, Path] | None = None
) -> None:
    """Remove the run folder's reports and the tables they wrote (they describe an earlier state):
    report.html with report_tables/, and every report written elsewhere in the folder with --out
    (:func:`cytopipe.report.blindfiles.report_folders`); any other file of a tables folder is kept,
    with a warning (:func:`cytopipe.report.tables_folder.remove_tables`; ``blinding``: without the
    hashes of the tables as the report wrote them; ``report``: the report the command writes next,
    HTML and tables folder, removed with or without a record of its tables, silently: the report
    written next replaces it and names the files it keeps in its tables folder)."""
    from cytopipe.report.blindfiles import report_folders
    from cytopipe.report.tables_folder import remove_tables

    run_dir = Path(run_dir)
    for html, tables in report_folders(run_dir, report):
        replaced = report is not None and (run_dir / tables).resolve() == Path(report[1]).resolve()
        if html != Path("report.html") and not replaced and (run_dir / html).is_file():
            logger.warning("%s: removed %s and the tables it wrote in %s/: a report of the run folder "
                           "before it was blinded (or unblinded)", run_dir, html.as_posix(), tables.as_posix())  # fmt: skip
        (run_dir / html).unlink(missing_ok=True)
        remove_tables(run_dir / tables, warn=warn and not replaced, blinding=blinding)


def _rewrite_in_place(path: Path, text: str) -> None:
    """``path`` emptied and written again in place (not replaced: a handler appending to it keeps
    writing into the same file)."""
    with open(path, "r+", encoding="utf-8") as fh:
        fh.truncate(0)
        fh.write(text)


#: run.json's rerun record (cytopipe/rerun.py): hashes of the manifest, clinical table, workflow
#: and blinding key, which hold the arms; kept in a blinded folder only when they are keyed
_RERUN, _KEYED_PREFIX = "rerun", "hmac-"


def blinded_info(info: Mapping, codes: Mapping[str, str], record: Mapping) -> dict:
    """run.json content of a blinded run: arm names coded everywhere, with the blinding record.
    A rerun record with plain hashes of the inputs (a folder blinded after its run) is dropped:
    trying arm assignments against them would unblind; the next run records keyed ones."""
    rerun = info.get(_RERUN)
    inputs = rerun.get("inputs") if isinstance(rerun, Mapping) else None
    keyed = isinstance(inputs, Mapping) and str(inputs.get("hash", "")).startswith(_KEYED_PREFIX)
    out = dict(recode_obj({k: v for k, v in info.items() if k != RECORD and (k != _RERUN or keyed)}, codes))
    out[RECORD] = dict(record)
    return out


def resolve_blinding(
    run_dir: str | Path,
    *,
    want: bool,
    arms: Iterable[str],
    key: Mapping[str, str] | str | Path | None = None,
    workflow: Mapping | None = None,
    clinical: object = None,
    secret: bytes | None = None,
    by: str = "",
) -> tuple[dict[str, str], dict] | None:
    """``(codes, record)`` when what a command writes into ``run_dir`` must be blinded: the folder
    is blinded already (its record's codes, matched to the arms of the data and the run's inputs;
    a ``key`` must agree with them), or ``want`` blinds it now (codes from ``key``, else from a
    permutation seeded by ``secret``). ``None``: write unblinded."""
    info: dict = {}
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    record = run_record(info)
    if workflow is None and isinstance(info.get("workflow"), Mapping):
        workflow = info["workflow"]
    all_arms = list(dict.fromkeys([str(a) for a in arms if isinstance(a, str) and a.strip()]
                                  + source_arms(workflow, clinical)))  # fmt: skip
    if record is not None:
        codes = codes_of_record(record, run_dir, workflow, clinical, all_arms, key=key)
        if key is not None:
            given = arm_codes(list(codes), key)
            if given != codes:
                raise ReportError(
                    "this run folder is blinded with other codes than the blinding key gives; use the key "
                    "it was blinded with (or `cytopipe unblind` it first)",
                    file=run_dir,
                )
        return codes, rekeyed(record, codes, run_dir)  # a lost secret or an older record: keyed anew
    if not want:
        return None
    from cytopipe.report.armcheck import refuse_number_arms

    refuse_number_arms(all_arms, "Nothing was blinded.")  # the commands refuse them before their work
    codes = arm_codes(all_arms, key, secret=secret)
    return codes, new_record(codes, by or "blinded", run_dir, previous=info.get(RECORD))
