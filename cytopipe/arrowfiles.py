"""Small tables as Arrow IPC files ("Feather v2", uncompressed): the per-sample cache's tables.

A run writes three small tables per sample and pass to its cache (``RUN_DIR/.cache``), in its own
process, which shares the cores with the workers. Encoded as Parquet (statistics, snappy, its
metadata) the three cost 5.9-6.0 ms of CPU per sample, as an IPC file 3.4-3.7 ms, mostly the
pandas -> Arrow conversion both need (2026-12-07, 2-core Intel Xeon VM, tables of the 150-file
trial of ``bench/trial.py``, min of 5 x 60 encodings, load 3.6); in that trial's run Parquet
encoding (4.8 s) took most of the 5.0 s its cache entries cost of the run process's 12.8 s
of CPU in the per-file phases.
The run's final tables stay Parquet. Read back, a table is the DataFrame a Parquet round trip
gives (pandas' own conversion, ``pd.read_feather``; ``DataFrame.attrs`` kept as pandas keeps them
in Parquet).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from cytopipe.files import atomic_write, check_rows

ARROW = "arrow"
_ATTRS = b"PANDAS_ATTRS"  # where pandas' to_parquet keeps DataFrame.attrs; the same key here


def arrow_bytes(df: pd.DataFrame) -> bytes:
    """``df`` (index dropped) as an uncompressed Arrow IPC file's bytes; ``df.attrs`` kept."""
    import pyarrow as pa

    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    if df.attrs:
        meta = dict(table.schema.metadata or {})
        meta[_ATTRS] = json.dumps(df.attrs).encode("utf-8")
        table = table.replace_schema_metadata(meta)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def arrow_rows(path: str | Path) -> int:
    """The row count of an Arrow IPC file, from its footer and batch headers (raises when the
    file is truncated or damaged)."""
    import pyarrow as pa

    with pa.OSFile(str(path), "rb") as source:
        reader = pa.ipc.open_file(source)
        return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def read_arrow(path: str | Path) -> pd.DataFrame:
    """An Arrow IPC file written by :func:`arrow_bytes` as the DataFrame it was written from
    (converted as ``pd.read_parquet`` converts, by ``pd.read_feather``)."""
    import pyarrow as pa

    df = pd.read_feather(path)
    with pa.OSFile(str(path), "rb") as source:
        meta = pa.ipc.open_file(source).schema.metadata or {}
    if _ATTRS in meta:
        df.attrs = json.loads(meta[_ATTRS])
    return df


def atomic_write_arrow(path: str | Path, df: pd.DataFrame) -> Path:
    """An Arrow IPC file (:func:`arrow_bytes`), verified by reading its row count back."""
    data = arrow_bytes(df)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    return atomic_write(path, write, lambda tmp: check_rows(tmp, path, len(df), arrow_rows))
