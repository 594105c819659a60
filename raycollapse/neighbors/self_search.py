"""Within-set exact kNN on the CPU: partition pruning where it pays, symmetric products elsewhere.

:func:`~raycollapse.neighbors.knn.knn_self` on the CPU (``method='auto'``) comes here. Rows
whose neighbours partition pruning finds cheaply (clustered data,
:mod:`raycollapse.neighbors.partitioned`) are searched that way; the rows it gives up on (data
without clusters) are searched by :func:`~raycollapse.neighbors.symmetric.symmetric_self_knn`,
which computes each pair of them once instead of twice. Both give the exact k nearest other
rows by (canonical distance, index), as the flat search does.
"""

from __future__ import annotations

import numpy as np

from raycollapse.neighbors.distances import drop_self_rows
from raycollapse.neighbors.partitioned import Partition, partitioned_candidates
from raycollapse.neighbors.symmetric import MAX_SCREEN_NORM2, symmetric_self_knn

__all__ = ["neighbour_contrast", "partition_may_pay", "screen_applies", "self_knn_cpu"]

# Below this scale the screen's absolute underflow slack (2^-100 on squared distances) would
# make every pair a candidate; such data go through the flat search.
_MIN_SCALE = 1e-12
# neighbour_contrast's sample, and the contrast above which partition pruning is not tried.
# Measured (N = 20k-60k, k = 3): pruning gave up on every row from a contrast of 0.43 up
# (isotropic d >= 8: 0.43-0.91; clusters under heavy noise: 0.56) and still pruned some rows up
# to 0.50; clustered data sit at 0.20-0.35. 0.6 leaves a margin for the partial cases.
_CONTRAST_SAMPLE = 1024
_CONTRAST_SKIP = 0.6


def screen_applies(x: np.ndarray) -> bool:
    """Whether the float32 symmetric screen is safe for ``x``: no overflow of its products
    (squared centred norms below 1e30) and values not so small that underflow dominates."""
    top = float(np.abs(x).max())
    return _MIN_SCALE <= top and 4.0 * x.shape[1] * (2.0 * top) ** 2 <= MAX_SCREEN_NORM2


def neighbour_contrast(x: np.ndarray, k: int, seed: int = 0) -> float:
    """How far a row's k-th nearest neighbour is, relative to a typical row: the median, over a
    seeded sample of 1024 rows, of (k-th nearest distance / median distance) within the sample
    (float32 products; ``k`` capped at the sample size - 1). Near 1 for data without structure
    in high dimension, where no partition can rule out rows; small for clustered data."""
    n = x.shape[0]
    s = min(n, _CONTRAST_SAMPLE)
    if s < 3:
        return 1.0
    rows = np.sort(np.random.default_rng(seed).choice(n, s, replace=False))
    y = x[rows].astype(np.float64)
    y = (y - y.mean(axis=0)).astype(np.float32)
    n2 = np.einsum("ij,ij->i", y, y)
    d2 = n2[:, None] + n2[None, :] - np.float32(2.0) * (y @ y.T)
    np.fill_diagonal(d2, np.inf)
    kk, mid = min(k, s - 1) - 1, (s - 1) // 2
    part = np.partition(d2, sorted({kk, mid}), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt(np.maximum(part[:, kk], 0.0) / part[:, mid])
    ratio = ratio[np.isfinite(ratio)]  # rows whose median distance is 0 carry no scale
    return float(np.median(ratio)) if ratio.size else 1.0


def partition_may_pay(x: np.ndarray, k: int) -> bool:
    """Whether partition pruning is worth building for a within-set search of ``x``: False when
    :func:`neighbour_contrast` is above 0.6 (pruning gave up there in every measured case,
    after building the partition and probing 5 % of the rows). Decides the work, never the
    result."""
    return neighbour_contrast(x, k) <= _CONTRAST_SKIP


def self_knn_cpu(
    x: np.ndarray,
    k: int,
    n_fetch: int,
    partition: Partition | None,
    workers: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """The ``k`` nearest other rows of every row of ``x`` (float32, N x d, ``1 <= k < N``).

    With a ``partition`` (built from ``x``), partition pruning searches first, asking for
    ``n_fetch >= k + 1`` candidates per row as the flat search does; the rows it leaves (see
    ``search_flat`` in :func:`~raycollapse.neighbors.partitioned.partitioned_candidates`) and,
    without a partition, all rows go to the symmetric search. Returns (N, k) float64 distances,
    (N, k) int64 indices, rows sorted by (distance, index), and the share of the N x N
    distances computed (a pair of symmetric rows counts once).
    """
    n = x.shape[0]
    dist = np.empty((n, k), dtype=np.float64)
    idx = np.empty((n, k), dtype=np.int64)
    rows: np.ndarray | None = None
    pairs = 0.0
    if partition is not None:
        d_p, i_p, stats = partitioned_candidates(
            x, x, k + 1, n_fetch, partition=partition, search_flat=False
        )
        rows = stats.flat_rows if stats.flat_rows is not None else np.empty(0, np.int64)
        done = np.ones(n, dtype=bool)
        done[rows] = False
        ids = np.flatnonzero(done)
        dist[ids], idx[ids] = drop_self_rows(d_p[ids], i_p[ids], ids, k)
        pairs = stats.pair_share * n * n
    m = n if rows is None else rows.size
    if m:
        d_s, i_s = symmetric_self_knn(x, k, rows, workers=workers)
        target = slice(None) if rows is None else rows
        dist[target], idx[target] = d_s, i_s
        pairs += m * (m - 1) / 2 + m * (n - m)
    return dist, idx, pairs / (n * n)
