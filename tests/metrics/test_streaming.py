"""Streamed distribution metrics (raycollapse.metrics.streaming) equal the whole-array ones
(frechet_distance, prdc) for any chunking and chunk order, and the closed forms."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import brute_distances, clustered

from raycollapse.errors import UserInputError
from raycollapse.metrics import distribution
from raycollapse.metrics.distribution import (
    feature_stats,
    frechet_distance,
    frechet_from_stats,
    prdc,
)
from raycollapse.metrics.streaming import GaussianStats, PrdcAccumulator


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, s + size) for s in range(0, n, size)]


def _streamed_stats(x: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    acc = GaussianStats()
    for sl in _chunks(len(x), size):
        acc.add(x[sl])
    return acc.stats()


def _data(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    if kind == "clustered":
        return clustered(n, d, seed, n_clusters=6, offset=100.0)  # far from 0: cancellation
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("size", [1, 7, 64, 10_000])
def test_streamed_frechet_equals_whole_arrays(kind: str, size: int) -> None:
    pool, real = _data(kind, 301, 6, 1), _data(kind, 150, 6, 2) * 1.1
    mu, sigma = _streamed_stats(pool, size)
    mu_w, sigma_w = feature_stats(pool)
    # float64 on both sides; only the order of the sums differs
    np.testing.assert_allclose(mu, mu_w, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma_w, rtol=1e-10, atol=1e-12)
    got = frechet_from_stats(mu, sigma, *feature_stats(real))
    assert got == pytest.approx(frechet_distance(pool, real), rel=1e-9)


def test_streamed_frechet_closed_forms() -> None:
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(500, 4)) @ rng.normal(size=(4, 4))).astype(np.float32)
    shift = np.array([0.5, -2.0, 0.0, 1.25], dtype=np.float32)  # exact in float32
    # A constant shift: equal covariances, so FD = ||shift||^2 exactly (up to rounding).
    mu, sigma = _streamed_stats(x + shift, 13)
    got = frechet_from_stats(mu, sigma, *feature_stats(x))
    assert got == pytest.approx(float(shift.astype(np.float64) @ shift), rel=1e-9)
    # Points whose mean and unbiased covariance are known: +-a e_j over n = 2d rows, a^2 =
    # (n - 1) / 2, give mean 0 and covariance I; against N(m, 4 I): ||m||^2 + d (1 + 4 - 2 * 2).
    d = 3
    pts = np.concatenate([np.eye(d), -np.eye(d)]).astype(np.float64) * np.sqrt((2 * d - 1) / 2)
    acc = GaussianStats()
    for row in pts.astype(np.float32):
        acc.add(row[None])
    mu, sigma = acc.stats()
    np.testing.assert_allclose(sigma, np.eye(d), atol=1e-6)
    m = np.array([1.0, 2.0, 0.0])
    assert frechet_from_stats(mu, sigma, m, 4 * np.eye(d)) == pytest.approx(5.0 + d, rel=1e-6)


def test_gaussian_stats_bad_input() -> None:
    acc = GaussianStats("pool")
    with pytest.raises(UserInputError, match="pool must have at least 2"):
        acc.stats()
    acc.add(np.ones((1, 3)))
    with pytest.raises(UserInputError, match="pool: rows of 2 features after rows of 3"):
        acc.add(np.ones((2, 2)))
    with pytest.raises(UserInputError, match="NaN"):
        acc.add(np.array([[1.0, np.nan, 0.0]]))


# --- PRDC ------------------------------------------------------------------------------------


def _brute_kth(x: np.ndarray, k: int) -> np.ndarray:
    """k-th nearest other row, from the full float64 distance matrix (self at 0 is first)."""
    return np.sort(brute_distances(x, x), axis=1)[:, k]


def _streamed_prdc(real: np.ndarray, fake: np.ndarray, size: int, seed: int) -> dict:
    """Fake chunks in a shuffled order, each with its rows' k-NN radii in the whole fake set."""
    radii = _brute_kth(fake, 5)
    acc = PrdcAccumulator(real, 5)
    chunks = _chunks(len(fake), size)
    for i in np.random.default_rng(seed).permutation(len(chunks)):
        acc.add(fake[chunks[i]], radii[chunks[i]])
    return acc.result()


def _prdc_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    near = rng.normal(size=(60, 3)).astype(np.float32)
    # near-ties: copies moved by one float32 ulp, so many distances equal a radius but for
    # the last bit; exact ties: integer grids, many fakes exactly on a ball's radius
    nudged = np.nextafter(near, np.float32(np.inf))
    return {
        "random": (_data("random", 90, 4, 8), _data("random", 110, 4, 9) * 1.3 + 0.2),
        "clustered": (clustered(120, 5, 4), clustered(100, 5, 4, offset=0.3)),
        "ties": (
            rng.integers(0, 4, size=(70, 3)).astype(np.float32),
            rng.integers(0, 4, size=(55, 3)).astype(np.float32),
        ),
        "near_ties": (near, np.concatenate([nudged, near[:20]])),
    }


@pytest.mark.parametrize("case", ["random", "clustered", "ties", "near_ties"])
@pytest.mark.parametrize("size", [1, 9, 1000])
def test_streamed_prdc_equals_prdc_exactly(
    case: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, fake = _prdc_cases()[case]
    want = prdc(real, fake, k=5)
    # small tiles (dividing nothing) exercise the tiling and the exact border re-check
    monkeypatch.setattr(distribution, "_TILE_ENTRIES", 7 * 13)
    got = _streamed_prdc(real, fake, size, seed=size)
    assert got == want  # the same floats, not approximately
    # and the definitions, on full float64 distance matrices (strict <)
    d_rf = brute_distances(real, fake)
    inside = d_rf < _brute_kth(real, 5)[:, None]
    assert got["precision"] == inside.any(axis=0).mean()
    assert got["recall"] == (d_rf < _brute_kth(fake, 5)[None, :]).any(axis=1).mean()
    assert got["density"] == pytest.approx(inside.sum() / (5 * len(fake)), rel=1e-15)
    assert got["coverage"] == (d_rf.min(axis=1) < _brute_kth(real, 5)).mean()


def test_prdc_accumulator_bad_input() -> None:
    real = np.random.default_rng(0).normal(size=(20, 3))
    acc = PrdcAccumulator(real, 5)
    with pytest.raises(UserInputError, match="one radius per fake row"):
        acc.add(real[:4], np.ones(3))
    with pytest.raises(UserInputError, match="real have 3 features but fake have 2"):
        acc.add(np.ones((4, 2)), np.ones(4))
    acc.add(real[:5], np.ones(5))
    with pytest.raises(UserInputError, match="fake points N=5"):
        acc.result()
    with pytest.raises(UserInputError, match="real points N=4"):
        PrdcAccumulator(real[:4], 5)
