"""`cytopipe run --quiet` (`-q`), for scripts and cron: only warnings and errors on the terminal,
the same outputs and the same run.log as without it (`cytopipe run` had no such flag; `gate` did)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cytopipe.cli import build_parser
from tests.pipeline_support import TEMPLATE, assert_same_outputs, cli, truncate_fcs


def _trial(folder: Path) -> Path:
    """A small simulated trial with one warning (a clinical-table patient without flow data) and
    one error (a truncated file): both must still reach the terminal of a quiet run."""
    from cytopipe.simulate import simulate_trial

    simulate_trial(folder, n_patients=2, visits=(0, 4), events=2000, seed=4242, control_events=1000)
    clinical = (folder / "clinical.csv").read_text(encoding="utf-8").splitlines()
    extra = [line.replace("P001,", "P099,", 1) for line in clinical if line.startswith("P001,")]
    (folder / "clinical.csv").write_text("\n".join(clinical + extra) + "\n", encoding="utf-8")
    truncate_fcs(folder / "fcs" / "P002_W04.fcs")
    spec = {"study": "quiet", "manifest": "manifest.csv", "clinical": "clinical.csv", "template": str(TEMPLATE),
            "clustering": {"enabled": False}, "report": {"enabled": False}}  # fmt: skip
    (folder / "workflow.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return folder / "workflow.yaml"


def _log(run: Path) -> list[str]:
    """run.log without what differs between two runs: times, the pid, ETAs, the folder's path."""
    lines = (run / "run.log").read_text(encoding="utf-8").replace(str(run), "RUN_DIR").splitlines()
    return [re.sub(r"\d+(\.\d+)?", "N", re.sub(r"^\d{4}-\d\d-\d\d [\d:,]+ ", "", line)) for line in lines]


@pytest.mark.slow  # default suite: test_run_and_gate_take_quiet_and_q (the option's parsing)
def test_run_quiet_shows_only_warnings_and_errors(tmp_path):
    wf = _trial(tmp_path / "trial")
    plain = cli("run", str(wf), "--out", str(tmp_path / "plain"), "--scheduler", "synchronous")
    quiet = cli("run", str(wf), "--out", str(tmp_path / "quiet"), "--scheduler", "synchronous", "-q")
    assert plain.returncode == 3, plain.stderr  # the truncated file failed
    assert quiet.returncode == 3, quiet.stderr
    # without --quiet (no terminal): progress lines and notices on stderr, the summary on stdout
    assert "register: " in plain.stderr and "statistics: computing the tests" in plain.stderr
    assert re.match(r"cytopipe run: \d+ files: ", plain.stdout), plain.stdout
    warnings = [line for line in plain.stderr.splitlines() if line.startswith("cytopipe run: warning: ")]
    assert any("P099" in line for line in warnings), plain.stderr  # patient without flow data
    errors = [line for line in plain.stdout.splitlines() if line.startswith(("  failed  ", "completed with"))]
    failed = ["  failed  P002_W04", "completed with failures"]
    assert [e.split(":")[0] for e in errors] == failed, plain.stdout
    # with it: the warnings and the errors, nothing else, and nothing on stdout
    assert quiet.stdout == ""
    assert quiet.stderr.splitlines() == warnings + errors
    # the same outputs and the same run.log (progress lines and notices included)
    assert_same_outputs(tmp_path / "plain", tmp_path / "quiet")
    assert _log(tmp_path / "quiet") == _log(tmp_path / "plain")
    assert any("register: N/N samples" in line for line in _log(tmp_path / "quiet"))
    # `cytopipe gate --manifest --quiet` (the same pipeline): its errors too, as its single-process
    # path prints them (it printed nothing at all, exit code 3 alone saying something failed)
    gate = cli("gate", "--manifest", str(wf.parent / "manifest.csv"), "--template", str(TEMPLATE),
               "--out", str(tmp_path / "gated"), "-q")  # fmt: skip
    assert gate.returncode == 3, gate.stderr
    assert gate.stdout == ""
    shown = [line for line in gate.stderr.splitlines() if not line.startswith("cytopipe gate: warning: ")]
    assert [line.split(":")[0] for line in shown] == failed, gate.stderr
    assert shown[0] == errors[0] and shown[1].startswith("completed with failures: 1 of "), gate.stderr


def test_run_and_gate_take_quiet_and_q():
    for command in ("run", "gate"):
        for flag in ("-q", "--quiet"):
            for light in (True, False):  # the help's parser (from source) and the command's
                argv = [command, "x.yaml", "--template", "t.yaml", "--out", "out", flag]
                args = build_parser(only=command, light=light).parse_args(argv)
                assert args.quiet is True
