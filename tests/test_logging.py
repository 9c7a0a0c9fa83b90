"""Logging: the CLI shows library warnings (``logging`` under ``cytopipe``) on stderr while a command
runs; what the FCS reader notes about a file reaches the log (run.log of `cytopipe run`)."""

from __future__ import annotations

import logging
import sys
import types


def test_library_warnings_reach_the_terminal_once_and_only_during_the_command(monkeypatch, capsys):
    from cytopipe import cli

    module = types.ModuleType("cytopipe._warns_command")

    def add_arguments(parser) -> None:
        parser.add_argument("what")

    def run(args) -> int:
        log = logging.getLogger("cytopipe.gating.cytobank")  # a real library logger
        log.info("details for run.log only")
        log.warning("%s: population 'X' is not an 'and' of gates; not imported", args.what)
        log.error("an error is the command's to report, not the console handler's")
        return 0

    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(cli.COMMANDS, "warns", (module.__name__, "emit a warning"))
    before = list(logging.getLogger("cytopipe").handlers)
    assert cli.main(["warns", "exp.xml"]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("cytopipe warns: warning: ")]
    assert warned == [
        "cytopipe warns: warning: exp.xml: population 'X' is not an 'and' of gates; not imported"
    ]
    assert "run.log only" not in err
    assert logging.getLogger("cytopipe").handlers == before  # removed when the command ends


def test_fcs_reader_notes_reach_the_log(caplog):
    import warnings

    from cytopipe.fcs import read_fcs
    from tests.conftest import shared_path

    path = shared_path("FlowKit", "data", "noncompliant", "data_start_offset_discrepancy_example.fcs")
    with caplog.at_level("INFO", logger="cytopipe.fcs"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the FCSWarning itself is checked in test_fcs_read
        sample = read_fcs(path)
    logged = [r.getMessage() for r in caplog.records if r.name == "cytopipe.fcs"]
    assert logged == [f"{path}: {note}" for note in sample.warnings]
    assert any("HEADER and TEXT disagree" in m for m in logged)
