"""Symmetric exact self-kNN (raycollapse.neighbors.symmetric) against a float64 brute force.

The kernel screens pairs with a float32 product and a rigorous error bound, then ranks the
survivors with the canonical float64 distance. Every test compares with the plain definition
(all N x N float64 distances, the point itself excluded by index, ties by index): ties and
duplicate points, N not a multiple of the 512-row block, k near N, d = 1, data far from the
origin, outliers, a subset of query rows, and two worker threads.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import brute_distances, brute_knn

import raycollapse.neighbors.knn as knn_module
import raycollapse.neighbors.symmetric as symmetric
from raycollapse.neighbors.knn import knn_self
from raycollapse.neighbors.self_search import neighbour_contrast, partition_may_pay
from raycollapse.neighbors.symmetric import screen_error_constant, symmetric_self_knn


def brute_self(x: np.ndarray, k: int, rows: np.ndarray | None = None):
    """k nearest other rows by float64 distance, ties by index, for ``rows`` (default all)."""
    rows = np.arange(len(x)) if rows is None else rows
    dist = brute_distances(x[rows], x)
    dist[np.arange(len(rows)), rows] = np.inf
    return brute_knn(dist, k)


def check(x: np.ndarray, k: int, rows: np.ndarray | None = None, **kw) -> None:
    dist, idx = symmetric_self_knn(x, k, rows, **kw)
    ref_d, ref_i = brute_self(x, k, rows)
    np.testing.assert_array_equal(idx, ref_i)
    np.testing.assert_allclose(dist, ref_d, rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_isotropic_rows_not_a_multiple_of_the_block(k: int) -> None:
    x = np.random.default_rng(k).normal(size=(1300, 16)).astype(np.float32)
    check(x, k)


def test_ties_and_duplicates_on_an_integer_grid() -> None:
    """Small integer coordinates: many rows at exactly equal distances and many exact copies
    (r_k = 0); the order among equals must be by index."""
    x = np.random.default_rng(1).integers(0, 3, size=(1100, 3)).astype(np.float32)
    for k in (1, 5, 40):
        check(x, k)


def test_k_near_n() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    check(x, 39)
    # k + 1 > 512: one block per 521 rows, the last block (58 rows) too small to seed itself.
    x = rng.normal(size=(1100, 4)).astype(np.float32)
    check(x, 520)
    check(rng.normal(size=(2, 3)).astype(np.float32), 1)


def test_one_dimension_with_duplicates() -> None:
    x = np.random.default_rng(3).normal(size=(2000, 1)).astype(np.float32)
    x[::7] = x[1]
    check(x, 3)


def test_far_from_origin_with_outliers_and_near_ties() -> None:
    """Offset 1e3 (centring matters), a few rows 1e4 away (large norms in some blocks) and
    groups of near ties far below float32 resolution, decided by the float64 distances."""
    rng = np.random.default_rng(4)
    d = 8
    centres = 1000.0 + 10.0 * rng.normal(size=(60, d))
    near = centres[:, None, :] + 0.01 * rng.normal(size=(60, 6, d))
    x = np.concatenate([centres, near.reshape(-1, d), 1000.0 + 1e4 * rng.normal(size=(5, d))])
    x = x.astype(np.float32)
    x[70] = x[3]
    check(x, 1)
    check(x, 6)


def test_subset_of_query_rows_and_two_workers() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1200, 12)).astype(np.float32)
    x[1100:1110] = x[3]
    rows = np.sort(rng.choice(1200, 600, replace=False))
    rows = np.union1d(rows, np.arange(1100, 1105))
    check(x, 3, rows)
    check(x, 3, rows, workers=2)
    check(x, 4, workers=2)


def test_a_bound_too_small_loses_neighbours(monkeypatch: pytest.MonkeyPatch) -> None:
    """The screen's error bound is what keeps the true neighbours: with it shrunk to nothing,
    the float32 screen drops them on two tight clusters far from the mean (float32 error of
    the squared distances ~10, neighbours at ~1e-5), so this test can fail."""
    rng = np.random.default_rng(6)
    side = np.where(np.arange(800) % 2 == 0, 3e3, -3e3)[:, None]
    x = (side + 1e-3 * rng.normal(size=(800, 16))).astype(np.float32)
    ref_d, ref_i = brute_self(x, 2)
    monkeypatch.setattr(symmetric, "screen_error_constant", lambda d: 0.0)
    monkeypatch.setattr(symmetric, "_ABS", 0.0)
    _, idx = symmetric_self_knn(x, 2)
    assert not np.array_equal(idx, ref_i)
    monkeypatch.undo()
    check(x, 2)
    assert screen_error_constant(16) > 18 * 2.0**-24 * 2


@pytest.mark.slow  # ~10 s on a quiet host, 35-55 s at load 20
def test_knn_self_auto_uses_it_on_isotropic_data_with_the_same_result() -> None:
    """N = 20,000 isotropic: partition pruning gives up and the symmetric search takes its rows;
    the result is the flat search's, and about half the pairs are computed."""
    x = np.random.default_rng(7).normal(size=(20_000, 8)).astype(np.float32)
    auto = knn_self(x, 3)
    flat = knn_self(x, 3, method="flat")
    np.testing.assert_array_equal(auto.indices, flat.indices)
    np.testing.assert_array_equal(auto.distances, flat.distances)
    assert auto.pair_share is not None and 0.4 < auto.pair_share < 0.7
    sub = np.arange(0, 20_000, 97)
    ref_d, ref_i = brute_self(x, 3, sub)
    np.testing.assert_array_equal(auto.indices[sub], ref_i)
    np.testing.assert_allclose(auto.distances[sub], ref_d, rtol=1e-12, atol=0)


def test_neighbour_contrast_is_its_definition_and_separates_clusters_from_noise() -> None:
    """Median of (k-th nearest / median distance) over a seeded 1024-row sample, against a float64
    re-computation; near 1 without structure in high dimension, small for clusters."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5000, 64)).astype(np.float32)
    rows = np.sort(np.random.default_rng(0).choice(5000, 1024, replace=False))
    dist = brute_distances(x[rows], x[rows])
    np.fill_diagonal(dist, np.inf)
    srt = np.sort(dist, axis=1)
    ref = float(np.median(srt[:, 2] / srt[:, 511]))  # k = 3; median of the 1023 others
    assert neighbour_contrast(x, 3) == pytest.approx(ref, rel=1e-3)
    assert neighbour_contrast(x, 3) > 0.6 and not partition_may_pay(x, 3)
    centres = rng.normal(scale=8.0, size=(50, 64))
    clusters = (centres[rng.integers(0, 50, 5000)] + rng.normal(size=(5000, 64))).astype(np.float32)
    assert neighbour_contrast(clusters, 3) < 0.4 and partition_may_pay(clusters, 3)
    assert neighbour_contrast(x[:2], 1) == 1.0  # too few rows to measure: no pruning claimed


def test_knn_self_skips_the_partition_where_it_cannot_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    """N = 20,000 isotropic in d = 64: no partition is built (the real builder, counted), and
    the neighbours are the brute force's; clustered data of the same size still get one."""
    builds = []
    real = knn_module.build_partition

    def counted(*args, **kwargs):
        builds.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(knn_module, "build_partition", counted)
    n = 20_000
    rng = np.random.default_rng(8)
    x = rng.normal(size=(n, 64)).astype(np.float32)
    auto = knn_self(x, 3)
    assert builds == []
    sub = np.arange(0, n, 211)
    ref_d, ref_i = brute_self(x, 3, sub)
    np.testing.assert_array_equal(auto.indices[sub], ref_i)
    np.testing.assert_allclose(auto.distances[sub], ref_d, rtol=1e-12, atol=0)
    centres = rng.normal(scale=8.0, size=(50, 64))
    clusters = (centres[rng.integers(0, 50, n)] + rng.normal(size=(n, 64))).astype(np.float32)
    auto = knn_self(clusters, 3)
    assert builds == [(n, 64)]
    ref_d, ref_i = brute_self(clusters, 3, sub)
    np.testing.assert_array_equal(auto.indices[sub], ref_i)
