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


@pytest.mark.parametrize("first_to_leave", ["a", "b"])
def test_one_thread_holds_while_another_thread_is_inside(two_blas_threads, first_to_leave):
    """Two threads (the server runs studies in threads) inside one_thread() at once: whichever
    leaves first, the other still runs on one thread, and the pool is restored once both left.
    (A plain threadpoolctl limiter per block, the old gating helper, lifts the limit under the
    other thread when the thread that set it leaves first.)"""
    entered = {"a": threading.Event(), "b": threading.Event()}
    left = {"a": threading.Event(), "b": threading.Event()}
    seen: dict[str, int] = {}
    order = [first_to_leave, "b" if first_to_leave == "a" else "a"]

    def worker(me: str) -> None:
        if me == "b":
            entered["a"].wait(30)  # a enters (and sets the limit) first
        with one_thread():
            entered[me].set()
            entered["a" if me == "b" else "b"].wait(30)
            if me == order[1]:
                left[order[0]].wait(30)
                seen["after the other left"] = _blas_threads()
        left[me].set()

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen == {"after the other left": 1}
    assert _blas_threads() == 2  # the original size once both have left


def test_one_thread_limits_a_library_loaded_after_the_first_block():
    """Libraries are recounted only after an import (counting them costs ~2 ms): scikit-learn's
    own OpenMP, loaded by an import after a first block, is limited by the next block."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "np.ones((4, 4)) @ np.ones((4, 4))\n"
        "import threadpoolctl\n"
        "from cytopipe.threads import one_thread\n"
        "with one_thread():\n"
        "    pass\n"
        "assert 'openmp' not in {i['internal_api'] for i in threadpoolctl.threadpool_info()}\n"
        "import sklearn.cluster  # loads scikit-learn's OpenMP runtime\n"
        "threadpoolctl.ThreadpoolController().limit(limits=2, user_api='openmp')\n"
        "with one_thread():\n"
        "    inside = {i['internal_api']: i['num_threads'] for i in threadpoolctl.threadpool_info()}\n"
        "print(inside['openmp'], inside['openblas'])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]
