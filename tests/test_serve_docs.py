"""The JSON API examples of docs/serve.md run as written against a real `cytopipe serve` (only the
server's address and the password are filled in, and the files they upload are put where they
look for them)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SAMPLE_DATA
from tests.serve_support import PASSWORD, Client, serving

DOC = (REPO / "docs" / "serve.md").read_text()


def _block(lang: str, marker: str) -> str:
    blocks = [b for b in re.findall(rf"```{lang}\n(.*?)```", DOC, re.S) if marker in b]
    assert len(blocks) == 1, f"docs/serve.md: one ```{lang} block with {marker!r}"
    return blocks[0]


@pytest.fixture
def server(tmp_path):
    with serving(tmp_path / "workspace", admin="alice") as srv:
        yield srv


def test_the_python_api_example_uploads_maps_and_runs(server, tmp_path, monkeypatch, capsys):
    code = _block("python", "import httpx").replace("http://127.0.0.1:8765", server.url)
    code = code.replace('"password": "..."', f'"password": "{PASSWORD}"')
    shutil.copy(SAMPLE_DATA / "fcs" / "P001_W04.fcs", tmp_path / "P001_W04.fcs")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/serve.md", "exec"), scope)
    assert scope["row"]["status"] == "ok", scope["row"]
    assert [r["sample_id"] for r in scope["rows"]] == ["P001_W04"] and scope["rows"][0]["arm"] == "IL-2"
    assert 0 <= float(capsys.readouterr().out.strip()) <= 100  # the run's progress, in percent
    status = Client(server.url, "alice").wait_run(scope["run"]["id"])
    assert status["status"] == "finished" and status["exit_code"] == 0, status


@pytest.mark.skipif(shutil.which("curl") is None, reason="the example uses curl")
def test_the_curl_example_uploads_a_visit(server, tmp_path):
    script = _block("bash", "SERVER=").replace("http://127.0.0.1:8765", server.url)
    script = script.replace('"password": "..."', f'"password": "{PASSWORD}"')
    (tmp_path / "visit4").mkdir()
    for name in ("P001_W04.fcs", "P002_W04.fcs"):
        shutil.copy(SAMPLE_DATA / "fcs" / name, tmp_path / "visit4" / name)
    (tmp_path / "visit4" / "notes.fcs").write_text("not an FCS file")
    env = dict(
        os.environ, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    done = subprocess.run(
        ["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(rows) == 3 and sum('"status":"ok"' in r for r in rows) == 2, done.stdout
    assert '"status":"rejected"' in rows[2], done.stdout  # notes.fcs, after P001 and P002 (the shell sorts)
