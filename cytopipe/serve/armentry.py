"""What a blinded study's runs would refuse, refused when it is entered (HTTP 400).

A run of a blinded study stops before any work (exit 2) when blinding cannot code the study
(:func:`cytopipe.report.armcheck.refuse_uncodable`): arms named by numbers, ids that carry a
one-letter arm, population, marker or channel names that show an arm. The workspace refuses the
same inputs when they are entered (a study created, its template saved, an FCS file or a table
uploaded, a mapping confirmed), so that the user does not do all the work first and then see
each run fail (and a run of a study set up before these checks is not started: its error would
name the populations with the arm's code in them). It also refuses an uploaded FCS file's name
and a sample or patient id in which an arm's name shows (``P01_IL2_W04.fcs``): a run codes it in
its folder, but the workspace's pages show it as it is. Each is checked again when arms become
known (a table uploaded, a mapping confirmed) and when a run starts, as files may come first (an
FCS file's name again once its bytes are received: a table may have come meanwhile). A
refusal stores nothing and writes no audit entry; its message names the field and the value to
change (what the user typed), never an arm of the study beyond that. The template loader's check
(:func:`check_template`) is here too: the names checked are those of the template it loads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from cytopipe.serve.auth import AuthError
from cytopipe.serve.blinding import data_arms, every_arm, stored_codes
from cytopipe.serve.db import Sample, Study, Template, Upload
from cytopipe.serve.storage import BlobStore, read_table_rows


def check_template(text: str, label: str) -> Any:
    """The gating template of a YAML text, with the template loader's checks
    (:func:`cytopipe.gating.loading.load_template`); an error (400) names the template (``label``,
    e.g. ``'t.yaml' (version 2)``), never the server's temporary file."""
    from cytopipe.errors import CytopipeError
    from cytopipe.gating.loading import load_template

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        try:
            return load_template(fh.name)
        except CytopipeError as exc:
            context = {k: v for k, v in exc.context.items() if not (k == "file" and str(v) == fh.name)}
            shown = str(CytopipeError(exc.message.replace(fh.name, "the template"), **context))
            raise AuthError(400, f"the gating template {label} is not valid: {shown}") from None


def refuse_number_arms(arms: Iterable[str], todo: str) -> None:
    """A blinded study's arms named by numbers: its pages, runs and reports could not code them
    (:func:`cytopipe.report.armcheck.number_arms`), so they are refused (400) up front."""
    from cytopipe.report.armcheck import number_arms

    numbers = number_arms(arms)
    if numbers:
        raise AuthError(
            400,
            f"{todo}: the arm(s) {', '.join(repr(a) for a in numbers)} are named by numbers (no letter): "
            "a blinded study cannot replace them by codes or check that none shows, as digits are in "
            "every number on its pages and in its runs. Name the arms with words (e.g. 'PBO', 'TRT', "
            "'dose 10 mg')",
        )


def refuse_ids_with_arms(
    db: DBSession, store: BlobStore, study: Study, todo: str, *,
    mapped: dict[int, dict[str, str]] | None = None, clinical: list[dict[str, str]] | None = None,
    manifest: list[dict[str, str]] | None = None,
) -> None:  # fmt: skip
    """A blinded study's file names and ids that show an arm (:func:`ids_with_arms`): refused (400).
    ``todo``: what happened."""
    _, letters, words = ids_with_arms(db, store, study, mapped=mapped, clinical=clinical, manifest=manifest)
    _refuse_found(todo, letters, words)


def ids_with_arms(
    db: DBSession, store: BlobStore, study: Study, *,
    mapped: dict[int, dict[str, str]] | None = None, clinical: list[dict[str, str]] | None = None,
    manifest: list[dict[str, str]] | None = None,
) -> tuple[list[str], list[str], list[str]]:  # fmt: skip
    """(the arms, ids carrying a one-letter arm, file names and ids showing an arm's name) of a
    blinded study, labelled ``"column 'value'"``. Two kinds:

    * ids carrying a one-letter arm (``P01-A``, ``P01A``), as its runs refuse them
      (:func:`cytopipe.report.armcheck.ids_showing_arms`), in the inputs a run gets: its manifest
      (the confirmed samples, ``mapped`` (upload id -> file, sample_id, patient_id, arm) replacing
      those of their uploads) and its clinical table (``clinical``'s rows, else the stored table).
      The study's other uploads, whose arm is not confirmed, are refused for a letter that is a
      part of their name of its own (``P01-A_W04.fcs``:
      :func:`~cytopipe.report.armcheck.ids_with_letter_parts`);
    * file names and ids in which an arm's name shows as blinding finds it
      (:func:`cytopipe.report.armnames.shared_words`: ``P01_IL2_W04.fcs`` beside an arm ``IL2``).
      A run codes them in its folder, but the workspace shows file names, sample and patient ids
      as they are (the study page, the mapping, a run's page, the audit trail): each would tell a
      patient's arm, and beside its code which code is which arm.

    Checked with every arm the study codes (its list, its data's, those given codes before) and
    those of the tables entered now. ``manifest``: an uploaded manifest's rows (else the stored
    one), whose file, sample and patient ids and arms become the mapping's proposals (its other
    columns never reach a run)."""
    import pandas as pd

    from cytopipe.report.armcheck import ids_showing_arms

    if clinical is None and study.clinical_sha256:
        clinical = _stored_rows(store, study.clinical_sha256)
    columns = ["file", "sample_id", "patient_id", "arm"]
    rows = _upload_rows(db, study, mapped or {})
    tables = [pd.DataFrame(rows, columns=columns), pd.DataFrame(clinical or [])]
    listed = manifest if manifest is not None else _stored_rows(store, study.manifest_sha256)
    if listed is not None:  # as proposals take them: a file by its name (runs link it as fcs/NAME)
        proposals = [
            {**{k: r.get(k, "") for k in columns}, "file": _as_run_file(r.get("file"))} for r in listed
        ]
        tables.append(pd.DataFrame(proposals, columns=columns))
    arms = every_arm(db, store, study, [a for t in tables if "arm" in t.columns for a in t["arm"]])
    if not arms:
        return [], [], []
    unknown = [r["file"] for r in rows if not str(r["arm"] or "").strip()]
    shown: dict[str, str] = {}  # label -> what the pages show (a file's name, not runs' fcs/NAME)
    for table in tables:
        for column in (c for c in ("file", "sample_id", "patient_id") if c in table.columns):
            for value in table[column].dropna().astype(str):
                text = PurePosixPath(value).name if column == "file" else value
                shown.setdefault(f"{column} {text!r}", text)
    return arms, *_found(arms, ids_showing_arms(arms, tables), unknown, shown)


def refuse_upload_name(
    db: DBSession, store: BlobStore, study: Study, name: str, raw_name: str, todo: str
) -> None:
    """An FCS file about to be uploaded to a blinded study whose name (``name``; ``raw_name``: as
    sent, with its folders, which the audit trail keeps) shows an arm the study knows: refused
    (400) before any byte is received, as :func:`refuse_ids_with_arms` refuses a stored one (its
    arm not known: a one-letter arm as a part of the name, an arm's name as blinding finds it)."""
    from cytopipe.report.armcheck import without_drive

    arms = every_arm(db, store, study)
    if arms:
        sent = [raw_name] if raw_name != name else []  # a Windows drive (C:) is not looked at
        shown = {f"file {name!r}": name, **{f"file {r!r}": without_drive(r) for r in sent}}
        _refuse_found(todo, *_found(arms, [], [f"fcs/{name}", *sent], shown))


def _found(
    arms: list[str], found: list[str], files: list[str], shown: dict[str, str]
) -> tuple[list[str], list[str]]:
    """(``found`` (ids carrying a one-letter arm) and ``files`` (names, as runs link them, whose
    arm is not known) carrying one as a part of their own; the labels of ``shown`` (label -> text)
    in which an arm's name shows)."""
    from cytopipe.report.armcheck import ids_with_letter_parts
    from cytopipe.report.armnames import shared_words

    letters = list(dict.fromkeys([*found, *ids_with_letter_parts(arms, "file", files)]))
    words = set(shared_words(arms, shown.values()))
    return letters, [label for label, text in shown.items() if text in words]


def _refuse_found(todo: str, found: list[str], words: list[str]) -> None:
    """Refuse (400) ``found`` (ids carrying a one-letter arm), then ``words`` (file names and ids
    in which an arm's name shows: :func:`_found`); the message names them, never the arm."""
    from cytopipe.report.armcheck import named_ids

    if found:
        raise AuthError(
            400,
            f"{todo}: ids carry a one-letter arm name as a part of them ({named_ids(found)}); in a "
            "blinded study they would show beside their arm's code and tell which code is which arm "
            "(a letter joined by a hyphen, or glued to digits where only one arm's ids carry it there). "
            f"Give ids that do not carry the arm, or give the arms longer names{_rename(found)}",
        )
    if words:
        raise AuthError(
            400,
            f"{todo}: an arm's name shows in file names or ids ({named_ids(words)}); a blinded study "
            "shows them as they are (on the study page, the mapping, a run's page and in the audit "
            "trail), so each would tell its patient's arm, and beside the arm's code which code is "
            f"which arm. Give ids that do not carry the arm, or give the arms other names (e.g. 'TRT', "
            f"'PBO'){_rename(words)}",
        )


def _rename(found: list[str]) -> str:
    """What to do when a file's name is refused (``found``: labels): the workspace renames no upload."""
    if not any(label.startswith("file ") for label in found):
        return ""
    return (
        ". An uploaded FCS file keeps the name it was uploaded under: upload the files under names "
        "that do not carry the arm (e.g. P01_W04.fcs), in a new study if they are in this one already"
    )


def _upload_rows(db: DBSession, study: Study, mapped: dict[int, dict[str, str]]) -> list[dict[str, str]]:
    """One row (file as a run names it, sample_id, patient_id, arm) per upload of the study, any
    status: a confirmed sample's (``mapped`` replacing it), else the file alone, its arm not known.
    Not the mapping's proposals: a letter glued to digits tells an arm only among the ids of every
    arm, and files come one at a time (the first one uploaded is always of one arm); the
    mapping's confirmation and the run check it."""
    uploads = db.execute(select(Upload.id, Upload.name).where(Upload.study_id == study.id)).all()
    rows = {
        uid: {"file": f"fcs/{name}", "sample_id": "", "patient_id": "", "arm": ""} for uid, name in uploads
    }
    for s in db.scalars(select(Sample).where(Sample.study_id == study.id)):
        rows[s.upload_id] = {**rows.get(s.upload_id, {"file": ""}), "sample_id": s.sample_id,
                             "patient_id": s.patient_id, "arm": s.arm}  # fmt: skip
    rows.update(mapped)
    return list(rows.values())


def refuse_names_with_arms(
    db: DBSession, store: BlobStore, study: Study, todo: str, *,
    arms: Iterable[str] = (), template: Any = None, label: str = "",
) -> None:  # fmt: skip
    """A blinded study whose gating template's population or marker names show an arm name
    (:func:`cytopipe.report.armnames.shared_words`: ``T cells`` beside an arm ``T``, ``activated
    cTfh`` beside ``ACT``): refused (400), as its runs refuse them
    (:func:`cytopipe.report.armcheck.refuse_shared_words`, with
    :func:`~cytopipe.report.armcheck.template_names`). Checked with every arm the study codes (its
    list, the arms of its data and those given codes before) and ``arms`` (those entered now);
    ``template``: the one entered now (a loaded template, named ``label``), else the study's
    current one. ``todo``: what happened."""
    if template is None:
        current = db.get(Template, study.template_id) if study.template_id else None
        if current is None:
            return
        label = f"{current.name!r} (version {current.version})"
        try:
            template = check_template(current.yaml, label)
        except AuthError:  # a stored template the loader no longer takes: its runs stop on it anyway
            return
    every = [*(study.arms or []), *arms, *data_arms(db, store, study), *stored_codes(db, study.id)]
    refuse_study_name(every, study.name, todo)
    refuse_template_names(every, template, label, todo)


def refuse_study_name(arms: Iterable[str], name: str, todo: str) -> None:
    """Refuse (400) a blinded study's name in which one of ``arms`` shows as blinding finds it
    (:func:`cytopipe.report.armnames.shared_words`, as for the template's names): its runs write
    the name in their report's title, coded there (``Arm B trial: run report`` of a study ``IL2
    trial``), which would tell which code is that arm, and the pages show it as it is. Named: the
    study's name, not the arm. The template's file name is not looked at: it reaches no run (a run
    gets ``template_vN.yaml``) and tells no patient's arm."""
    from cytopipe.report.armnames import shared_words

    if shared_words([str(a) for a in arms if a is not None and str(a).strip()], [name]):
        raise AuthError(
            400,
            f"{todo}: an arm's name shows in the study's name {name!r}; a blinded study's runs write "
            "its name in their report, with the arm's code in its place, which would tell which code is "
            "which arm, and its pages show the name as it is. The workspace renames no study: create the "
            "study under a name that does not carry the arm (e.g. 'SLE trial 2'), or give the arms other "
            "names (e.g. 'TRT', 'PBO')",
        )


def name_mask(db: DBSession, store: BlobStore, study: Study) -> Any:
    """``mask(text)`` for the file names and ids a blinded study shows that were stored before its
    arms were known (an upload's name: the workspace renames none): ``[arm]`` where an arm shows
    as its refusals find one (:func:`cytopipe.report.armcheck.masked`); ``None`` when nothing is
    masked (its arms may be shown, or none is known)."""
    from cytopipe.report.armcheck import masker
    from cytopipe.serve.blinding import arms_visible

    arms = [] if arms_visible(study) else every_arm(db, store, study)
    return masker(arms) if arms else None


def shown_upload(row: dict[str, Any], mask: Any) -> dict[str, Any]:
    """An upload's row (:func:`cytopipe.serve.ops.upload_dict`) with its name, reason and notes
    masked (``mask``: :func:`name_mask`; ``None``: as it is)."""
    if mask is None:
        return row
    notes = [mask(str(n)) for n in row.get("notes") or []]
    return {**row, "name": mask(row["name"]), "reason": mask(row.get("reason") or ""), "notes": notes}


def shown_mapping(
    db: DBSession, store: BlobStore, study: Study, rows: list[dict[str, Any]], mask: Any = ...
) -> list[dict[str, Any]]:
    """A blinded study's mapping rows (:func:`cytopipe.serve.ops.mapping`) as they may be shown: a
    row whose file name or ids the mapping's confirmation would refuse (:func:`ids_with_arms`, the
    rows taken as confirmed: ``P01A`` where only one arm's ids carry ``A`` there, ``P01-A``, an
    arm's name) shows its arm as hidden (``(blinded)``, never beside its code, which would tell
    which code is which arm), and every name and id ``[arm]`` where an arm's name or one-letter part
    shows (:func:`name_mask`; ``mask``: one the caller made already). Rows of a study whose arms may
    be shown or are not known: as they are."""
    from cytopipe.serve.blinding import HIDDEN

    if mask is ...:
        mask = name_mask(db, store, study)
    if mask is None or not rows:
        return rows
    mapped = {r["upload_id"]: {"file": f"fcs/{r['name']}", **{k: str(r.get(k) or "") for k in
              ("sample_id", "patient_id", "arm")}} for r in rows if str(r.get("arm") or "").strip()}  # fmt: skip
    _, letters, words = ids_with_arms(db, store, study, mapped=mapped)
    found = {*letters, *words}
    out = []
    for r in rows:
        labels = {f"file {'fcs/' + r['name']!r}", f"file {r['name']!r}",
                  *(f"{k} {str(r.get(k) or '')!r}" for k in ("sample_id", "patient_id"))}  # fmt: skip
        hidden = {"arm": HIDDEN} if r.get("arm") and labels & found else {}
        out.append(
            {**r, **{k: mask(str(r[k])) for k in ("name", "sample_id", "patient_id") if r.get(k)}, **hidden}
        )
    return out


def refuse_template_names(arms: Iterable[str], template: Any, label: str, todo: str) -> None:
    """Refuse (400) a gating template (loaded, named ``label``) whose population, marker or channel
    names (:func:`~cytopipe.report.armcheck.template_names`: its ``medians:`` and ``panel:`` too)
    show one of ``arms`` (:func:`refuse_names_with_arms`), naming those names, not the arm."""
    from cytopipe.report.armcheck import named_ids, template_names
    from cytopipe.report.armnames import shared_words

    found = shared_words([str(a) for a in arms if a is not None and str(a).strip()], template_names(template))
    if found:
        populations, channels = set(template.names), set(template.panel.values()) - set(template.panel)
        kinds = {
            n: "population" if n in populations else "channel" if n in channels else "marker" for n in found
        }
        named = named_ids([f"{kinds[n]} {n!r}" for n in found])
        raise AuthError(
            400,
            f"{todo}: an arm's name is also a word of population, marker or channel names of the gating template "
            f"{label} ({named}); "
            "in a blinded study it would be replaced by the arm's code there too (in the runs' tables, "
            "report and log), which would tell anyone who knows the panel which code stands for that "
            "arm, so its runs refuse such names. Rename the population, marker or channel in the template, or "
            "give the arm another name (e.g. 'TRT', 'PBO')",
        )


def _stored_rows(store: BlobStore, sha256: str | None) -> list[dict[str, str]] | None:
    if not sha256:
        return None
    try:
        return read_table_rows(store.path(sha256).read_bytes())
    except (OSError, ValueError):  # a table that cannot be read: the run stops on it anyway
        return None


def _as_run_file(value: Any) -> str:
    """A manifest's file as a run of the workspace names it: ``fcs/`` and the file's name (the
    upload it matches; the folders of the uploader's computer never reach a run)."""
    name = PurePosixPath(str(value or "").replace("\\", "/")).name
    return f"fcs/{name}"
