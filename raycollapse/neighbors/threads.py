"""Thread control for the core's matrix products: BLAS threads, FAISS's OpenMP threads and
FAISS's choice of distance kernel. Every such setting in raycollapse goes through this module.

Multi-threaded OpenBLAS and OpenMP teams spin-wait at every call; with thousands of small
products per search they stall, worst when a core is shared. The core therefore runs such loops
single-threaded and spreads independent pieces over Python threads instead (numpy's BLAS and
FAISS release the GIL).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import faiss

from raycollapse.errors import UserInputError

__all__ = ["blas_single_threaded", "faiss_blas_distances", "faiss_threads"]


@contextlib.contextmanager
def blas_single_threaded() -> Iterator[int]:
    """Run the block with single-threaded BLAS; yields the thread count BLAS had before.

    The selection loops issue thousands of small or memory-bound products. Multi-threaded
    OpenBLAS spin-waits at every call and stalls when a core is shared (measured on the 2-core
    dev machine under load 4: greedy N=100k, d=64, B=10k took 24 s with 2 BLAS threads and
    5.5 s with 1). Large products are split over Python threads instead, as many as BLAS had
    threads (Ray sets that from the task's CPUs). BLAS is process-global: other threads of this
    process run single-threaded BLAS meanwhile. A no-op without threadpoolctl.
    """
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        yield 1
        return
    blas = ThreadpoolController().select(user_api="blas")
    threads = max([int(i["num_threads"]) for i in blas.info()] or [1])
    limiter = blas.limit(limits=1)
    try:
        yield threads
    finally:
        limiter.restore_original_limits()


@contextlib.contextmanager
def faiss_threads(threads: int | None) -> Iterator[None]:
    """FAISS calls from this thread use ``threads`` OpenMP threads inside the block (None: leave
    FAISS's setting). Raises ``UserInputError`` for a count that is not a positive integer.

    OpenMP's thread count is per calling thread, so worker threads that each run small FAISS
    searches (``faiss_threads(1)``) do not disturb the caller's setting.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserInputError(f"threads must be a positive integer or None, got {threads!r}")
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)


_blas_lock = threading.Lock()
_blas_users = 0
_blas_saved = 0


@contextlib.contextmanager
def faiss_blas_distances() -> Iterator[None]:
    """FAISS computes distances by BLAS matrix products for every query block in the body.

    Its default switches to BLAS only from 128,000 queries (FAISS 1.15); the partitioned
    search's group blocks (hundreds of queries against thousands of rows) run about twice as
    fast through BLAS, and centring plus the exact re-ranking remove the precision the direct
    path would add. The setting is process-global: it is counted, so overlapping searches on
    several threads restore FAISS's own value only when the last one ends.
    """
    global _blas_users, _blas_saved
    with _blas_lock:
        if _blas_users == 0:
            _blas_saved = faiss.cvar.distance_compute_blas_threshold
            faiss.cvar.distance_compute_blas_threshold = 1
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                faiss.cvar.distance_compute_blas_threshold = _blas_saved
