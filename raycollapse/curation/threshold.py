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
  (:class:`raycollapse.curation.approx.ApproxSpace`) with the canonical formula.

The walk itself is :class:`raycollapse.curation.threshold_state.ThresholdState`.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

from raycollapse.curation.greedy import check_budget
from raycollapse.curation.threshold_state import ThresholdResult, ThresholdState
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

TAU0_PAIRS = 4096  # sample size of default_tau0


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
            walk: ThresholdState = TorchThreshold(x, budget, compute)
            return walk.run(order, float(tau0), float(decay), int(max_passes))
    with blas_single_threaded():
        return ThresholdState(x, budget).run(order, float(tau0), float(decay), int(max_passes))


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
