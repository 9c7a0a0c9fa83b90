"""What a blinded study's runs would refuse, refused when it is entered (HTTP 400).

A run of a blinded study stops before any work (exit 2) when blinding cannot code the study
(:func:`cytopipe.report.armcheck.refuse_uncodable`): arms named by numbers, ids that carry a
one-letter arm, population or marker names that show an arm. The workspace refuses the same
inputs when they are entered (a study created, its template saved, a table uploaded, a mapping
confirmed), so that the user does not do all the work first and then see each run fail (and a
run of a study set up before these checks is not started: its error would name the populations
with the arm's code in them). A refusal stores nothing and writes no audit entry; its message
names the field and the value to change (what the user typed), never an arm of the study beyond
that. The template loader's check (:func:`check_template`) is here too: the names checked are
those of the template it loads.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession

from cytopipe.serve.auth import AuthError
from cytopipe.serve.blinding import data_arms, stored_codes
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
    """A blinded study's ids carrying a one-letter arm (``P01-A``, ``P01A``): refused (400), as its
    runs would refuse them (:func:`cytopipe.report.armcheck.ids_showing_arms`), in the inputs a run
    gets: its manifest (the confirmed samples, ``mapped`` (upload id -> file, sample_id,
    patient_id, arm) replacing those of their uploads) and its clinical table (``clinical``'s rows,
    else the stored table), with every arm of both and of the study's list. ``manifest``: an
    uploaded manifest's rows, whose file, sample and patient ids and arms become the mapping's
    proposals (its other columns never reach a run). ``todo``: what happened."""
    import pandas as pd

    from cytopipe.report.armcheck import ids_showing_arms, named_ids

    samples = {s.upload_id: s for s in db.scalars(select(Sample).where(Sample.study_id == study.id))}
    names = dict(db.execute(select(Upload.id, Upload.name).where(Upload.id.in_(list(samples)))).all())
    rows = {uid: {"file": f"fcs/{names.get(uid, '')}", "sample_id": s.sample_id, "patient_id": s.patient_id,
                  "arm": s.arm} for uid, s in samples.items()}  # fmt: skip
    rows.update(mapped or {})
    if clinical is None and study.clinical_sha256:
        clinical = _stored_rows(store, study.clinical_sha256)
    columns = ["file", "sample_id", "patient_id", "arm"]
    tables = [pd.DataFrame(list(rows.values()), columns=columns), pd.DataFrame(clinical or [])]
    if manifest is not None:  # as proposals take them: a file by its name (runs link it as fcs/NAME)
        proposals = [
            {**{k: r.get(k, "") for k in columns}, "file": _as_run_file(r.get("file"))} for r in manifest
        ]
        tables.append(pd.DataFrame(proposals, columns=columns))
    arms = [*(study.arms or []), *(a for t in tables if "arm" in t.columns for a in t["arm"])]
    found = ids_showing_arms([str(a) for a in arms if a is not None], tables)
    if found:
        raise AuthError(
            400,
            f"{todo}: ids carry a one-letter arm name as a part of them ({named_ids(found)}); in a "
            "blinded study they would show beside their arm's code and tell which code is which arm "
            "(a letter joined by a hyphen, or glued to digits where only one arm's ids carry it there). "
            "Give ids that do not carry the arm, or give the arms longer names",
        )


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
    refuse_template_names(every, template, label, todo)


def refuse_template_names(arms: Iterable[str], template: Any, label: str, todo: str) -> None:
    """Refuse (400) a gating template (loaded, named ``label``) whose population or marker names
    show one of ``arms`` (:func:`refuse_names_with_arms`), naming those names, not the arm."""
    from cytopipe.report.armcheck import named_ids, template_names
    from cytopipe.report.armnames import shared_words

    found = shared_words([str(a) for a in arms if a is not None and str(a).strip()], template_names(template))
    if found:
        populations = set(template.names)
        named = named_ids([f"{'population' if n in populations else 'marker'} {n!r}" for n in found])
        raise AuthError(
            400,
            f"{todo}: an arm's name is also a word of population or marker names of the gating template "
            f"{label} ({named}); "
            "in a blinded study it would be replaced by the arm's code there too (in the runs' tables, "
            "report and log), which would tell anyone who knows the panel which code stands for that "
            "arm, so its runs refuse such names. Rename the population or marker in the template, or "
            "give the arm another name (e.g. 'TRT', 'PBO')",
        )


def _stored_rows(store: BlobStore, sha256: str) -> list[dict[str, str]] | None:
    try:
        return read_table_rows(store.path(sha256).read_bytes())
    except (OSError, ValueError):  # a table that cannot be read: the run stops on it anyway
        return None


def _as_run_file(value: Any) -> str:
    """A manifest's file as a run of the workspace names it: ``fcs/`` and the file's name (the
    upload it matches; the folders of the uploader's computer never reach a run)."""
    name = PurePosixPath(str(value or "").replace("\\", "/")).name
    return f"fcs/{name}"
