"""The committed sample_data/ folder is exactly what its documented command writes."""

from __future__ import annotations

import filecmp
import re
import shlex

import pytest

from tests.conftest import SAMPLE_DATA
from tests.pipeline_support import cli


def documented_command() -> list[str]:
    text = (SAMPLE_DATA / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^cytopipe (simulate --out sample_data .*)$", text, flags=re.MULTILINE)
    assert match, "sample_data/README.md must show the regeneration command"
    return shlex.split(match.group(1))


def test_sample_data_regenerates_byte_identically(tmp_path):
    if not (SAMPLE_DATA / "manifest.csv").is_file():
        pytest.fail("sample_data/manifest.csv is missing: run the command in sample_data/README.md")
    out = tmp_path / "sample_data"
    args = documented_command()
    args[args.index("--out") + 1] = str(out)  # the documented command itself, into a fresh folder
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    committed = sorted(p.relative_to(SAMPLE_DATA) for p in SAMPLE_DATA.rglob("*") if p.is_file())
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert sorted(set(committed) - {p for p in committed if p.name == "README.md"}) == written
    assert len(written) > 90
    _, mismatch, errors = filecmp.cmpfiles(SAMPLE_DATA, out, [str(p) for p in written], shallow=False)
    assert not mismatch and not errors, (
        f"{len(mismatch)} files differ from a fresh regeneration (first: {mismatch[:3]}); if the simulator "
        "or numpy changed on purpose, regenerate with the command in sample_data/README.md"
    )


def test_sample_data_size_is_small():
    total = sum(p.stat().st_size for p in SAMPLE_DATA.rglob("*") if p.is_file())
    assert total < 35 * 1024 * 1024, f"sample_data is {total / 2**20:.1f} MiB"
