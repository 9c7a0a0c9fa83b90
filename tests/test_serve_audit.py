"""The audit trail under concurrent state changes: one unbroken chain, no lost or failed entry."""

from __future__ import annotations

import threading

import pytest

from tests.serve_support import BACKENDS, fresh_database

THREADS, EACH = 6, 15


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_changes_append_one_unbroken_chain(backend, tmp_path):
    """Changes whose first write is their audit entry, from several threads at once (as the server's
    worker threads do): without the write lock taken before reading the last entry, two of them read
    the same last id and one fails (IntegrityError on SQLite)."""
    from cytopipe.serve.audit import record, verify_chain
    from cytopipe.serve.db import database_url, open_database

    url, drop = fresh_database(backend)
    try:
        engine, sessions = open_database(database_url(url, tmp_path))
        start, errors = threading.Barrier(THREADS), []

        def work(t: int) -> None:
            start.wait()
            for i in range(EACH):
                try:
                    with sessions() as db, db.begin():
                        record(db, f"user{t}", "test.change", "thing", f"{t}-{i}", after={"i": i})
                except Exception as exc:  # noqa: BLE001 - every failure is reported below
                    errors.append(f"{t}-{i}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        with sessions() as db:
            ok, n, message = verify_chain(db)
        engine.dispose()
    finally:
        drop()
    assert not errors, errors[:5]
    assert ok and n == THREADS * EACH, message


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancelling_a_queued_run_records_it_was_queued(backend, tmp_path):
    """A run the server created but never started (it stopped in between: the run stays queued,
    with no worker) is cancelled; its audit entry says it was queued (it said "running", always)."""
    from cytopipe.serve.db import Run, Study, database_url, open_database
    from cytopipe.serve.runs import RunManager
    from cytopipe.serve.storage import BlobStore

    url, drop = fresh_database(backend)
    try:
        engine, sessions = open_database(database_url(url, tmp_path))
        manager = RunManager(tmp_path, sessions, BlobStore(tmp_path / "blobs"), None)
        with sessions() as db:
            study = Study(name="queued study", created_by="ana")
            db.add(study)
            db.flush()
            run = Run(
                study_id=study.id, status="queued", folder=str(tmp_path / "runs" / "1"), started_by="ana"
            )
            db.add(run)
            db.commit()
            manager.cancel(db, run, "ana")
            entries = list_entries(db)
        engine.dispose()
    finally:
        drop()
    cancel = [e for e in entries if e[0] == "run.cancel"]
    assert cancel == [("run.cancel", {"status": "queued"}, {"status": "cancelled"})]


def list_entries(db) -> list[tuple[str, object, object]]:
    """(action, before, after) of every audit row, in order."""
    import json

    from sqlalchemy import select

    from cytopipe.serve.db import Audit

    return [
        (a.action, json.loads(a.before), json.loads(a.after))
        for a in db.scalars(select(Audit).order_by(Audit.id))
    ]
