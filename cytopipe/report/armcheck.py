"""Arm names and ids that blinding cannot code, refused before a blinded run does any work.

Blinding replaces an arm's name by its code where :func:`cytopipe.report.armnames.leak_pattern`
finds it, and the leak check refuses a text where it still shows. These studies defeat both:

* arms named by a number (``1`` / ``2``, ``0`` / ``1``, ``10`` / ``20``; any name without a
  letter): digits are in every number of the run's tables, texts and file names (a version
  ``0.1.0`` became ``0.Arm A.0``), and the codes ``Arm 1``, ``Arm 2`` are such names themselves,
  so no text can be coded or checked;
* ids that carry a one-letter arm as a part of their own (a patient ``P01-A`` or ``P01_A``, a file
  ``fcs/P01-A.fcs``, a batch ``B2.A`` in a study of arms ``A`` and ``B``): such a letter joined by a
  hyphen is part of a name to blinding (the channels ``FSC-A``), so the blinded folder would show
  each patient's id beside its arm's code, and so which code is ``A``. Ids joined otherwise were
  coded (``P01_Arm 1``), which a mix of both would still give away;
* ids that carry a one-letter arm glued to digits (``P01A``, ``A017``, ``P001A_W00``,
  ``fcs/P01A.fcs``): blinding codes words, so it leaves them as they are. Such a letter is a
  one-letter arm name among the pieces of an id's part split where letters and digits meet
  (``P01A``: ``P``, ``01``, ``A``); it shows an arm where every row carrying it at that place (the
  same column, the same part and piece counted from the start) is of one arm. A letter that rows
  of two or more arms carry there tells nothing and is left alone: the ``P`` of every patient
  ``P001``, ``P002`` in a study of arms ``P`` and ``T``, the ``W`` of every visit ``W00``. Where
  only one arm's rows carry it, it is refused (fail-closed), also when the rows are all of one
  arm (nothing then shows that the letter is not the arm's), and whatever arm's letter it is (a
  study whose arm ``A`` patients are ``P01B`` and arm ``B`` ones ``P02A`` tells as much).

Longer arm names inside ids (``P01-placebo``) are coded there like anywhere else (``P01-Arm B``)
and come back when unblinding, as do two-letter ones (``P01-HI``), as whole words. A letter glued
to other letters (``PA01``) is a part of a word, as everywhere else, and not looked for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

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
#: the pieces of an id's part, split where letters and digits meet (``P01A``: ``P``, ``01``, ``A``)
_PIECES = re.compile(r"\d+|[^\W\d_]+")


def number_arms(arms: Iterable[str]) -> list[str]:
    """The arm names that hold no letter (``1``, ``0``, ``10``, ``2.5``, ``-``): numbers or
    punctuation, which blinding can neither code nor check for."""
    names = dict.fromkeys(str(a).strip() for a in arms if a is not None and str(a).strip())
    return [a for a in names if not any(ch.isalpha() for ch in a)]


def ids_showing_arms(arms: Iterable[str], tables: Iterable[pd.DataFrame]) -> list[str]:
    """``["column 'id'", ...]``: the ids (:data:`ID_COLUMNS`) of the rows that have an arm, in
    ``tables`` (the manifest, the clinical table), that carry a one-letter arm name, in any case
    (fail-closed: ``P01-a`` beside an arm ``A`` tells as much): as a part of their own (between
    hyphens, underscores, dots, slashes, spaces: ``P01-A``), or glued to digits (``P01A``, ``A017``)
    where only rows of one arm carry that letter at that place (:func:`_glued_letters`)."""
    letters = {str(a).strip().casefold() for a in arms if a is not None and len(str(a).strip()) == 1}
    if not letters:
        return []
    found: dict[str, None] = {}
    for table in tables:
        if "arm" not in table.columns:
            continue
        armed = table[table["arm"].notna() & (table["arm"].astype(str).str.strip() != "")]
        for column in (c for c in ID_COLUMNS if c in armed.columns):
            rows = armed[[column, "arm"]].dropna().astype(str).drop_duplicates()
            glued = _glued_letters(letters, column, rows)
            for value in rows[column].unique():
                if _letter_part(letters, column, value) or value in glued:
                    found[f"{column} {value!r}"] = None
    return list(found)


def ids_with_letter_parts(arms: Iterable[str], column: str, values: Iterable[str]) -> list[str]:
    """``["column 'id'", ...]``: those of ``values`` (ids of ``column``, :data:`ID_COLUMNS`, whose
    arm is not known: a workspace's uploaded file not yet mapped) that carry a one-letter arm name
    as a part of their own, in any case (``P01-A``, ``fcs/P01_a.fcs``), as
    :func:`ids_showing_arms` finds them. A letter glued to digits (``P01A``) tells an arm only
    beside the arms of other ids, so it is looked for there, once the arm is known."""
    letters = {str(a).strip().casefold() for a in arms if a is not None and len(str(a).strip()) == 1}
    if not letters:
        return []
    return [
        f"{column} {v!r}" for v in dict.fromkeys(str(v) for v in values) if _letter_part(letters, column, v)
    ]


#: what a workspace shows in place of an arm found in a text it keeps as it was entered
MASK = "[arm]"
#: an id's separators (:data:`_SEPARATORS`) as a capturing group, kept when its parts are masked
_SPLIT = re.compile(r"([\W_]+)")


def masked(arms: Iterable[str], text: str, *, ids: bool = True) -> str:
    """``text`` with :data:`MASK` in place of every arm name blinding finds in it
    (:func:`cytopipe.report.armnames.leak_pattern`, as :func:`refuse_shared_words` finds one) and,
    for an id or a file's name (``ids``), of every one-letter arm that is a part of its own in any
    case (``P01-A``, ``P01_a.fcs``: :func:`ids_with_letter_parts`' rule). For what a workspace
    stored before the arms were known and cannot rewrite (an audit entry, an upload's name): the
    same rules as its refusals, never a second matcher. A letter glued to digits (``P01A``) tells
    an arm only beside the other ids' arms, so it is not masked here."""
    return masker(arms)(text, ids)


def masker(arms: Iterable[str]) -> Callable[[str, bool], str]:
    """:func:`masked` of ``arms`` as a function ``(text, ids)``, its pattern compiled once."""
    from cytopipe.report.armnames import leak_pattern

    names = {str(a).strip() for a in arms if a is not None and str(a).strip()}
    pattern = leak_pattern(names)
    letters = {a.casefold() for a in names if len(a) == 1}

    def mask(text: str, ids: bool = True) -> str:
        if not names or not text:
            return text
        text = pattern.sub(MASK, text)
        if not ids or not letters:
            return text
        return "".join(MASK if part.casefold() in letters else part for part in _SPLIT.split(text))

    return mask


def _letter_part(letters: set[str], column: str, value: str) -> bool:
    """Whether one of an id's parts (:func:`_parts`) is a one-letter arm name (``letters``, casefolded)."""
    return any(part.casefold() in letters for part in _parts(column, value) if part)


def _parts(column: str, value: str) -> list[str]:
    """An id's parts (between separators); a file's Windows drive is not one."""
    return _SEPARATORS.split(without_drive(value) if column == "file" else value)


def without_drive(path: str) -> str:
    """A file's path without its Windows drive (``C:\\data\\P01.fcs``: ``\\data\\P01.fcs``),
    which is not an id and shows no arm."""
    return _DRIVE.sub("", path)


def _glued_letters(letters: set[str], column: str, rows: pd.DataFrame) -> set[str]:
    """The ids of ``rows`` (``column`` and ``arm``, text) with a one-letter arm name (``letters``,
    casefolded) glued to digits that only rows of one arm carry at that place: the same part of the
    id and the same piece of it, split where letters and digits meet, counted from the start
    (``P01A``: ``P``, ``01``, ``A``). A letter that rows of two or more arms carry there tells
    nothing (the ``P`` of every ``P001`` in a study of arms ``P`` and ``T``); one that rows of a
    single arm carry is refused, also when every row is of one arm (fail-closed)."""
    carriers: dict[tuple[int, int, str], set[str]] = {}
    places: dict[str, list[tuple[int, int, str]]] = {}
    for value, arm in zip(rows[column], rows["arm"]):
        for i, part in enumerate(_parts(column, value)):
            pieces = _PIECES.findall(part)
            if len(pieces) < 2:  # a part of its own: refused as such, or no letter glued to digits
                continue
            for j, piece in enumerate(pieces):
                if len(piece) == 1 and piece.casefold() in letters:
                    place = (i, j, piece.casefold())
                    carriers.setdefault(place, set()).add(arm.strip().casefold())
                    places.setdefault(value, []).append(place)
    return {value for value, found in places.items() if any(len(carriers[p]) == 1 for p in found)}


def template_names(template: Any) -> list[str]:
    """The names of a gating template (:class:`cytopipe.gating.template.Template`) that a blinded
    run checks for arm names (:func:`refuse_shared_words`): its populations, then the markers its
    gates use, then those of ``medians:`` and ``panel:`` that no gate uses and the panel's channels.
    Each reaches a blinded folder: a median marker as a ``median_<marker>`` column of
    population_stats (blinding codes a table's values, not its column names) and in the report;
    a panel's marker or channel in the run's log and errors. One list for the run and for the
    workspace, which refuses them when entered."""
    panel = getattr(template, "panel", None) or {}
    more = [*(getattr(template, "medians", None) or []), *panel, *panel.values()]
    return list(dict.fromkeys([*template.names, *template.markers(), *(str(n) for n in more)]))


def named_ids(found: list[str]) -> str:
    """The first three of :func:`ids_showing_arms`' ids, and how many more (for a message)."""
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return ", ".join(found[:3]) + more


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
        raise ReportError(
            f"the study's ids carry a one-letter arm name as a part of them ({named_ids(found)}): "
            "blinding cannot code a letter that is a part of a name (it leaves one joined by a hyphen as "
            "it is, like the channel 'FSC-A', and one glued to digits, like 'P01A', that only one arm's "
            "ids carry there), so the blinded folder would show each id beside its arm's "
            "code and tell which code is which arm. Give the "
            "patients, samples, files and batches ids that do not carry the arm, or give the arms "
            f"longer names (e.g. 'TRT', 'PBO'), in the manifest and the clinical table. {todo}",
            key="blinded",
        )
    refuse_shared_words(arms, names, todo)


def refuse_study_names(arms: Iterable[str], study: str, folder: str, todo: str) -> None:
    """Refuse (:class:`ReportError`) to blind a run whose study name or run folder's name shows an
    arm name (:func:`cytopipe.report.armnames.shared_words`): the blinded report's title and run
    summary show both with the arm's code in its place (``Arm B trial``), which would tell which
    code stands for that arm. Named: the study or the folder (not the arm). ``todo``: what
    happens now."""
    from cytopipe.report.armnames import shared_words

    arms = [str(a) for a in arms if a is not None and str(a).strip()]
    for kind, name, fix in (
        ("study name", study, "give the workflow's `study:` a name that does not carry the arm"),
        ("run folder's name", folder, "write the run to a folder whose name does not carry it (`--out`)"),
    ):
        if name and shared_words(arms, [name]):
            raise ReportError(
                f"an arm's name shows in the {kind} {name!r}: a blinded report shows it with the arm's "
                f"code in its place, which would tell which code stands for that arm. To blind the run, "
                f"{fix}, or give the arms other names (e.g. 'TRT', 'PBO'). {todo}",
                key="blinded",
            )


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
