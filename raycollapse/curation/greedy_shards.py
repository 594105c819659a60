"""Exact greedy (farthest-point) selection over a pool split into row shards.

Definition: docs/design.md, "Greedy selection"; the distributed scheme: docs/design.md,
"Distributed selection". The pool's rows are cut into shards (shard s holds global rows
``offset_s`` .. ``offset_s + n_s - 1``); each shard keeps, for its own rows only, the running
minimum canonical distance ``m`` to the selected centres (a :class:`GreedyShard`, which runs the
single-node pruned state of :mod:`raycollapse.curation.greedy` on its rows with centres from any
shard). A driver (:func:`sharded_greedy`) needs per step only each shard's best few candidates:

* each shard reports its top ``t`` rows by (-m, global index), with their float32 rows;
* the driver merges them into the global top ``t`` and keeps the longest prefix p1, p2, ... in
  which every p_j is at canonical distance >= m(p_j) from p1 .. p_{j-1}: adding the earlier
  ones leaves m(p_j), hence its rank, unchanged, so the plain loop picks exactly this prefix
  next (the single-node batch argument, across shards);
* the prefix goes to every shard, which updates its m and answers with its next top ``t``.

One round trip per batch; the result equals :func:`~raycollapse.curation.greedy.greedy_select`
index for index (same seed, same first point, ties to the lowest global index). When the best
m is 0 (only exact duplicates of selected points remain) the lowest-index unselected row is
taken, one per step, as in the single-node rule.

Nothing here imports Ray: the shards are plain objects (tests drive them in-process); the Ray
actors of :mod:`raycollapse.stages.select_shards` wrap them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from raycollapse.curation.approx import ApproxSpace
from raycollapse.curation.greedy import _Greedy
from raycollapse.neighbors.distances import pair_distances
from raycollapse.neighbors.threads import blas_single_threaded
from raycollapse.neighbors.validate import as_features

__all__ = [
    "Candidates",
    "GreedyShard",
    "T_MAX",
    "common_space",
    "next_centres",
    "sharded_greedy",
]

T_MAX = 64  # largest batch of centres per round trip (as the single-node batches)


@dataclass(frozen=True)
class Candidates:
    """One shard's best unselected rows: ``m`` (float64), global ``index`` (int64) and float32
    ``rows``, in (-m, index) order; ``lowest``: its lowest-index unselected row as (index, row)
    or None when all its rows are selected."""

    m: np.ndarray
    index: np.ndarray
    rows: np.ndarray
    lowest: tuple[int, np.ndarray] | None


def common_space(sums: Sequence[np.ndarray], counts: Sequence[int]) -> np.ndarray:
    """The translation all shards share: the pool mean from per-shard float64 column sums."""
    return (np.sum(sums, axis=0) / float(sum(counts))).astype(np.float32)


class GreedyShard:
    """One shard's greedy state: rows ``x`` are global rows ``offset`` .. ``offset + n - 1``.

    Build with the pool's common translation ``mean`` (:func:`common_space`); then
    :meth:`norm_max` of every shard gives ``smax`` for :meth:`begin`.
    """

    def __init__(self, x: np.ndarray, offset: int, mean: np.ndarray) -> None:
        self.x = as_features(x, "shard features", min_rows=1)
        self.offset = int(offset)
        self.space = ApproxSpace(self.x, mean=mean)
        self.state: _Greedy | None = None
        self.k = 0  # centres placed

    def norm_max(self) -> float:
        """Largest norm of this shard's centred rows (the pool's max bounds every centre)."""
        return float(self.space.s.max())

    def begin(self, budget: int, smax: float) -> None:
        """A fresh selection of ``budget`` centres (``smax``: the max of all :meth:`norm_max`)."""
        self.state = _Greedy(self.x, budget, space=self.space, smax=smax)
        self.k = 0

    def add(self, index: np.ndarray, rows: np.ndarray) -> None:
        """Add the centres with global ``index`` and float32 ``rows`` (from any shard)."""
        assert self.state is not None, "begin() first"
        with blas_single_threaded():
            if self.k == 0:
                self.state.start(index[:1], rows[:1], self._local(index[:1]))
                self.k, index, rows = 1, index[1:], rows[1:]
            if len(index):
                self.state.add_batch(index, self.k, rows, self._local(index))
                self.k += len(index)

    def _local(self, index: np.ndarray) -> np.ndarray:
        """The rows of this shard among global ``index``, as local row numbers."""
        local = index - self.offset
        return local[(local >= 0) & (local < len(self.x))]

    def top(self, t: int) -> Candidates:
        """This shard's ``t`` best rows by (-m, global index) (all rows when it has fewer)."""
        assert self.state is not None, "begin() first"
        m, n = self.state.m, len(self.x)
        t = min(t, n)
        top = np.argpartition(m, n - t)[n - t :] if t < n else np.arange(n)
        top = np.flatnonzero(m >= m[top].min())  # ties at the cut included
        top = top[np.lexsort((top, -m[top]))][:t]
        sel = self.state.selected
        free = int(np.argmin(sel))  # first unselected row
        lowest = None if sel[free] else (free + self.offset, self.x[free].copy())
        return Candidates(m[top].copy(), top + self.offset, self.x[top].copy(), lowest)


def next_centres(cands: Sequence[Candidates], t: int) -> tuple[np.ndarray, np.ndarray]:
    """The next greedy centres from all shards' candidates: (global indices, float32 rows).

    The global top ``t`` by (-m, index), cut to the longest exact prefix (module docstring); a
    single lowest-index unselected row when the best m is 0.
    """
    m = np.concatenate([c.m for c in cands])
    idx = np.concatenate([c.index for c in cands])
    rows = np.concatenate([c.rows for c in cands])
    order = np.lexsort((idx, -m))[:t]
    m, idx, rows = m[order], idx[order], rows[order]
    if m[0] <= 0.0:  # only exact duplicates of selected rows remain
        lowest = min((c.lowest for c in cands if c.lowest is not None), key=lambda p: p[0])
        return np.array([lowest[0]], dtype=np.int64), lowest[1][None, :]
    j = 1
    while j < len(m) and m[j] > 0.0:
        if (pair_distances(rows[:j], rows[j]) < m[j]).any():
            break
        j += 1
    return idx[:j], rows[:j]


def sharded_greedy(
    n: int,
    budget: int,
    seed: int,
    row_of: Callable[[int], np.ndarray],
    add_top: Callable[[np.ndarray, np.ndarray, int], list[Candidates]],
) -> tuple[np.ndarray, int]:
    """Drive an exact sharded greedy selection of ``budget`` of ``n`` rows; returns (indices in
    the order chosen, round trips).

    ``row_of(i)``: global row i (float32, (d,)), for the seeded first point
    ``default_rng(seed).integers(n)`` as in the single-node code; ``add_top(index, rows, t)``:
    add those centres on every shard and return each shard's :meth:`GreedyShard.top` ``(t)``.
    The shards must have been given :meth:`GreedyShard.begin` ``(budget, smax)``.
    """
    first = int(np.random.default_rng(seed).integers(n))
    chosen = [np.array([first], dtype=np.int64)]
    count, trips = 1, 0
    index, rows = chosen[0], np.asarray(row_of(first), dtype=np.float32)[None, :]
    while count < budget:
        t = min(T_MAX, budget - count)
        cands = add_top(index, rows, t)
        trips += 1
        index, rows = next_centres(cands, t)
        chosen.append(index)
        count += len(index)
    return np.concatenate(chosen), trips
