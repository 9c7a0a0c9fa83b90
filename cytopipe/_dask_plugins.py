"""Dask worker plugins of :class:`cytopipe.pipeline.executors.DaskExecutor` (imported only with Dask)."""

from __future__ import annotations

from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin


class OneThreadBLAS(WorkerPlugin):
    """BLAS/OpenMP thread pools of a local worker limited to one thread. The nanny's ``env``
    sets OMP/MKL/OPENBLAS_NUM_THREADS in the worker process, but only after it has imported
    numpy (whose OpenBLAS has sized its pool by then): threadpoolctl resizes the pools."""

    name = "cytopipe-one-thread-blas"

    def setup(self, worker: Any) -> None:
        from cytopipe.threads import limit_process_to_one_thread

        self._limits = limit_process_to_one_thread()
