"""Exact within-set kNN with torch tensors on any device (CUDA or the CPU).

The same neighbours and bits as :func:`~raycollapse.neighbors.knn.knn_self` (ranked by the
canonical float64 distance, then by index), with a proof instead of a padding heuristic:

1. float32 products of centred rows (:class:`~raycollapse.curation.approx.ApproxSpace`, TF32
   off) rank all rows for each query; the best ``P = k + 9`` are candidates;
2. their canonical distances (:func:`~raycollapse.neighbors.compute.canonical_distances`, numpy's
   bits) give ``tau``, the (k + 1)-th smallest, an upper bound of the true (k + 1)-th distance;
3. every other row has an approximate squared distance >= the P-th candidate's; with the
   rigorous error bound for the largest norm this gives a lower bound of its canonical
   distance. When that bound exceeds ``tau`` no other row can be a neighbour or tie with one;
   otherwise (rare: dense near-ties) the query is searched again with 4 times the candidates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raycollapse.curation.approx import ApproxSpace
from raycollapse.neighbors.compute import Compute, canonical_distances, exact_matmul
from raycollapse.neighbors.knn import KnnResult, drop_self

if TYPE_CHECKING:
    import torch

__all__ = ["knn_self_torch"]

_PAD = 8  # candidates beyond k + 1, as the FAISS path
_COLS = 1 << 16  # database rows per product
_MAX_QUERIES = 4096  # queries per batch: the product holds queries x _COLS float32 (1 GiB)
_U32 = 2.0**-24


def knn_self_torch(x: np.ndarray, k: int, compute: Compute, batch_size: int = 4096) -> KnnResult:
    """The ``k`` nearest neighbours of every row of ``x`` among the other rows, exact (``x``
    validated float32, ``1 <= k < N``), computed on ``compute.device`` in query batches of
    ``batch_size`` rows."""
    import torch

    dev = torch.device(compute.device)
    n = x.shape[0]
    need = k + 1
    sp = ApproxSpace(x)
    smax = float(sp.s.max())
    xa = torch.from_numpy(sp.xa).to(dev)
    xd = torch.from_numpy(x).to(dev)
    s2f = torch.from_numpy(sp.s2.astype(np.float32)).to(dev)
    out_d = np.empty((n, k), dtype=np.float64)
    out_i = np.empty((n, k), dtype=np.int64)
    batch_size = min(batch_size, _MAX_QUERIES)
    with exact_matmul():
        for q0 in range(0, n, batch_size):
            rows = np.arange(q0, min(q0 + batch_size, n))
            dist, idx = _search(rows, need, min(need + _PAD, n), xa, xd, s2f, sp, smax)
            res = drop_self(KnnResult(dist, idx), rows, k)
            out_d[rows], out_i[rows] = res.distances, res.indices
    return KnnResult(out_d, out_i, pair_share=1.0)


def _search(
    rows: np.ndarray,
    need: int,
    p: int,
    xa: torch.Tensor,
    xd: torch.Tensor,
    s2f: torch.Tensor,
    sp: ApproxSpace,
    smax: float,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``need`` nearest rows of queries ``rows`` (themselves included), sorted by
    (canonical distance, index), from ``p`` candidates each; queries the proof does not
    cover are searched again with more."""
    import torch

    n = xa.shape[0]
    qi = torch.from_numpy(rows).to(xa.device)
    xq = xa[qi]
    best_v = torch.empty((len(rows), 0), dtype=torch.float32, device=xa.device)
    best_i = torch.empty((len(rows), 0), dtype=torch.int64, device=xa.device)
    for c0 in range(0, n, _COLS):
        c1 = min(c0 + _COLS, n)
        t = xq @ xa[c0:c1].T
        t *= -2.0
        t += s2f[c0:c1]  # |q - r|^2 - |q|^2, in float32
        v, pos = torch.topk(t, min(p, c1 - c0), dim=1, largest=False)
        v = torch.cat([best_v, v], dim=1)
        i = torch.cat([best_i, pos + c0], dim=1)
        best_v, pos = torch.topk(v, min(p, v.shape[1]), dim=1, largest=False, sorted=True)
        best_i = torch.gather(i, 1, pos)
    flat = best_i.reshape(-1)
    dist = canonical_distances(xd[qi.repeat_interleave(p)], xd[flat]).reshape(len(rows), p)
    o = torch.argsort(best_i, dim=1, stable=True)  # then by distance, stably: (distance, index)
    best_i, dist = torch.gather(best_i, 1, o), torch.gather(dist, 1, o)
    o = torch.argsort(dist, dim=1, stable=True)
    best_i, dist = torch.gather(best_i, 1, o), torch.gather(dist, 1, o)
    dist_h, idx_h = dist.cpu().numpy(), best_i.cpu().numpy()
    if p == n:
        return dist_h[:, :need], idx_h[:, :need]
    # every row outside the candidates has q >= the p-th candidate's q (float32 rounding of
    # s2 and of the subtraction: 2.1 u32 (s_i + s_j)^2 on top of ApproxSpace's bound)
    si = sp.s[rows]
    q = best_v[:, p - 1].double().cpu().numpy() + sp.s2[rows]
    e, f = sp.err(si, smax)
    e = e + 2.1 * _U32 * (si + smax) ** 2
    again = np.flatnonzero(~(sp.lower(q, e, f) > dist_h[:, need - 1]))
    if len(again):
        d2, i2 = _search(rows[again], need, min(4 * p, n), xa, xd, s2f, sp, smax)
        dist_h[again, :need], idx_h[again, :need] = d2, i2
    return dist_h[:, :need], idx_h[:, :need]
