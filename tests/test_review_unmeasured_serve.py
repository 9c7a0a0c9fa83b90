"""Gate review of a population not measured in a sample, with a real `cytopipe serve` subprocess (SQLite;
PostgreSQL, where .ci/run starts one, under -m slow) and a finished run of the 12 small simulated samples, one of
which has its CXCR5 channel unlabelled: cTfh and activated cTfh are not measured in that sample.

population_stats and gate_review.parquet have a missing count for them (gate_review kept count 0
until 2026-12-06; fully measured runs keep their bytes, tests/test_output_hashes.py). Before, the review page showed "0 of
1371 events" as if the gate were empty, drew an empty 0..1 plot, and a reviewer could approve that
gate, or save a pooled gate for it, with an audit entry from a missing % to a missing %. Now the
queue, the gate view, the page and `cytopipe review --list` say "not measured", and approving or
changing such a gate is refused (409) naming the sample(s) and the missing marker; approving every
unflagged gate (or every gate of the run) leaves them out.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests import serve_support, test_report_browser
from tests.pipeline_support import cli
from tests.serve_support import (
    STUDY,
    signed_in,
    trial_files,
    trial_manifest,
)

# PostgreSQL under -m slow only: "not measured" is read from the run's tables, not the database. The
# database work here runs on PostgreSQL in test_review_serve.py, in the default suite only in part:
# approving a run's gates and a refused request in test_a_carried_over_change_names_who_made_it;
# approving unflagged gates and `review --list` (test_signoff_locks_the_gates_until_a_new_version)
# and refusals that record nothing (test_roles_viewer_and_analyst,
# test_a_gate_number_that_is_not_a_finite_number_is_refused_naming_it) only under -m slow, as here
backend = serve_support.backend_postgresql_slow
server = serve_support.server  # SERVE_USERS / SERVE_ARGS: its accounts and options
SERVE_USERS = {"rita": "reviewer", "vera": "viewer"}
browser = test_report_browser.browser


@pytest.fixture(scope="module")
def run(server, serve_trial, tmp_path_factory) -> tuple[int, str, str]:
    """(run id, the sample without CXCR5, another visit of its patient): a finished run."""
    from cytopipe.fcs import read_fcs, write_fcs

    manifest = trial_manifest(serve_trial)
    unlabelled = manifest["sample_id"].iloc[0]
    patient = manifest["patient_id"].iloc[0]
    other = manifest[(manifest["patient_id"] == patient) & (manifest["sample_id"] != unlabelled)][
        "sample_id"
    ].iloc[0]
    folder = tmp_path_factory.mktemp("unlabelled")
    files = []
    for f in trial_files(serve_trial):
        if f.stem == unlabelled:
            sample = read_fcs(f)
            channels = sample.channels.copy()
            cxcr5 = channels["pns"].astype(str).str.contains("CXCR5")
            assert cxcr5.sum() == 1, channels
            channels.loc[cxcr5, "pns"] = ""
            f = Path(write_fcs(folder / f.name, sample.events, channels, keywords=sample.keywords))
        files.append(f)
    c = server.client()
    sid = c.post("/api/studies", json={"name": "not measured", **STUDY, "report": False}, headers=c.h).json()[
        "id"
    ]
    for f in files:
        r = c.upload(sid, f)
        assert r.status_code == 201 and r.json()["status"] == "ok", r.text
    arms = manifest.set_index("sample_id")["arm"]
    rows = c.get(f"/api/studies/{sid}/mapping").json()
    for row in rows:
        row["arm"] = arms[row["sample_id"]]
    assert c.post(f"/api/studies/{sid}/mapping", json={"rows": rows}, headers=c.h).status_code == 200
    r = c.post(f"/api/studies/{sid}/runs", headers=c.h)
    assert r.status_code == 201, r.text
    status = c.wait_run(r.json()["id"])
    assert status["status"] == "finished", status
    return status["id"], unlabelled, other


def test_a_population_not_measured_is_shown_so_and_cannot_be_approved_or_changed(server, run):
    run_id, sample, other = run
    out = server.data / "runs" / str(run_id) / "out"
    ps = pd.read_parquet(out / "population_stats.parquet").set_index(["sample_id", "population"])
    assert ps.loc[(sample, "cTfh"), "gate_source"] == "not measured" and pd.isna(
        ps.loc[(sample, "cTfh"), "count"]
    )
    review = pd.read_parquet(out / "gate_review.parquet")
    mine = review[(review["sample_id"] == sample) & (review["population"] == "cTfh")]
    assert len(mine) == 1 and mine[["count", "pct_parent"]].isna().all().all()  # not measured, not 0 events

    c = server.client("rita")
    items = {i["sample_id"]: i for i in c.get(f"/api/runs/{run_id}/review?population=cTfh").json()["items"]}
    assert items[sample]["status"] == "not measured" and items[sample]["pct_parent"] is None
    assert items[other]["status"] == "unreviewed" and items[other]["pct_parent"] > 0

    gate = c.get(f"/api/runs/{run_id}/review/gate", params={"sample_id": sample, "population": "cTfh"}).json()
    assert gate["measured"] is False and gate["count"] is None and gate["pct_parent"] is None
    assert gate["parent_count"] == int(ps.loc[(sample, "Memory CD4"), "count"]) and gate["panels"] == []
    assert "CXCR5" in gate["flags"]
    below = c.get(
        f"/api/runs/{run_id}/review/gate", params={"sample_id": sample, "population": "activated cTfh"}
    )
    # its parent (cTfh) is not measured either: no parent count
    assert below.json()["count"] is None and below.json()["parent_count"] is None
    measured = c.get(
        f"/api/runs/{run_id}/review/gate", params={"sample_id": other, "population": "cTfh"}
    ).json()
    assert measured["measured"] is True and measured["count"] > 0 and measured["panels"]

    trail = len(c.get("/api/audit?limit=500").json())
    r = c.post(f"/api/runs/{run_id}/review/approve", json={"scope": "one", "population": "cTfh", "sample_id": sample},
               headers=c.h)  # fmt: skip
    assert r.status_code == 409, r.text
    assert f"cTfh is not measured in sample {sample}" in r.json()["detail"] and "CXCR5" in r.json()["detail"]
    change = {"sample_id": sample, "population": "cTfh", "kind": "pooled", "reason": "fit failure"}
    r = c.post(f"/api/runs/{run_id}/review/change", json=change, headers=c.h)
    assert r.status_code == 409 and "no gate to change" in r.json()["detail"], r.text
    r = c.post(
        f"/api/runs/{run_id}/review/change", json={**change, "sample_ids": [sample, other]}, headers=c.h
    )
    assert r.status_code == 409 and "Leave these samples out" in r.json()["detail"], r.text
    assert other not in r.json()["detail"]  # only the sample where it is not measured is named
    r = c.post(f"/api/runs/{run_id}/review/preview", json={**change, "kind": "override", "params": {"CXCR5 >=": 1.0}},
               headers=c.h)  # fmt: skip
    assert r.status_code == 409, r.text
    assert len(c.get("/api/audit?limit=500").json()) == trail  # nothing was recorded

    r = c.post(
        f"/api/runs/{run_id}/review/approve", json={"scope": "unflagged", "population": "cTfh"}, headers=c.h
    )
    assert r.status_code == 200, r.text
    items = {i["sample_id"]: i for i in c.get(f"/api/runs/{run_id}/review?population=cTfh").json()["items"]}
    plain = [s for s, i in items.items() if not i["flagged"] and not i["outlier"] and s != sample]
    assert r.json()["approved"] == len(plain) >= 1
    assert sorted(s for s, i in items.items() if i["status"] == "approved") == sorted(plain)
    assert items[sample]["status"] == "not measured"

    db = ["--data", str(server.data)] + (["--database", server.database] if server.database else [])
    proc = cli("review", str(run_id), *db, "--list", "cTfh")
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith(sample))
    assert line.split("\t")[1:3] == ["-", "not measured"], line


def test_the_review_page_says_not_measured(browser, server, run, backend):
    expect = pytest.importorskip("playwright.sync_api").expect
    if backend != "sqlite":
        pytest.skip("a browser check: it runs once (on SQLite)")
    run_id, sample, other = run
    errors: list[str] = []
    context, page = signed_in(browser, server, "rita", errors, console=False)
    page.goto(server.url + f"/runs/{run_id}/review?population=cTfh")
    row = page.locator(f'#queue tbody tr[data-sample="{sample}"]')
    expect(row).to_contain_text("not measured")
    row.click()
    freq = page.locator("#current-freq")
    expect(freq).to_contain_text("not measured in this sample")
    assert "CXCR5" in freq.inner_text() and "0 of" not in freq.inner_text()
    assert page.locator("#panels svg").count() == 0
    expect(page.locator("#approve-one")).to_be_disabled()
    expect(page.locator("#save-override")).to_be_disabled()
    # the patient's other visit: measured, drawn; this one in its other visits says not measured
    page.locator(f'#queue tbody tr[data-sample="{other}"]').click()
    expect(page.locator("#current-freq")).to_contain_text(" events; gate ")
    expect(page.locator("#approve-one")).to_be_enabled()
    expect(page.locator(f'#other-visits figure[data-sample="{sample}"] figcaption')).to_contain_text(
        "not measured"
    )
    assert errors == []
    context.close()
