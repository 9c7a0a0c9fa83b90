"""cytopipe.threads: the one BLAS/OpenMP limiter (compensation, gating's compensation and mixture fits)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

threadpoolctl = pytest.importorskip("threadpoolctl")  # a dependency of scikit-learn

from cytopipe.threads import one_thread, pool_sizes  # noqa: E402


def _blas_threads() -> int:
    return pool_sizes()["openblas"]


@pytest.fixture
def two_blas_threads():
    """Start from two BLAS threads (CI has 2 cores), whatever an earlier test left."""
    np.ones((4, 4)) @ np.ones((4, 4))  # numpy's OpenBLAS is loaded
    release = threadpoolctl.OpenBLASController.clear_controlling_thread
    before = threadpoolctl.ThreadpoolController().limit(limits=2, user_api="blas")
    release()  # the threads of the test may set the pool size (threadpoolctl allows one thread)
    assert _blas_threads() == 2
    yield
    before.restore_original_limits()
    release()


def test_one_thread_limits_and_restores(two_blas_threads):
    with one_thread():
        assert _blas_threads() == 1
        with one_thread():  # nested: still one, and leaving the inner block keeps the limit
            assert _blas_threads() == 1
        assert _blas_threads() == 1
    assert _blas_threads() == 2


def test_one_thread_holds_while_another_thread_is_inside(two_blas_threads):
    """threadpoolctl's own limiter restores on every exit: a block leaving in one thread would
    lift the limit under a block still running in another (the server runs studies in threads)."""
    a_inside, b_done, a_may_leave = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, int] = {}

    def a() -> None:
        with one_thread():
            a_inside.set()
            b_done.wait(30)
            seen["a after b left"] = _blas_threads()
            a_may_leave.wait(30)

    def b() -> None:
        a_inside.wait(30)
        with one_thread():
            seen["b inside"] = _blas_threads()
        b_done.set()

    ta, tb = threading.Thread(target=a), threading.Thread(target=b)
    ta.start(), tb.start()
    tb.join(60)
    a_may_leave.set()
    ta.join(60)
    assert seen == {"b inside": 1, "a after b left": 1}
    assert _blas_threads() == 2  # the original size once both have left
