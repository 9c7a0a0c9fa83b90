"""Outputs on a full disk and in a read-only folder: the old file is kept, the error names the file
and the reason (issue 11, defects 2 and 4), on a real small tmpfs."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import pytest

from cytopipe import store
from cytopipe.errors import OutputWriteError
from cytopipe.tabular import write_csv
from tests.disk_support import fill, remount, small_tmpfs, temp_files


def tables(n: int) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(0)
    return {
        "population_stats": pd.DataFrame({"sample_id": [f"S{i % 50}" for i in range(n)], "x": rng.random(n)}),
        "samples": pd.DataFrame({"sample_id": [f"S{i}" for i in range(50)], "status": "ok"}),
    }


def rows(catalog) -> dict[str, int]:
    with duckdb.connect(str(catalog), read_only=True) as con:
        return {
            t: con.execute(f"select count(*) from {t}").fetchone()[0] for t in ("population_stats", "samples")
        }


def test_a_full_disk_during_the_catalog_write_keeps_the_old_catalog(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "8m") as mnt:
        catalog = mnt / "catalog.duckdb"
        store.write_catalog(catalog, tables(100), {"run": 1})
        good = catalog.read_bytes()
        fill(mnt, leave=200_000)
        big = tables(400_000)  # several MB: cannot fit
        with pytest.raises(OutputWriteError) as info:
            store.write_catalog(catalog, big, {"run": 2})
        message = str(info.value)
        assert "catalog.duckdb" in message and "No space left on device" in message
        assert "rerun" in message and "resumes" in message
        assert catalog.read_bytes() == good  # byte for byte the old catalog
        assert rows(catalog) == {"population_stats": 100, "samples": 50}
        assert temp_files(mnt) == []  # neither the temporary database nor its .wal is left


def test_a_full_disk_keeps_old_parquet_json_and_csv_files(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "2m") as mnt:
        pq, js, csv = mnt / "t.parquet", mnt / "run.json", mnt / "t.csv"
        store.atomic_write_parquet(pq, tables(10)["population_stats"])
        store.atomic_write_json(js, {"v": 1})
        write_csv(tables(10)["samples"], csv)
        before = {p: p.read_bytes() for p in (pq, js, csv)}
        fill(mnt, leave=4096)
        rng = np.random.default_rng(1)
        noise = pd.DataFrame({"x": rng.random(300_000)})  # incompressible: ~2.4 MB
        with pytest.raises(OutputWriteError, match=r"t\.parquet.*No space left on device"):
            store.atomic_write_parquet(pq, noise)
        with pytest.raises(OutputWriteError, match=r"run\.json.*No space left on device"):
            store.atomic_write_json(js, {"v": rng.random(100_000).tolist()})
        with pytest.raises(OutputWriteError, match=r"t\.csv.*No space left on device"):
            write_csv(noise, csv)
        assert {p: p.read_bytes() for p in (pq, js, csv)} == before
        assert temp_files(mnt) == []


def test_a_read_only_folder_is_named_with_the_reason(tmp_path):
    with small_tmpfs(tmp_path / "mnt", "1m") as mnt:
        store.atomic_write_json(mnt / "run.json", {"v": 1})
        remount(mnt, "ro")
        with pytest.raises(OutputWriteError) as info:
            store.atomic_write_json(mnt / "run.json", {"v": 2})
        assert "run.json" in str(info.value) and "Read-only file system" in str(info.value)
        assert "the folder is read-only" in str(info.value)
        with pytest.raises(OutputWriteError, match="catalog.duckdb.*Read-only file system"):
            store.write_catalog(mnt / "catalog.duckdb", tables(10), {})
        remount(mnt, "rw")
        assert store.read_run_info(mnt) == {"v": 1}


def test_a_catalog_that_duckdb_did_not_save_is_never_renamed_over_the_good_one(tmp_path, monkeypatch):
    """DuckDB's final save can fail without raising (the issue's full-disk case): the data stays in the
    .wal and the database file is empty. Reproduced by making the checkpoint a no-op, so the
    temporary catalog really is left empty with its write-ahead log."""
    catalog = tmp_path / "catalog.duckdb"
    store.write_catalog(catalog, tables(100), {"run": 1})
    good = catalog.read_bytes()
    real_connect = duckdb.connect

    class NoSave:
        def __init__(self, *a, **kw):
            kw.setdefault("config", {})["checkpoint_threshold"] = "1TB"
            self.con = real_connect(*a, **kw)

        def execute(self, sql, *a):
            if sql.strip().upper() == "CHECKPOINT":
                return None
            return self.con.execute(sql, *a)

        def executemany(self, *a):
            return self.con.executemany(*a)

        def register(self, *a):
            return self.con.register(*a)

        def unregister(self, *a):
            return self.con.unregister(*a)

        def close(self):  # what a failed final save leaves: the WAL, not the tables
            self.con.execute("PRAGMA disable_checkpoint_on_shutdown")
            self.con.close()

    def connect(*a, **kw):
        return real_connect(*a, **kw) if kw.get("read_only") else NoSave(*a, **kw)

    monkeypatch.setattr(duckdb, "connect", connect)
    with pytest.raises(OutputWriteError, match="write-ahead log|incomplete"):
        store.write_catalog(catalog, tables(200), {"run": 2})
    monkeypatch.undo()
    assert catalog.read_bytes() == good
    assert rows(catalog) == {"population_stats": 100, "samples": 50}
    assert temp_files(tmp_path) == []
