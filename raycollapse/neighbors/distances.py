"""Exact Euclidean distances and the exact re-ranking of FAISS candidates.

FAISS ranks candidates with float32 distances that carry rounding error; every kNN search in
raycollapse (flat, partitioned, sharded) recomputes its candidates' distances here, exactly, and
orders them by (distance, index), so that all paths give the same bits for the same pair.
"""

from __future__ import annotations

import numpy as np

__all__ = ["drop_self_rows", "pair_distances", "rerank_exact", "sort_rows"]

_RERANK_ELEMENTS = 1 << 22
_ROWS = 1 << 16  # rows per chunk of the float64 differences in pair_distances


def pair_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Exact Euclidean distances between paired rows: ``out[i] = ||a[i] - b[i]||`` (float64).

    ``b`` may also be one row (``d``,), compared with every row of ``a``. Computed as
    ``sqrt(sum((a - b)**2))`` in float64 from the (float32) inputs, never through
    ``|a|^2 + |b|^2 - 2 a.b``: the difference of two float32 values is exact in float64, so
    identical rows give exactly 0.0. Each row is reduced on its own (numpy's pairwise sum over
    its contiguous d values), so a pair's value does not depend on the other rows computed with
    it; rows go in chunks of 65,536 to bound the float64 temporaries. All of raycollapse (kNN,
    selection, metrics) uses this one function for distances that are compared with each other,
    so the same pair always gives the same bits.
    """
    n = a.shape[0]
    out = np.empty(n, dtype=np.float64)
    one = b.ndim == 1
    for s in range(0, n, _ROWS):
        diff = np.subtract(a[s : s + _ROWS], b if one else b[s : s + _ROWS], dtype=np.float64)
        np.multiply(diff, diff, out=diff)
        np.sqrt(diff.sum(axis=1), out=out[s : s + _ROWS])
    return out


def sort_rows(dist: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by (distance, index)."""
    order = np.lexsort((idx, dist), axis=-1)
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)


def rerank_exact(
    queries: np.ndarray, data: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact distances from ``queries[q]`` to ``data[candidates[q, j]]``, rows sorted.

    Returns ``(dist, idx)``: float64 (nq, m) distances from :func:`pair_distances` and the int64
    candidate indices, each row ordered by (distance, index). FAISS's float32 distances are
    ``|q|^2 + |x|^2 - 2 q.x`` on its BLAS path: catastrophic cancellation makes a duplicate come
    out as ~1e-6 instead of 0 and can swap near-ties, hence the recompute.
    """
    cand = np.asarray(candidates, dtype=np.int64)
    nq, m = cand.shape
    dist = np.empty((nq, m), dtype=np.float64)
    # Rows in chunks of ~4M float64 differences; each (query, candidate) pair reduces its own
    # contiguous d values exactly as pair_distances does, so the bits are the same.
    rows = max(1, _RERANK_ELEMENTS // max(1, m * queries.shape[1]))
    for s in range(0, nq, rows):
        q = queries[s : s + rows]
        diff = np.subtract(q[:, None, :], data[cand[s : s + rows]], dtype=np.float64)
        np.multiply(diff, diff, out=diff)
        np.sqrt(diff.sum(axis=2), out=dist[s : s + rows])
    return sort_rows(dist, cand)


def drop_self_rows(
    dist: np.ndarray, idx: np.ndarray, query_ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's own index ``query_ids[q]`` from its sorted neighbours and keep ``k``
    (the last one is dropped where the index is absent); see ``knn.drop_self``."""
    is_self = idx == query_ids[:, None]
    # Stable sort puts the kept entries first, in their original (sorted) order.
    order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), np.take_along_axis(idx, order, axis=1)
