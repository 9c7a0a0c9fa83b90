"""A blinded study refuses, when they are entered, the population and marker names and the
uploaded manifest that its runs would refuse, with a real `cytopipe serve` subprocess (SQLite;
PostgreSQL under -m slow) and real uploads of the small simulated trial's files.

A run of a blinded study stops before any work (exit 2) when an arm's name is a word of its
template's population or marker names (cytopipe/report/armcheck.py: ``refuse_shared_words``; an arm
``ACT`` in the default template's ``activated cTfh``, ``T`` in ``T cells``, ``PD`` in the marker
``PD-1``), since blinding would code it there too. Before, the workspace took such a study, its
template, tables and mapping, and each of its runs failed after the user had done all the work,
with an error that the run's log mask coded (``'Arm Bivated cTfh'``), telling which code is ``ACT``.
Now each is refused at entry (400, nothing stored, no audit entry), and so is a run of a study set
up before. An uploaded manifest is checked as the mapping's proposals it gives (file, sample and
patient ids, arms): its other columns (batch, site, panel) never reach a run, so they are not.
"""

from __future__ import annotations

import pytest

from cytopipe.errors import ReportError
from tests import serve_support
from tests.pipeline_support import TEMPLATE
from tests.serve_support import STUDY, confirm_in_database, trial_manifest

backend = serve_support.backend_postgresql_slow
server = serve_support.server
SERVE_USERS = {"vera": "viewer"}  # a blinded user who reads the pages


def _create(c, name: str, arms: list[str], blinded: bool = True, **more):
    body = {"name": name, **STUDY, "arms": arms, "blinded": blinded, **more}
    return c.post("/api/studies", json=body, headers=c.h)


def _put_table(c, study: int, kind: str, text: str, name: str = "table.csv"):
    return c.put(
        f"/api/studies/{study}/tables/{kind}", params={"name": name}, content=text.encode(), headers=c.h
    )


def _audit(c, study: int) -> list[str]:
    return [e["action"] for e in c.get("/api/audit?limit=500").json() if e["object_id"] == str(study)]


def test_the_run_refuses_what_the_workspace_now_refuses_at_entry():
    """The truth the workspace follows: a run's own check (the one a blinded `cytopipe run` makes
    before any work) on the default template's names with the arms used below."""
    from cytopipe.gating.loading import load_template
    from cytopipe.report.armcheck import refuse_shared_words, template_names

    names = template_names(load_template(TEMPLATE))
    for arms, shown in ((["ACT", "PBO"], "'activated cTfh'"), (["T", "P"], "'T cells', 'CD4 T'"),
                        (["PD", "PBO"], "'PD-1'")):  # fmt: skip
        with pytest.raises(ReportError, match=shown):
            refuse_shared_words(arms, names, "")
    refuse_shared_words(["TRT", "PBO", "A", "B"], names, "")  # FSC-A: a letter joined by a hyphen


def test_a_blinded_study_is_not_created_with_a_template_whose_names_show_an_arm(server):
    c = server.client()
    for i, (arms, said) in enumerate([
        (["ACT", "PBO"], "(population 'activated cTfh')"),
        (["T", "P"], "(population 'T cells', population 'CD4 T', population 'CD8 T')"),
        (["PD", "PBO"], "(marker 'PD-1')"),
    ]):  # fmt: skip
        r = _create(c, f"names {i}, blinded", arms)
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert detail.startswith("the study was not created: ") and said in detail, detail
        assert f"the gating template '{TEMPLATE.name}' (version 1)" in detail
        assert _create(c, f"names {i}", arms, blinded=False).status_code == 201  # unblinded: no codes
    studies = [s["name"] for s in c.get("/api/studies").json()]
    assert not [s for s in studies if s.endswith("blinded")]
    entries = c.get("/api/audit?limit=500").json()
    assert not [
        e for e in entries if e["action"] == "study.create" and e["after"]["name"].endswith("blinded")
    ]

    # an uploaded template (the form's file: template_yaml) is checked the same way
    text = TEMPLATE.read_text(encoding="utf-8").replace("Memory CD4", "TRT memory")
    r = _create(c, "uploaded template, blinded", ["TRT", "PBO"], template_yaml=text, template="mine.yaml")
    assert r.status_code == 400 and "'mine.yaml' (version 1) (population 'TRT memory')" in r.text, r.text

    # a new version of the template of a blinded study: refused, nothing saved or audited
    r = _create(c, "a template edited, blinded", ["TRT", "PBO"])
    assert r.status_code == 201, r.text
    study = r.json()["id"]
    r = c.post(f"/api/studies/{study}/templates", json={"yaml": text, "reason": "renamed"}, headers=c.h)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("the template was not saved: ") and "'TRT memory'" in r.text
    assert [t["version"] for t in c.get(f"/api/studies/{study}/templates").json()] == [1]
    assert "template.edit" not in _audit(c, study)
    # without a CSRF token or as a viewer the request is refused as before (403), the names unchecked
    assert c.post(f"/api/studies/{study}/templates", json={"yaml": text, "reason": "x"}).status_code == 403


def test_a_blinded_study_refuses_arms_its_template_shows_in_tables_and_mapping(server, serve_trial):
    """A blinded study without an arm list: the arms come with its clinical table, manifest or
    mapping, each refused when its arm is a word of the template's names, nothing stored (no
    table, no confirmed sample, no arm code, no audit entry)."""
    c = server.client()
    study = _create(c, "arms from the data, blinded", []).json()["id"]
    row = trial_manifest(serve_trial).iloc[0]
    r = _put_table(c, study, "clinical", f"patient_id,visit,arm\n{row['patient_id']},0,T\nP999,0,PBO\n")
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("the clinical table was not saved: ") and "'T cells'" in r.text
    manifest = (
        f"file,sample_id,patient_id,visit,arm\n{row['file']},{row['sample_id']},{row['patient_id']},0,ACT\n"
    )
    r = _put_table(c, study, "manifest", manifest)
    assert r.status_code == 400, r.text
    assert (
        r.json()["detail"].startswith("the manifest table was not saved: ") and "'activated cTfh'" in r.text
    )
    assert "'ACT'" not in r.text and "'T'" not in r.text  # the names to change, not the arm

    assert c.upload(study, serve_trial / row["file"]).status_code == 201
    (mapped,) = c.get(f"/api/studies/{study}/mapping").json()
    r = c.post(f"/api/studies/{study}/mapping", json={"rows": [dict(mapped, arm="PD")]}, headers=c.h)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("the mapping was not saved: ") and "(marker 'PD-1')" in r.text

    shown = c.get(f"/api/studies/{study}").json()
    assert shown["clinical"] is None and shown["manifest"] is None
    assert not any(m["confirmed"] for m in c.get(f"/api/studies/{study}/mapping").json())
    assert not {"study.clinical", "study.manifest", "mapping.confirm", "study.arm_codes"} & set(
        _audit(c, study)
    )

    # arms the template does not show are taken
    r = c.post(f"/api/studies/{study}/mapping", json={"rows": [dict(mapped, arm="TRT")]}, headers=c.h)
    assert r.status_code == 200, r.text


def test_an_uploaded_manifest_is_checked_as_the_proposals_it_gives(server):
    """Its arms and its file, sample and patient ids, as a run would check them once they are
    confirmed (they show on the mapping page as proposals, each arm as its code): refused. Its
    batch, site and panel columns, which no run reads (runs get the confirmed mapping), are not."""
    c = server.client()
    study = _create(c, "a manifest, blinded", []).json()["id"]
    head = "file,sample_id,patient_id,visit,arm,batch,site,panel\n"
    for rows, said in [
        (["fcs/P01_W0.fcs,P01_W0,P01,0,1,b1,s1,p", "fcs/P02_W0.fcs,P02_W0,P02,0,2,b1,s1,p"],
         "the arm(s) '1', '2' are named by numbers"),
        (["fcs/P01_W0.fcs,P01_W0,P01-A,0,A,b1,s1,p", "fcs/P02_W0.fcs,P02_W0,P02,0,B,b1,s1,p"],
         "(patient_id 'P01-A')"),
        (["C:\\lab\\P01A.fcs,P01_W0,P01,0,A,b1,s1,p", "fcs/P02_W0.fcs,P02_W0,P02,0,B,b1,s1,p"],
         "(file 'fcs/P01A.fcs')"),
    ]:  # fmt: skip
        r = _put_table(c, study, "manifest", head + "\n".join(rows) + "\n")
        assert r.status_code == 400, r.text
        assert r.json()["detail"].startswith("the manifest table was not saved: ") and said in r.text, r.text
    assert c.get(f"/api/studies/{study}").json()["manifest"] is None
    assert not {"study.manifest", "study.arm_codes"} & set(_audit(c, study))

    # a letter of an arm in its batch, site, panel or folder names: never in a run, taken
    rows = ["A\\P01_W0.fcs,P01_W0,P01,W4,A,B1-A,S-A,A", "fcs/P02_W0.fcs,P02_W0,P02,W4,B,B1-B,S-B,B"]
    r = _put_table(c, study, "manifest", head + "\n".join(rows) + "\n", name="ok.csv")
    assert r.status_code == 200, r.text
    assert c.get(f"/api/studies/{study}").json()["manifest"] == "ok.csv"


def test_a_run_of_a_study_set_up_before_is_not_started(server, serve_trial):
    """A blinded study whose arm ``T`` was confirmed before the names were checked at entry (a
    workspace of an older version: the sample written to its database here): its run is not
    started (400, no run), where before the run started and stopped on the names at once."""
    from sqlalchemy.orm import sessionmaker

    from cytopipe.serve.db import Sample, database_url, make_engine

    c = server.client()
    study = _create(c, "set up before, blinded", []).json()["id"]
    row = trial_manifest(serve_trial).iloc[1]
    assert c.upload(study, serve_trial / row["file"]).status_code == 201
    (mapped,) = c.get(f"/api/studies/{study}/mapping").json()
    engine = make_engine(database_url(server.database, server.data))
    try:
        with sessionmaker(engine)() as db:
            db.add(Sample(study_id=study, upload_id=mapped["upload_id"], sample_id=row["sample_id"],
                          patient_id=row["patient_id"], visit=0, arm="T", confirmed_by="admin"))  # fmt: skip
            db.commit()
    finally:
        engine.dispose()
    r = c.post(f"/api/studies/{study}/runs", headers=c.h)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("the run was not started: ") and "'T cells'" in r.text
    assert c.get(f"/api/studies/{study}").json()["runs"] == []
    assert "run.start" not in _audit(c, study)


def _shown(c, study: int) -> str:
    """What a signed-in user reads of a study: its page, its API answers, the audit trail."""
    pages = [
        f"/studies/{study}",
        f"/api/studies/{study}",
        f"/api/studies/{study}/mapping",
        "/audit",
        "/api/audit",
    ]
    return "\n".join(c.get(p).text for p in pages)


def test_fcs_file_names_that_show_an_arm_are_refused_when_the_arms_are_known(server, serve_trial):
    """An FCS file of a blinded study named with its arm (``P001_IL2_W00.fcs``, an arm ``IL2``) was
    stored and listed under that name on the study page, its mapping, the audit trail (with the
    name as sent, folders included) and its runs' pages (the sample id made of it), to every
    role: a run codes it in its folder, the workspace showed it as it is, telling the patient's
    arm. Now such an upload is refused (400, nothing stored, no audit entry), as is one whose name
    carries a one-letter arm as a part of its own (``P001-X_W00.fcs``, which blinding leaves as it
    is, like ``FSC-A``)."""
    c, vera = server.client(), server.client("vera")
    study = _create(c, "file names, blinded", ["IL2", "X"]).json()["id"]
    source = serve_trial / trial_manifest(serve_trial).iloc[0]["file"]
    for name, said in [
        ("P001_IL2_W00.fcs", "(file 'P001_IL2_W00.fcs')"),
        ("lab/IL2/P001_W00.fcs", "(file 'lab/IL2/P001_W00.fcs')"),  # the audit trail keeps the name as sent
        ("P001-X_W00.fcs", "(file 'fcs/P001-X_W00.fcs')"),
        ("P001_il2_W00.fcs", "(file 'P001_il2_W00.fcs')"),
    ]:  # fmt: skip
        r = c.upload(study, source, name=name)
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert (
            detail.startswith(f"the file {name.rsplit('/', 1)[-1]!r} was not uploaded: ") and said in detail
        )
        assert "upload the files under names that do not carry the arm" in detail, detail
        assert "'IL2'" not in detail and "'X'" not in detail  # the names to change, not the arm
    assert c.get(f"/api/studies/{study}").json()["uploads"] == []
    entries = c.get("/api/audit?limit=500").json()
    assert not [
        e for e in entries if e["action"].startswith("upload.") and e["after"].get("study_id") == study
    ]
    shown = _shown(vera, study)
    assert "P001_IL2" not in shown and "P001-X" not in shown and "P001_il2" not in shown
    r = c.upload(study, source, name="P001_W00.fcs")  # a name that shows no arm
    assert r.status_code == 201, r.text
    other = serve_trial / trial_manifest(serve_trial).iloc[1]["file"]
    r = c.upload(study, other, name="X:\\lab\\P001_W04.fcs")  # a Windows drive X: shows no arm X
    assert r.status_code == 201, r.text
    assert [u["name"] for u in c.get(f"/api/studies/{study}").json()["uploads"]] == [
        "P001_W00.fcs",
        "P001_W04.fcs",
    ]


def test_fcs_file_names_uploaded_before_the_arms_are_refused_when_the_arms_come(server, serve_trial):
    """Files may come before the clinical table or manifest that names the arms: then a table,
    mapping or run that would make an uploaded file's name show an arm is refused (400, nothing
    stored, no arm code given, no audit entry), naming the file, as the workspace renames no
    upload. Before, each was taken, the files listed under their names beside their arms' codes."""
    c, vera = server.client(), server.client("vera")
    study = _create(c, "files first, blinded", []).json()["id"]
    rows = trial_manifest(serve_trial)
    first, second = rows.iloc[2], rows.iloc[4]
    word, letter = f"{first['patient_id']}_HD_W00.fcs", f"{second['patient_id']}-X_W00.fcs"
    up = c.upload(study, serve_trial / first["file"], name=word)
    assert up.status_code == 201, up.text  # no arm known yet: nothing tells that HD is one
    assert c.upload(study, serve_trial / second["file"], name=letter).status_code == 201
    patients = f"{first['patient_id']},0,HD\n{second['patient_id']},0,LD\n"
    for kind, text, said in [
        ("clinical", f"patient_id,visit,arm\n{patients}", f"(file {word!r})"),
        ("clinical", f"patient_id,visit,arm\n{first['patient_id']},0,X\nP999,0,Y\n", f"(file 'fcs/{letter}')"),
        ("manifest", "file,sample_id,patient_id,visit,arm\nfcs/other.fcs,S1,P999,0,HD\n", f"(file {word!r})"),
    ]:  # fmt: skip
        r = _put_table(c, study, kind, text)
        assert r.status_code == 400, r.text
        detail = r.json()["detail"]
        assert detail.startswith(f"the {kind} table was not saved: ") and said in detail, detail
        assert "in a new study if they are in this one already" in detail, detail
    mapped = next(m for m in c.get(f"/api/studies/{study}/mapping").json() if m["name"] == word)
    row = dict(mapped, arm="HD", patient_id=first["patient_id"], sample_id="S1", visit=0)
    r = c.post(f"/api/studies/{study}/mapping", json={"rows": [row]}, headers=c.h)
    assert r.status_code == 400 and f"(file {word!r}" in r.text, r.text
    shown = c.get(f"/api/studies/{study}").json()
    assert shown["clinical"] is None and shown["manifest"] is None and shown["runs"] == []
    assert not {"study.clinical", "study.manifest", "mapping.confirm", "study.arm_codes"} & set(
        _audit(c, study)
    )
    # no arm became known, so no file is shown beside an arm's code
    assert not [m for m in vera.get(f"/api/studies/{study}/mapping").json() if m["arm"]]

    # a study set up before these checks (its sample confirmed by an older version): no run starts
    confirm_in_database(
        server, study, up.json()["id"], sample_id="S1", patient_id=first["patient_id"], arm="HD"
    )
    r = c.post(f"/api/studies/{study}/runs", headers=c.h)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("the run was not started: ") and f"(file {word!r}" in r.text
    assert c.get(f"/api/studies/{study}").json()["runs"] == [] and "run.start" not in _audit(c, study)


def test_a_run_of_a_study_set_up_before_with_ids_carrying_a_letter_is_not_started(server, serve_trial):
    """The run start repeats the id checks too, not only the names': a sample confirmed before
    the ids were checked at entry (its patient ``P00n-X`` of the arm ``X``) starts no run (400),
    where before the run started and stopped at once (exit 2), its error masked with the codes."""
    c = server.client()
    study = _create(c, "ids set up before, blinded", []).json()["id"]
    row = trial_manifest(serve_trial).iloc[3]
    up = c.upload(study, serve_trial / row["file"])
    assert up.status_code == 201, up.text
    patient = f"{row['patient_id']}-X"
    confirm_in_database(
        server, study, up.json()["id"], sample_id=row["sample_id"], patient_id=patient, arm="X"
    )
    r = c.post(f"/api/studies/{study}/runs", headers=c.h)
    assert r.status_code == 400, r.text
    assert (
        r.json()["detail"].startswith("the run was not started: ") and f"(patient_id {patient!r})" in r.text
    )
    assert c.get(f"/api/studies/{study}").json()["runs"] == [] and "run.start" not in _audit(c, study)


def _panel_template() -> str:
    """The default template with a median marker no gate uses and a panel's channel."""
    text = TEMPLATE.read_text(encoding="utf-8").replace("medians: [CD3,", "medians: [HLA-DR, CD3,")
    assert "HLA-DR" in text
    return text.replace("compensation: file\n", 'compensation: file\npanel: {CD3: "APC-H7-A"}\n', 1)


def test_median_markers_and_panel_channels_that_show_an_arm_are_refused(server, tmp_path):
    """A ``medians:`` marker that no gate uses reaches a blinded folder as a column name of
    population_stats (``median_HLA-DR``: blinding codes a table's values, not its column names)
    and the report; a ``panel:`` channel the run's log and errors (``channel 'APC-H7-A' ...``).
    Both were checked neither by runs nor at entry; now they are in the one names list
    (armcheck.template_names), refused by both."""
    from cytopipe.gating.loading import load_template
    from cytopipe.report.armcheck import refuse_shared_words, template_names

    text = _panel_template()
    (tmp_path / "t.yaml").write_text(text, encoding="utf-8")
    names = template_names(load_template(tmp_path / "t.yaml"))
    assert {"HLA-DR", "APC-H7-A"} <= set(names)
    for arms, shown in ((["DR", "PBO"], "'HLA-DR'"), (["APC", "PBO"], "'APC-H7-A'")):
        with pytest.raises(ReportError, match=shown):
            refuse_shared_words(arms, names, "")

    c = server.client()
    for i, (arms, said) in enumerate(
        [(["DR", "PBO"], "(marker 'HLA-DR')"), (["APC", "PBO"], "(channel 'APC-H7-A')")]
    ):
        r = _create(c, f"panel {i}, blinded", arms, template_yaml=text, template="panel.yaml")
        assert r.status_code == 400, r.text
        assert r.json()["detail"].startswith("the study was not created: ") and said in r.text, r.text
    assert (
        _create(c, "panel, blinded", ["TRT", "PBO"], template_yaml=text, template="panel.yaml").status_code
        == 201
    )
