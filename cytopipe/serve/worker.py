"""``python -m cytopipe.serve.worker RUN_FOLDER``: one run of the workspace, in its own process.

Runs ``cytopipe run RUN_FOLDER/input/workflow.yaml --out RUN_FOLDER/out`` (the pipeline's own
resumable run: a restarted worker reuses every per-sample result already cached) and writes
``RUN_FOLDER/status.json`` with the exit code when it ends, so a server that was restarted in
between still learns how the run ended. Output goes to ``RUN_FOLDER/run.log``.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    folder = Path(argv[0]).resolve()
    options = json.loads((folder / "input" / "options.json").read_text(encoding="utf-8"))

    def stop(signum, frame):  # cancel: end like Ctrl-C (the Dask cluster is closed on the way out)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    from cytopipe.cli import main as cli_main
    from cytopipe.store import atomic_write_json

    args = ["run", str(folder / "input" / "workflow.yaml"), "--out", str(folder / "out"), "--no-progress"]
    if options.get("scheduler_address"):
        args += ["--scheduler-address", options["scheduler_address"]]
    t0 = time.time()
    code = 1
    try:
        code = cli_main(args)
    except KeyboardInterrupt:
        code = 130
    finally:
        atomic_write_json(folder / "status.json", {"exit_code": code, "seconds": round(time.time() - t0, 3)})
    return code


if __name__ == "__main__":
    sys.exit(main())
