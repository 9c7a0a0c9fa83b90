"""Cache entries written in the background: the same entries, linked when already on disk, and a
write error still stops the run (kill -9 and full-disk resumption: tests/test_pipeline.py,
tests/test_run_safety.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cytopipe.errors import OutputWriteError
from cytopipe.pipeline.cachewriter import CacheWriter
from cytopipe.pipeline.context import _load_result, _save_result
from cytopipe.store import RunFolder


def _result(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {
        "ok": True,
        "pid": 123,
        "seconds": 0.5,
        "stats": pd.DataFrame({"population": ["A", "B"], "count": rng.integers(0, 99, 2)}),
        "train": rng.normal(size=(7, 3)).astype(np.float32),
        "metrics": {"n": i, "flags": ["x"]},
    }


def test_background_entries_equal_the_direct_ones_and_linked_parts_share_the_files(tmp_path):
    folder = RunFolder(tmp_path / "run").create()
    writer = CacheWriter(folder)
    for i in range(5):
        writer.save("fit", f"k{i}", _result(i))
        _save_result(folder, "direct", f"k{i}", _result(i))
    ready = {k: v for k, v in _result(0).items() if k != "train"}
    writer.save("gate", "g0", ready, source=("fit", "k0"))  # queued after fit/k0: linked from it
    writer.close()
    for i in range(5):
        got, want = _load_result(folder, "fit", f"k{i}"), _load_result(folder, "direct", f"k{i}")
        assert sorted(got) == sorted(want) == ["metrics", "ok", "stats", "train"]
        pd.testing.assert_frame_equal(got["stats"], want["stats"])
        np.testing.assert_array_equal(got["train"], want["train"])
        assert got["metrics"] == want["metrics"]
        assert (
            folder.cached("fit", f"k{i}.stats", "arrow").read_bytes()
            == folder.cached("direct", f"k{i}.stats", "arrow").read_bytes()
        )
    gate = _load_result(folder, "gate", "g0")
    assert sorted(gate) == ["metrics", "ok", "stats"]
    pd.testing.assert_frame_equal(gate["stats"], _result(0)["stats"].reset_index(drop=True))
    linked = folder.cached("gate", "g0.stats", "arrow").stat()
    assert linked.st_ino == folder.cached("fit", "k0.stats", "arrow").stat().st_ino
    assert not list((folder.cache / "gate").glob(".*"))  # no temporary file left


def test_a_missing_source_entry_is_written_in_full(tmp_path):
    folder = RunFolder(tmp_path / "run").create()
    writer = CacheWriter(folder)
    writer.save("gate", "g0", _result(3), source=("fit", "absent"))
    writer.close()
    got = _load_result(folder, "gate", "g0")
    np.testing.assert_array_equal(got["train"], _result(3)["train"])


def test_a_write_error_is_raised_in_the_calling_thread(tmp_path):
    folder = RunFolder(tmp_path / "run").create()
    (folder.cache / "fit").write_text("a file where the phase folder should be")
    writer = CacheWriter(folder)
    writer.save("fit", "k0", _result(0))
    with pytest.raises(OutputWriteError):
        writer.close()
    writer.close()  # raised once: a second close (the run's clean-up) is quiet


def test_a_queued_table_write_runs_after_the_entries_before_it_and_its_error_stops_the_run(tmp_path):
    """CacheWriter.call (gate_review.parquet written while the clustering steps run): in order,
    after the entries queued before it, and a failure (here: a folder where the file goes) is
    raised by close() as the run's error."""
    from cytopipe.report.gate_review import read_gate_review
    from cytopipe.store import atomic_write_bytes

    folder = RunFolder(tmp_path / "run").create()
    writer = CacheWriter(folder)
    seen = []
    writer.save("fit", "k0", _result(0))
    writer.call(lambda: seen.append(_load_result(folder, "fit", "k0") is not None))
    writer.call(lambda: atomic_write_bytes(folder.path / "table.bin", b"abc"))
    writer.close()
    assert seen == [True] and (folder.path / "table.bin").read_bytes() == b"abc"
    assert read_gate_review(folder.path) is None

    (folder.path / "blocked").mkdir()  # a folder where the table goes: it cannot be written
    writer = CacheWriter(folder)
    writer.call(lambda: atomic_write_bytes(folder.path / "blocked", b"abc"))
    with pytest.raises(OutputWriteError):  # by save() if the failure came first, else by close()
        writer.save("fit", "k1", _result(1))  # after a failure: not written (the run stops)
        writer.close()
    writer.close()
    assert _load_result(folder, "fit", "k1") is None


def test_the_run_links_the_fused_pass_results_into_the_gating_pass_entries(sim_run):
    folder = RunFolder(sim_run)
    fit_parts = {p.stat().st_ino: p for p in (folder.cache / "fit").glob("*.stats.arrow")}
    gate_parts = list((folder.cache / "gate").glob("*.stats.arrow"))
    linked = [p for p in gate_parts if p.stat().st_ino in fit_parts]
    assert gate_parts and linked  # the samples whose fits did not fall back: not written twice
    for part in linked:
        key = part.name.split(".")[0]
        gate = _load_result(folder, "gate", key)
        fit = _load_result(folder, "fit", fit_parts[part.stat().st_ino].name.split(".")[0])
        assert "fits" not in gate and "fits" in fit
        for name in gate:
            if isinstance(gate[name], pd.DataFrame):
                pd.testing.assert_frame_equal(gate[name], fit[name])


def test_the_pooled_key_part_is_the_hash_of_the_samples_estimates_and_computed_once(monkeypatch):
    from types import SimpleNamespace

    import cytopipe.pipeline.context as context
    from cytopipe.config import stable_hash
    from cytopipe.gating.engine import PooledEstimates

    table = pd.DataFrame(
        {
            "key": ["Live", "Live", "Live", "Live", "Live"],
            "level": ["cohort", "patient", "patient", "batch", "batch"],
            "group": ["", "P1", "P2", "B1", "B2"],
            "n": [4, 2, 2, 2, 2],
            "params": ["[1.0]", "[1.1]", "[0.9]", "[1.2]", "[0.8]"],
        }
    )
    ctx = SimpleNamespace(state=SimpleNamespace(pooled=PooledEstimates(table, pd.DataFrame())))
    jobs = [{"patient_id": p, "batch": b} for p in ("P1", "P2") for b in ("B1", "B2")]
    want = [stable_hash(table.iloc[[0, 1 + (j["patient_id"] == "P2"), 3 + (j["batch"] == "B2")]].to_json())[:8]
            for j in jobs]  # fmt: skip
    assert len(set(want)) == 4
    hashed = []
    real = context.stable_hash
    monkeypatch.setattr(context, "stable_hash", lambda x: hashed.append(x) or real(x))
    for _phase in ("gate", "cluster-train", "cluster-map"):
        extra = context._pooled_key(ctx)
        assert [extra(j) for j in jobs] == want
    assert len(hashed) == 4  # once per patient and batch, not once per phase


def test_an_entry_costs_one_folder_fsync_for_its_parts_and_one_for_its_json(tmp_path, monkeypatch):
    """A cache entry of two parts: every file still fsynced, the folder fsynced once after the
    parts are renamed (not once per part) and once after the JSON."""
    import cytopipe.files as files
    import cytopipe.pipeline.cachewriter as cachewriter

    folder = RunFolder(tmp_path / "run").create()
    calls = []
    real = files._fsync_dir

    def counted(path):  # the real fsync, counted
        calls.append(path)
        real(path)

    monkeypatch.setattr(files, "_fsync_dir", counted)
    monkeypatch.setattr(cachewriter, "_fsync_dir", counted)
    cachewriter.write_encoded(folder, "fit", "k0", *cachewriter.encode_result(_result(0)))
    assert calls == [folder.cache / "fit"] * 2
    got = _load_result(folder, "fit", "k0")
    pd.testing.assert_frame_equal(got["stats"], _result(0)["stats"])
    np.testing.assert_array_equal(got["train"], _result(0)["train"])


def test_cached_tables_read_back_as_the_parquet_cache_read_them(tmp_path):
    """The cache's tables are Arrow IPC files (cheaper to write than Parquet): read back, each is
    the DataFrame a Parquet round trip gave (the earlier cache format), for the column kinds the
    tasks return, attrs and an empty frame included; an entry an earlier version wrote as Parquet
    (a run resumed after an upgrade) is still read."""
    import io

    from cytopipe.arrowfiles import arrow_bytes, read_arrow

    frame = pd.DataFrame(
        {
            "population": ["A", "B", None],
            "count": np.array([1, 2, 3], dtype=np.int64),
            "panel": np.array([1, 2, 3], dtype=np.int16),
            "share": [0.5, np.nan, 1.0],
            "hist": [np.arange(3, dtype=np.int16), np.arange(2, dtype=np.int16), np.zeros(0, np.int16)],
            "params": [[1.0, 2.0], None, [3.0]],
            "flag": pd.Categorical(["x", "y", "x"]),
            "n": pd.array([1, None, 3], dtype="Int64"),
        },
        index=[5, 6, 7],
    )
    with_attrs = frame.copy()
    with_attrs.attrs["source"] = "a test"
    for i, df in enumerate((frame, with_attrs, frame.iloc[:0])):
        buf = io.BytesIO()
        df.reset_index(drop=True).to_parquet(buf, engine="pyarrow", index=False)
        want = pd.read_parquet(io.BytesIO(buf.getvalue()))
        path = tmp_path / f"t{i}.arrow"
        path.write_bytes(arrow_bytes(df))
        got = read_arrow(path)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        assert got.attrs == want.attrs == df.attrs
        for column in ("hist", "params"):
            for a, b in zip(got[column], want[column]):
                assert type(a) is type(b) and (
                    a is None or (a.dtype == b.dtype and a.tobytes() == b.tobytes())
                )

    folder = RunFolder(tmp_path / "run").create()
    folder.save_cached("fit", "old.stats", "parquet", frame)
    folder.save_cached("fit", "old", "json", {"ok": True, "_parts": {"stats": "parquet"}})
    pd.testing.assert_frame_equal(_load_result(folder, "fit", "old")["stats"], frame.reset_index(drop=True))
