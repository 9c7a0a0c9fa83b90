"""The example in docs/interop.md runs as written (its report goes to a temporary folder)."""

import re

from tests.conftest import REPO, shared_path


def test_interop_doc_example_runs(tmp_path, monkeypatch, capsys):
    shared_path("FlowSOM", "inst", "extdata", "gating.wsp")
    text = (REPO / "docs" / "interop.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0].replace("/tmp/interop-example", str(tmp_path))
    monkeypatch.chdir(REPO)
    exec(compile(code, "docs/interop.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'All Samples'" in out and "10745" in out and "/Lymphocytes/Singlets" in out
    assert "within tolerance: True" in out
    assert (tmp_path / "reconcile" / "reconcile.html").stat().st_size > 10_000
