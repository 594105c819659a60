"""Exact threshold decay over a pool split into row shards, and the approximate two-round greedy.

Definition: docs/design.md, "Threshold decay"; the distributed scheme: docs/design.md,
"Distributed selection". Every shard derives the same seeded order
``default_rng(seed).permutation(N)`` and keeps the positions of its own rows in it, with the
single-node bounds of :mod:`raycollapse.curation.threshold` (lower/upper bound of each row's
min distance to the accepted points). The driver (:func:`sharded_threshold`) walks the order
in spans of positions: each shard settles, exactly, which of its rows in the span are farther
than tau from every point accepted *before* the span ("open" rows) and returns them; the driver
walks the open rows of all shards in order with the single-node pass (which settles conflicts
among them exactly) and sends what it accepted with the next request. A row that is not open
can only stay rejected in this pass (the accepted set only grows), so the result equals the
sequential definition, hence :func:`~raycollapse.curation.threshold.threshold_select`.

No Ray here: the shards are plain objects driven in-process by tests and wrapped by the actors
of :mod:`raycollapse.stages.select_shards`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from raycollapse.curation.greedy import greedy_run
from raycollapse.curation.threshold import ThresholdResult
from raycollapse.curation.threshold_state import ThresholdState, duplicates_error, passes_error
from raycollapse.neighbors.threads import blas_single_threaded
from raycollapse.neighbors.validate import as_features
from raycollapse.seeds import derive_seed

__all__ = ["Open", "ThresholdShard", "sharded_threshold", "two_round_greedy"]

Open = tuple[np.ndarray, np.ndarray, np.ndarray]  # (positions, global indices, float32 rows)

_SPAN0 = 4096  # positions of the first request
_TARGET = 4096  # open rows per request the span adapts to


class ThresholdShard(ThresholdState):
    """One shard's threshold state: rows ``x`` are global rows ``offset`` .. of an ``n``-row
    pool; ``budget`` and ``seed`` as in :func:`~raycollapse.curation.threshold.threshold_select`."""

    def __init__(self, x: np.ndarray, offset: int, n: int, budget: int, seed: int) -> None:
        x = as_features(x, "shard features", min_rows=1)
        super().__init__(x, budget)
        self.offset = int(offset)
        self.acc_x = np.empty((budget, x.shape[1]), dtype=np.float32)
        perm = np.random.default_rng(seed).permutation(n)
        self.pos = np.flatnonzero((perm >= offset) & (perm < offset + len(x)))
        self.order = perm[self.pos] - offset  # local rows, in the order of the pool
        del perm

    def accept(self, index: np.ndarray, rows: np.ndarray) -> None:
        """Record points the driver accepted (global ``index``, float32 ``rows``), in order."""
        if len(index) == 0:
            return
        xa, s2, s = self.sp.centre(rows)
        a, b = self.a, self.a + len(index)
        self.acc[a:b], self.acc_x[a:b], self.acc_xa[a:b] = index, rows, xa
        self.acc_s2f[a:b] = s2
        self.acc_smax = max(self.acc_smax, float(s.max()))
        local = index - self.offset
        self.done[local[(local >= 0) & (local < self.n)]] = True
        self.a = b

    def open_rows(self, start: int, stop: int, tau: float) -> Open:
        """This shard's not-yet-accepted rows at order positions ``start`` .. ``stop - 1`` whose
        canonical distance to every accepted point is > ``tau``."""
        lo, hi = np.searchsorted(self.pos, [start, stop])
        rows = self.order[lo:hi]
        pos = self.pos[lo:hi]
        keep = ~self.done[rows] & (self.ub[rows] > tau)
        rows, pos = rows[keep], pos[keep]
        with blas_single_threaded():
            self._bulk_update(rows)
            amb = rows[(self.lb[rows] <= tau) & (self.ub[rows] > tau)]
            if len(amb):
                self._exact_min(amb)
        ok = self.lb[rows] > tau
        return pos[ok], rows[ok] + self.offset, self.x[rows[ok]]

    def only_duplicates(self) -> bool:
        """Whether every row not yet accepted is an exact duplicate of an accepted point."""
        with blas_single_threaded():
            return self._all_duplicates(self.order[~self.done[self.order]])


def _walk_open(opens: Sequence[Open], tau: float, left: int) -> tuple[np.ndarray, np.ndarray]:
    """The sequential pass at ``tau`` over the open rows of all shards, in pool order, stopping
    at ``left`` accepted: (global indices, rows) accepted."""
    pos = np.concatenate([o[0] for o in opens])
    if len(pos) == 0:
        return np.empty(0, dtype=np.int64), opens[0][2][:0]
    order = np.argsort(pos, kind="stable")
    idx = np.concatenate([o[1] for o in opens])[order]
    rows = np.concatenate([o[2] for o in opens])[order]
    with blas_single_threaded():
        walk = ThresholdState(rows, min(left, len(rows)))
        walk.walk(np.arange(len(rows)), tau)
    got = walk.acc[: walk.a]
    return idx[got], rows[got]


def sharded_threshold(
    n: int,
    d: int,
    budget: int,
    tau0: float,
    decay: float,
    max_passes: int,
    open_rows: Callable[[np.ndarray, np.ndarray, int, int, float], list[Open]],
    only_duplicates: Callable[[np.ndarray, np.ndarray], bool],
) -> tuple[ThresholdResult, int]:
    """Drive exact sharded threshold decay; returns (result, round trips).

    ``open_rows(index, rows, start, stop, tau)``: every shard first accepts ``index``/``rows``
    (:meth:`ThresholdShard.accept`), then returns :meth:`ThresholdShard.open_rows`;
    ``only_duplicates(index, rows)``: accept, then whether every shard's
    :meth:`ThresholdShard.only_duplicates`. Arguments are checked by the caller.
    """
    new_i, new_r = np.empty(0, dtype=np.int64), np.empty((0, d), dtype=np.float32)
    chosen: list[np.ndarray] = []
    count, trips, span, tau, checked_at = 0, 0, _SPAN0, tau0, -1
    for passes in range(1, max_passes + 1):
        at_pass = count
        start = 0
        while start < n:
            stop = min(n, start + span)
            opens = open_rows(new_i, new_r, start, stop, tau)
            trips += 1
            new_i, new_r = _walk_open(opens, tau, budget - count)
            chosen.append(new_i)
            count += len(new_i)
            if count == budget:
                return ThresholdResult(np.concatenate(chosen), tau0, tau, passes), trips
            n_open = sum(len(o[0]) for o in opens)
            # Aim at _TARGET open rows per request; grow at most 4x (few open rows: cheap).
            span = int(min(n, max(256, span * min(4.0, _TARGET / max(n_open, 1)))))
            start = stop
        if count == at_pass and count != checked_at:
            checked_at = count
            if only_duplicates(new_i, new_r):  # nothing pending: this pass accepted nobody
                raise duplicates_error(count, n, budget)
        tau = tau * decay
    raise passes_error(count, budget, max_passes, tau0, tau / decay)


def two_round_greedy(
    shard_select: Callable[[list[int]], list[tuple[np.ndarray, np.ndarray]]],
    shards: int,
    budget: int,
    seed: int,
) -> np.ndarray:
    """Approximate greedy: greedy inside every shard, then greedy over the union.

    ``shard_select(seeds)``: for each shard s, its :func:`~raycollapse.curation.greedy.greedy_run`
    of ``min(budget, rows)`` rows with seed ``seeds[s]`` as (global indices, float32 rows).
    Shard s uses ``derive_seed(seed, s)``; the final round ``seed``. The coverage radius is at
    most 4x the optimal k-center radius, hence at most 4x exact greedy's (docs/design.md,
    "Distributed selection").
    """
    parts = shard_select([derive_seed(seed, s) for s in range(shards)])
    index = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    return index[greedy_run(rows, budget, seed).indices]
