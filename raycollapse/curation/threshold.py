"""Threshold-decay filter and its default starting threshold.

Definition (docs/design.md, "Threshold decay"; Shi et al., "A Closer Look at Model Collapse:
From a Generalization-to-Memorization Perspective", NeurIPS 2025, arXiv 2509.16499): shuffle the
candidates (seeded); tau = tau0; each pass walks the not-yet-accepted candidates in that order
and accepts a candidate when its distance to EVERY accepted point is > tau (strictly); stop as
soon as B are accepted; after each pass tau <- tau * decay.

The result equals that sequential loop over canonical float64 distances
(:func:`raycollapse.neighbors.distances.pair_distances`) exactly. It is computed faster by

* caching, for every candidate, lower and upper bounds of its min distance to the accepted
  points it has been compared with (``lb``, ``ub``, ``cnt``): a candidate with ``ub <= tau`` is
  rejected without any work (the min can only fall as points are accepted and tau only falls),
  and each candidate is compared with each accepted point about once;
* walking candidates in blocks: one float32 matrix product gives bounds against the points
  accepted before the block, another the conflicts inside the block, which are then resolved
  sequentially in candidate order;
* settling every comparison that falls within the rigorous error bound of the product
  (:class:`raycollapse.curation.greedy.ApproxSpace`) with the canonical formula.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from raycollapse.curation.greedy import ApproxSpace, check_budget
from raycollapse.errors import UserInputError
from raycollapse.neighbors.compute import resolve_compute, torch_threads
from raycollapse.neighbors.distances import pair_distances
from raycollapse.neighbors.threads import blas_single_threaded
from raycollapse.neighbors.validate import as_features

__all__ = [
    "ThresholdResult",
    "check_threshold_args",
    "default_tau0",
    "tau0_from_distances",
    "tau0_pairs",
    "threshold_select",
]

_BLOCK = 512  # candidates per block
_CHUNK = 8 * _BLOCK  # candidates brought up to date together (sorted by progress)
_COLS = 8192  # accepted points per product chunk
_U32 = 2.0**-24
TAU0_PAIRS = 4096  # sample size of default_tau0


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


def default_tau0(x: Any, budget: int, seed: int = 0) -> float:
    """Default starting threshold: the typical distance between two random candidates.

    Rule: with ``rng = np.random.default_rng(seed)``, draw 4096 seeded pairs ``i =
    rng.integers(N, size=4096)``, ``j = rng.integers(N - 1, size=4096)``, ``j += (j >= i)`` (so
    j != i), and return the median of their canonical distances that are positive (exact
    duplicates carry no scale information); 1.0 when there are none (N = 1 or all sampled pairs
    identical). ``budget`` is validated but does not enter the rule.

    Why not a spacing that depends on the budget (e.g. the median nearest-neighbour distance
    among ``budget`` random points): such a tau0 is below the separation a well-spread subset
    reaches, so the first pass already fills the budget and tau never decays; the subset is
    then barely more diverse than a random one (benchmarks/README.md, "default tau0"). Starting
    at the typical pair distance, above any separation B points can keep, lets the decay
    find the largest threshold that still fills the budget (within a factor ``decay``), at the
    cost of a few more passes, which are cheap here.
    """
    x = as_features(x, "features", min_rows=1)
    n = x.shape[0]
    check_budget(budget, n)
    if n < 2:
        return 1.0
    i, j = tau0_pairs(n, seed)
    return tau0_from_distances(pair_distances(x[i], x[j]))


def tau0_pairs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded pairs (i, j), i != j, of :func:`default_tau0`'s rule (n >= 2)."""
    rng = np.random.default_rng(seed)
    i = rng.integers(n, size=TAU0_PAIRS)
    j = rng.integers(n - 1, size=TAU0_PAIRS)
    j += j >= i
    return i, j


def tau0_from_distances(dist: np.ndarray) -> float:
    """:func:`default_tau0` from the canonical distances of its pairs."""
    dist = dist[dist > 0.0]
    return float(np.median(dist)) if len(dist) else 1.0


def threshold_select(
    x: Any,
    budget: int,
    tau0: float | None = None,
    decay: float = 0.9,
    seed: int = 0,
    max_passes: int = 10_000,
    *,
    device: str = "cpu",
    backend: str = "auto",
) -> ThresholdResult:
    """Threshold-decay selection of ``budget`` rows of ``x`` (docs/design.md, "Threshold decay").

    Order: ``np.random.default_rng(seed).permutation(N)``; ``tau0=None`` uses
    :func:`default_tau0` ``(x, budget, seed)`` (median distance of random pairs). Raises UserInputError for a bad budget, decay
    outside (0, 1), a non-positive or non-finite tau0, non-finite features, when a pass accepts
    nobody and every remaining candidate is an exact duplicate of an accepted point (fewer
    distinct points than the budget), and when ``max_passes`` passes do not reach the budget.

    ``device`` and ``backend``: see :func:`~raycollapse.neighbors.compute.resolve_compute`; the
    torch backend (:class:`~raycollapse.curation.threshold_torch.TorchThreshold`) runs the
    products there and gives the same result.
    """
    compute = resolve_compute(device, backend)
    x = as_features(x, "features", min_rows=1)
    n = x.shape[0]
    budget = check_budget(budget, n)
    check_threshold_args(decay, max_passes, tau0)
    if tau0 is None:
        tau0 = default_tau0(x, budget, seed)
    order = np.random.default_rng(seed).permutation(n)
    if compute.torch:
        from raycollapse.curation.threshold_torch import TorchThreshold

        with blas_single_threaded(), torch_threads(compute):
            walk: _Threshold = TorchThreshold(x, budget, compute)
            return walk.run(order, float(tau0), float(decay), int(max_passes))
    with blas_single_threaded():
        return _Threshold(x, budget).run(order, float(tau0), float(decay), int(max_passes))


def check_threshold_args(decay: Any, max_passes: Any, tau0: Any) -> None:
    """UserInputError for decay outside (0, 1), max_passes < 1, or a tau0 (not None) that is
    not a positive finite number."""
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real) or not 0.0 < decay < 1.0:
        raise UserInputError(
            f"decay must be a number strictly between 0 and 1, got {decay!r}; e.g. decay=0.9"
        )
    if isinstance(max_passes, bool) or not isinstance(max_passes, numbers.Integral):
        raise UserInputError(f"max_passes must be an integer >= 1, got {max_passes!r}")
    if max_passes < 1:
        raise UserInputError(f"max_passes must be >= 1, got {max_passes}; e.g. max_passes=10000")
    if tau0 is not None and (
        isinstance(tau0, bool)
        or not isinstance(tau0, numbers.Real)
        or not math.isfinite(tau0)
        or tau0 <= 0
    ):
        raise UserInputError(
            f"tau0 must be a positive finite number, got {tau0!r}; pass e.g. tau0=1.0 or omit it "
            "to use default_tau0 (the typical spacing of `budget` random points)"
        )


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


class _Threshold:
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
