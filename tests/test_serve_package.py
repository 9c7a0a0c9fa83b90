"""Every asset of `cytopipe serve` ships in the wheel (pages, script, style, migrations), so an
installed workspace works offline; the pages reference nothing outside the server. The wheel is
built the way pip installs the project (an isolated build environment from the package index)."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVE = REPO / "cytopipe" / "serve"


def test_the_wheel_holds_every_template_static_file_and_migration(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("cytopipe-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = [p.relative_to(REPO).as_posix() for p in SERVE.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts]  # fmt: skip
    assert len(expected) > 20
    missing = [e for e in expected if e not in names]
    assert missing == []


def test_pages_load_nothing_from_elsewhere():
    for page in (SERVE / "templates").glob("*.html"):
        text = page.read_text(encoding="utf-8")
        for url in re.findall(r'(?:src|href)="([^"]+)"', text):
            assert not re.match(r"(https?:)?//", url), f"{page.name}: {url}"
    assert "http" not in (SERVE / "static" / "app.js").read_text().replace("https?", "")
