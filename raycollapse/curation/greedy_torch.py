"""Greedy (farthest-point) selection with torch tensors on any device (CUDA or the CPU).

The same result as :func:`~raycollapse.curation.greedy.greedy_run`, index for index
(docs/design.md, "Greedy selection"): the state is the canonical min distance ``m`` of every
point to the selected set, kept exact on the device. Centres are added in the provably exact
batches of the CPU code (:func:`~raycollapse.curation.greedy.valid_prefix`); each batch is
applied to all points with one float32 product per block of rows, and only the (point, centre)
pairs whose rigorous lower bound is below the point's ``m`` get their canonical distance
(:func:`~raycollapse.neighbors.compute.canonical_distances`, numpy's bits). No pruning: on a
GPU the dense product is cheaper than the bookkeeping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from raycollapse.curation.approx import ApproxSpace, valid_prefix
from raycollapse.neighbors.compute import Compute, canonical_distances, exact_matmul

if TYPE_CHECKING:
    import torch

__all__ = ["greedy_torch"]

_T_MAX = 64  # largest batch (as the CPU code)
_ROWS = 1 << 18  # rows per block of the batch product (float64 bounds: ~8 x 64 x 2 MiB)


def greedy_torch(
    x: np.ndarray, budget: int, first: int, compute: Compute
) -> tuple[np.ndarray, int, int]:
    """Greedy indices from ``first`` on ``compute.device``, with the number of batches and
    of (point, centre) pairs compared by product (``x`` validated float32, ``budget`` checked)."""
    import torch

    dev = torch.device(compute.device)
    n = x.shape[0]
    sp = ApproxSpace(x)
    xd = torch.from_numpy(x).to(dev)
    xa = torch.from_numpy(sp.xa).to(dev)
    s2 = torch.from_numpy(sp.s2).to(dev)
    s = torch.from_numpy(sp.s).to(dev)
    centers = np.empty(budget, dtype=np.int64)
    centers[0] = first
    selected = torch.zeros(n, dtype=torch.bool, device=dev)
    selected[first] = True
    m = canonical_distances(xd, xd[first])
    batches, pairs, k = 0, n, 1
    with exact_matmul():
        while k < budget:
            cs = _next_batch(m, selected, sp, x, min(_T_MAX, budget - k))
            centers[k : k + len(cs)] = cs
            ci = torch.from_numpy(cs).to(dev)
            selected[ci] = True
            _apply(m, xd, xa, s2, s, ci, sp)
            pairs += n * len(cs)
            batches += 1
            k += len(cs)
    return centers, batches, pairs


def _next_batch(
    m: torch.Tensor, selected: torch.Tensor, sp: ApproxSpace, x: np.ndarray, t: int
) -> np.ndarray:
    """The next greedy centres, as :meth:`raycollapse.curation.greedy._Greedy._next_batch`."""
    import torch

    n = m.shape[0]
    t = min(t, n)
    cut = float(torch.topk(m, t).values.min()) if t < n else float(m.min())
    if t == 1 or cut <= 0.0:
        c = int(torch.argmax(m))  # first maximal index: lowest index on ties
        if float(m[c]) <= 0.0:  # only exact duplicates of selected points remain
            c = int(torch.argmin(selected.to(torch.uint8)))
        return np.array([c], dtype=np.int64)
    top_d = torch.nonzero(m >= cut).flatten()  # ties at the cut included
    top, mt = top_d.cpu().numpy(), m[top_d].cpu().numpy()
    o = np.lexsort((top, -mt))[:t]
    return valid_prefix(sp, x, top[o], mt[o])


def _apply(
    m: torch.Tensor,
    xd: torch.Tensor,
    xa: torch.Tensor,
    s2: torch.Tensor,
    s: torch.Tensor,
    ci: torch.Tensor,
    sp: ApproxSpace,
) -> None:
    """Lower ``m`` to the canonical distance to the new centres ``ci`` where that is smaller
    (pairs whose lower bound is not below ``m`` cannot be strictly closer)."""
    import torch

    xc, s2c, sc = xa[ci], s2[ci], s[ci]
    pts, cen = [], []
    for lo in range(0, m.shape[0], _ROWS):
        hi = min(lo + _ROWS, m.shape[0])
        q = s2[lo:hi, None] + s2c[None, :] - 2.0 * (xa[lo:hi] @ xc.T).double()
        si = s[lo:hi, None]
        e = 3.0 * sp.gamma * si * sc + sp.c64 * (si + sc) ** 2
        f = 1.02 * 2.0**-24 * (si + sc)
        lb = (torch.sqrt(torch.clamp(q - e, min=0.0)) - f) / sp.rel
        r, j = torch.nonzero(lb < m[lo:hi, None], as_tuple=True)
        pts.append(r + lo)
        cen.append(j)
    # one canonical evaluation for all blocks: its many small kernels are launched once
    r, j = torch.cat(pts), torch.cat(cen)
    if len(r):
        m.scatter_reduce_(0, r, canonical_distances(xd[r], xd[ci[j]]), reduce="amin")
