"""An FCS quirk the reader handled is said once, as the command's note: `cytopipe gate` on the
CyTOF workshop's example.fcs (68 stray bytes after its TEXT) printed Python's warning display
twice, each with a line of cytopipe's source under it (header read, then events read)."""

from __future__ import annotations

from tests.conftest import shared_path
from tests.pipeline_support import TEMPLATE, cli


def test_gate_says_an_fcs_quirk_once_as_a_note(tmp_path):
    path = shared_path("CyTOF-workshop-2017-07-10", "data", "example.fcs")
    proc = cli("gate", str(path), "--template", str(TEMPLATE), "--out", str(tmp_path / "g"),
               "--missing-markers", "skip", "--quiet", timeout=300)  # fmt: skip
    assert proc.returncode == 3, proc.stderr  # refused: no spillover matrix for `compensation: file`
    notes = [line for line in proc.stderr.splitlines() if "stray byte(s)" in line]
    assert notes == [f"cytopipe gate: note: {path}: TEXT segment ends with 68 stray byte(s) "
                     "b'                ' after its last delimiter; ignored"], proc.stderr  # fmt: skip
    assert "FCSWarning" not in proc.stderr and "read_fcs" not in proc.stderr
