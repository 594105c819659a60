"""Kozachenko–Leonenko (KL) k-nearest-neighbour estimator of differential entropy.

Definition (docs/design.md, "KL entropy"; the estimator used by Shi et al., "A Closer Look at
Model Collapse: From a Generalization-to-Memorization Perspective", NeurIPS 2025, arXiv
2509.16499), for features X in R^{N x d}, Euclidean distance, natural log (nats)::

    H = psi(N) - psi(k) + log c_d + (d / N) * sum_i log max(r_k(i), eps)
    log c_d = (d / 2) log(pi) - lgamma(d / 2 + 1)     (log volume of the unit d-ball)

where r_k(i) is the distance from point i to its k-th nearest neighbour, the point itself
excluded, and psi is the digamma function. Exact duplicates make r_k(i) = 0; those points are
counted (``n_duplicates``) and floored at ``eps`` (the paper's code uses 1e-10), so the result
is never NaN nor -inf.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.special import digamma

from raycollapse.errors import UserInputError
from raycollapse.neighbors.compute import resolve_compute, torch_threads
from raycollapse.neighbors.device import faiss_has_gpu
from raycollapse.neighbors.knn import knn_self
from raycollapse.neighbors.validate import as_distances, as_features, check_k

__all__ = ["EntropyResult", "entropy_from_knn_distances", "kl_entropy", "log_unit_ball_volume"]


@dataclass(frozen=True)
class EntropyResult:
    """A KL entropy estimate, in nats, with what it was computed from.

    ``n_duplicates``: number of points i whose k-th neighbour distance r_k(i) is exactly 0.0,
    i.e. points with at least k other rows identical to them (all their first k neighbours are
    exact copies). Those points use the floor ``eps`` instead of log 0. Points with
    0 < r_k(i) < eps are floored too but not counted. ``ci_low``/``ci_high``: bootstrap
    percentile interval, None without bootstrap.
    """

    entropy: float
    n: int
    d: int
    k: int
    n_duplicates: int
    eps: float
    ci_low: float | None = None
    ci_high: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A plain dict of the fields (JSON/Parquet friendly)."""
        return asdict(self)


def log_unit_ball_volume(d: int) -> float:
    """log c_d = (d/2) log(pi) - lgamma(d/2 + 1), the log volume of the unit ball in R^d."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1.0)


def _positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise UserInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def entropy_from_knn_distances(
    r_k: np.ndarray,
    d: int,
    k: int,
    eps: float = 1e-10,
    *,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> EntropyResult:
    """KL entropy from the k-th neighbour distances ``r_k`` (shape (N,)) of N points in R^d.

    ``H = psi(N) - psi(k) + log c_d + (d/N) sum_i log max(r_k(i), eps)`` (see the module
    docstring). Pure function: the sharded Ray path computes r_k elsewhere and calls this.

    Bootstrap (``bootstrap`` > 0 resamples): the N per-point terms log max(r_k(i), eps) are
    resampled with replacement (numpy Generator seeded with ``seed``) and H recomputed each time;
    ``ci_low``/``ci_high`` are the (1 - confidence)/2 and (1 + confidence)/2 percentiles. The
    neighbour distances are held fixed: resampling the points themselves and re-running kNN
    would put copies of the same point in the set, creating artificial duplicates with r = 0.
    The interval therefore reflects the spread of the per-point terms, not the kNN variability.
    """
    r = as_distances(r_k, "r_k")
    n = int(r.shape[0])
    if n < 2:
        raise UserInputError(f"entropy needs at least 2 points, got N={n}; provide more samples")
    d = _positive_int(d, "d (feature dimension)")
    k = check_k(k, n)
    if not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps > 0):
        raise UserInputError(f"eps must be a positive finite number, got {eps!r}; e.g. 1e-10")
    bootstrap = _positive_int(bootstrap, "bootstrap", minimum=0)
    if not (isinstance(confidence, numbers.Real) and 0.0 < confidence < 1.0):
        raise UserInputError(f"confidence must be in (0, 1), got {confidence!r}; e.g. 0.95")

    n_duplicates = int(np.count_nonzero(r == 0.0))
    terms = np.log(np.maximum(r, eps))
    const = float(digamma(n) - digamma(k)) + log_unit_ball_volume(d)
    entropy = const + d * float(terms.mean())

    ci_low = ci_high = None
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        means = np.empty(bootstrap, dtype=np.float64)
        # Resample in chunks so memory stays ~ 8 * N * chunk bytes.
        chunk = max(1, min(bootstrap, 2**22 // n))
        for start in range(0, bootstrap, chunk):
            m = min(chunk, bootstrap - start)
            draws = rng.integers(0, n, size=(m, n))
            means[start : start + m] = terms[draws].mean(axis=1)
        alpha = (1.0 - float(confidence)) / 2.0
        lo, hi = np.quantile(const + d * means, [alpha, 1.0 - alpha])
        ci_low, ci_high = float(lo), float(hi)

    return EntropyResult(
        entropy=float(entropy),
        n=n,
        d=d,
        k=k,
        n_duplicates=n_duplicates,
        eps=float(eps),
        ci_low=ci_low,
        ci_high=ci_high,
    )


def kl_entropy(
    x: np.ndarray,
    k: int = 3,
    eps: float = 1e-10,
    *,
    bootstrap: int = 0,
    seed: int = 0,
    batch_size: int = 4096,
    device: str = "cpu",
    backend: str = "auto",
) -> EntropyResult:
    """KL entropy (nats) of the point set ``x`` (N, d), k-th neighbour excluding the point itself.

    Validates ``x`` (:func:`~raycollapse.neighbors.validate.as_features`) and ``k`` (1 <= k < N),
    finds exact neighbour distances with :func:`~raycollapse.neighbors.knn.knn_self` and applies
    :func:`entropy_from_knn_distances` (formula, duplicates, ``eps`` and bootstrap there).

    ``device`` and ``backend``: see :func:`~raycollapse.neighbors.compute.resolve_compute`. On
    CUDA the neighbours come from FAISS's GPU index where faiss-gpu is installed, else from
    :func:`~raycollapse.neighbors.knn_torch.knn_self_torch`; the torch backend on the CPU uses
    the latter too. Every path gives the same neighbour distances, hence the same entropy.
    """
    compute = resolve_compute(device, backend)
    x = as_features(x, "features")
    k = check_k(k, x.shape[0])
    if compute.cuda and faiss_has_gpu():
        knn = knn_self(x, k, batch_size=batch_size, device=compute.device)
    elif compute.torch:
        from raycollapse.neighbors.knn_torch import knn_self_torch

        with torch_threads(compute):
            knn = knn_self_torch(x, k, compute, batch_size)
    else:
        knn = knn_self(x, k, batch_size=batch_size)
    r_k = knn.distances[:, k - 1]
    return entropy_from_knn_distances(r_k, x.shape[1], k, eps, bootstrap=bootstrap, seed=seed)
