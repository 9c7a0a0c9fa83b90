"""``cytopipe unblind RUN_DIR --key FILE``: the deliberate end of a run folder's blinding.

A blinded run folder (``cytopipe report --blinded``, ``blinded: true`` in the workflow) holds arm
codes instead of arm names in every table, catalog, run.json and report, and every command that
writes into it keeps it so. Unblinding needs material from outside the folder: the blinding key
(CSV ``arm,code`` or JSON ``{arm: code}``) or the study manifest (its ``arm`` column; each arm is
matched to its code by the keyed hash kept in run.json). It rewrites the folder's tables with the
arm names, writes an unblinded report when the folder had one, and logs the act (time, user, the
key file's name) in run.json's ``blinding.log``, which later blinding keeps. The log holds no hash
of the key: a folder blinded again would show it, and the few possible keys could be tried
against it.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from cytopipe.errors import ReportError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a blinded run folder")
    parser.add_argument(
        "--key",
        metavar="FILE",
        required=True,
        help="the blinding key (CSV arm,code or JSON {arm: code}) or the study manifest (its arm column)",
    )
    parser.add_argument(
        "--no-report",
        action="store_true",
        help="do not write the unblinded report (the blinded report.html and its report_tables/ are "
        "removed all the same; write one later with `cytopipe report RUN_DIR`)",
    )


def run(args: argparse.Namespace) -> int:
    done = unblind_run(args.run_dir, args.key, report=not args.no_report)
    print(f"unblinded {done['run_dir']}: {len(done['codes'])} arms, {len(done['files'])} files rewritten; "
          "logged in run.json (blinding.log)")  # fmt: skip
    return 0


def _key_codes(record: dict[str, Any], key: Path, run_dir: Path, info: dict[str, Any]) -> dict[str, str]:
    from cytopipe.report.blinding import _read_key, codes_of_record

    if not key.is_file():
        raise ReportError("key file not found", file=key)
    if key.suffix.lower() == ".json":
        mapping = _read_key(key)
    else:
        try:
            head = pd.read_csv(key, dtype=str, keep_default_na=False, nrows=0)
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ReportError(f"cannot read the key ({exc})", file=key) from None
        if "code" in head.columns:
            mapping = _read_key(key)
        elif "arm" in head.columns:  # the manifest: arms matched to codes by the record's hashes
            manifest = pd.read_csv(key, dtype=str, keep_default_na=False)
            return codes_of_record(record, run_dir, clinical=manifest)
        else:
            raise ReportError(
                "the key needs columns arm,code (a blinding key) or arm (the manifest)", file=key
            )
    # the folder's codes: matched through the record (or, its secret lost, read off its tables
    # joined with the run's manifest); the key must give exactly these
    try:
        matched = codes_of_record(record, run_dir, info.get("workflow"), arms=mapping)
    except ReportError:
        matched = {}
    wrong = sorted(a for a in mapping if a in matched and matched[a] != mapping[a])
    wrong += sorted(a for a in mapping if a not in matched)
    missing = sorted(set(record.get("codes") or {}) - set(matched.values()))
    if wrong or missing:
        raise ReportError(
            "this key does not match the codes the run folder was blinded with "
            f"({len(wrong)} arm(s) with another code, {len(missing)} code(s) without an arm); nothing was changed",
            file=key,
        )
    return matched


def unblind_run(run_dir: str | Path, key: str | Path, report: bool = True) -> dict[str, Any]:
    """Unblind a run folder with its key (see the module docstring); returns what was done."""
    from cytopipe.report.blinding import RECORD, _now, _user, recode_folder, recode_obj, run_record
    from cytopipe.report.blindrecord import source_tables
    from cytopipe.store import read_run_info

    run_dir, key = Path(run_dir), Path(key)
    info = read_run_info(run_dir)
    record = run_record(info)
    if record is None:
        raise ReportError("this run folder is not blinded; there is nothing to unblind", file=run_dir)
    codes = _key_codes(record, key, run_dir, info)
    had_report = (run_dir / "report.html").is_file()
    entry = {
        "action": "unblinded",
        "at": _now(),
        "by": "cytopipe unblind --key",
        "user": _user(),
        "key": key.name,
    }
    new_info = recode_obj({k: v for k, v in info.items() if k != RECORD}, codes, unblind=True)
    # values spelt with an arm name in another case (a batch ``Placebo``): as the inputs spell them
    manifest = pd.read_csv(key, dtype=str, keep_default_na=False) if _is_manifest(key) else None
    cases = case_spellings(source_tables(new_info.get("workflow"), manifest), codes)
    new_info = respell_info(new_info, cases, codes)
    new_info[RECORD] = {"blinded": False, "log": [*record.get("log", []), entry]}
    # the report written below names the files it keeps in report_tables/ (named once)
    written = (run_dir / "report.html", run_dir / "report_tables") if report and had_report else None
    files = recode_folder(run_dir, codes, new_info, unblind=True, report=written, cases=cases)
    if report and had_report:
        from cytopipe.report import write_report

        write_report(run_dir)
    return {"run_dir": str(run_dir), "codes": codes, "files": files, "log": entry}


def _is_manifest(key: Path) -> bool:
    """The key given is the study manifest (a CSV with an ``arm`` column and no ``code`` column)."""
    if key.suffix.lower() == ".json":
        return False
    try:
        columns = pd.read_csv(key, dtype=str, keep_default_na=False, nrows=0).columns
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return "arm" in columns and "code" not in columns


def case_spellings(tables: Iterable[pd.DataFrame], codes: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``{column: {value as decoded: value as written}}`` for the values of the study's inputs
    (manifest, clinical table) that hold an arm name in another case than the arm's (the batch
    ``Placebo`` of the arm ``placebo``). Blinding codes every case of a name alike: a code written
    in the case of the text would tell, beside the text's own case, whether the arm's name is
    written so, and with it which arm the code stands for. Decoded, they hold the arm's spelling;
    these give them back as written. A value decoded like another value of its column is left
    as decoded (ambiguous)."""
    from cytopipe.report.blinding import blind_text, recode_obj

    spelt: dict[str, dict[str, set[str]]] = {}
    values: dict[str, set[str]] = {}
    for table in tables:
        for column in table.columns:
            if column == "arm":
                continue
            texts = {str(v) for v in table[column].dropna() if str(v)}
            values.setdefault(str(column), set()).update(texts)
            for text in texts:
                back = str(recode_obj(blind_text(text, codes), codes, unblind=True))
                if back != text:
                    spelt.setdefault(str(column), {}).setdefault(back, set()).add(text)
    return {
        column: {
            back: next(iter(texts))
            for back, texts in found.items()
            if len(texts) == 1 and back not in values[column]
        }
        for column, found in spelt.items()
    }


def respell_info(
    info: dict[str, Any], cases: Mapping[str, Mapping[str, str]], arms: Iterable[str]
) -> dict[str, Any]:
    """An unblinded run.json with the values :func:`case_spellings` gives back where run.json
    names them by their column: the control sets (per batch or site) of ``study_state`` and of the
    compensation step, and the files named after them in the rerun record; and where its texts
    hold them (a file's path, a message: :mod:`cytopipe.report.respell`; not a value that is an arm's
    name, ``arms``, in another case, which a text cannot tell from the arm)."""
    from cytopipe.report.respell import respell_obj, respeller, text_spellings

    info = dict(respell_obj(info, respeller(text_spellings(cases, arms))))  # type: ignore[arg-type]
    sets = (info.get("study_state") or {}).get("spillover_sets")
    if not cases or not isinstance(sets, dict) or not isinstance(sets.get("sets"), dict):
        return info
    column = str(sets.get("column"))
    spelt = cases.get(column) or {}
    if not spelt:
        return info
    sets["sets"] = {spelt.get(k, k): v for k, v in sets["sets"].items()}
    for step in info.get("steps") or []:
        control = step.get("control_sets") if isinstance(step, dict) else None
        if isinstance(control, dict) and isinstance(control.get(column), list):
            control[column] = [spelt.get(v, v) if isinstance(v, str) else v for v in control[column]]
    outputs = (info.get("rerun") or {}).get("outputs")
    if isinstance(outputs, dict):
        files = {f"study/spillover_{column}_{v}.csv".casefold(): f"study/spillover_{column}_{v}.csv"
                 for v in sets["sets"]}  # fmt: skip
        info["rerun"]["outputs"] = {files.get(k.casefold(), k): v for k, v in outputs.items()}
    return info
