"""The mixture of Gaussians: exact sampling, log-density, true entropy and its Monte Carlo error bar.

References are written here or come from scipy: moments of a mixture in closed form, scipy's
``multivariate_normal`` for densities and the Gaussian entropy, a fine-grid quadrature in 1-D and
the separated-components limit ``sum_i w_i H_i + H(w)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal, norm

from raycollapse.config import load_config
from raycollapse.data.mog import (
    entropy_bounds,
    gaussian_entropy,
    log_pdf,
    make_mixture,
    mixture_entropy,
    mixture_from_config,
    random_mixture,
    sample_mixture,
)
from raycollapse.errors import UserInputError


def test_sampling_moments_match_the_closed_form():
    mix = make_mixture(
        [0.2, 0.5, 0.3],
        [[0.0, 1.0], [2.0, -1.0], [-1.5, 0.5]],
        [[[0.3, 0.1], [0.1, 0.2]], [[0.05, 0.0], [0.0, 0.4]], [[0.5, -0.2], [-0.2, 0.3]]],
    )
    n = 200_000
    x, comp = sample_mixture(mix, n, np.random.default_rng(0))
    w, mu, cov = mix.weights, mix.means, mix.covariances
    mean = w @ mu
    second = sum(wi * (ci + np.outer(mi, mi)) for wi, mi, ci in zip(w, mu, cov, strict=True))
    full_cov = second - np.outer(mean, mean)
    se = np.sqrt(np.diag(full_cov) / n)
    assert np.all(np.abs(x.mean(axis=0) - mean) < 4 * se)
    assert np.allclose(np.cov(x.T), full_cov, atol=0.01)
    # Component frequencies are the weights; each component has its own mean and covariance.
    assert np.allclose(np.bincount(comp) / n, w, atol=4 * math.sqrt(0.25 / n))
    for i in range(3):
        xi = x[comp == i]
        assert np.allclose(xi.mean(axis=0), mu[i], atol=0.01)
        assert np.allclose(np.cov(xi.T), cov[i], atol=0.01)


def test_log_pdf_and_gaussian_entropy_match_scipy():
    mix = random_mixture(3, 4, seed=1, scale=0.5)
    x, _ = sample_mixture(mix, 50, np.random.default_rng(2))
    ref = np.log(
        sum(
            w * multivariate_normal(m, c).pdf(x)
            for w, m, c in zip(mix.weights, mix.means, mix.covariances, strict=True)
        )
    )
    assert np.allclose(log_pdf(mix, x), ref, rtol=1e-10, atol=1e-10)
    for c in mix.covariances:
        assert gaussian_entropy(c) == pytest.approx(multivariate_normal(cov=c).entropy(), rel=1e-12)


def test_one_component_is_closed_form():
    mix = random_mixture(1, 3, seed=4)
    h = mixture_entropy(mix)
    assert h.method == "closed form" and h.stderr == 0.0
    assert h.value == pytest.approx(
        multivariate_normal(cov=mix.covariances[0]).entropy(), rel=1e-12
    )


def test_monte_carlo_entropy_against_1d_quadrature():
    """1-D: -int p log p on a fine grid (an independent reference) lies within 3 standard errors."""
    w, mu, sd = np.array([0.3, 0.7]), np.array([-0.4, 0.5]), np.array([0.3, 0.5])
    mix = make_mixture(w, mu[:, None], (sd**2)[:, None, None])
    grid = np.linspace(-6, 6, 200_001)
    p = (w[None, :] * norm.pdf(grid[:, None], mu[None, :], sd[None, :])).sum(axis=1)
    truth = -np.trapezoid(p * np.log(p), grid)
    h = mixture_entropy(mix, mc_samples=100_000, seed=3)
    assert h.method == "monte carlo" and h.samples == 100_000
    assert abs(h.value - truth) < 3 * h.stderr
    lo, hi = entropy_bounds(mix)
    assert lo < truth < hi


def test_monte_carlo_error_bar_is_honest_for_separated_components():
    """Components 100 deviations apart: H = sum_i w_i H_i + H(w) to machine precision. The
    estimate lies within 3 standard errors, and over 30 seeds the z-scores have spread ~1."""
    mix = make_mixture(
        [0.5, 0.3, 0.2],
        [[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]],
        [np.eye(2) * 0.5, [[1.0, 0.3], [0.3, 0.6]], np.eye(2) * 0.2],
    )
    _, truth = entropy_bounds(mix)
    inner = sum(
        w * multivariate_normal(cov=c).entropy()
        for w, c in zip(mix.weights, mix.covariances, strict=True)
    )
    assert truth == pytest.approx(inner - (mix.weights * np.log(mix.weights)).sum(), rel=1e-12)
    z = []
    for seed in range(30):
        h = mixture_entropy(mix, mc_samples=5000, seed=seed)
        z.append((h.value - truth) / h.stderr)
    assert abs(z[0]) < 3
    assert 0.6 < np.std(z) < 1.5 and abs(np.mean(z)) < 0.6


def test_config_parameters_given_or_seeded():
    cfg = load_config(
        None,
        [
            "data.mog.components=2",
            "data.mog.dim=1",
            "data.mog.weights=[1,3]",
            "data.mog.means=[[0],[2]]",
            "data.mog.covariances=[[[1]],[[0.25]]]",
        ],
    )
    mix = mixture_from_config(cfg.data.mog)
    assert np.allclose(mix.weights, [0.25, 0.75]) and np.allclose(mix.means[:, 0], [0, 2])
    seeded = load_config(None, ["data.mog.components=3", "data.mog.dim=5", "data.mog.seed=7"])
    a, b = mixture_from_config(seeded.data.mog), random_mixture(3, 5, seed=7, scale=0.2)
    assert np.array_equal(a.means, b.means) and np.array_equal(a.covariances, b.covariances)
    assert np.all(np.abs(a.means) <= 1.0)
    for c in a.covariances:  # axis deviations within [scale / 2, scale]
        ev = np.linalg.eigvalsh(c)
        assert np.all(ev >= 0.1**2 - 1e-12) and np.all(ev <= 0.2**2 + 1e-12)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["data.mog.components=2", "data.mog.means=[[0,0]]"], "data.mog.means has shape"),
        (["data.mog.dim=1", "data.mog.covariances=[[[1]],[[-1]]]"], "positive definite"),
        (["data.mog.dim=2", "data.mog.covariances=[[[1,0.5],[0,1]],[[1,0],[0,1]]]"], "symmetric"),
        (["data.mog.weights=[1,0]"], "positive"),
        (["data.mog.components=3", "data.mog.weights=[1,1]"], "data.mog.weights has shape"),
    ],
)
def test_bad_parameters_are_refused(overrides, match):
    with pytest.raises(UserInputError, match=match):
        mixture_from_config(load_config(None, overrides).data.mog)
