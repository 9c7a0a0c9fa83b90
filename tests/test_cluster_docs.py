"""The example in docs/clustering.md runs as written (files go to a temporary folder)."""

import re

from tests.conftest import REPO, shared_path


def test_clustering_doc_example_runs(tmp_path, monkeypatch, capsys):
    shared_path("FlowSOM", "inst", "extdata", "68983.fcs")
    text = (REPO / "docs" / "clustering.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)[0].replace("/tmp/", f"{tmp_path}/")
    monkeypatch.chdir(REPO)
    exec(compile(code, "docs/clustering.md", "exec"), {})
    out = capsys.readouterr().out
    assert "MC10" in out and "CD4 T cells" in out
    assert (tmp_path / "flowsom_model.npz").exists() and (tmp_path / "mst.png").stat().st_size > 1000
