"""What a per-sample task returns, and its size as Dask's memory manager counts it.

A :class:`TaskResult` is a plain ``dict`` of small tables, arrays and numbers; its own type only
gives Dask a cheap size (:func:`_result_nbytes`), registered with ``dask.sizeof`` when this module
is imported (by the tasks' module, so in every worker that runs one).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd


class TaskResult(dict):
    """What a per-sample task returns: a plain ``dict`` (small tables, arrays, numbers), of a type
    of its own only so that Dask sizes it cheaply (:func:`_result_nbytes`)."""

    __slots__ = ()


def _result_nbytes(result: Mapping[str, Any]) -> int:
    """Dask's estimate of a task result's memory, made cheap. A worker sizes every result twice
    (memory manager, then sending it), and dask's own sizeof samples the Python objects of every
    object column (the gate-review table's lists and strings): 1.3 ms a call for a 200k-event
    sample's gating result, so ~2.6 ms of the worker's event loop per ~85 ms task, under the GIL
    the next task needs (half the loop's busy time in a profile); this takes ~20 us. Arrays and
    numeric columns are counted exactly, an object cell as 64 bytes: an underestimate for the
    review table's lists (dask counts ~1.2 MB for a 200k-event sample's result, this ~0.1 MB),
    harmless because a result leaves the worker as soon as the client has it, so results never
    build up for the memory manager to spill."""
    total = 64
    for value in result.values():
        if isinstance(value, pd.DataFrame):  # from the dtypes alone: pandas' own sums cost ~0.3 ms
            per_row = sum(64 if dt.kind == "O" else getattr(dt, "itemsize", 64) for dt in value.dtypes)
            total += per_row * len(value)
        elif isinstance(value, np.ndarray):
            total += int(value.nbytes)
        else:
            total += 64
    return total


def _register_sizeof() -> None:
    from dask.sizeof import sizeof

    sizeof.register(TaskResult)(_result_nbytes)


_register_sizeof()
