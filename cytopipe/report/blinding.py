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
import random
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from cytopipe.errors import ReportError


def arm_codes(
    arms: Iterable[str],
    key: Mapping[str, str] | str | Path | None = None,
    secret: bytes | None = None,
) -> dict[str, str]:
    """``{arm: code}`` for every arm.

    ``key``: a mapping, or a CSV (columns ``arm,code``) / JSON (``{"arm": "code"}``) file. Every
    arm must have a code, codes must be distinct, and no code may contain an arm name.
    Without a key, ``Arm A``, ``Arm B``, ... are assigned by a permutation seeded with SHA-256 of
    ``secret`` (deterministic), or drawn from system entropy when there is no secret.
    """
    arms = sorted({str(a) for a in arms if a is not None and not pd.isna(a) and str(a) != ""})
    if key is None:
        letters = [_letter(i) for i in range(len(arms))]
        if secret:
            seed = int.from_bytes(hashlib.sha256(b"cytopipe-blinding\0" + secret).digest()[:8], "big")
            random.Random(seed).shuffle(letters)
        else:
            random.SystemRandom().shuffle(letters)
        return {arm: f"Arm {code}" for arm, code in zip(arms, letters)}
    mapping = _read_key(key) if not isinstance(key, Mapping) else {str(k): str(v) for k, v in key.items()}
    missing = [a for a in arms if a not in mapping]
    if missing:
        raise ReportError(f"the blinding key has no code for arm(s) {missing}; add them", key="blind_key")
    codes = {a: mapping[a] for a in arms}
    if len(set(codes.values())) != len(codes):
        raise ReportError(
            "the blinding key gives two arms the same code; codes must be distinct", key="blind_key"
        )
    for code in codes.values():
        for name in arms:
            if name.lower() in code.lower():
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
            out[column] = col.map(lambda v: codes.get(str(v), v) if isinstance(v, str) else v)
            continue
        if col.dtype == object or pd.api.types.is_string_dtype(col):
            out[column] = col.map(lambda v: blind_text(v, codes, pattern) if isinstance(v, str) else v)
    return out


def blind_text(text: str, codes: Mapping[str, str], pattern: re.Pattern | None = None) -> str:
    """``text`` with every arm name replaced by its code (case-insensitive)."""
    if not codes:
        return text
    pattern = pattern or _pattern(codes)
    lower = {k.lower(): v for k, v in codes.items()}
    return pattern.sub(lambda m: lower[m.group(0).lower()], text)


def _pattern(codes: Mapping[str, str]) -> re.Pattern:
    names = sorted(codes, key=len, reverse=True)
    return re.compile("|".join(re.escape(n) for n in names) or "(?!)", re.IGNORECASE)


def find_leaks(texts: Mapping[str, str], arms: Iterable[str]) -> list[str]:
    """``["where: arm name", ...]`` for every arm name found in any of ``texts`` (case-insensitive).

    Arm names of one or two characters are matched as whole words only (they would otherwise
    match everywhere)."""
    checks = []
    for arm in {str(a) for a in arms if a}:
        if len(arm) <= 2:
            checks.append(
                (arm, re.compile(rf"(?<![A-Za-z0-9]){re.escape(arm)}(?![A-Za-z0-9])", re.IGNORECASE))
            )
        else:
            checks.append((arm, re.compile(re.escape(arm), re.IGNORECASE)))
    leaks = []
    for where, text in texts.items():
        for arm, rx in checks:
            if rx.search(text):
                leaks.append(f"{where}: {arm!r}")
    return leaks
