"""The workspace in a real browser (Chromium driven by Playwright, as the report test does) with a
real `cytopipe serve` subprocess and a fresh database: sign in, create a study, choose 12 simulated
FCS files + a truncated file + a PNG renamed .fcs in the page's file chooser, see 12 ok rows and 2
rejected rows with their reasons, accept the proposed patient/visit/arm mapping, start a run, watch
the progress reach 100%, open the results and download the report. The run's population_stats equal
`cytopipe run` on the same files. Screenshots of each step go to $CYTOPIPE_TEST_ARTIFACTS/serve
(default: test-artifacts/serve in the repository, not committed)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from tests import serve_support, test_report_browser
from tests.pipeline_support import REPO, truncate_fcs
from tests.serve_support import (
    PASSWORD,
    assert_same_population_stats,
    trial_files,
    trial_manifest,
)

# PostgreSQL under -m slow only: the page drives the same API; on PostgreSQL in the default suite,
# test_serve_api.py rejects a PNG and a truncated file and keeps duplicates once, test_review_serve.py
# uploads, maps and runs the 12 files, and test_serve_runs.py compares a run with `cytopipe run`
backend = serve_support.backend_postgresql_slow
server = serve_support.server  # SERVE_USERS / SERVE_ARGS: its accounts and options
browser = test_report_browser.browser  # the one Chromium fixture (module scope)


def _watch_progress(page, timeout: float = 900) -> list[float]:
    """The percentages the page showed, until the page reloads with the results."""
    seen: list[float] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = float(page.inner_text("#run-percent", timeout=5000))
        except Exception:  # reloading
            time.sleep(0.3)
            continue
        if not seen or value != seen[-1]:
            seen.append(value)
        if page.locator("section#results").count():
            return seen
        time.sleep(0.3)
    raise AssertionError(f"the run did not finish in {timeout} s; progress seen: {seen}")


def test_upload_map_run_and_results_in_the_browser(
    browser, server, backend, serve_trial, serve_reference, tmp_path
):
    shots = Path(os.environ.get("CYTOPIPE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "serve" / backend
    shots.mkdir(parents=True, exist_ok=True)
    files = trial_files(serve_trial)
    assert len(files) == 12
    truncated = tmp_path / "P099_W00.fcs"
    truncated.write_bytes(files[0].read_bytes().replace(b"P001", b"P099"))
    truncate_fcs(truncated)
    png = tmp_path / "gel_photo.fcs"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8)
    manifest = trial_manifest(serve_trial)
    arms = sorted(manifest["arm"].unique())

    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    errors, remote = [], []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda req: remote.append(req.url) if not req.url.startswith(server.url) else None)
    page.set_default_timeout(60_000)

    # 1. sign in (an anonymous visit is sent to the sign-in page)
    page.goto(server.url + "/studies")
    assert "/login" in page.url
    page.fill("input[name=name]", "admin")
    page.fill("input[name=password]", PASSWORD)
    page.screenshot(path=str(shots / "01-sign-in.png"))
    page.click("#sign-in")
    page.wait_for_url(re.compile(r".*/studies$"))

    # 2. create a study
    page.fill("#new-study input[name=name]", "IL-2 trial (browser test)")
    page.fill("#new-study input[name=arms]", ", ".join(arms))
    page.fill("#new-study input[name=visits]", "0, 4")
    page.fill("#new-study input[name=workers]", "1")
    page.screenshot(path=str(shots / "02-new-study.png"), full_page=True)
    page.click("#create-study")
    page.wait_for_url(re.compile(r".*/studies/\d+$"))
    study_url = page.url

    # 3. the clinical table (gives each patient's arm), then the batch through the file chooser
    page.select_option("#table-kind", "clinical")
    page.set_input_files("#table-file", str(serve_trial / "clinical.csv"))
    page.wait_for_selector("#table-result[data-done=true]")
    assert "rows stored as the clinical table" in page.inner_text("#table-result")
    page.set_input_files("#fcs-files", [str(f) for f in files] + [str(truncated), str(png)])
    page.wait_for_selector("#batch-summary[data-done=true]", timeout=300_000)
    rows = page.locator("#upload-results tbody tr")
    assert rows.count() == 14
    ok = page.locator("#upload-results tbody tr.status-ok")
    rejected = page.locator("#upload-results tbody tr.status-rejected")
    assert ok.count() == 12 and rejected.count() == 2
    reasons = {rejected.nth(i).locator("td").nth(0).inner_text(): rejected.nth(i).locator("td").nth(2).inner_text()
               for i in range(2)}  # fmt: skip
    assert "not an FCS file" in reasons["gel_photo.fcs"] and "PNG" in reasons["gel_photo.fcs"]
    assert reasons["P099_W00.fcs"]  # validate's reason (the DATA segment is cut)
    assert "12 ok" in page.inner_text("#batch-summary") and "2 rejected" in page.inner_text("#batch-summary")
    page.screenshot(path=str(shots / "03-uploaded.png"), full_page=True)

    # 4. the proposed mapping: patient and visit from the names, the arm from the clinical table
    page.click("#to-mapping")
    page.wait_for_selector("#mapping-table")
    mapping = page.locator("#mapping-table tbody tr")
    assert mapping.count() == 12
    truth = manifest.set_index("sample_id")
    for i in range(12):
        row = mapping.nth(i)
        sample = row.locator("input[name=sample_id]").input_value()
        assert row.locator("input[name=patient_id]").input_value() == truth.loc[sample, "patient_id"]
        assert row.locator("input[name=visit]").input_value() == str(int(truth.loc[sample, "visit"]))
        assert row.locator("input[name=arm]").input_value() == truth.loc[sample, "arm"]
    page.screenshot(path=str(shots / "04-mapping.png"), full_page=True)
    page.click("#confirm-mapping")
    page.wait_for_selector("#start-run")
    assert page.locator("#mapping-table tbody tr.confirmed").count() == 12

    # 5. start a run and watch the progress reach 100%
    page.click("#start-run")
    page.wait_for_url(re.compile(r".*/runs/\d+$"))
    run_url = page.url
    page.screenshot(path=str(shots / "05-run-started.png"), full_page=True)
    seen = _watch_progress(page)  # polled from Python: the page's CSP forbids evaluating strings
    assert seen[-1] == 100.0 and seen == sorted(seen) and len(set(seen)) >= 3, seen
    page.screenshot(path=str(shots / "06-run-progress.png"), full_page=True)
    assert page.inner_text("#run-state") == "finished"
    assert page.inner_text("#run-percent") == "100.0"
    assert page.locator("#run-progress").get_attribute("value") == "100.0"

    # 6. results: samples with QC, frequencies by arm and visit, provenance, downloads
    assert page.locator("#result-samples tbody tr").count() == 12
    freq = page.inner_text("#frequencies")
    assert "Treg" in freq and all(f"{arm} / week 4" in freq for arm in arms)
    assert '"cytopipe_version"' in page.locator("#provenance").text_content()
    page.screenshot(path=str(shots / "07-results.png"), full_page=True)
    with page.expect_download() as info:
        page.click("#downloads a[href$='/report.html']")
    report = tmp_path / "report.html"
    info.value.save_as(report)
    html = report.read_text(encoding="utf-8")
    assert html.lstrip().lower().startswith("<!doctype html") and "Treg" in html
    assert info.value.suggested_filename == "report.html"
    # the escaped CSV download
    with page.expect_download() as info:
        page.click("#downloads a[href$='/population_stats.csv']")
    assert info.value.suggested_filename == "population_stats.csv"
    page.goto(study_url + "#runs")
    assert "finished" in page.inner_text("#run-list")
    page.screenshot(path=str(shots / "08-study.png"), full_page=True)
    assert errors == [] and remote == []  # no script errors, nothing fetched from elsewhere
    context.close()

    # the run started from the browser = `cytopipe run` on the same files
    run_id = run_url.rsplit("/", 1)[1]
    assert_same_population_stats(server.data / "runs" / run_id / "out", serve_reference)
