"""One order of the arms in the statistics table, the same in every run and after unblinding.

The families compute their rows arm by arm in different orders (dose order for the Mann-Whitney
and trend tests, the model's order for the mixed model), and a blinded folder lists them in code
order instead (:func:`cytopipe.report.blinding.hide_arm_order`: dose order would tell each code's
dose). :func:`in_arm_order` puts any such table in one order that depends only on the rows and the
arms, so an unblinded run writes it and ``cytopipe unblind`` gets it back from a folder in code
order:

* the rows of one test (the same :data:`TEST_KEYS`; an arm as ``subgroup`` counts as blank) that
  name arms in ``comparison``, ``arm`` or ``subgroup`` are ordered by those arms, in the places
  those rows held; every other row keeps its place;
* a list of two or more arms inside a text (``placebo=3, IL-2 0.5 MIU=3`` or ``['placebo', ...]``)
  is in arm order, except the two arms of the row's comparison, which follow the comparison.

The arm order (:func:`arm_sort_key`): by dose (``arm_doses``, else the dose read from the arm's
name, the reference arm 0), arms without a known dose last, ties by name; the pooled ``all active
arms`` after every arm.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from cytopipe.stats.settings import parse_dose

#: the columns that say which test a statistics row belongs to (its arms aside)
TEST_KEYS = ("family", "population", "parent", "measure", "scale", "visit", "window", "endpoint", "subgroup")
#: the label of the pooled comparison of the response-rate families (cytopipe/stats/rate_tests.py)
POOLED = "all active arms"


def arm_sort_key(reference: str, doses: Mapping[str, float] | None = None) -> Callable[[str], tuple]:
    """The sort key of an arm name (see the module docstring)."""

    def key(arm: str) -> tuple:
        if arm == POOLED:
            return (1, math.inf, arm)
        if doses is not None and arm in doses:
            dose: float | None = float(doses[arm])
        elif arm == reference:
            dose = 0.0
        else:
            dose = None if doses is not None else parse_dose(arm)
        return (0, math.inf if dose is None else dose, arm)

    return key


def _names_pattern(names: Iterable[str]) -> re.Pattern:
    body = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True)) or "(?!)"
    return re.compile(rf"(?<![A-Za-z0-9])(?:{body})(?![A-Za-z0-9])")


def _list_pattern(names: Iterable[str]) -> re.Pattern:
    """Two or more arms in a row: ``a=2, b=3`` / ``'a', 'b'`` / ``"a", "b"``."""
    body = "|".join(re.escape(n) for n in sorted(set(names), key=len, reverse=True)) or "(?!)"
    item = rf"(?:'(?:{body})'|\"(?:{body})\"|(?:{body})(?![A-Za-z0-9])(?:=[^,;\]\)\"']*)?)"
    return re.compile(rf"(?<![A-Za-z0-9]){item}(?:, {item})+")


def order_arm_rows(
    table: pd.DataFrame, names: Sequence[str], key: Callable[[tuple[str, ...]], object]
) -> pd.DataFrame:
    """``table`` with the rows of each test that name arms (any of ``names``, or the pooled label)
    sorted by ``key(arms named, in order of appearance)``, in the places those rows held."""
    named = [c for c in ("comparison", "arm", "subgroup") if c in table.columns]
    if table.empty or not named or not names:
        return table
    find = _names_pattern([*names, POOLED])
    text = table[named].astype(object).where(table[named].notna(), "").astype(str).agg(" | ".join, axis=1)
    found = [tuple(find.findall(t)) for t in text]
    keys = [c for c in TEST_KEYS if c in table.columns]
    frame = table[keys].astype(object).where(table[keys].notna(), "").astype(str)
    if "subgroup" in frame.columns:  # a per-arm subgroup (logistic_terms): the arms of one test
        arms = set(names)
        frame["subgroup"] = frame["subgroup"].map(lambda v: "" if v in arms else v)
    group = frame.agg("\x1f".join, axis=1).to_numpy() if keys else np.zeros(len(table), dtype=object)
    places: dict[str, list[int]] = {}
    for i, (g, f) in enumerate(zip(group, found)):
        if f:
            places.setdefault(g, []).append(i)
    order = np.arange(len(table))
    for at in places.values():
        if len(at) > 1:
            order[at] = sorted(at, key=lambda i: (key(found[i]), i))
    return table.iloc[order].reset_index(drop=True)


def order_arm_lists(
    table: pd.DataFrame, names: Sequence[str], key: Callable[[str], object], follow_comparison: bool
) -> pd.DataFrame:
    """``table`` with every list of two or more arms inside a text sorted by ``key(arm)``; with
    ``follow_comparison``, a list of exactly the two arms of the row's comparison follows it."""
    if table.empty or not names:
        return table
    listed = _list_pattern(names)
    find = _names_pattern(names)
    pair: list[tuple[str, ...]] = [()] * len(table)
    if follow_comparison and "comparison" in table.columns:
        pair = [
            tuple(find.findall(c)) if isinstance(c, str) and " vs " in c else () for c in table["comparison"]
        ]
    out = table.copy()
    for column in out.columns:
        col = out[column]
        if column == "arm" or not (col.dtype == object or pd.api.types.is_string_dtype(col)):
            continue
        values = col.to_numpy(dtype=object)
        new = values.copy()
        changed = False
        for i, v in enumerate(values):
            if not isinstance(v, str) or listed.search(v) is None:
                continue
            order = {a: n for n, a in enumerate(pair[i])} if len(pair[i]) == 2 else None

            def by_key(m: re.Match, order=order) -> str:
                items = m.group(0).split(", ")
                arms = [find.search(x).group(0) for x in items]
                if order is not None and sorted(arms) == sorted(order):
                    rank = [order[a] for a in arms]
                else:
                    rank = [key(a) for a in arms]
                return ", ".join(x for _, x in sorted(zip(rank, items), key=lambda t: t[0]))

            new[i] = listed.sub(by_key, v)
            changed = changed or new[i] != v
        if changed:
            out[column] = pd.array(new, dtype=col.dtype)
    return out


def in_arm_order(
    table: pd.DataFrame | None, arms: Sequence[str], reference: str, doses: Mapping[str, float] | None = None
) -> pd.DataFrame | None:
    """A statistics table in the one arm order of the module docstring (rows and lists in texts)."""
    if table is None or table.empty:
        return table
    names = [str(a) for a in dict.fromkeys(arms) if isinstance(a, str) and a.strip()]
    if not names:
        return table
    arm_key = arm_sort_key(reference, doses)
    out = order_arm_lists(table, names, arm_key, follow_comparison=True)
    return order_arm_rows(out, names, lambda found: tuple(arm_key(a) for a in found))
