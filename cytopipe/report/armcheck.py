"""Arm names and ids that blinding cannot code, refused before a blinded run does any work.

Blinding replaces an arm's name by its code where :func:`cytopipe.report.armnames.leak_pattern`
finds it, and the leak check refuses a text where it still shows. Two kinds of study defeat both:

* arms named by a number (``1`` / ``2``, ``0`` / ``1``, ``10`` / ``20``; any name without a
  letter): digits are in every number of the run's tables, texts and file names (a version
  ``0.1.0`` became ``0.Arm A.0``), and the codes ``Arm 1``, ``Arm 2`` are such names themselves,
  so no text can be coded or checked;
* ids that carry a one-letter arm as a part of their own (a patient ``P01-A`` or ``P01_A``, a file
  ``fcs/P01-A.fcs``, a batch ``B2.A`` in a study of arms ``A`` and ``B``): such a letter joined by a
  hyphen is part of a name to blinding (the channels ``FSC-A``), so the blinded folder would show
  each patient's id beside its arm's code, and so which code is ``A``. Ids joined otherwise were
  coded (``P01_Arm 1``), which a mix of both would still give away.

Longer arm names inside ids (``P01-placebo``) are coded there like anywhere else (``P01-Arm B``)
and come back when unblinding, as do two-letter ones (``P01-HI``), as whole words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import pandas as pd

from cytopipe.errors import ReportError

#: the columns of the manifest and clinical table that hold the study's own ids (shown in the
#: blinded folder's tables beside the arm's code)
ID_COLUMNS = ("patient_id", "sample_id", "file", "batch", "site")

#: what separates the parts of an id (``P01-A``, ``P01_A``, ``B2.A``, ``fcs/P01 A.fcs``)
_SEPARATORS = re.compile(r"[\W_]+")
#: a Windows drive at the start of a file's path (``C:\data\P01.fcs``): not an id, and blinding
#: codes a letter followed by a colon (``Arm 3:\data``), so it shows no arm
_DRIVE = re.compile(r"^[A-Za-z]:(?=[\\/])")


def number_arms(arms: Iterable[str]) -> list[str]:
    """The arm names that hold no letter (``1``, ``0``, ``10``, ``2.5``, ``-``): numbers or
    punctuation, which blinding can neither code nor check for."""
    names = dict.fromkeys(str(a).strip() for a in arms if a is not None and str(a).strip())
    return [a for a in names if not any(ch.isalpha() for ch in a)]


def ids_showing_arms(arms: Iterable[str], tables: Iterable[pd.DataFrame]) -> list[str]:
    """``["column 'id'", ...]``: the ids (:data:`ID_COLUMNS`) of the rows that have an arm, in
    ``tables`` (the manifest, the clinical table), of which a part (between hyphens, underscores,
    dots, slashes, spaces) is a one-letter arm name, in any case (fail-closed: ``P01-a`` beside an
    arm ``A`` tells as much)."""
    letters = {str(a).strip().casefold() for a in arms if a is not None and len(str(a).strip()) == 1}
    if not letters:
        return []
    found: dict[str, None] = {}
    for table in tables:
        if "arm" not in table.columns:
            continue
        armed = table[table["arm"].notna() & (table["arm"].astype(str).str.strip() != "")]
        for column in (c for c in ID_COLUMNS if c in armed.columns):
            for value in armed[column].dropna().astype(str).unique():
                parts = _SEPARATORS.split(_DRIVE.sub("", value) if column == "file" else value)
                if any(part.casefold() in letters for part in parts if part):
                    found[f"{column} {value!r}"] = None
    return list(found)


def refuse_number_arms(arms: Iterable[str], todo: str) -> None:
    """Refuse (:class:`ReportError`) to blind a study whose arms are named by numbers
    (:func:`number_arms`), naming those arms."""
    numbers = number_arms(arms)
    if numbers:
        raise ReportError(
            f"the arm(s) {', '.join(repr(a) for a in numbers)} are named by numbers (no letter in the "
            "name): blinding can neither replace them by codes nor check that none shows, as digits "
            "are in every number of the run's tables, texts and file names (and in the codes 'Arm 1', "
            "'Arm 2'). Name the arms with words in the manifest and the clinical table (e.g. 'PBO', "
            f"'TRT', 'dose 10 mg'). {todo}",
            key="blinded",
        )


def refuse_uncodable(
    arms: Iterable[str], names: Iterable[str], inputs: Mapping[str, object], todo: str
) -> None:
    """Refuse (:class:`ReportError`, exit 2) to blind a study that blinding cannot code: arms named
    by numbers (:func:`refuse_number_arms`), ids of the run's ``inputs`` (``{"manifest": ...,
    "clinical": ...}``: paths or tables) that carry a one-letter arm (:func:`ids_showing_arms`:
    named, up to three; not the arm), population or marker ``names`` that show an arm
    (:func:`refuse_shared_words`). ``todo``: what happens now."""
    from cytopipe.report.blindrecord import source_tables

    arms = [str(a) for a in arms if a is not None and str(a).strip()]
    refuse_number_arms(arms, todo)
    found = ids_showing_arms(arms, source_tables(inputs))
    if found:
        more = f" and {len(found) - 3} more" if len(found) > 3 else ""
        raise ReportError(
            f"the study's ids carry a one-letter arm name as a part of them ({', '.join(found[:3])}{more}): "
            "blinding cannot code a letter that is a part of a name (it leaves one joined by a hyphen as "
            "it is, like the channel 'FSC-A'), so the blinded folder would show each id beside its arm's "
            "code and tell which code is which arm. Give the "
            "patients, samples, files and batches ids that do not carry the arm, or give the arms "
            f"longer names (e.g. 'TRT', 'PBO'), in the manifest and the clinical table. {todo}",
            key="blinded",
        )
    refuse_shared_words(arms, names, todo)


def refuse_shared_words(arms: Iterable[str], names: Iterable[str], todo: str) -> None:
    """Refuse (:class:`ReportError`) to blind a run whose populations or markers (``names``) show an
    arm name (:func:`cytopipe.report.armnames.shared_words`): coded there too, they would tell
    which code stands for that arm. Named: those names (not the arm; the user knows the arms).
    ``todo``: what happens now."""
    from cytopipe.report.armnames import shared_words

    found = shared_words(arms, names)
    if found:
        raise ReportError(
            "an arm's name is also a word of the run's population or marker names "
            f"({', '.join(repr(n) for n in found[:6])}): blinding would code it there too, which "
            "would tell anyone who knows the panel which code stands for that arm. Give the arm a "
            f"longer name in the manifest and the clinical table (e.g. 'TRT', 'PBO'). {todo}",
            key="blinded",
        )
