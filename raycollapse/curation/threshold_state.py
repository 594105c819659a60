"""The state of one threshold-decay walk (docs/design.md, "Threshold decay"): the bounds cache,
the blocked walk and its exact conflict resolution described in :mod:`raycollapse.curation.threshold`.

Apart from the entry point so that the sharded (``threshold_shards``) and torch
(``threshold_torch``) walks can extend it without importing the entry point that dispatches to them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from raycollapse.curation.approx import ApproxSpace
from raycollapse.errors import UserInputError
from raycollapse.neighbors.distances import pair_distances

_BLOCK = 512  # candidates per block
_CHUNK = 8 * _BLOCK  # candidates brought up to date together (sorted by progress)
_COLS = 8192  # accepted points per product chunk
_U32 = 2.0**-24


@dataclass(frozen=True)
class ThresholdResult:
    """Output of :func:`threshold_select`.

    ``indices``: accepted rows (int64) in acceptance order; ``tau0``: the starting threshold
    (given or from :func:`default_tau0`); ``tau_final``: the threshold of the last pass,
    ``tau0 * decay ** (passes - 1)`` (by repeated multiplication); ``passes``: passes made.
    """

    indices: np.ndarray
    tau0: float
    tau_final: float
    passes: int


def duplicates_error(accepted: int, n: int, budget: int) -> UserInputError:
    """The error when a pass accepts nobody and only duplicates of accepted points remain."""
    return UserInputError(
        f"only {accepted} distinct points among the N={n} candidates; budget "
        f"{budget} too large: lower the budget to at most {accepted} or "
        "remove exact duplicates from the pool"
    )


def passes_error(
    accepted: int, budget: int, max_passes: int, tau0: float, tau: float
) -> UserInputError:
    """The error when ``max_passes`` passes (the last at ``tau``) do not reach the budget."""
    return UserInputError(
        f"threshold decay accepted only {accepted} of budget {budget} points in "
        f"max_passes={max_passes} passes (tau fell from {tau0:g} to {tau:g}); raise "
        "max_passes, lower tau0 or use a smaller decay"
    )


class ThresholdState:
    """State of one threshold-decay run (see the module docstring)."""

    def __init__(self, x: np.ndarray, budget: int) -> None:
        n, d = x.shape
        self.x, self.n, self.budget = x, n, budget
        self.sp = ApproxSpace(x)
        # canonical rows of the accepted points (other shards' included); None: rows of x
        self.acc_x: np.ndarray | None = None
        self.lb = np.full(n, np.inf)  # bounds of the canonical min distance to acc[:cnt]
        self.ub = np.full(n, np.inf)
        self.cnt = np.zeros(n, dtype=np.int64)
        self.done = np.zeros(n, dtype=bool)
        self.acc = np.empty(budget, dtype=np.int64)
        self.acc_xa = np.empty((budget, d), dtype=np.float32)
        self.acc_s2f = np.empty(budget, dtype=np.float32)
        self.acc_smax = 0.0
        self.a = 0  # number accepted

    def run(self, order: np.ndarray, tau0: float, decay: float, max_passes: int) -> ThresholdResult:
        remaining = order
        tau = tau0
        checked_at = -1
        for passes in range(1, max_passes + 1):
            a_pass = self.a
            if self.walk(remaining, tau):
                return ThresholdResult(self.acc.copy(), tau0, tau, passes)
            if self.a > a_pass:
                remaining = remaining[~self.done[remaining]]
            elif self.a != checked_at:
                checked_at = self.a
                if self._all_duplicates(remaining):
                    raise duplicates_error(self.a, self.n, self.budget)
            tau = tau * decay
        raise passes_error(self.a, self.budget, max_passes, tau0, tau / decay)

    def walk(self, candidates: np.ndarray, tau: float) -> bool:
        """One pass at ``tau`` over ``candidates`` in order (rows of x not yet accepted): each
        is accepted when its distance to every accepted point is > tau. True when the budget
        is reached (the walk stops there)."""
        viable = candidates[self.ub[candidates] > tau]
        for s in range(0, len(viable), _CHUNK):
            chunk = viable[s : s + _CHUNK]
            self._bulk_update(chunk)
            chunk = chunk[self.ub[chunk] > tau]
            for b in range(0, len(chunk), _BLOCK):
                if self._block(chunk[b : b + _BLOCK], tau):
                    return True
        return False

    def _block(self, blk: np.ndarray, tau: float) -> bool:
        """Process one block of candidates in order; True when the budget is reached."""
        a0 = self.a
        stale = blk[self.cnt[blk] < a0]
        if len(stale):
            self._update(stale, a0)
        lb, ub = self.lb[blk], self.ub[blk]
        amb = blk[(lb <= tau) & (ub > tau)]
        if len(amb):
            self._exact_min(amb)
        ok = blk[self.lb[blk] > tau]
        if len(ok) == 0:
            return False
        conflict = self._conflicts(ok, tau)
        blocked = np.zeros(len(ok), dtype=bool)
        for p in range(len(ok)):
            if blocked[p]:
                continue
            self._accept(int(ok[p]))
            if self.a == self.budget:
                return True
            blocked |= conflict[p]
        return False

    def _update(self, rows: np.ndarray, a_end: int) -> None:
        """Extend the bounds of ``rows`` to the accepted points acc[:a_end] (float32 products).

        ``t = s2[j] - 2 dot(i, j)`` is formed in float32: on top of the bound E of ApproxSpace
        this adds at most ``2.1 u32 (s_i + s_j)^2`` (rounding of s2 and of the subtraction)."""
        sp = self.sp
        qmin = self._qmin(rows, int(self.cnt[rows].min()), a_end)
        q = qmin.astype(np.float64) + sp.s2[rows]
        si = sp.s[rows]
        e, f = sp.err(si, self.acc_smax)
        e += 2.1 * _U32 * (si + self.acc_smax) ** 2
        self.lb[rows] = np.minimum(self.lb[rows], sp.lower(q, e, f))
        self.ub[rows] = np.minimum(self.ub[rows], sp.upper(q, e, f))
        self.cnt[rows] = a_end

    def _qmin(self, rows: np.ndarray, lo: int, a_end: int) -> np.ndarray:
        """float32 ``min_j (s2[j] - 2 dot(i, j))`` over accepted points j in acc[lo:a_end]."""
        xr = self.sp.xa[rows] * np.float32(-2.0)  # exact; scales the small factor, not t
        qmin = np.full(len(rows), np.inf, dtype=np.float32)
        for c0 in range(lo, a_end, _COLS):
            c1 = min(c0 + _COLS, a_end)
            t = xr @ self.acc_xa[c0:c1].T
            t += self.acc_s2f[c0:c1]
            np.minimum(qmin, t.min(axis=1), out=qmin)
        return qmin

    def _gram(self, ok: np.ndarray) -> np.ndarray:
        """float32 products ``dot(ok[p], ok[q])`` of the centred rows."""
        xo = self.sp.xa[ok]
        return xo @ xo.T

    def _bulk_update(self, rows: np.ndarray) -> None:
        """Bring ``rows`` up to all accepted points, grouped by how far each already is."""
        stale = rows[self.cnt[rows] < self.a]
        stale = stale[np.argsort(self.cnt[stale], kind="stable")]
        for s in range(0, len(stale), _BLOCK):
            self._update(stale[s : s + _BLOCK], self.a)

    def _exact_min(self, rows: np.ndarray) -> None:
        """Canonical min distance of each of ``rows`` to all accepted points."""
        acc = self.x[self.acc[: self.a]] if self.acc_x is None else self.acc_x[: self.a]
        for i in rows:
            v = float(pair_distances(acc, self.x[i]).min()) if self.a else np.inf
            self.lb[i] = self.ub[i] = v
            self.cnt[i] = self.a

    def _conflicts(self, ok: np.ndarray, tau: float) -> np.ndarray:
        """conflict[p, q] (p < q): canonical d(ok[p], ok[q]) <= tau."""
        sp = self.sp
        s2 = sp.s2[ok]
        q = s2[:, None] + s2[None, :] - 2.0 * self._gram(ok)
        # the bounds of the largest norm of the block hold for every pair (they grow with
        # the norms): two scalar limits on q instead of bounds per pair
        smax = float(sp.s[ok].max())
        qu, ql = sp.q_limits(tau, *sp.err(smax, smax))
        conflict = q <= qu
        amb = (q < ql) & ~conflict
        pi, qi = np.nonzero(np.triu(amb, 1))
        if len(pi):
            conflict[pi, qi] = pair_distances(self.x[ok[pi]], self.x[ok[qi]]) <= tau
        return conflict

    def _accept(self, i: int) -> None:
        a = self.a
        self.acc[a] = i
        self.acc_xa[a] = self.sp.xa[i]
        self.acc_s2f[a] = self.sp.s2[i]
        self.acc_smax = max(self.acc_smax, float(self.sp.s[i]))
        self.done[i] = True
        self.a = a + 1

    def _all_duplicates(self, remaining: np.ndarray) -> bool:
        """Whether every remaining candidate is at canonical distance 0 of an accepted point."""
        for s in range(0, len(remaining), _BLOCK):
            blk = remaining[s : s + _BLOCK]
            self._bulk_update(blk)
            if (self.lb[blk] > 0.0).any():
                return False
            amb = blk[self.ub[blk] > 0.0]
            if len(amb):
                self._exact_min(amb)
                if (self.ub[blk] > 0.0).any():
                    return False
        return True
