"""What the workspace keeps and shows of a blinded study's run names no arm: its run folder's
``run.log`` and ``console.log`` (the worker's), the error stored with the run, the run's page, its
status and the study's runs, over HTTP from a real `cytopipe serve` (SQLite: the masking is the
worker's and the run manager's, the same for PostgreSQL).

Before, the command's console (its warnings, which quote the clinical table, and its error) went
into ``RUN_FOLDER/run.log`` as it was said, arm names and all; the pages coded it on the way out,
but the server kept the names (and stored a failed run's error with them). Now the worker writes
each line with the study's codes (cytopipe/serve/worker.py, ``arm_mask``) and masks console.log
when the run ends.

Two runs: one whose clinical table puts patient P001 in another arm than the mapping (finished,
its warning quoting both arms), and one with a clinical table written with a space before each arm
name (`P001,0, placebo`). Its run failed (exit 2, "the blinding key has no code for arm(s)"): the
run's blinding check read the arms with the space (``' placebo'``), the workspace and the run's
clinical checks without. It now runs; what it keeps and shows names no arm either. A failed run's
error is masked by the same code (the run manager masks console.log before reading its tail;
``test_console_log_is_masked_when_the_run_ends``).
"""

from __future__ import annotations

import csv
import io
import sqlite3

import pandas as pd
import pytest
import yaml

from tests.serve_support import STUDY, serving, trial_files, trial_manifest

ARM_WORDS = ("placebo", "MIU", "IL-2")  # every arm of the trial names one of these (a dose too)


def _named(text: str, arms: list[str]) -> list[str]:
    """The arm names (or the words of them) ``text`` shows, case-insensitive."""
    low = text.lower()
    return [a for a in [*arms, *ARM_WORDS] if a.lower() in low]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("blinded_logs") / "data"
    data.mkdir()
    with serving(data, "sqlite") as srv:
        yield srv


def _blinded_study(c, trial, name: str, clinical: bytes) -> tuple[int, dict[str, str], list[dict]]:
    body = {"name": name, **STUDY, "blinded": True, "report": False}  # no arm list (a public one)
    sid = c.post("/api/studies", json=body, headers=c.h).json()["id"]
    for f in trial_files(trial)[:4]:
        assert c.upload(sid, f).status_code == 201
    r = c.put(f"/api/studies/{sid}/tables/clinical", params={"name": "clinical.csv"}, content=clinical,
              headers=c.h)  # fmt: skip
    assert r.status_code == 200, r.text
    truth = trial_manifest(trial).set_index("sample_id")["arm"]
    rows = c.get(f"/api/studies/{sid}/mapping").json()
    codes = {truth[r["sample_id"]]: r["arm"] for r in rows}
    assert len(codes) == 2 and set(codes.values()) <= {f"Arm {x}" for x in "ABCD"}
    return sid, codes, rows


def _start_run(c, sid: int, rows: list[dict]) -> int:
    """Save the study's mapping ``rows`` and start a run of it: the run's id."""
    assert c.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=c.h).status_code == 200
    return c.post(f"/api/studies/{sid}/runs", headers=c.h).json()["id"]


def _start_blinded_run(c, trial, name: str) -> tuple[dict[str, str], int]:
    """A blinded study of ``trial`` with its clinical table, its run started: (codes, run id)."""
    sid, codes, rows = _blinded_study(c, trial, name, (trial / "clinical.csv").read_bytes())
    return codes, _start_run(c, sid, rows)


def _kept_and_shown(server, c, sid: int, run_id: int) -> dict[str, str]:
    """Everything the server keeps (the run folder's own files beside ``input/`` and ``out/``, the
    stored error) and shows (the run's page, its status, the study) of the run."""
    folder = server.data / "runs" / str(run_id)
    texts = {p.name: p.read_text(encoding="utf-8", errors="replace") for p in folder.iterdir() if p.is_file()}
    assert {"run.log", "console.log", "status.json"} <= set(texts), sorted(texts)
    with sqlite3.connect(server.data / "cytopipe.sqlite") as con:
        texts["stored error"] = (
            con.execute("SELECT error FROM runs WHERE id = ?", (run_id,)).fetchone()[0] or ""
        )
    texts["page"] = c.get(f"/runs/{run_id}").text
    texts["status"] = c.get(f"/api/runs/{run_id}").text
    texts["study"] = c.get(f"/api/studies/{sid}").text
    texts["study page"] = c.get(f"/studies/{sid}").text
    return texts


def test_a_blinded_studys_run_log_names_no_arm(server, serve_trial):
    arms = sorted(set(pd.read_csv(serve_trial / "clinical.csv")["arm"]))
    c = server.client()
    sid, codes, rows = _blinded_study(
        c, serve_trial, "blinded log", (serve_trial / "clinical.csv").read_bytes()
    )
    truth = trial_manifest(serve_trial).set_index("sample_id")["arm"]
    # P001 mapped to the other arm: the run's warning quotes both arms (the clinical table's and the mapping's)
    p001 = truth["P001_W00"]
    other = next(a for a in codes if a != p001)
    rows = [{**r, "arm": codes[other]} if r["patient_id"] == "P001" else r for r in rows]
    run_id = _start_run(c, sid, rows)
    status = c.wait_run(run_id)
    assert status["status"] == "finished" and status["exit_code"] == 3, status

    texts = _kept_and_shown(server, c, sid, run_id)
    assert {name: _named(text, arms) for name, text in texts.items() if _named(text, arms)} == {}
    # the warning is there, with the codes the study's pages show
    warned = [line for line in texts["run.log"].splitlines() if "cytopipe run: warning: " in line
              and "P001" in line and "in the clinical table but in arm" in line]  # fmt: skip
    assert warned and codes[p001] in warned[0] and codes[other] in warned[0], texts["run.log"][-3000:]
    assert codes[p001] in status["progress"]["log"]


@pytest.mark.slow  # default suite: test_a_blinded_studys_run_log_names_no_arm
def test_a_blinded_study_with_spaces_before_its_arm_names_runs_and_names_no_arm(server, serve_trial):
    arms = sorted(set(pd.read_csv(serve_trial / "clinical.csv")["arm"]))
    rows = list(csv.reader(io.StringIO((serve_trial / "clinical.csv").read_text(encoding="utf-8"))))
    col = rows[0].index("arm")
    spaced = "".join(
        ",".join(c if i != col or r is rows[0] else f" {c}" for i, c in enumerate(r)) + "\n" for r in rows
    ).encode("utf-8")  # fmt: skip  ("P001,0, placebo,...")
    c = server.client()
    sid, codes, rows = _blinded_study(c, serve_trial, "blinded error", spaced)
    run_id = _start_run(c, sid, rows)
    status = c.wait_run(run_id)
    assert status["status"] == "finished" and status["exit_code"] == 0, status  # was: failed, exit 2

    texts = _kept_and_shown(server, c, sid, run_id)
    assert {name: _named(text, arms) for name, text in texts.items() if _named(text, arms)} == {}
    assert "no code for arm" not in texts["run.log"]


def test_console_log_is_masked_when_the_run_ends(tmp_path):
    """console.log takes what does not pass through the worker's Python streams (Dask's processes,
    a crash): masked in place when the worker ends (and when the server finds it gone)."""
    from cytopipe.serve.blinding import write_run_key
    from cytopipe.serve.worker import CONSOLE_LOG, mask_logs

    for blinded in (True, False):
        folder = tmp_path / f"run_{blinded}"
        (folder / "input").mkdir(parents=True)
        report = {"blinded": True, "blind_key": "blind_key.csv"} if blinded else {}
        spec = {"study": "s", "manifest": "manifest.csv", "clinical": "clinical.csv", "report": report}
        (folder / "input" / "workflow.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
        (folder / "input" / "manifest.csv").write_text("file,sample_id,patient_id,visit,arm\n"
                                                       "a.fcs,S1,P1,0,placebo\n", encoding="utf-8")  # fmt: skip
        (folder / "input" / "clinical.csv").write_text("patient_id,visit,arm\nP1,0,placebo\nP2,0,High Dose\n",
                                                       encoding="utf-8")  # fmt: skip
        write_run_key(folder / "input" / "blind_key.csv", {"placebo": "Arm B"})  # P2's arm: no code
        said = "distributed.worker - WARNING - task failed: patient P1 (PLACEBO), P2 (high dose)\n"
        (folder / CONSOLE_LOG).write_text(said, encoding="utf-8")
        mask_logs(folder)
        got = (folder / CONSOLE_LOG).read_text(encoding="utf-8")
        assert got == (said.replace("PLACEBO", "Arm B").replace("high dose", "[arm]") if blinded else said)


# What a process of the run says on its own descriptors (never through the worker's Python
# streams): written at its start by a sitecustomize the test puts on the server's PYTHONPATH (the
# workers get the server's environment), naming every arm as a Dask worker's "task failed" line
# would, in a process whose arguments (after the interpreter's name, joined by "|") hold
# CYTOPIPE_TEST_SAYS_IN (with a leading "^": begin with it).
_SITECUSTOMIZE = """\
import os
said, where = os.environ.get("CYTOPIPE_TEST_SAYS"), os.environ.get("CYTOPIPE_TEST_SAYS_IN", "")
with open("/proc/self/cmdline", "rb") as fh:
    args = "|".join(a.decode("utf-8", "replace") for a in fh.read().split(b"\\0")[1:])
if said and where and (args.startswith(where[1:]) if where.startswith("^") else where in args):
    os.write(2, said.encode("utf-8") + b"\\n")
"""
SAID = "Compute Failed"


def _says(monkeypatch, tmp_path, arms: list[str], where: str) -> None:
    """The server's environment: processes whose command line holds ``where`` say every arm name."""
    import os

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE, encoding="utf-8")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    named = ", ".join(f"P00{i + 1} ({arm.upper() if i % 2 else arm})" for i, arm in enumerate(arms))
    monkeypatch.setenv("CYTOPIPE_TEST_SAYS", f"distributed.worker - WARNING - {SAID}: patients {named}")
    monkeypatch.setenv("CYTOPIPE_TEST_SAYS_IN", where)


def _until_said(path, ended) -> str:
    """``path``'s text once it holds the line said (``ended()``: the process ended first: fails)."""
    import time

    deadline = time.monotonic() + 300
    while SAID not in (text := path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""):
        assert time.monotonic() < deadline and not ended(), f"{path.name}: the process ended first"
        time.sleep(0.2)
    return text


def _coded_line(text: str, codes: dict[str, str]) -> bool:
    shown = [line for line in text.splitlines() if SAID in line]
    return bool(shown) and all(f"({code})" in shown[0] for code in codes.values())


def test_console_log_names_no_arm_while_the_run_runs_nor_after_a_kill(serve_trial, tmp_path, monkeypatch):
    """console.log is masked as it is written: read while the blinded run runs, and after the server
    and then the run's worker were killed (SIGKILL: nothing masks it afterwards), it names no arm.
    Before, it held the Dask processes' lines as said until the worker ended (and for good when
    nothing was left to mask it)."""
    import os
    import signal

    from tests.serve_support import Server

    arms = sorted(set(pd.read_csv(serve_trial / "clinical.csv")["arm"]))
    _says(monkeypatch, tmp_path, arms, "spawn_main")  # the run's Dask worker processes
    data = tmp_path / "data"
    data.mkdir()
    with serving(data, "sqlite") as srv:
        c = srv.client()
        codes, run_id = _start_blinded_run(c, serve_trial, "blinded console")
        folder = data / "runs" / str(run_id)
        during = _until_said(folder / "console.log", (folder / "status.json").exists)
        pid = c.get(f"/api/runs/{run_id}").json()["pid"]
        Server.kill(srv)  # the server, then the run's worker and its Dask processes: nothing left to mask
        os.killpg(pid, signal.SIGKILL)
        after = (folder / "console.log").read_text(encoding="utf-8", errors="replace")
        assert not (folder / "status.json").exists()  # killed mid-run
    assert _named(during, arms) == [] and _named(after, arms) == [], after
    assert _coded_line(after, codes), after


@pytest.mark.slow  # default suite: test_a_blinded_studys_run_log_names_no_arm and test_console_log_names_no_arm_while_the_run_runs_nor_after_a_kill
def test_an_exports_log_names_no_arm_while_it_runs_nor_after_the_server_is_killed(
    serve_trial, tmp_path, monkeypatch
):
    """An AnnData export of a blinded study's run: its log (out/exports/NAME.h5ad.log) is masked as
    it is written, read while the export runs and after it ended with the server killed. Before,
    the server masked it when the export ended, so with the server killed meanwhile, never."""
    import time

    from tests.serve_support import Server

    arms = sorted(set(pd.read_csv(serve_trial / "clinical.csv")["arm"]))
    _says(monkeypatch, tmp_path, arms, "^-m|cytopipe|export")  # the export command's process
    data = tmp_path / "data"
    data.mkdir()
    with serving(data, "sqlite") as srv:
        c = srv.client()
        codes, run_id = _start_blinded_run(c, serve_trial, "blinded export")
        assert c.wait_run(run_id)["status"] == "finished"
        r = c.post(f"/api/runs/{run_id}/anndata", json={"population": "Treg", "max_events_per_sample": 50},
                   headers=c.h)  # fmt: skip
        assert r.status_code == 202, r.text
        exports = data / "runs" / str(run_id) / "out" / "exports"
        during = _until_said(exports / "Treg.h5ad.log", (exports / "Treg.h5ad").exists)
        Server.kill(srv)  # nothing left to mask the log when the export ends
        deadline = time.monotonic() + 300
        while not (exports / "Treg.h5ad").exists():  # the export goes on, and ends
            assert time.monotonic() < deadline, "the AnnData export did not appear"
            time.sleep(0.5)
        after = (exports / "Treg.h5ad.log").read_text(encoding="utf-8", errors="replace")
    assert _named(during, arms) == [] and _named(after, arms) == [], after
    assert _coded_line(after, codes), after
