"""The sample trial's report.html in a real headless browser (Chromium driven by Playwright).

Skips only when no Chromium is installed (CI installs Debian's `chromium` in .ci/run). Playwright's
own browser download is never used: it drives the system Chromium.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SECTIONS = ["overview", "qc", "gates", "dynamics", "clinical", "correlations", "models", "files"]


def _chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("no Chromium on this machine (install Debian's `chromium` package; .ci/run does)")


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser, path: Path, sections: list[str]):
    """Load ``path`` offline; check no script/console errors, nothing fetched, every section visible
    and reachable from the table of contents, every figure decoded with a real size. Returns
    (context, page, images)."""
    context = browser.new_context(offline=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    console, errors, requests = [], [], []
    page.on("console", lambda msg: console.append((msg.type, msg.text)))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("requestfailed", lambda req: errors.append(f"request failed: {req.url}"))
    page.on("request", lambda req: requests.append(req.url))
    response = page.goto(path.as_uri(), wait_until="load")
    assert response is not None and response.ok
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")

    # no scripts errors, no console errors, nothing fetched but the file itself (and data: URIs)
    assert errors == []
    assert [m for m in console if m[0] == "error"] == []
    remote = [u for u in requests if urlparse(u).scheme not in ("file", "data")]
    assert remote == []
    assert [u for u in requests if urlparse(u).scheme == "file"] == [path.as_uri()]

    # every section is there, visible, and reachable from the table of contents
    for section in sections:
        assert page.locator(f"section#{section}").is_visible()
        assert page.locator(f'nav.toc a[href="#{section}"]').count() == 1
    anchors = page.eval_on_selector_all("nav.toc a", "els => els.map(a => a.getAttribute('href').slice(1))")
    assert len(anchors) > len(sections)  # sub-sections: QC parts and one entry per gate
    missing = page.evaluate("ids => ids.filter(id => !document.getElementById(id))", anchors)
    assert missing == []

    # every figure decoded and laid out with a real size
    images = page.eval_on_selector_all(
        "img",
        "els => els.map(i => ({alt: i.alt, w: i.naturalWidth, h: i.naturalHeight, shown: i.getBoundingClientRect().width, "
        "folded: !!i.closest('details:not([open])'), section: i.closest('section') && i.closest('section').id}))",
    )
    html = path.read_text(encoding="utf-8")
    assert len(images) == html.count("<img ") >= 20
    for img in (
        images
    ):  # figures folded in a closed <details> (the gallery's other samples) are laid out when opened
        assert img["w"] > 0 and img["h"] > 0 and (img["shown"] > 0 or img["folded"]), img
    gallery = page.locator("section#gates > figure img").count()
    assert gallery >= 16  # one figure per gate (Treg two)
    return context, page, images


def test_report_opens_offline_and_renders(browser, sample_report):
    run, path = sample_report
    context, page, _ = _open(browser, path, SECTIONS)
    # tables render as tables; the failed sample and its reason are on the page
    assert page.locator("section#qc table").count() >= 2
    assert "FCS header is damaged" in page.locator("section#qc").inner_text()
    page.locator('nav.toc a[href="#models"]').click()
    assert page.locator("section#models").is_visible()
    context.close()


def test_the_report_of_cytopipe_run_renders_with_its_clusters(browser, pipeline_run):
    """report.html as `cytopipe run workflows/sle_il2.yaml` wrote it (same browser launch)."""
    run, proc = pipeline_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    context, page, images = _open(browser, run / "report.html", [*SECTIONS[:-1], "clusters", "files"])
    clusters = {img["alt"] for img in images if img["section"] == "clusters"}
    assert {
        "Metacluster by marker median heatmap",
        "FlowSOM minimum spanning tree sized by abundance",
        "UMAP of a subsample coloured by metacluster and by gated population",
        "Cluster-gate concordance heatmap (F-measure)",
        "Metacluster abundance over visits by arm",
    } <= clusters
    text = page.locator("section#clusters").inner_text()
    assert "Differential abundance" in text and "Treg" in text  # concordance table: best match per gate
    page.locator('nav.toc a[href="#clusters-concordance"]').click()
    assert page.locator("section#clusters table").count() >= 2
    context.close()


def test_sections_at_1400_px_screenshots_headers_and_layout(browser, sample_report, tmp_path_factory):
    """Each section of the sample trial's report at 1400 px: a screenshot (test artefact, in
    $CYTOPIPE_ARTIFACTS or the test's temporary folder), no raw column name in any table header,
    the contents stay in view while scrolling, and every figure passed the layout check made on its
    matplotlib objects (no text over another: the PNG's Layout text)."""
    import base64
    import os
    import re

    from tests.test_report import png_texts

    run, path = sample_report
    out = (
        Path(os.environ.get("CYTOPIPE_ARTIFACTS") or tmp_path_factory.mktemp("artefacts")) / "report-sections"
    )
    out.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(offline=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(path.as_uri(), wait_until="load")
    page.wait_for_function("Array.from(document.images).every(i => i.complete)")
    ids = page.eval_on_selector_all("main > section", "els => els.map(e => e.id)")
    assert set(SECTIONS) <= set(ids) and "batches" in ids
    for sid in ids:
        box = page.locator(f"section#{sid}").bounding_box()
        assert box is not None and box["width"] > 900  # the section uses the width beside the contents
        shot = out / f"{sid}.png"
        page.screenshot(path=str(shot), full_page=True,
                        clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": min(box["height"], 6000)})  # fmt: skip
        assert shot.stat().st_size > 5000
    # table headers are words, not column names
    heads = page.eval_on_selector_all("th", "els => els.map(e => e.textContent.trim())")
    assert heads and [h for h in heads if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", h)] == []
    # the contents stay in view at the end of the page
    page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
    nav = page.locator("nav.toc").bounding_box()
    assert nav is not None and nav["y"] == 0 and nav["height"] > 500
    context.close()
    html = path.read_text(encoding="utf-8")
    for name, data in re.findall(r'<figure id="fig-([^"]+)"><img src="data:image/png;base64,([^"]+)"', html):
        layout = [t for t in png_texts(base64.b64decode(data)) if t.startswith("Layout ")]
        assert layout == ["Layout overlapping texts: none"], (name, layout)
