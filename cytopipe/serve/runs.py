"""Runs of a study: each a ``cytopipe run`` in a worker process, never in the server's event loop.

A run folder ``DATA/runs/<id>/`` holds ``input/`` (manifest, clinical table, template and
workflow written from the database; the FCS files linked from the blob store), ``out/`` (the
pipeline's run folder), ``run.log`` (what the run says, each line timed: :mod:`cytopipe.serve.worker`),
``console.log`` (the worker process's own output: Dask's processes, a crash) and, once the worker
ends, ``status.json``.

:class:`RunManager` starts workers (in their own process group, so a cancel stops their Dask
workers too), watches them from a background thread, and on start-up adopts workers that
outlived a server restart or starts again those that died with it: the pipeline's cache makes
the new attempt resume where the old one stopped. One run per study at a time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session as DBSession
from sqlalchemy.orm import sessionmaker

from cytopipe.errors import RequestError
from cytopipe.serve import armentry, audit
from cytopipe.serve.blinding import (
    arms_visible,
    assign_codes,
    codes_of,
    every_arm,
    table_arms,
    workspace_secret,
    write_run_key,
)
from cytopipe.serve.db import RUN_ACTIVE, Run, Sample, Study, Template, Upload, utcnow
from cytopipe.serve.storage import BlobStore
from cytopipe.serve.worker import CONSOLE_LOG, PIPE, RUN_LOG, arm_mask, mask_file, mask_logs

logger = logging.getLogger(__name__)
MAX_ATTEMPTS = 3


class RunError(RequestError):
    """A run cannot be started, changed or read as asked (``status``: the HTTP code)."""


def run_options(values: dict[str, Any] | None) -> dict[str, Any]:
    """A run's options (beyond the study's settings) from the new-run form or the API, checked and
    with the workflow's defaults filled in: ``missing_markers`` (``stop``: a template marker absent
    from every file stops the run; ``skip``: its populations are reported "not measured")."""
    from cytopipe.workflow import SCHEMA

    values = dict(values or {})
    unknown = sorted(set(values) - {"missing_markers"})
    if unknown:
        raise RunError(400, f"unknown run option(s) {unknown}; the options are ['missing_markers']")
    field = SCHEMA["missing_markers"]
    policy = values.get("missing_markers") or field.default
    if policy not in field.choices:
        raise RunError(400, f"missing_markers must be one of {list(field.choices)}, not {policy!r}")
    return {"missing_markers": policy}


class RunManager:
    def __init__(
        self, data_dir: Path, sessions: sessionmaker, store: BlobStore, scheduler_address: str | None
    ):
        self.blind_secret = workspace_secret(data_dir)  # the codes of blinded studies' arms
        self.root = Path(data_dir) / "runs"
        self.root.mkdir(parents=True, exist_ok=True)
        self.sessions, self.store = sessions, store
        self.scheduler_address = scheduler_address
        self._children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- starting -------------------------------------------------------------------------------
    def start(self, db: DBSession, study: Study, user: str, options: dict[str, Any] | None = None) -> Run:
        options = run_options(options)
        db.execute(select(Study).where(Study.id == study.id).with_for_update())  # serialise per study
        active = db.scalar(select(Run).where(Run.study_id == study.id, Run.status.in_(RUN_ACTIVE)))
        if active is not None:
            raise RunError(409, f"run {active.id} of this study is still {active.status}; wait or cancel it")
        if study.template_id is None:
            raise RunError(400, "the study has no gating template yet")
        samples = db.execute(
            select(Sample, Upload)
            .join(Upload, Sample.upload_id == Upload.id)
            .where(Sample.study_id == study.id)
        ).all()
        if not samples:
            raise RunError(400, "no confirmed samples: upload FCS files and confirm their mapping first")
        if not arms_visible(study):  # a study set up before its names and ids were checked when
            # entered: the run would stop on them, its error (masked with the codes) telling which code
            # is which arm; its pages would show file names and ids carrying an arm
            armentry.refuse_number_arms(every_arm(db, self.store, study), "the run was not started")
            armentry.refuse_ids_with_arms(db, self.store, study, "the run was not started")
            armentry.refuse_names_with_arms(db, self.store, study, "the run was not started")
        run = Run(study_id=study.id, status="queued", folder="", template_id=study.template_id,
                  n_samples=len(samples), started_by=user, options=options)  # fmt: skip
        db.add(run)
        db.flush()
        folder = self.root / str(run.id)
        run.folder = str(folder)
        self._write_inputs(db, folder, study, samples, options, user)
        audit.record(db, user, "run.start", "run", run.id, None,
                     {"study": study.name, "samples": len(samples), "template_id": study.template_id,
                      "options": options})  # fmt: skip
        db.commit()
        self._spawn(run.id)
        return run

    def _write_inputs(
        self, db: DBSession, folder: Path, study: Study, samples: list, options: dict[str, Any], user: str
    ) -> None:
        inp = folder / "input"
        (inp / "fcs").mkdir(parents=True, exist_ok=True)
        rows, used = [], set()
        for sample, upload in sorted(samples, key=lambda su: su[0].sample_id):
            name = upload.name if upload.name.lower() not in used else f"{upload.id}_{upload.name}"
            used.add(name.lower())
            link = inp / "fcs" / name
            if not link.exists():
                os.symlink(self.store.path(upload.sha256), link)
            rows.append({"file": f"fcs/{name}", "sample_id": sample.sample_id, "patient_id": sample.patient_id,
                         "visit": sample.visit, "arm": sample.arm})  # fmt: skip
        import pandas as pd

        pd.DataFrame(rows, columns=["file", "sample_id", "patient_id", "visit", "arm"]).to_csv(
            inp / "manifest.csv", index=False
        )
        template = db.get(Template, study.template_id)
        template_file = f"template_v{template.version}.yaml"  # run.json names the version it used
        (inp / template_file).write_text(template.yaml, encoding="utf-8")
        settings = dict(study.settings or {})
        spec: dict[str, Any] = {"study": study.name, "manifest": "manifest.csv", "template": template_file,
                                "seed": int(settings.get("seed", 0)),
                                "missing_markers": options["missing_markers"]}  # fmt: skip
        if study.clinical_sha256:
            (inp / "clinical.csv").write_bytes(self.store.path(study.clinical_sha256).read_bytes())
            spec["clinical"] = "clinical.csv"
        if settings.get("workers") not in (None, "", "auto"):
            spec["workers"] = int(settings["workers"])
        spec["clustering"] = {"enabled": bool(settings.get("clustering"))}  # the form's box, not the default
        report: dict[str, Any] = {}
        if settings.get("blinded"):  # the whole run folder (tables, run.json, report) with the pages' codes
            assign_codes(db, self.store, study, self.blind_secret, user)
            codes = codes_of(db, self.store, study, self.blind_secret)
            used = {s.arm for s, _ in samples} | table_arms(self.store, study.clinical_sha256)
            write_run_key(inp / "blind_key.csv", {a: c for a, c in codes.items() if a in used})
            report.update(blinded=True, blind_key="blind_key.csv")
        if not settings.get("report", True):
            report["enabled"] = False  # still blinded: blinding is the folder's, not the report's
        if report:
            spec["report"] = report
        (inp / "workflow.yaml").write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        (inp / "options.json").write_text(json.dumps({"scheduler_address": self.scheduler_address}))

    def _spawn(self, run_id: int) -> None:
        with self.sessions() as db:
            run = db.get(Run, run_id)
            folder = Path(run.folder)
            (folder / "status.json").unlink(missing_ok=True)
            log = open(folder / CONSOLE_LOG, "ab")  # run.log is the worker's own (timed lines)
            proc = subprocess.Popen(
                [sys.executable, "-m", "cytopipe.serve.worker", str(folder)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, env=_worker_env(), cwd=str(folder),
            )  # fmt: skip
            log.close()
            with self._lock:
                self._children[proc.pid] = proc
            run.pid, run.status, run.attempts = proc.pid, "running", run.attempts + 1
            db.commit()
            logger.info("run %s: worker pid %s (attempt %s)", run_id, proc.pid, run.attempts)

    # --- watching -------------------------------------------------------------------------------
    def watch(self, interval: float = 0.5) -> None:
        """Check every active run now (adopt or restart after a server restart), then keep
        checking from a background thread."""
        with self.sessions() as db:  # created but never started (the server stopped in between)
            queued = db.scalars(select(Run.id).where(Run.status == "queued", Run.pid.is_(None))).all()
        for run_id in queued:
            self._spawn(run_id)
        self.check()
        self._thread = threading.Thread(target=self._loop, args=(interval,), name="run-watch", daemon=True)
        self._thread.start()

    def _loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.check()
            except Exception:  # keep watching; the next round retries
                logger.exception("checking runs failed")

    def close(self) -> None:
        """Stop watching; workers go on (a restarted server adopts them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def check(self) -> None:
        with self.sessions() as db:
            for run in db.scalars(select(Run).where(Run.status.in_(RUN_ACTIVE))).all():
                self._check_one(db, run)

    def _alive(self, pid: int | None) -> bool:
        if not pid:
            return False
        with self._lock:
            proc = self._children.get(pid)
        if proc is not None:
            if proc.poll() is None:
                return True
            with self._lock:
                self._children.pop(pid, None)
            return False
        try:  # a worker from before a restart: alive, and really ours?
            os.kill(pid, 0)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
        except (OSError, PermissionError):
            return False
        return not cmd or b"cytopipe.serve.worker" in cmd

    def _check_one(self, db: DBSession, run: Run) -> None:
        if run.status == "queued" or self._alive(run.pid):
            return
        mask_logs(Path(run.folder))  # a blinded study's run: its logs name no arm (the worker's crash too)
        status_file = Path(run.folder) / "status.json"
        if status_file.is_file():
            code = int(json.loads(status_file.read_text(encoding="utf-8")).get("exit_code", 1))
            run.exit_code = code
            run.status = "finished" if code in (0, 3) else "failed"
            if code not in (0, 3):
                run.error = log_tail(Path(run.folder), 20)
            run.finished_at = utcnow()
            audit.record(db, "system", "run.finish", "run", run.id, {"status": "running"},
                         {"status": run.status, "exit_code": code})  # fmt: skip
            db.commit()
        elif run.attempts >= MAX_ATTEMPTS:
            run.status, run.finished_at = "failed", utcnow()
            run.error = f"the worker stopped {run.attempts} times without finishing\n" + log_tail(
                Path(run.folder), 20
            )
            audit.record(db, "system", "run.fail", "run", run.id, {"status": "running"}, {"status": "failed"})
            db.commit()
        else:  # the worker died (server or machine restart): start again, the cache resumes it
            audit.record(db, "system", "run.resume", "run", run.id, {"pid": run.pid, "attempts": run.attempts},
                         None, "worker not running (server restart?); resumed from the run's cache")  # fmt: skip
            db.commit()
            self._spawn(run.id)

    # --- AnnData export of a finished run -----------------------------------------------------
    def export_anndata(
        self, db: DBSession, run: Run, population: str, max_events: int | None, user: str
    ) -> str:
        """``cytopipe export anndata`` in a worker process, into ``out/exports/<population>.h5ad``."""
        from cytopipe.serve.storage import sanitise_name

        name = sanitise_name(population.replace(" ", "_"), "population") + ".h5ad"
        folder = Path(run.folder)
        exports = folder / "out" / "exports"
        exports.mkdir(exist_ok=True)
        args = [sys.executable, "-m", "cytopipe", "export", "anndata", str(Path(run.folder) / "out"),
                "--population", population, "--out", str(exports / name), "--no-progress"]  # fmt: skip
        if max_events:
            args += ["--max-events-per-sample", str(max_events)]
        # one process (the export is a small share of a run's work) unless the lab has a cluster
        args += (
            ["--scheduler-address", self.scheduler_address]
            if self.scheduler_address
            else ["--scheduler", "synchronous"]
        )
        audit.record(db, user, "run.export", "run", run.id, None, {"anndata": name, "population": population})
        db.commit()
        with contextlib.suppress(OSError, ValueError, yaml.YAMLError):
            if arm_mask(folder) is not None:  # a blinded study's: the log masked as it is written
                args = [sys.executable, "-m", "cytopipe.serve.worker", str(folder), PIPE, *args]
        with open(exports / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=_worker_env())  # fmt: skip

        def collect() -> None:  # when it ends: a blinded study's log masked (one an older version wrote)
            proc.wait()
            with contextlib.suppress(OSError, ValueError, yaml.YAMLError):
                if (mask := arm_mask(folder)) is not None:
                    mask_file(exports / f"{name}.log", mask)

        threading.Thread(target=collect, daemon=True).start()
        return name

    # --- cancel -------------------------------------------------------------------------------
    def cancel(self, db: DBSession, run: Run, user: str) -> None:
        if run.status not in RUN_ACTIVE:
            raise RunError(
                409, f"run {run.id} is {run.status}; only a queued or running run can be cancelled"
            )
        before = run.status  # queued (never started: the server stopped before its worker) or running
        run.status, run.finished_at = "cancelled", utcnow()
        audit.record(db, user, "run.cancel", "run", run.id, {"status": before}, {"status": "cancelled"})
        db.commit()
        if run.pid and self._alive(run.pid):
            try:
                os.killpg(run.pid, signal.SIGTERM)  # the worker and its Dask processes
            except OSError:
                pass
            threading.Thread(target=self._reap, args=(run.pid,), daemon=True).start()

    def _reap(self, pid: int, grace: float = 10.0) -> None:
        """After a cancel: SIGKILL the group if it outlives ``grace``; collect our child's exit."""
        with self._lock:
            proc = self._children.pop(pid, None)
        if proc is not None:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        else:
            time.sleep(grace)
        try:
            os.killpg(pid, signal.SIGKILL)  # Dask processes left behind, or a worker ignoring SIGTERM
        except OSError:
            pass
        if proc is not None:
            proc.wait()


def _worker_env() -> dict[str, str]:
    """The server's environment, with this cytopipe first on the path (workers run the same code)."""
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([pkg_root, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def tail(path: Path, lines: int) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 16384))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def log_tail(folder: Path, lines: int) -> str:
    """The last lines of a run's ``run.log``; of its ``console.log`` when the run.log is empty (the
    worker stopped before the command said anything, e.g. Python could not start it)."""
    return tail(folder / RUN_LOG, lines) or tail(folder / CONSOLE_LOG, lines)


def progress(run: Run, sha_by_sample: dict[str, str]) -> dict[str, Any]:
    """Per phase and per sample, from the run folder (the pipeline caches one entry per sample
    and phase): percent 0-100, the phases, the samples gated so far and the log's last lines."""
    out = Path(run.folder) / "out"
    n = max(run.n_samples, 1)

    def done(phase: str) -> set[str]:
        folder = out / ".cache" / phase
        if not folder.is_dir():
            return set()
        return {p.name[:32] for p in folder.iterdir() if p.name.endswith(".json") and p.name.count(".") == 1}

    fit, gate = done("fit"), done("gate")
    if gate and not fit:
        fit = gate  # templates without data-driven gates skip the fit pass
    finished = run.status == "finished"
    wrote = (out / "run.json").is_file()
    percent = (
        100.0 if finished else min(99.0, 5 + 40 * len(fit) / n + 45 * len(gate) / n + (5 if wrote else 0))
    )
    phases = [
        {"phase": "register", "done": n if (fit or gate or wrote) else 0, "total": n},
        {"phase": "gating-fit", "done": min(len(fit), n), "total": n},
        {"phase": "gating", "done": min(len(gate), n), "total": n},
        {"phase": "tables and report", "done": 1 if finished or wrote else 0, "total": 1},
    ]
    samples = [{"sample_id": s, "gated": sha[:32] in gate} for s, sha in sorted(sha_by_sample.items())]
    return {"percent": round(percent, 1), "phases": phases, "samples": samples,
            "log": log_tail(Path(run.folder), 8)}  # fmt: skip
