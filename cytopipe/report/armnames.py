"""How an arm name shows in a text: what blinding replaces by its code and the leak check finds.

One definition (:func:`leak_pattern`) for both, so that a blinded text holds no arm name the check
would find, and the check refuses no text blinding left as it was for a reason (an ordinary word).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping


def leak_pattern(arms: Iterable[str]) -> re.Pattern:
    """Any arm name, as blinding replaces it and the leak check finds it: a name of three or more
    characters anywhere, case-insensitively (``Placebo`` is ``placebo``); one of two characters as a
    whole word, case-insensitively (``HI`` not inside ``CHI``); one of ONE character as a word of
    its own (:func:`_letter_pattern`): in its own case, not joined by a hyphen or an apostrophe to
    a letter or digit, and not the English article."""
    parts = []
    for arm in sorted(set(arms), key=len, reverse=True):
        word = re.escape(arm)
        if len(arm) == 1:
            parts.append(_letter_pattern(arm))
        else:
            parts.append(rf"(?<![A-Za-z0-9]){word}(?![A-Za-z0-9])" if len(arm) == 2 else word)
    return re.compile("|".join(parts) or "(?!)", re.IGNORECASE)


#: what follows the article: a word (``A`` starting a sentence: in lower case), not one that
#: follows a name (``A vs B``, ``A and B``, ``A or B``, ``A is ...``, ``A has ...``), which the
#: article never precedes
_NOT_AFTER_ARTICLE = r" (?!(?:vs|and|or|is|are|was|were|has|had)\b)"
#: not the start of a text (or line) nor of a sentence (nor of one after a colon: ``Problem: A gate ...``)
_MID_SENTENCE = r"(?<=[^\n])(?<![.!?:]\s)(?<![.!?:][)\"'\u2019\u201d]\s)"


def _letter_pattern(arm: str) -> str:
    """An arm name of one character as a word (for :func:`leak_pattern`).

    A single letter in another case is another word (the article ``a`` of an arm ``A``, the
    formula's ``x`` or the column ``p`` of arms ``X`` and ``P``); one joined by a hyphen or an
    apostrophe is part of a name (the channels ``FSC-A``, ``BV421-A``, the Westgard rule ``R-4s``,
    ``QC'd``); and ``A`` starting a sentence before a word in lower case (``A batch is ...``, a study
    ``A study of ...``), like ``a`` before a word anywhere (``a flag``, ``a CSV file``), is the
    English article. Coding those would
    garble the run's channels and texts, and tie the code to its arm for anyone who reads
    ``Arm 2 batch is ...``; refusing them would refuse every blinded report of such a study. The
    name as data still shows as itself: a cell ``A``, ``A vs B``, ``A=2, B=3``, ``['A', 'B']``,
    ``arm A``, ``A has 2 patients``, ``arm_A.csv``."""
    word = re.escape(arm)
    if arm == "A":
        word = rf"(?:A(?!{_NOT_AFTER_ARTICLE}[a-z])|{_MID_SENTENCE}A)"
    elif arm == "a":
        word = rf"a(?!{_NOT_AFTER_ARTICLE}[A-Za-z])"
    return rf"(?-i:(?<![A-Za-z0-9])(?<![A-Za-z0-9][-'\u2019]){word}(?![A-Za-z0-9])(?![-'\u2019][A-Za-z0-9]))"


def any_case(arms: Iterable[str]) -> re.Pattern:
    """:func:`leak_pattern` of the arms in every case: a code must not show an arm's letter in any
    case (no ``Arm A`` for an arm ``a``)."""
    return leak_pattern({v for a in arms for v in (a, a.lower(), a.upper())})


def find_leaks(texts: Mapping[str, str], arms: Iterable[str]) -> list[str]:
    """``["where: arm name", ...]`` for every arm name found in any of ``texts``, as
    :func:`leak_pattern` finds a name (the way blinding replaces it)."""
    checks = [(arm, leak_pattern([arm])) for arm in sorted({str(a) for a in arms if a})]
    leaks = []
    for where, text in texts.items():
        for arm, rx in checks:
            if rx.search(text):
                leaks.append(f"{where}: {arm!r}")
    return leaks


def shared_words(arms: Iterable[str], names: Iterable[str]) -> list[str]:
    """The run's own names (``names``: its populations and markers) in which an arm name shows
    as :func:`leak_pattern` finds it: an arm ``T`` in ``T cells`` and ``CD4 T``, ``DR`` in
    ``HLA-DR``. Blinding would code the name there too (``Arm 2 cells``), and so tell anyone who
    knows the panel which code stands for that arm: a run folder with such names is not blinded
    (:func:`cytopipe.report.armcheck.refuse_shared_words`)."""
    pattern = leak_pattern({str(a) for a in arms if str(a).strip()})
    return [n for n in dict.fromkeys(str(n) for n in names) if pattern.search(n)]
