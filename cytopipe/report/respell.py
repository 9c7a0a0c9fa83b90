"""Unblinding's spelling of the study's values inside a text: ``P003_PLACEBO`` as written, not
``P003_placebo``.

Blinding codes every case of an arm's name alike (a code written in the text's case would tell
whether the arm's name is written so, and with it which arm the code stands for), so a value of the
study's inputs that holds an arm name in another case (a sample ``P003_PLACEBO`` of the arm
``placebo``) decodes with the arm's spelling. A table's cell holding the whole value is given its
spelling back by its column (:func:`cytopipe.report.unblind.case_spellings`); here the same values
inside a text (a path in run.json, a message in run.log or in a table's cell) are. A value that
decodes to an arm's name itself (a batch ``Placebo``) is left as the arm in a text: there it cannot
be told from the arm.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping


def text_spellings(cases: Mapping[str, Mapping[str, str]], arms: Iterable[str]) -> dict[str, str]:
    """``{value as decoded: value as written}`` of ``cases`` (by column) for texts: every column's,
    but a value written two ways (in two columns) and a value that is an arm's name."""
    names = {str(a) for a in arms}
    written: dict[str, set[str]] = {}
    for spelt in cases.values():
        for back, text in spelt.items():
            written.setdefault(back, set()).add(text)
    return {
        back: next(iter(texts)) for back, texts in written.items() if len(texts) == 1 and back not in names
    }


def respeller(spellings: Mapping[str, str]) -> Callable[[str], str]:
    """A function giving a decoded text the spellings of ``spellings`` (:func:`text_spellings`)
    where one of those values stands in it whole (not inside a longer word: ``P003_placebo`` is
    not inside ``P003_placebo2``), longest first; the identity when there is none."""
    if not spellings:
        return lambda text: text
    body = "|".join(re.escape(v) for v in sorted(spellings, key=len, reverse=True))
    pattern = re.compile(rf"(?<![A-Za-z0-9])(?:{body})(?![A-Za-z0-9])")
    return lambda text: pattern.sub(lambda m: spellings[m.group(0)], text)


def respell_obj(obj: object, respell: Callable[[str], str]) -> object:
    """A JSON-like value with every string and key given through ``respell``."""
    if isinstance(obj, str):
        return respell(obj)
    if isinstance(obj, Mapping):
        return {(respell(k) if isinstance(k, str) else k): respell_obj(v, respell) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [respell_obj(v, respell) for v in obj]
    return obj
