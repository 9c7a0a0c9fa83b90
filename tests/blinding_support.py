"""The attack a blinded reader can make on what a blinded run shows: every column of the manifest
(and clinical table) is known to them but the arm, so they write the file once per possible arm
assignment and look for its SHA-256 (or a prefix of it) in everything they can read."""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import re
from collections.abc import Iterable
from pathlib import Path

PREFIX = 12  # hex characters of a digest that count as a match (a shortened hash is still a hash)


def _rewrite(rows: list[list[str]], arm_col: int, by_col: int, assignment: dict[str, str]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(rows[0])
    for row in rows[1:]:
        row = list(row)
        if row[by_col] in assignment:
            row[arm_col] = assignment[row[by_col]]
        writer.writerow(row)
    return buf.getvalue().encode("utf-8")


def candidate_digests(table: Path, arms: Iterable[str], by: str = "patient_id") -> dict[str, bool]:
    """{sha256 hex: is the true file} for every assignment of ``arms`` to the values of ``by``
    (patients) of a CSV table with an ``arm`` column, written the way the file was."""
    text = table.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    arm_col, by_col = rows[0].index("arm"), rows[0].index(by)
    keys = sorted({r[by_col] for r in rows[1:] if r[by_col]})
    truth = {r[by_col]: r[arm_col] for r in rows[1:] if r[by_col]}
    assert _rewrite(rows, arm_col, by_col, truth) == text.encode("utf-8"), (
        "the table is not rewritten exactly"
    )
    out = {}
    for choice in itertools.product(sorted(set(arms)), repeat=len(keys)):
        assignment = dict(zip(keys, choice))
        out[hashlib.sha256(_rewrite(rows, arm_col, by_col, assignment)).hexdigest()] = assignment == truth
    assert True in out.values()
    return out


def key_digests(key: Path) -> dict[str, bool]:
    """{sha256 hex: is the true file} for every permutation of the codes of a blinding key CSV
    (columns arm,code, as written by hand)."""
    text = key.read_text(encoding="utf-8")
    rows = list(csv.reader(io.StringIO(text)))
    arms, codes = [r[0] for r in rows[1:]], [r[1] for r in rows[1:]]
    out = {}
    for perm in itertools.permutations(codes):
        body = "\n".join(",".join(r) for r in [rows[0], *zip(arms, perm)]) + "\n"
        out[hashlib.sha256(body.encode()).hexdigest()] = list(perm) == codes
    assert True in out.values(), "the key is not rewritten exactly"
    return out


def matches(digests: dict[str, bool], shown: str) -> list[str]:
    """The candidate digests of which a prefix appears in ``shown`` (what a reader can see)."""
    hexes = set(re.findall(rf"[0-9a-f]{{{PREFIX},}}", shown.lower()))
    prefixes = {h[i : i + PREFIX] for h in hexes for i in range(len(h) - PREFIX + 1)}
    return [d for d in digests if d[:PREFIX] in prefixes]


def visible_text(run: Path) -> str:
    """Everything a reader of the run folder gets (the files the web serves, the report and its
    tables, the log), as text; the private cache ``.cache/`` aside."""
    import duckdb
    import pandas as pd

    parts = []
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        if not path.is_file() or rel.parts[0] == ".cache":
            continue
        if path.suffix == ".parquet":
            parts.append(pd.read_parquet(path).to_csv())
        elif path.suffix == ".duckdb":
            con = duckdb.connect(str(path), read_only=True)
            try:
                for (name,) in con.execute("select table_name from information_schema.tables").fetchall():
                    parts.append(con.execute(f'select * from "{name}"').df().to_csv())
            finally:
                con.close()
        else:
            parts.append(path.read_bytes().decode("latin-1"))
    parts.append(json.dumps(json.loads((run / "run.json").read_text())))
    return "\n".join(parts)


def arm_name_digests(arms: Iterable[str], shown: str) -> dict[str, str]:
    """{sha256 hex: arm} of every unkeyed way to hash an arm name a reader could try: the name as
    it is or lower-cased, bare or as cytopipe's record hashed it, with each 32-hex value the reader
    sees (e.g. a salt stored next to the hashes) as the salt. The study's arm list is public."""
    salts = set(re.findall(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])", shown.lower())) | {""}
    out = {}
    for arm in arms:
        for name in {arm, arm.strip().lower()}:
            out[hashlib.sha256(name.encode()).hexdigest()] = arm
            for salt in salts:
                text = f"cytopipe-arm\0{salt}\0{name}" if salt else f"cytopipe-arm\0{name}"
                out[hashlib.sha256(text.encode()).hexdigest()] = arm
    return out


def arm_matches(arms: Iterable[str], shown: str) -> dict[str, str]:
    """{digest: arm} of the candidate hashes of arm names of which a prefix appears in ``shown``."""
    digests = arm_name_digests(arms, shown)
    found = matches(dict.fromkeys(digests, False), shown)
    return {d: digests[d] for d in found}
