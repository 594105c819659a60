"""Random and greedy (farthest-point / k-center) selection, and the exact-distance machinery.

Definitions (docs/design.md, "Greedy selection"; Shi et al., "A Closer Look at Model Collapse:
From a Generalization-to-Memorization Perspective", NeurIPS 2025, arXiv 2509.16499, Sec.
"entropy-based data selection"):

* Distances are Euclidean, computed from the float32 features in float64 with the *canonical*
  formula :func:`~raycollapse.neighbors.distances.pair_distances`
  ``sqrt(sum((float64(a) - float64(b)) ** 2))`` (numpy pairwise summation along the feature axis). Every decision an algorithm here takes equals the decision
  a plain sequential loop over these canonical values takes: ties go to the lowest index.
* Greedy selection: start from one seeded random point, repeatedly add the candidate whose
  distance to the selected set is largest.

Speed without changing a single decision comes from three tools:

1. :class:`ApproxSpace`: centred float32 coordinates whose matrix products give squared distances
   with a *rigorous* error bound (floating-point summation bound ``gamma_d``), so a comparison is
   settled by the fast product whenever it is not within the bound, and by the canonical formula
   otherwise.
2. Triangle-inequality pruning (Elkan 2003; Gonzalez's k-center): a point i whose nearest
   selected centre is a(i) at distance m(i) cannot get closer to a new centre c when
   ``d(c, a(i)) >= 2 m(i)``; whole groups (all points of one centre) are skipped when their
   radius is below that bound, with safety factors for rounding.
3. Batches of greedy steps (:class:`_Greedy`): consecutive farthest points that provably do not
   change each other's rank are added together, so one matrix product serves many steps.
"""

from __future__ import annotations

import numbers
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from raycollapse.curation.approx import ApproxSpace, valid_prefix
from raycollapse.errors import UserInputError
from raycollapse.neighbors.compute import resolve_compute, torch_threads
from raycollapse.neighbors.distances import pair_distances
from raycollapse.neighbors.threads import blas_single_threaded
from raycollapse.neighbors.validate import as_features

__all__ = [
    "ApproxSpace",
    "GreedyResult",
    "check_budget",
    "greedy_run",
    "greedy_select",
    "random_select",
]

_PAR_MIN = 1 << 21  # N * d from which the full scan is split over threads


def check_budget(budget: Any, n: int) -> int:
    """Return ``budget`` as an int in [1, n], or raise UserInputError naming the value."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise UserInputError(f"budget must be an integer, got {budget!r}; pass e.g. budget=1000")
    budget = int(budget)
    if budget <= 0 or budget > n:
        raise UserInputError(
            f"budget must be between 1 and the number of candidates N={n}, got {budget}; "
            "lower the budget or provide a larger candidate pool"
        )
    return budget


def random_select(n: int, budget: int, seed: int = 0) -> np.ndarray:
    """``budget`` distinct indices of ``range(n)``: ``default_rng(seed).choice(n, budget,
    replace=False)`` in the order returned, as int64 (the paper's random-selection baseline)."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise UserInputError(f"n must be a positive integer, got {n!r}; pass the pool size")
    budget = check_budget(budget, int(n))
    return np.random.default_rng(seed).choice(int(n), budget, replace=False).astype(np.int64)


@dataclass(frozen=True)
class GreedyResult:
    """Output of :func:`greedy_run`.

    ``indices``: int64 rows in the order chosen. ``batches``: matrix-product rounds the
    ``budget - 1`` steps after the first took (fewer rounds than steps: batching served several
    steps at once). ``pair_share``: (point, centre) distances evaluated, by float32 product or
    exactly, as a share of the ``N x budget`` the plain loop evaluates (what pruning left).
    """

    indices: np.ndarray
    batches: int
    pair_share: float


def greedy_select(
    x: Any, budget: int, seed: int = 0, *, device: str = "cpu", backend: str = "auto"
) -> np.ndarray:
    """Farthest-point (k-center) greedy selection: the indices of :func:`greedy_run`."""
    return greedy_run(x, budget, seed, device=device, backend=backend).indices


def greedy_run(
    x: Any, budget: int, seed: int = 0, *, device: str = "cpu", backend: str = "auto"
) -> GreedyResult:
    """Farthest-point (k-center) greedy selection of ``budget`` rows of ``x`` (docs/design.md,
    "Greedy selection").

    The first index is ``int(np.random.default_rng(seed).integers(N))``. Each next index is the
    argmax over all points of the canonical distance to the nearest selected point (lowest index
    on ties). Selected points have distance 0 and are never chosen again, except when every
    unselected point is an exact duplicate of a selected one (the maximum is 0): the lowest-index
    unselected point is taken then. Returns the indices in the order chosen, with the work done.

    The result equals that plain loop exactly; it is computed in provably exact batches of steps
    with triangle-inequality pruning and bounded-error float32 products (module docstring),
    which skip most distance evaluations on clustered data.

    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) and ``backend`` (``numpy``, ``torch``,
    ``auto``): see :func:`~raycollapse.neighbors.compute.resolve_compute`; the torch backend
    (:func:`~raycollapse.curation.greedy_torch.greedy_torch`) gives the same indices.
    """
    compute = resolve_compute(device, backend)
    x = as_features(x, "features", min_rows=1)
    n = x.shape[0]
    budget = check_budget(budget, n)
    first = int(np.random.default_rng(seed).integers(n))
    if compute.torch:
        from raycollapse.curation.greedy_torch import greedy_torch

        with torch_threads(compute):
            indices, batches, pairs = greedy_torch(x, budget, first, compute)
        return GreedyResult(indices, batches, pairs / (n * budget))
    with blas_single_threaded() as threads:
        run = _Greedy(x, budget, threads)
        indices = run.run(first)
    return GreedyResult(indices, run.batches, run.pairs / (n * budget))


class _Greedy:
    """State of one greedy run: per point its min distance ``m`` and centre slot ``assign``.

    Centres are added in *batches*: with points sorted by (-m, index), the greedy order starts
    with p1, and continues with p2, p3, ... as long as each is at distance >= its own m from the
    ones before it (adding them leaves its m, hence its rank, unchanged). A batch is the longest
    such prefix; its T centres are applied to all points with T-column products.

    ``members[a]`` lists the points whose nearest centre is slot ``a`` (``mlen[a]`` of them) and
    ``rad[a]`` is the largest ``m`` among them; both are kept exact by compacting every centre
    that loses points, except in the unpruned regime (``dirty``: supersets and upper bounds).
    Screens on float32 products use per-point ``v`` and per-centre ``w`` thresholds that fold
    in the rigorous error bounds of :class:`ApproxSpace` with the largest norm ``smax``.
    """

    T_MAX = 64  # largest batch
    ROWS = 8192  # rows per block of the full scan

    def __init__(
        self,
        x: np.ndarray,
        budget: int,
        threads: int = 1,
        space: ApproxSpace | None = None,
        smax: float | None = None,
    ) -> None:
        n, d = x.shape
        self.x, self.n, self.budget = x, n, budget
        # A shard of a pool passes the pool's common space and largest norm (centres come
        # from other shards and must be within smax).
        self.sp = sp = ApproxSpace(x) if space is None else space
        self.threads = min(threads, 8) if n * d >= _PAR_MIN else 1
        self.pool: ThreadPoolExecutor | None = None
        self.smax = float(sp.s.max()) if smax is None else float(smax)
        self.m = np.full(n, np.inf)
        self.assign = np.full(n, -1, dtype=np.int64)
        # point i can get closer to new centre c only if dot(i, c) > v[i] + s2[c] / 2
        self.v = np.full(n, -np.inf)
        self.e_pt, self.f_pt = sp.err(sp.s, self.smax)
        self.selected = np.zeros(n, dtype=bool)
        self.centers = np.empty(budget, dtype=np.int64)
        self.ca = np.empty((budget, d), dtype=np.float32)
        self.cs, self.cs2 = np.empty(budget), np.empty(budget)
        self.ecs, self.fcs = np.empty(budget), np.empty(budget)
        # group a can hold a point closer to new centre c only if dot(a, c) > w[a] + s2[c] / 2
        self.w = np.empty(budget)
        self.rad = np.zeros(budget)
        self.rad3 = 2.0 * sp.rel**3
        self.members: list[np.ndarray] = []
        self.mlen = np.zeros(budget, dtype=np.int64)
        self.dirty = False
        self.batches = 0  # see GreedyResult
        self.pairs = 0

    def run(self, first: int) -> np.ndarray:
        pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        try:
            self.pool = pool
            self.start(np.array([first]), self.x[[first]])
            k = 1
            while k < self.budget:
                batch = self._next_batch(self.budget - k)
                self.add_batch(batch, k)
                k += len(batch)
        finally:
            if pool is not None:
                pool.shutdown()
        return self.centers.copy()

    def _next_batch(self, limit: int) -> np.ndarray:
        """The next greedy centres: the longest valid prefix of the (-m, index) order."""
        m, n = self.m, self.n
        t = min(self.T_MAX, limit, n)
        top = np.argpartition(m, n - t)[n - t :] if t < n else np.arange(n)
        cut = m[top].min()
        if t == 1 or cut <= 0.0:
            c = int(np.argmax(m))
            if m[c] <= 0.0:  # only exact duplicates of selected points remain
                c = int(np.argmin(self.selected))
            return np.array([c])
        top = np.flatnonzero(m >= cut)  # ties at the cut included
        top = top[np.lexsort((top, -m[top]))][:t]
        return valid_prefix(self.sp, self.x, top, m[top])

    def start(self, first: np.ndarray, row: np.ndarray, local: np.ndarray | None = None) -> None:
        """The first centre ``first`` (one index) with float32 ``row`` (1, d); ``local`` as in
        :meth:`add_batch`."""
        self._place(first, 0, row if local is not None else None, local)
        self.pairs = self.n
        pts = np.arange(self.n)
        self._set_m(pts, pair_distances(self.x, row[0]), np.zeros(self.n, np.int64))
        self.members.append(pts)
        self.mlen[0] = self.n
        self._set_rad(np.array([0]), np.array([self.m.max()]))

    def _place(
        self, cs: np.ndarray, k: int, rows: np.ndarray | None, local: np.ndarray | None
    ) -> np.ndarray:
        """Centres ``cs`` as slots k, k+1, ...; returns their centred coordinates. ``rows``
        and ``local`` as in :meth:`add_batch`."""
        sp, sl = self.sp, slice(k, k + len(cs))
        if rows is None:
            xa, s2, s = sp.xa[cs], sp.s2[cs], sp.s[cs]
        else:
            xa, s2, s = sp.centre(rows)
        self.selected[cs if local is None else local] = True
        self.centers[sl] = cs
        self.ca[sl] = xa
        self.cs[sl], self.cs2[sl] = s, s2
        self.ecs[sl], self.fcs[sl] = sp.err(s, self.smax)
        return xa

    def _set_m(self, pts: np.ndarray, dist: np.ndarray, slots: np.ndarray) -> None:
        self.m[pts] = dist
        self.assign[pts] = slots
        t = self.e_pt[pts] + (dist * self.sp.rel + self.f_pt[pts]) ** 2
        self.v[pts] = 0.5 * (self.sp.s2[pts] - t)

    def _set_rad(self, slots: Any, rad: np.ndarray) -> None:
        self.rad[slots] = rad
        t = (self.rad3 * rad + self.fcs[slots]) * (1.0 + 1e-12)
        self.w[slots] = 0.5 * (self.cs2[slots] - self.ecs[slots] - t * t)

    def _radii(self, k: int, slots: Any, j: Any, dots: np.ndarray) -> np.ndarray:
        """Pruning radii for (group ``slots``, new centre slot ``k + j``) pairs: a point of the
        group with m <= h cannot get closer to the centre (triangle inequality, rounding
        included)."""
        sp = self.sp
        q = self.cs2[slots] + self.cs2[k + j] - 2.0 * dots.astype(np.float64)
        e, f = sp.err(self.cs[slots], self.cs[k + j])
        return sp.lower(q, e, f) / (2.0 * sp.rel * sp.rel)

    def add_batch(
        self,
        cs: np.ndarray,
        k: int,
        rows: np.ndarray | None = None,
        local: np.ndarray | None = None,
    ) -> None:
        """Add centres ``cs`` as slots k, k+1, ...: every point ends at its min over them.

        ``rows``: the centres' float32 rows when they are not rows of ``x`` (another shard's);
        ``local``: then the rows of ``x`` among them (marked selected). None: ``cs`` index ``x``.
        """
        sp, n = self.sp, self.n
        xc = self._place(cs, k, rows, local)
        self.batches += 1
        lim = 0.5 * self.cs2[k : k + len(cs)]
        rows = self.x[cs] if rows is None else rows
        dots_c = self.ca[:k] @ xc.T
        aff = dots_c > self.w[:k, None] + lim  # (group, centre) pairs that may matter
        if self.dirty:  # rebuild the groups once pruning would keep at most n / 4 points
            h = self._radii(k, np.arange(k)[:, None], np.arange(len(cs))[None, :], dots_c)
            h[~aff] = np.inf
            if 4 * np.count_nonzero(self.m > h.min(axis=1)[self.assign]) <= n:
                self._rebuild(k)
        if not self.dirty:
            j, g = np.nonzero(aff.T)  # pairs sorted by centre
            lens = self.mlen[g]
            if lens.sum() <= 4 * n:
                h = self._radii(k, g, j, dots_c[g, j])
                pts = np.concatenate([self.members[a] for a in g.tolist()] or [g])
                keep = self.m[pts] > np.repeat(h, lens)
                pts, j = pts[keep], np.repeat(j, lens)[keep]
                if 2 * len(pts) <= n:
                    self.pairs += len(pts)
                    ends = np.searchsorted(j, np.arange(1, len(cs) + 1)).tolist()
                    dots = np.empty(len(pts), dtype=np.float32)
                    lo = 0
                    for c, hi in enumerate(ends):  # one matrix-vector product per centre
                        if hi > lo:
                            dots[lo:hi] = sp.xa[pts[lo:hi]] @ xc[c]
                        lo = hi
                    ok = dots > self.v[pts] + lim[j]
                    self._settle(cs, k, pts[ok], j[ok], rows, compact=True)
                    return
        pts, j = self._scan(xc, lim)
        self.pairs += n * len(cs)
        self._settle(cs, k, pts, j, rows, compact=False)

    def _scan(self, xc: np.ndarray, lim: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """All (point, centre) pairs that the float32 screen cannot rule out (see ``v``)."""
        xa, v = self.sp.xa, self.v

        def block(lo: int) -> tuple[np.ndarray, np.ndarray]:
            hi = min(lo + self.ROWS, self.n)
            r, j = np.nonzero(xa[lo:hi] @ xc.T > v[lo:hi, None] + lim)
            return r + lo, j

        starts = range(0, self.n, self.ROWS)
        out = list(self.pool.map(block, starts) if self.pool else map(block, starts))
        return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])

    def _settle(
        self,
        cs: np.ndarray,
        k: int,
        pts: np.ndarray,
        j: np.ndarray,
        rows: np.ndarray,
        compact: bool,
    ) -> None:
        """Canonical distances of the screened pairs; each point moves to its nearest new
        centre when strictly closer than ``m``; the centres it leaves are compacted."""
        dist = pair_distances(self.x[pts], rows[j])
        better = dist < self.m[pts]
        pts, j, dist = pts[better], j[better], dist[better]
        if len(cs) > 1:  # keep each point's nearest new centre
            o = np.lexsort((j, dist, pts))
            pts, j, dist = pts[o], j[o], dist[o]
            first = np.ones(len(pts), dtype=bool)
            first[1:] = pts[1:] != pts[:-1]
            pts, j, dist = pts[first], j[first], dist[first]
        losers = np.unique(self.assign[pts])
        self._set_m(pts, dist, k + j)
        t = len(cs)
        o = np.argsort(j, kind="stable")
        counts = np.bincount(j, minlength=t)
        self.members.extend(np.split(pts[o], np.cumsum(counts)[:-1]))
        self.mlen[k : k + t] = counts
        rad = np.zeros(t)
        np.maximum.at(rad, j, dist)
        self._set_rad(slice(k, k + t), rad)
        if compact:
            self._compact(losers)
        else:
            self.dirty = True

    def _compact(self, slots: np.ndarray) -> None:
        """Drop the points that left the groups ``slots`` (sorted) and recompute their radii;
        only centres that lost points need this, as ``m`` changes only by moving."""
        if len(slots) == 0:
            return
        cat = np.concatenate([self.members[a] for a in slots.tolist()])
        pos = np.repeat(np.arange(len(slots)), self.mlen[slots])
        keep = self.assign[cat] == slots[pos]
        cat, pos = cat[keep], pos[keep]
        counts = np.bincount(pos, minlength=len(slots))
        for a, part in zip(slots.tolist(), np.split(cat, np.cumsum(counts)[:-1]), strict=True):
            self.members[a] = part
        self.mlen[slots] = counts
        rad = np.zeros(len(slots))
        np.maximum.at(rad, pos, self.m[cat])
        self._set_rad(slots, rad)

    def _rebuild(self, k: int) -> None:
        """Exact lists, counts and radii of slots 0..k-1 from ``assign`` (after dirty steps)."""
        order = np.argsort(self.assign, kind="stable")
        counts = np.bincount(self.assign, minlength=k)
        self.members = np.split(order, np.cumsum(counts)[:-1])
        self.mlen[:k] = counts
        rad = np.zeros(k)
        np.maximum.at(rad, self.assign, self.m)
        self._set_rad(slice(0, k), rad)
        self.dirty = False
