"""Runs of `cytopipe serve` in worker processes: a server killed mid-run (and its worker with it,
as in a power cut) resumes the run when it starts again and the run ends with the same
population_stats as `cytopipe run` on the same files; nothing uploaded is lost; one run per
study at a time; cancel stops the worker. SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests import serve_support
from tests.blinding_support import arm_matches, candidate_digests, matches
from tests.serve_support import (
    PASSWORD,
    STUDY,
    assert_same_population_stats,
    assert_timed_run_log,
    trial_files,
    trial_manifest,
)

backend = serve_support.backend
server = serve_support.server  # SERVE_USERS / SERVE_ARGS: its accounts and options
SERVE_USERS = {"rita": "reviewer"}  # signs a run off (a new version is made of a signed-off run)


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def _study_with_samples(client, trial: Path, name: str, n: int | None = None) -> int:
    study = {"name": name, **STUDY, "report": False}  # no report.html: the browser test makes one
    sid = client.post("/api/studies", json=study, headers=client.h).json()["id"]
    files = trial_files(trial)[:n]
    batch = client.post(f"/api/studies/{sid}/batches", json={"files": len(files), "bytes": sum(f.stat().st_size for f in files)},
                        headers=client.h).json()["batch_id"]  # fmt: skip
    for f in files:
        r = client.upload(sid, f, batch=batch)
        assert r.status_code == 201 and r.json()["status"] == "ok", r.text
    arms = trial_manifest(trial).set_index("sample_id")["arm"]
    rows = client.get(f"/api/studies/{sid}/mapping").json()
    for row in rows:  # no clinical table here: the arms are typed in (the API takes them as given)
        row["arm"] = arms[row["sample_id"]]
    assert (
        client.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=client.h).status_code == 200
    )
    return sid


@serve_support.POSTGRESQL_SLOW  # the same database work on PostgreSQL runs in the default suite in tests/test_serve_api.py and test_serve_routes.py (runs started, listed and audited)
def test_a_run_resumes_after_the_server_is_killed_mid_run(server, serve_trial, serve_reference):
    c = server.client()
    sid = _study_with_samples(c, serve_trial, "restart study")
    run = c.post(f"/api/studies/{sid}/runs", headers=c.h)
    assert run.status_code == 201, run.text
    run_id = run.json()["id"]
    # one run per study at a time
    second = c.post(f"/api/studies/{sid}/runs", headers=c.h)
    assert second.status_code == 409 and "still" in second.json()["detail"]
    # wait until some samples are gated, then kill the server and the worker (a power cut)
    status = c.wait_run(
        run_id, until=lambda s: s["progress"]["phases"][2]["done"] >= 2 or s["status"] != "running"
    )
    assert status["status"] == "running", status
    before = c.get(f"/api/studies/{sid}").json()["uploads"]
    blobs = {p.name: p.read_bytes() for p in (server.data / "blobs").rglob("*") if p.is_file()}
    server.kill()
    os.killpg(status["pid"], signal.SIGKILL)
    assert _gone(status["pid"])
    done_before = status["progress"]["phases"][2]["done"]

    server.start()
    c = server.client()
    final = c.wait_run(run_id)
    assert final["status"] == "finished", final
    assert final["attempts"] == 2 and final["exit_code"] == 0
    out = Path(server.data) / "runs" / str(run_id) / "out"
    info = json.loads((out / "run.json").read_text())
    assert info["cached_samples"] >= done_before >= 2  # the gated samples were not redone
    assert_same_population_stats(out, serve_reference)
    # nothing uploaded was lost: the same rows, the same bytes
    assert c.get(f"/api/studies/{sid}").json()["uploads"] == before
    assert {p.name: p.read_bytes() for p in (server.data / "blobs").rglob("*") if p.is_file()} == blobs
    actions = [(e["user"], e["action"]) for e in c.get("/api/audit").json() if e["object_id"] == str(run_id)]
    assert ("system", "run.resume") in actions and ("system", "run.finish") in actions
    assert ("admin", "run.start") in actions
    assert not (out / "report.html").exists()  # the study's setting


@serve_support.POSTGRESQL_SLOW  # exports the run of the test above (its PostgreSQL variant is under -m slow)
def test_events_of_a_population_download_as_anndata(server):
    import anndata
    import pandas as pd

    c = server.client()
    sid = next(s["id"] for s in c.get("/api/studies").json() if s["name"] == "restart study")
    run_id = c.get(f"/api/studies/{sid}").json()["runs"][0]["id"]
    r = c.post(
        f"/api/runs/{run_id}/anndata", json={"population": "Treg", "max_events_per_sample": 50}, headers=c.h
    )
    assert r.status_code == 202 and r.json()["file"] == "Treg.h5ad"
    entry = c.get("/api/audit", params={"limit": 1}).json()[0]  # the export is in the audit trail
    assert (entry["user"], entry["action"], entry["object_id"]) == ("admin", "run.export", str(run_id))
    deadline = time.monotonic() + 300
    while "Treg.h5ad" not in c.get(f"/api/runs/{run_id}/results").json()["downloads"]:
        assert time.monotonic() < deadline, "the AnnData export did not appear"
        time.sleep(0.5)  # as wait_run polls
    data = c.get(f"/api/runs/{run_id}/files/Treg.h5ad")
    assert data.status_code == 200
    path = server.data.parent / "treg.h5ad"
    path.write_bytes(data.content)
    adata = anndata.read_h5ad(path)
    stats = pd.read_parquet(server.data / "runs" / str(run_id) / "out" / "population_stats.parquet")
    treg = stats[stats["population"] == "Treg"].set_index("sample_id")["count"].clip(upper=50)
    assert adata.n_obs == int(treg.sum()) > 0 and adata.obs["sample_id"].nunique() == int((treg > 0).sum())


def test_cancel_stops_the_worker(server, serve_trial):
    c = server.client()
    sid = _study_with_samples(c, serve_trial, "cancel study", n=2)
    run = c.post(f"/api/studies/{sid}/runs", headers=c.h).json()
    status = c.wait_run(run["id"], until=lambda s: s["pid"] is not None)
    assert c.post(f"/api/runs/{run['id']}/cancel").status_code == 403  # CSRF token needed here too
    r = c.post(f"/api/runs/{run['id']}/cancel", headers=c.h)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert _gone(status["pid"])
    assert c.get(f"/api/runs/{run['id']}").json()["status"] == "cancelled"
    assert c.post(f"/api/runs/{run['id']}/cancel", headers=c.h).status_code == 409
    # the study is free for a new run again
    entries = c.get("/api/audit").json()
    assert any(e["action"] == "run.cancel" and e["user"] == "admin" for e in entries)


def _names_in(arms: list[str], name: str, content: bytes, folder: Path) -> list[str]:
    """The arm names in a downloaded file: its text, its Parquet cells, its DuckDB tables or its
    AnnData obs/uns (read as the program that opens it would)."""
    import pandas as pd

    path = folder / name
    path.write_bytes(content)
    if name.endswith(".parquet"):
        text = pd.read_parquet(path).astype(str).to_csv()
    elif name.endswith(".duckdb"):
        import duckdb

        with duckdb.connect(str(path), read_only=True) as con:
            tables = [
                t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()
            ]
            text = "".join(con.execute(f'SELECT * FROM "{t}"').df().astype(str).to_csv() for t in tables)
    elif name.endswith(".h5ad"):
        import anndata

        adata = anndata.read_h5ad(path)
        text = adata.obs.astype(str).to_csv() + json.dumps(adata.uns, default=str)
    else:
        text = content.decode("utf-8", "replace")
    return [a for a in arms if a.lower() in text.lower()]


@serve_support.POSTGRESQL_SLOW  # the same database work on PostgreSQL runs in the default suite in tests/test_serve_blind_codes.py and test_serve_audit_blinding.py
def test_a_blinded_studys_runs_show_codes_everywhere_and_an_unblinded_folder_is_refused(
    server, serve_trial, tmp_path
):
    """A blinded study (here without a report, which used to leave its run folder unblinded): the
    run's status and log, its page, its results and every download (tables, CSV, run.json, the
    catalog, an AnnData export) show the codes the mapping shows, never an arm name; a run folder
    unblinded on the server (`cytopipe unblind`) is then refused (403), saying what to do."""
    import pandas as pd

    from tests.pipeline_support import cli_in_process

    truth = trial_manifest(serve_trial).set_index("sample_id")["arm"]
    arms = sorted(set(pd.read_csv(serve_trial / "clinical.csv")["arm"]))
    c = server.client()
    body = {"name": "blinded runs", **STUDY, "arms": arms, "blinded": True, "report": False}
    sid = c.post("/api/studies", json=body, headers=c.h).json()["id"]
    for f in trial_files(serve_trial)[:4]:
        assert c.upload(sid, f).status_code == 201
    r = c.put(f"/api/studies/{sid}/tables/clinical", params={"name": "clinical.csv"},
              content=(serve_trial / "clinical.csv").read_bytes(), headers=c.h)  # fmt: skip
    assert r.status_code == 200, r.text
    rows = c.get(f"/api/studies/{sid}/mapping").json()
    codes = {truth[r["sample_id"]]: r["arm"] for r in rows}
    assert len(codes) == 2 and set(codes.values()) <= {f"Arm {x}" for x in "ABCD"}
    # P001 mapped to the other arm: the pipeline's warning quotes both arm names in the run's log
    p001, other = truth["P001_W00"], next(a for a in codes if a != truth["P001_W00"])
    rows = [{**r, "arm": codes[other]} if r["patient_id"] == "P001" else r for r in rows]
    assert c.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=c.h).status_code == 200
    run_id = c.post(f"/api/studies/{sid}/runs", headers=c.h).json()["id"]
    status = c.wait_run(run_id)
    assert status["status"] == "finished", status
    folder = server.data / "runs" / str(run_id)
    # what the log says on the server: the codes (the worker's; tests/test_serve_blinded_logs.py)
    assert p001 not in (folder / "run.log").read_text() and codes[p001] in (folder / "run.log").read_text()
    # each line with its time, in order: the pipeline's warning (stderr) and its summary (stdout)
    said = assert_timed_run_log(folder)
    warned = [
        i for i, line in enumerate(said) if line.startswith("cytopipe run: warning: ") and codes[p001] in line
    ]
    summary = [i for i, line in enumerate(said) if line.startswith("cytopipe run: ") and " files: " in line]
    assert warned and summary and warned[-1] < summary[0], said
    assert codes[p001] in status["progress"]["log"] and not _names_in(
        arms, "log", status["progress"]["log"].encode(), tmp_path
    )
    r = c.post(
        f"/api/runs/{run_id}/anndata", json={"population": "Treg", "max_events_per_sample": 20}, headers=c.h
    )
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 300
    while "Treg.h5ad" not in c.get(f"/api/runs/{run_id}/results").json()["downloads"]:
        assert time.monotonic() < deadline, "the AnnData export did not appear"
        time.sleep(0.5)  # as wait_run polls
    results = c.get(f"/api/runs/{run_id}/results")
    assert results.status_code == 200 and not _names_in(arms, "results", results.content, tmp_path)
    page = c.get(f"/runs/{run_id}")
    assert (
        page.status_code == 200
        and "Provenance" in page.text
        and not _names_in(arms, "page", page.content, tmp_path)
    )
    assert codes[p001] in page.text  # the log, coded
    downloads = results.json()["downloads"]
    assert {"samples.parquet", "run.json", "catalog.duckdb", "statistics.csv", "Treg.h5ad"} <= set(downloads)
    for name in downloads:
        got = c.get(f"/api/runs/{run_id}/files/{name}")
        assert got.status_code == 200 and not _names_in(arms, name, got.content, tmp_path), name
    # no hash of a file that holds the arms, to try every arm assignment against (blinding_support)
    shown = results.text + page.text + c.get(f"/api/runs/{run_id}/files/run.json").text
    for table in ("manifest.csv", "clinical.csv"):
        assert matches(candidate_digests(folder / "input" / table, arms), shown) == [], table
    # ... nor of an arm name (the arm list is public), e.g. in run.json's blinding record
    assert arm_matches(arms, shown) == {}
    # a new version of the run is copied without the folder's secret (.cache): a review change
    # still writes codes (read off the copied tables and the run's manifest) and no arm's hash.
    # A new version is made of a signed-off run: a reviewer approves every gate and signs it first
    rita = server.client("rita")
    r = rita.post(f"/api/runs/{run_id}/review/approve", json={"scope": "run"}, headers=rita.h)
    assert r.status_code == 200, r.text
    r = rita.post(f"/api/runs/{run_id}/signoff", json={"password": PASSWORD}, headers=rita.h)
    assert r.status_code == 200, r.text
    r = c.post(f"/api/runs/{run_id}/versions", headers=c.h)  # (after the signature's refresh)
    assert r.status_code == 201, r.text
    new_id = r.json()["id"]
    item = c.get(f"/api/runs/{new_id}/review?population=Treg").json()["items"][-1]
    change = {"sample_id": item["sample_id"], "population": "Treg", "kind": "pooled", "reason": "fit failure"}
    r = c.post(f"/api/runs/{new_id}/review/change", json=change, headers=c.h)
    assert r.status_code == 200, r.text
    copied = server.data / "runs" / str(new_id) / "out"
    ps = pd.read_parquet(copied / "population_stats.parquet")
    assert set(ps["arm"].dropna()) <= set(codes.values()) and "overridden" in set(ps["gate_source"])
    again = c.get(f"/api/runs/{new_id}/results").text + c.get(f"/api/runs/{new_id}/files/run.json").text
    assert not _names_in(arms, "new version", again.encode(), tmp_path) and arm_matches(arms, again) == {}
    for name in c.get(f"/api/runs/{new_id}/results").json()["downloads"]:  # the re-gated tables too
        got = c.get(f"/api/runs/{new_id}/files/{name}")
        assert got.status_code == 200 and not _names_in(arms, name, got.content, tmp_path), name
    # the run's codes are the pages' codes
    samples = pd.read_parquet(folder / "out" / "samples.parquet").set_index("sample_id")["arm"]
    assert samples.to_dict() == {r["sample_id"]: r["arm"] for r in rows}
    # unblinded on the server (deliberately, with its key): the web refuses the run's results
    # (in this process: what the server then refuses is checked here, not the command's process)
    proc = cli_in_process("unblind", str(folder / "out"), "--key", str(folder / "input" / "blind_key.csv"))
    assert proc.returncode == 0, proc.stderr
    for path in (f"/api/runs/{run_id}/results", f"/api/runs/{run_id}/files/run.json",
                 f"/api/runs/{run_id}/files/samples.csv", f"/runs/{run_id}/files/Treg.h5ad"):  # fmt: skip
        got = c.get(path)
        assert got.status_code == 403 and "start a new run" in got.text, (path, got.text[:300])
        assert not _names_in(arms, "refused", got.content, tmp_path)
    r = c.post(f"/api/runs/{run_id}/anndata", json={"population": "CD4 T"}, headers=c.h)
    assert r.status_code == 403 and "start a new run" in r.json()["detail"]
    page = c.get(f"/runs/{run_id}")
    assert page.status_code == 200 and "start a new run" in page.text and "Provenance" not in page.text
    assert not _names_in(arms, "page", page.content, tmp_path)
