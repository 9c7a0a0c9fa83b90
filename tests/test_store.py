"""The run folder: atomic files, Parquet tables, a real DuckDB catalog, the resume cache."""

from __future__ import annotations

import json
import os
import stat

import duckdb
import numpy as np
import pandas as pd
import pytest

from cytopipe import store
from cytopipe.errors import StoreError


def tables():
    stats = pd.DataFrame(
        {
            "sample_id": ["S1", "S1", "S2"],
            "population": ["Lymphocytes", "T cells", "Lymphocytes"],
            "count": [900, 500, 880],
            "pct_parent": [90.0, 55.6, 88.0],
        }
    )
    samples = pd.DataFrame({"sample_id": ["S1", "S2", "S3"], "status": ["ok", "flagged", "failed"]})
    return {"population_stats": stats, "samples": samples}


def test_atomic_write_leaves_no_temporary_files_and_normal_permissions(tmp_path):
    path = tmp_path / "sub" / "a.json"
    store.atomic_write_json(path, {"b": 1, "a": np.int64(2), "x": np.float32(0.5)})
    store.atomic_write_json(path, {"b": 3})
    assert json.loads(path.read_text()) == {"b": 3}
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask  # as open() would, not mkstemp's 0o600


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "t.json"
    store.atomic_write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        store.atomic_write_json(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert len(list(tmp_path.iterdir())) == 1


def test_outputs_parquet_and_duckdb_hold_the_same_tables(tmp_path):
    folder = store.RunFolder(tmp_path / "run").create()
    info = {"study": "x", "hashes": {"template": "abc"}, "seed": 3}
    folder.write_outputs(tables(), info)
    for name, df in tables().items():
        pd.testing.assert_frame_equal(store.read_table(folder.path, name), df)
        with duckdb.connect(str(folder.catalog), read_only=True) as con:
            pd.testing.assert_frame_equal(con.execute(f"select * from {name}").df(), df, check_dtype=False)
    assert store.read_run_info(folder.path) == info
    run = store.query(folder.path, "select key, value from run order by key")
    assert run["key"].tolist() == ["hashes", "seed", "study"]
    assert json.loads(run.loc[run.key == "hashes", "value"].iloc[0]) == {"template": "abc"}
    got = store.query(folder.path, "select count(*) as n from population_stats where population = 'T cells'")
    assert int(got["n"].iloc[0]) == 1
    # no temporary files left beside the outputs
    assert sorted(p.name for p in folder.path.iterdir()) == [
        ".cache",
        "catalog.duckdb",
        "population_stats.parquet",
        "run.json",
        "samples.parquet",
        "study",
    ]


def test_rewriting_outputs_gives_identical_bytes(tmp_path):
    a = store.RunFolder(tmp_path / "a").create()
    b = store.RunFolder(tmp_path / "b").create()
    a.write_outputs(tables(), {"x": 1})
    b.write_outputs(tables(), {"x": 1})
    for name in ("population_stats.parquet", "samples.parquet", "run.json"):
        assert (a.path / name).read_bytes() == (b.path / name).read_bytes()


def test_cache_round_trip_damage_and_prune(tmp_path):
    folder = store.RunFolder(tmp_path).create()
    df = tables()["population_stats"]
    folder.save_cached("gate", "k1", "arrow", df)
    folder.save_cached("gate", "k1", "json", {"ok": True})
    folder.save_cached("pool", "k1", "npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    pd.testing.assert_frame_equal(folder.load_cached("gate", "k1", "arrow"), df)
    arrow = folder.cached("gate", "k1", "arrow")
    arrow.write_bytes(arrow.read_bytes()[:-40])  # truncated: recomputed, not trusted
    assert folder.load_cached("gate", "k1", "arrow") is None
    assert folder.load_cached("gate", "k1", "json") == {"ok": True}
    assert folder.load_cached("pool", "k1", "npy").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert folder.load_cached("gate", "missing", "json") is None
    folder.cached("gate", "k2", "json").write_text('{"ok": tr')  # damaged: recomputed, not trusted
    assert folder.load_cached("gate", "k2", "json") is None
    assert folder.prune_cache("gate", keep=["k1"]) == 1
    assert folder.load_cached("gate", "k1", "json") == {"ok": True}


def test_reading_something_that_is_not_a_run(tmp_path):
    with pytest.raises(StoreError, match="run folder not found"):
        store.read_run_info(tmp_path / "nope")
    with pytest.raises(StoreError, match="not a finished cytopipe run"):
        store.read_run_info(tmp_path)
    with pytest.raises(StoreError, match="table 'samples' not found"):
        store.read_table(tmp_path, "samples")
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a folder"):
        store.RunFolder(tmp_path / "file").create()


def test_sha256_of_a_file(tmp_path):
    import hashlib

    for size in (5_000_000, 0, 1 << 20, (1 << 20) + 1):  # several reads, none, exactly one, a last byte
        data = os.urandom(size)
        (tmp_path / "f").write_bytes(data)
        assert store.file_sha256(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_a_written_table_that_does_not_read_back_whole_is_refused(tmp_path):
    """The row-count check every table write ends with (Parquet and the cache's Arrow IPC files):
    a truncated file or one with fewer rows than written raises, naming the file."""
    import pyarrow.parquet as pq

    from cytopipe.arrowfiles import arrow_bytes, arrow_rows
    from cytopipe.errors import OutputWriteError
    from cytopipe.files import check_rows

    df = tables()["population_stats"]
    whole = tmp_path / "t.arrow"
    whole.write_bytes(arrow_bytes(df))
    check_rows(whole, tmp_path / "final.arrow", len(df), arrow_rows)
    with pytest.raises(OutputWriteError, match=rf"has {len(df)} of {len(df) + 1} rows") as exc:
        check_rows(whole, tmp_path / "final.arrow", len(df) + 1, arrow_rows)
    assert "final.arrow" in str(exc.value)
    cut = tmp_path / "cut.arrow"
    cut.write_bytes(whole.read_bytes()[:-40])
    with pytest.raises(OutputWriteError, match="cannot be read back"):
        check_rows(cut, tmp_path / "final.arrow", len(df), arrow_rows)
    df.to_parquet(tmp_path / "t.parquet")
    cut = tmp_path / "cut.parquet"
    cut.write_bytes((tmp_path / "t.parquet").read_bytes()[:-20])
    with pytest.raises(OutputWriteError, match="cannot be read back"):
        check_rows(cut, tmp_path / "final.parquet", len(df), lambda t: pq.ParquetFile(t).metadata.num_rows)
