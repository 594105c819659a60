"""Thread control for the core's many small matrix products (BLAS and FAISS's OpenMP).

Multi-threaded OpenBLAS and OpenMP teams spin-wait at every call; with thousands of small
products per search they stall, worst when a core is shared. The core therefore runs such loops
single-threaded and spreads independent pieces over Python threads instead (numpy's BLAS and
FAISS release the GIL).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import faiss

__all__ = ["blas_single_threaded", "faiss_single_threaded"]


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
def faiss_single_threaded() -> Iterator[None]:
    """FAISS calls from this thread use one OpenMP thread inside the block.

    OpenMP's thread count is per calling thread, so worker threads that each run small FAISS
    searches call this once and do not disturb the caller's setting.
    """
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(previous)
