"""Distribution metrics on feature arrays: feature statistics, the Fréchet distance between
Gaussian fits (FD; FID when the features are Inception's) and precision, recall, density and
coverage (Naeem et al., "Reliable Fidelity and Diversity Metrics for Generative Models", ICML
2020; reference code: clovaai/generative-evaluation-prdc).

All distances are Euclidean. :func:`frechet_from_stats` takes precomputed statistics, for the
sharded Ray path.
"""

from __future__ import annotations

import numpy as np

from raycollapse.errors import UserInputError
from raycollapse.neighbors.distances import pair_distances
from raycollapse.neighbors.knn import knn_search, knn_self
from raycollapse.neighbors.validate import as_features, check_k, check_same_dim

__all__ = ["feature_stats", "frechet_distance", "frechet_from_stats", "prdc"]

# Entries per distance tile in prdc: each tile holds a few float64 arrays of this many entries
# (~8 MiB each), whatever the number of real and fake samples.
_TILE_ENTRIES = 2**20
_EPS64 = float(np.finfo(np.float64).eps)


def feature_stats(x: np.ndarray, *, chunk_rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean (d,) and covariance (d, d) of the rows of ``x``, float64, unbiased (ddof=1).

    Two passes over row chunks (never a float64 copy of all of ``x``); memory O(d^2).
    """
    x = as_features(x, "features")
    n, d = x.shape
    mu = np.zeros(d, dtype=np.float64)
    for s in range(0, n, chunk_rows):
        mu += x[s : s + chunk_rows].sum(axis=0, dtype=np.float64)
    mu /= n
    sigma = np.zeros((d, d), dtype=np.float64)
    for s in range(0, n, chunk_rows):
        c = x[s : s + chunk_rows].astype(np.float64) - mu
        sigma += c.T @ c
    sigma /= n - 1
    return mu, sigma


def _stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserInputError(
            f"{name}: mean must be (d,) and covariance (d, d), got {mu.shape} and {sigma.shape}"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserInputError(f"{name}: statistics contain NaN or inf; recompute them")
    return mu, 0.5 * (sigma + sigma.T)


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):

    ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``, in float64.

    Tr (S1 S2)^{1/2} is computed by the eigenvalue route: S1 S2 is similar to the symmetric PSD
    matrix M = S1^{1/2} S2 S1^{1/2}, so the trace is sum(sqrt(eigvalsh(M))). Unlike
    ``scipy.linalg.sqrtm(S1 @ S2)`` this is real and finite also for singular covariances
    (fewer samples than features), without the eps-offset retry. Tiny negative eigenvalues
    (rounding) are clipped to 0, and so is a tiny negative result.
    """
    mu1, s1 = _stats(mu1, sigma1, "first statistics")
    mu2, s2 = _stats(mu2, sigma2, "second statistics")
    if mu1.shape != mu2.shape:
        raise UserInputError(
            f"the two feature sets have different dimensions ({mu1.shape[0]} and "
            f"{mu2.shape[0]}); embed both with the same feature extractor"
        )
    root1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of feature sets ``a`` and ``b`` (FID on Inception
    features). See :func:`frechet_from_stats`."""
    a = as_features(a, "first feature set")
    b = as_features(b, "second feature set")
    check_same_dim(a, b, "first feature set", "second feature set")
    return frechet_from_stats(*feature_stats(a), *feature_stats(b))


def _ball_counts(points: np.ndarray, centers: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """For each row p of ``points``: the number of centers c with ||p - c|| < radii[c].

    Tiled: blocks of at most 1024 points x (_TILE_ENTRIES / 1024) centers, so memory stays
    ~ a few x 8 MiB whatever the sizes. Each tile uses the fast float64 expansion
    |p|^2 + |c|^2 - 2 p.c; the few pairs within its worst-case rounding bound of the radius are
    re-decided with the exact :func:`pair_distances`, the same function that computed the radii,
    so a point at exactly a ball's radius is never counted inside (strict ``<``).
    """
    n_p, d = points.shape
    r = np.asarray(radii, dtype=np.float64)
    r2 = r * r
    p_norm = np.einsum("ij,ij->i", points, points, dtype=np.float64)
    c_norm = np.einsum("ij,ij->i", centers, centers, dtype=np.float64)
    counts = np.zeros(n_p, dtype=np.int64)
    bp = min(1024, n_p)
    bc = max(1, _TILE_ENTRIES // bp)
    slack = (4 * d + 16) * _EPS64  # relative bound on both computations' rounding error
    for ps in range(0, n_p, bp):
        p = points[ps : ps + bp].astype(np.float64)
        pn = p_norm[ps : ps + bp, None]
        for cs in range(0, centers.shape[0], bc):
            c = centers[cs : cs + bc]
            cr, cr2 = r[cs : cs + bc], r2[cs : cs + bc]
            d2 = pn + c_norm[None, cs : cs + bc] - 2.0 * (p @ c.astype(np.float64).T)
            tol = slack * (pn + c_norm[None, cs : cs + bc] + cr2[None, :])
            live = cr[None, :] > 0  # a zero radius contains nothing under strict <
            counts[ps : ps + bp] += np.count_nonzero((d2 < cr2 - tol) & live, axis=1)
            bi, bj = np.nonzero((np.abs(d2 - cr2) <= tol) & live)
            for s in range(0, bi.size, 65536):  # exact re-check of borderline pairs
                i, j = bi[s : s + 65536], bj[s : s + 65536]
                inside = pair_distances(points[ps + i], c[j]) < cr[j]
                np.add.at(counts, ps + i[inside], 1)
    return counts


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` (Naeem et al. 2020).

    With r_i the distance from real i to its k-th nearest other real (self excluded) and s_j the
    same among fakes, N reals and M fakes:

    - precision = share of fakes j with ||f_j - x_i|| < r_i for some real i
    - recall    = share of reals i with ||x_i - f_j|| < s_j for some fake j
    - density   = (1 / (k M)) * sum_j #{i : ||f_j - x_i|| < r_i}
    - coverage  = share of reals i whose nearest fake is at distance < r_i

    Strict ``<`` everywhere, as in the authors' reference code (``distance < radii`` for
    precision, recall and density, ``nearest < radii`` for coverage); ``<`` and ``<=`` differ
    only on exact ties (e.g. discrete data). Distances are exact float64 (see
    :func:`~raycollapse.neighbors.distances.pair_distances`). Memory: no N x M matrix; kNN in query
    batches plus distance tiles of ~2^20 entries. Time O(N M d), like the reference.
    """
    real = as_features(real, "real")
    fake = as_features(fake, "fake")
    check_same_dim(real, fake, "real", "fake")
    for name, arr in (("real", real), ("fake", fake)):
        k = check_k(k, arr.shape[0], what=f"{name} points", hint="Naeem et al. use k=5")
    real_radii = knn_self(real, k).distances[:, k - 1]
    fake_radii = knn_self(fake, k).distances[:, k - 1]
    fake_in_real_balls = _ball_counts(fake, real, real_radii)
    real_in_fake_balls = _ball_counts(real, fake, fake_radii)
    nearest_fake = knn_search(fake, real, 1).distances[:, 0]
    return {
        "precision": float(np.mean(fake_in_real_balls > 0)),
        "recall": float(np.mean(real_in_fake_balls > 0)),
        "density": float(fake_in_real_balls.sum() / (k * fake.shape[0])),
        "coverage": float(np.mean(nearest_fake < real_radii)),
    }
