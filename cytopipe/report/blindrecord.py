"""run.json's blinding record: which code stands for which arm, without the folder showing it.

For each code the record keeps HMAC-SHA256 of its arm name, keyed with the run folder's secret
(``.cache/run.secret``, :func:`cytopipe.store.run_secret`, never served or copied). A plain or
salted hash would not do: the study's arm list is known to every reader, so one guess per arm and
code would find each code's arm. Commands match the arms of the run's manifest (and clinical
table), which live outside the folder, to their codes through the record.

When the secret is lost (a copied folder, e.g. the web's new version of a run, leaves ``.cache``
behind) the codes are recovered from the folder's own coded ``samples`` table joined with the
run's manifest or clinical table (patient or sample by patient or sample), and the next run
records them keyed with the folder's new secret. A record of an older version (salted SHA-256) is
still read, and replaced by a keyed one at the next run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pandas as pd

from cytopipe.errors import ReportError

#: key of the blinding record in run.json
RECORD = "blinding"
#: how a record's codes are hashed (its ``codes_hash``)
KEYED = "hmac-sha256 (key kept in .cache/run.secret)"


def arm_mac(key: bytes, arm: str) -> str:
    """The keyed hash of an arm name (case and surrounding spaces do not matter)."""
    msg = f"cytopipe-arm\0{str(arm).strip().lower()}".encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def _salted(salt: str, arm: str) -> str:
    """The hash of records written before they were keyed (read, never written)."""
    return hashlib.sha256(f"cytopipe-arm\0{salt}\0{str(arm).strip().lower()}".encode()).hexdigest()


def keyed_codes(codes: Mapping[str, str], run_dir: str | Path) -> dict:
    """The record's ``codes_hash`` and ``codes`` (``{code: keyed hash of its arm}``); the folder's
    secret is made when it has none."""
    from cytopipe.store import run_secret

    return {"codes_hash": KEYED, "codes": keyed_codes_with(run_secret(run_dir, create=True), codes)}


def is_current(record: Mapping, run_dir: str | Path, codes: Mapping[str, str]) -> bool:
    """Whether ``record`` holds ``codes`` keyed with the folder's present secret."""
    from cytopipe.store import run_secret

    key = run_secret(run_dir)
    if key is None or record.get("codes_hash") != KEYED or "salt" in record:
        return False
    return dict(record.get("codes") or {}) == keyed_codes_with(key, codes)


def keyed_codes_with(key: bytes, codes: Mapping[str, str]) -> dict[str, str]:
    """``{code: keyed hash of its arm}``."""
    return {code: arm_mac(key, arm) for arm, code in sorted(codes.items())}


def rekeyed(record: Mapping, codes: Mapping[str, str], run_dir: str | Path) -> dict:
    """``record`` with its codes keyed with the folder's secret (made when missing); its log kept."""
    if is_current(record, run_dir, codes):
        return dict(record)
    out = {k: v for k, v in record.items() if k not in ("salt", "codes", "codes_hash")}
    return {**out, **keyed_codes(codes, run_dir)}


def record_codes(record: Mapping, arms: Iterable[str], run_dir: str | Path | None) -> dict[str, str]:
    """``{arm: code}`` for those of ``arms`` the record knows (matched by their keyed hash; none
    when the folder has lost its secret)."""
    if "salt" in record:
        salt = str(record.get("salt", ""))

        def digest(arm: str) -> str:
            return _salted(salt, arm)
    else:
        from cytopipe.store import run_secret

        key = run_secret(run_dir) if run_dir is not None else None
        if key is None:
            return {}

        def digest(arm: str) -> str:
            return arm_mac(key, arm)

    by_hash = {h: c for c, h in (record.get("codes") or {}).items()}
    out = {}
    for arm in arms:
        if arm is None or (isinstance(arm, float) and pd.isna(arm)) or not str(arm).strip():
            continue
        code = by_hash.get(digest(str(arm)))
        if code is not None:
            out[str(arm)] = code
    return out


def source_tables(workflow: Mapping | None, clinical: object = None) -> Iterator[pd.DataFrame]:
    """The run's inputs that name the arms (its manifest and clinical table, outside the folder),
    as text tables with their ``arm`` column."""
    sources = [(workflow or {}).get("manifest"), (workflow or {}).get("clinical"), clinical]
    for src in sources:
        try:
            if isinstance(src, pd.DataFrame):
                table = src
            elif src is not None and str(src) and Path(str(src)).is_file():
                table = pd.read_csv(src, dtype=str, keep_default_na=False)
            else:
                continue
        except (OSError, ValueError):
            continue
        if "arm" in table.columns:
            yield table


def source_arms(workflow: Mapping | None, clinical: object = None) -> list[str]:
    """The arm names of the run's inputs (its manifest and clinical table, outside the folder),
    stripped of surrounding spaces as the run reads them (cytopipe/clinical.py, the manifest)."""
    arms: list[str] = []
    for table in source_tables(workflow, clinical):
        arms += [str(a).strip() for a in table["arm"].dropna() if str(a).strip()]
    return list(dict.fromkeys(arms))


def _folder_arms(run_dir: str | Path) -> pd.DataFrame | None:
    """The folder's coded ``samples`` table (else ``population_stats``), or ``None``."""
    for name in ("samples", "population_stats"):
        path = Path(run_dir) / f"{name}.parquet"
        try:
            table = pd.read_parquet(path) if path.is_file() else None
        except Exception:  # unreadable: nothing to recover from
            table = None
        if table is not None and "arm" in table.columns:
            return table
    return None


def recover_codes(
    run_dir: str | Path, tables: Iterable[pd.DataFrame], key: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``{arm: code}`` read off the folder's coded tables joined with the run's inputs (by sample
    when the manifest is among them, else by patient); with the run's blinding ``key``, the key's
    codes when the folder agrees with them. ``{}`` when they do not pair up one to one."""
    folder = _folder_arms(run_dir)
    if folder is None:
        return {}
    by: dict[str, set[tuple[str, str]]] = {"sample_id": set(), "patient_id": set()}
    for table in tables:
        on = next((c for c in by if c in table.columns and c in folder.columns), None)
        if on is None:
            continue
        src = table[[on, "arm"]].astype(str).drop_duplicates()
        got = folder[[on, "arm"]].dropna().astype(str).drop_duplicates()
        joined = src.merge(got, on=on, suffixes=("", "_code"))
        by[on] |= {(a, c) for a, c in zip(joined["arm"], joined["arm_code"]) if a.strip() and c.strip()}
    pairs = by["sample_id"] or by["patient_id"]  # the manifest is what the run's samples were coded by
    codes = dict(pairs)
    if len(codes) != len(pairs) or len(set(codes.values())) != len(codes):
        return {}  # an arm with two codes, or a code with two arms: not the folder's coding
    if key:
        return dict(key) if all(key.get(a) == c for a, c in codes.items()) else {}
    return codes


def _read_key(path: str | Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise ReportError("blinding key file not found", file=path)
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("expected an object {arm: code}")
            return {str(k): str(v) for k, v in data.items()}
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ReportError(f"cannot read the blinding key ({exc})", file=path) from None
    if not {"arm", "code"} <= set(table.columns):
        raise ReportError("the blinding key CSV needs columns 'arm' and 'code'", file=path)
    return dict(zip(table["arm"].str.strip(), table["code"].str.strip()))


def _key_of(key: object, workflow: Mapping | None) -> dict[str, str] | None:
    """The run's blinding key as ``{arm: code}`` (given, or the workflow's), or ``None``."""
    report = (workflow or {}).get("report")
    key = key if key is not None else (report.get("blind_key") if isinstance(report, Mapping) else None)
    if isinstance(key, Mapping):
        return {str(a): str(c) for a, c in key.items()}
    try:
        return _read_key(key) if key is not None and str(key) else None
    except ReportError:  # gone or unreadable: the tables alone
        return None


def codes_of_record(
    record: Mapping,
    run_dir: str | Path,
    workflow: Mapping | None = None,
    clinical: object = None,
    arms: Iterable[str] = (),
    key: object = None,
) -> dict[str, str]:
    """``{arm: code}`` of a blinded run from its input arms (``arms``, and those of the manifest
    and clinical table of ``workflow`` / ``clinical``); :class:`ReportError` when some code's arm
    is not among them (the manifest that names the arms is needed, as it was for the run). A
    folder without its secret: read off its tables and the run's inputs and blinding ``key`` (else
    the workflow's), :func:`recover_codes`."""
    all_arms = list(dict.fromkeys([*map(str, arms), *source_arms(workflow, clinical)]))
    wanted = set(record.get("codes") or {})
    codes = record_codes(record, all_arms, run_dir)
    if set(codes.values()) != wanted:
        recovered = recover_codes(run_dir, source_tables(workflow, clinical), _key_of(key, workflow))
        if wanted <= set(recovered.values()):
            codes = {a: c for a, c in recovered.items() if c in wanted}
    missing = sorted(wanted - set(codes.values()))
    if missing:
        raise ReportError(
            f"this run folder is blinded, and the arms of code(s) {missing} are not in the run's manifest "
            "or clinical table; the manifest the run was made from is needed to keep writing blinded outputs",
            file=run_dir or None,
        )
    return codes


def rekey_folder(run_dir: str | Path, codes: Mapping[str, str]) -> bool:
    """Key run.json's blinding record with the folder's secret when it is not (a lost secret, an
    older record); ``True`` when run.json was rewritten."""
    from cytopipe.store import atomic_write_json

    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    record = info.get(RECORD)
    if not isinstance(record, dict) or not record.get("blinded") or is_current(record, run_dir, codes):
        return False
    atomic_write_json(path, {**info, RECORD: rekeyed(record, codes, run_dir)})
    return True
