"""Metrics (raycollapse.metrics.memorization, .distribution) against brute force, scipy and
closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from raycollapse.errors import UserInputError
from raycollapse.metrics import distribution
from raycollapse.metrics.distribution import (
    feature_stats,
    frechet_distance,
    frechet_from_stats,
    prdc,
)
from raycollapse.metrics.memorization import (
    generalization_from_distances,
    generalization_score,
    memorized_fraction,
    memorized_from_distances,
)


def dist_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32).astype(np.float64)
    b = np.asarray(b, dtype=np.float32).astype(np.float64)
    return np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))


# --- Fréchet ---------------------------------------------------------------------------------


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The usual FID computation: np.cov + scipy.linalg.sqrtm(S1 @ S2), real part."""
    a = np.asarray(a, dtype=np.float32).astype(np.float64)
    b = np.asarray(b, dtype=np.float32).astype(np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.atleast_2d(np.cov(a, rowvar=False))
    s2 = np.atleast_2d(np.cov(b, rowvar=False))
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean))


def test_feature_stats_match_numpy() -> None:
    x = np.random.default_rng(0).normal(size=(300, 6)).astype(np.float32) * 3 + 10
    mu, sigma = feature_stats(x, chunk_rows=7)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10)


@pytest.mark.parametrize("d", [1, 3, 16])
def test_frechet_matches_scipy_sqrtm(d: int) -> None:
    rng = np.random.default_rng(d)
    a = rng.normal(size=(500, d)) @ rng.normal(size=(d, d))
    b = rng.normal(size=(400, d)) * 1.5 + 0.3
    assert frechet_distance(a, b) == pytest.approx(scipy_frechet(a, b), rel=1e-8)


def test_frechet_closed_form_for_gaussians() -> None:
    # FD(N(m1,S1), N(m2,S2)) with known parameters; sample estimate from N=100,000 each.
    rng = np.random.default_rng(1)
    d = 4
    m1, m2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 2.0])
    a_ = rng.normal(size=(d, d))
    s1 = a_ @ a_.T / d + np.eye(d)
    s2 = np.diag([0.5, 1.0, 2.0, 3.0])
    root = scipy.linalg.sqrtm(s1 @ s2)
    expected = float(np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * np.real(root)))
    x1 = rng.multivariate_normal(m1, s1, size=100_000)
    x2 = rng.multivariate_normal(m2, s2, size=100_000)
    assert frechet_distance(x1, x2) == pytest.approx(expected, abs=0.05)
    assert frechet_from_stats(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-10)


def test_frechet_identical_and_singular() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 32)) * 5  # fewer points than dimensions: singular covariance
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    y = rng.normal(size=(12, 32))
    value = frechet_distance(x, y)
    mu1, s1 = feature_stats(x)
    mu2, s2 = feature_stats(y)
    offset = np.eye(32) * 1e-6  # the standard retry for sqrtm on singular products
    ref_root = np.real(scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset)))
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * ref_root)
    assert np.isfinite(value) and value == pytest.approx(ref, rel=1e-4)


def test_frechet_bad_input() -> None:
    with pytest.raises(UserInputError, match="4 features but second feature set have 3"):
        frechet_distance(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(UserInputError, match=r"\(3,\) and \(2, 2\)"):
        frechet_from_stats(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(UserInputError, match="NaN"):
        frechet_from_stats(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))


# --- generalization / memorization ----------------------------------------------------------


def test_generalization_and_memorized_match_brute_force() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(150, 5)).astype(np.float32)
    gen = np.concatenate(
        [train[:20] + rng.normal(scale=1e-3, size=(20, 5)), rng.normal(size=(60, 5))]
    ).astype(np.float32)
    dist = np.sort(dist_matrix(gen, train), axis=1)
    assert generalization_score(gen, train) == pytest.approx(dist[:, 0].mean(), rel=1e-12)
    for ratio in (1 / 3, 0.5, 0.9):
        expected = np.mean(dist[:, 0] < ratio * dist[:, 1])
        assert memorized_fraction(gen, train, ratio=ratio) == expected
    assert memorized_fraction(gen, train) >= 20 / 80


def test_memorized_pure_rule() -> None:
    d1 = np.array([0.0, 1.0, 1.0, 0.0])
    d2 = np.array([1.0, 3.0, 3.0001, 0.0])  # 1 < 3/3 is false; an exact double copy not counted
    assert memorized_from_distances(d1, d2) == pytest.approx(0.5)
    assert generalization_from_distances(np.array([1.0, 2.0, 6.0])) == 3.0


def test_generalization_memorized_bad_input() -> None:
    train = np.zeros((1, 3))
    with pytest.raises(UserInputError, match="train must have at least 2 points.*got 1"):
        memorized_fraction(np.zeros((4, 3)), train)
    with pytest.raises(UserInputError, match="generated have 2 features but train have 3"):
        generalization_score(np.zeros((4, 2)), np.zeros((4, 3)))
    bad = np.ones((4, 3))
    bad[2, 0] = np.nan
    with pytest.raises(UserInputError, match="generated.*first bad row index: 2"):
        generalization_score(bad, np.ones((4, 3)))
    with pytest.raises(UserInputError, match="got -1"):
        memorized_from_distances(np.ones(2), np.ones(2), ratio=-1)
    with pytest.raises(UserInputError, match="d1.*first at index 1"):
        generalization_from_distances(np.array([1.0, -1.0]))


# --- PRDC ------------------------------------------------------------------------------------


def brute_prdc(real: np.ndarray, fake: np.ndarray, k: int) -> dict[str, float]:
    """Naeem et al.'s reference formulas on full float64 distance matrices (strict <)."""
    d_rr, d_ff, d_rf = dist_matrix(real, real), dist_matrix(fake, fake), dist_matrix(real, fake)
    # k-th neighbour excluding self = (k+1)-th smallest including the 0 self-distance.
    r_real = np.sort(d_rr, axis=1)[:, k]
    r_fake = np.sort(d_ff, axis=1)[:, k]
    inside_real = d_rf < r_real[:, None]  # [i, j]: fake j inside real i's ball
    return {
        "precision": float(inside_real.any(axis=0).mean()),
        "recall": float((d_rf < r_fake[None, :]).any(axis=1).mean()),
        "density": float(inside_real.sum(axis=0).mean() / k),
        "coverage": float((d_rf.min(axis=1) < r_real).mean()),
    }


def assert_prdc_equal(got: dict[str, float], want: dict[str, float]) -> None:
    assert set(got) == {"precision", "recall", "density", "coverage"}
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_matches_brute_force(k: int) -> None:
    rng = np.random.default_rng(k)
    real = rng.normal(size=(120, 4)).astype(np.float32)
    fake = (rng.normal(size=(90, 4)) * 1.3 + 0.4).astype(np.float32)
    got = prdc(real, fake, k=k)
    assert_prdc_equal(got, brute_prdc(real, fake, k))
    assert 0 < got["precision"] < 1 and 0 < got["coverage"] < 1


@pytest.mark.parametrize("k", [1, 2, 5])
def test_prdc_exact_ties_on_discrete_data(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Integer data: many fakes lie exactly on a ball's radius, where < and <= differ. Small
    # tiles (not dividing the sizes) exercise the tiling and the exact border re-check.
    monkeypatch.setattr(distribution, "_TILE_ENTRIES", 7 * 13)
    rng = np.random.default_rng(10 + k)
    real = rng.integers(0, 4, size=(70, 3)).astype(np.float32)
    fake = rng.integers(0, 4, size=(55, 3)).astype(np.float32)
    got = prdc(real, fake, k=k)
    assert_prdc_equal(got, brute_prdc(real, fake, k))
    # Same sets: every fake lies exactly on the radius of the reals it is k-th neighbour of.
    x = rng.normal(size=(40, 2)).round(1).astype(np.float32)
    assert_prdc_equal(prdc(x, x, k=k), brute_prdc(x, x, k))


def test_prdc_identical_distributions_near_one() -> None:
    rng = np.random.default_rng(4)
    real = rng.normal(size=(1500, 3))
    fake = rng.normal(size=(1500, 3))
    got = prdc(real, fake, k=5)
    assert got["precision"] > 0.8 and got["recall"] > 0.8
    assert 0.85 < got["density"] < 1.15 and got["coverage"] > 0.9


def test_prdc_bad_input() -> None:
    real = np.zeros((10, 3))
    with pytest.raises(UserInputError, match="fake points N=5, got 5"):
        prdc(real, np.ones((5, 3)), k=5)
    with pytest.raises(UserInputError, match="got 0"):
        prdc(real, real, k=0)
    with pytest.raises(UserInputError, match="real have 3 features but fake have 2"):
        prdc(real, np.zeros((10, 2)), k=2)
    with pytest.raises(UserInputError, match=r"real must be a 2-D.*shape \(10,\)"):
        prdc(np.zeros(10), real, k=2)
