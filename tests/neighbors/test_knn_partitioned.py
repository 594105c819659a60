"""Partition-pruned exact kNN (raycollapse.neighbors.partitioned) against brute-force numpy.

The pruning must never change a result: every test compares with a float64 brute force written
here, on clustered data (where lists are skipped), isotropic data (where they are not), data
far from the origin (rounding of the bounds), duplicates and queries outside the database.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest
from helpers import clustered

from raycollapse.errors import UserInputError
from raycollapse.neighbors.knn import ExactIndex, knn_search, knn_self
from raycollapse.neighbors.partitioned import (
    build_partition,
    default_n_lists,
    partitioned_candidates,
)


def brute_knn(queries: np.ndarray, db: np.ndarray, k: int, *, self_search: bool = False):
    """k nearest by float64 distance, ties by index; blocks of rows keep memory small."""
    q64 = queries.astype(np.float64)
    d64 = db.astype(np.float64)
    out_d = np.empty((len(q64), k))
    out_i = np.empty((len(q64), k), dtype=np.int64)
    idx = np.arange(len(d64))
    for s in range(0, len(q64), 128):
        dist = np.sqrt(((q64[s : s + 128, None, :] - d64[None, :, :]) ** 2).sum(axis=-1))
        if self_search:
            dist[np.arange(dist.shape[0]), s + np.arange(dist.shape[0])] = np.inf
        order = np.lexsort((np.broadcast_to(idx, dist.shape), dist), axis=-1)[:, :k]
        out_d[s : s + 128] = np.take_along_axis(dist, order, axis=1)
        out_i[s : s + 128] = order
    return out_d, out_i


def check_equal(res, ref_d: np.ndarray, ref_i: np.ndarray) -> None:
    np.testing.assert_array_equal(res.indices, ref_i)
    np.testing.assert_allclose(res.distances, ref_d, rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [1, 3, 10])
def test_knn_self_partitioned_matches_brute_force_on_clusters(k: int) -> None:
    x = clustered(3000, 8, seed=k)
    res = knn_self(x, k, method="partitioned")
    check_equal(res, *brute_knn(x, x, k, self_search=True))


def test_pruning_skips_work_on_clusters_and_keeps_every_neighbour() -> None:
    """On well separated clusters no group may fall back to the flat search (else the test of
    exactness above would not exercise pruning), and the candidates equal the brute force."""
    x = clustered(4000, 8, seed=5)
    dist, idx, stats = partitioned_candidates(x, x, 4, 12)
    assert stats.flat_queries == 0
    # pruning really skipped rows: a flat search computes every one of the 4000 x 4000 pairs
    assert stats.pair_share < 0.25
    # Only the n_need = 4 nearest are guaranteed; the 8 extra candidates are a float32 margin.
    ref_d, ref_i = brute_knn(x, x, 4)
    np.testing.assert_array_equal(idx[:, :4], ref_i)
    np.testing.assert_allclose(dist[:, :4], ref_d, rtol=1e-12, atol=0)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_isotropic_data_falls_back_to_flat_and_stays_exact() -> None:
    x = np.random.default_rng(0).normal(size=(3000, 48)).astype(np.float32)
    dist, idx, stats = partitioned_candidates(x, x, 4, 12)
    assert stats.flat_queries > 0
    assert stats.pair_share > 0.5  # the flat fallback computes (almost) every pair
    ref_d, ref_i = brute_knn(x, x, 4)
    np.testing.assert_array_equal(idx[:, :4], ref_i)
    np.testing.assert_allclose(dist[:, :4], ref_d, rtol=1e-12, atol=0)


def test_far_from_origin_with_duplicates() -> None:
    """Offset 1e3: float32 cancellation in FAISS and float64 rounding in the bounds are at
    their worst; a group of 25 identical rows exceeds the candidates FAISS is asked for."""
    x = clustered(3000, 6, seed=2, offset=1000.0)
    x[100:125] = x[100]
    x[7] = x[2900]
    res = knn_self(x, 3, method="partitioned")
    ref_d, ref_i = brute_knn(x, x, 3, self_search=True)
    np.testing.assert_allclose(res.distances, ref_d, rtol=1e-12, atol=0)
    outside = np.r_[0:100, 125:3000]
    np.testing.assert_array_equal(res.indices[outside], ref_i[outside])
    assert (res.distances[100:125] == 0.0).all()
    assert res.indices[7, 0] == 2900 and res.distances[7, 0] == 0.0
    assert (res.indices != np.arange(3000)[:, None]).all()


def test_knn_search_partitioned_with_outside_queries() -> None:
    """Queries are grouped by their nearest centroid; include some far from every cluster."""
    db = clustered(3000, 10, seed=3)
    rng = np.random.default_rng(4)
    queries = np.concatenate(
        [
            clustered(500, 10, seed=3)[rng.permutation(500)],
            rng.normal(scale=30.0, size=(40, 10)).astype(np.float32),
        ]
    )
    res = knn_search(db, queries, 5, method="partitioned")
    check_equal(res, *brute_knn(queries, db, 5))


def test_auto_partitions_large_searches_with_the_same_result() -> None:
    x = clustered(20_000, 16, seed=6, n_clusters=100)
    auto = knn_self(x, 3)  # N = 20,000: 'auto' takes the partitioned path
    flat = knn_self(x, 3, method="flat")
    assert flat.pair_share == 1.0
    assert auto.pair_share < 0.25  # pruned, not a flat search in disguise
    np.testing.assert_array_equal(auto.indices, flat.indices)
    np.testing.assert_array_equal(auto.distances, flat.distances)


def test_build_partition_lists_cover_every_row_once_sorted_by_centroid_distance() -> None:
    x = clustered(2000, 5, seed=7)
    part = build_partition(x, 20, seed=0)
    assert np.array_equal(np.sort(part.order), np.arange(2000))
    assert (part.counts > 0).all() and part.bounds[-1] == 2000
    np.testing.assert_array_equal(part.sorted_data, x[part.order])
    for b in range(len(part.counts)):
        rows = x[part.order[part.bounds[b] : part.bounds[b + 1]]].astype(np.float64)
        rho = np.sqrt(((rows - part.centroids[b].astype(np.float64)) ** 2).sum(axis=1))
        np.testing.assert_allclose(part.rho[part.bounds[b] : part.bounds[b + 1]], rho, rtol=1e-12)
        assert (np.diff(rho) >= -1e-12).all()
        assert part.radius[b] == pytest.approx(rho.max(), rel=1e-12)


def test_default_n_lists() -> None:
    assert default_n_lists(100) == 1
    assert default_n_lists(100_000) == 316
    assert default_n_lists(10**9) == 4096


def test_unknown_method_is_a_clear_error() -> None:
    x = clustered(100, 3, seed=0)
    with pytest.raises(UserInputError, match="method must be 'auto', 'flat' or 'partitioned'"):
        knn_self(x, 2, method="ivf")  # type: ignore[arg-type]


@pytest.mark.parametrize("k", [1, 5])
def test_low_dimension_mixed_density_needs_neighbouring_lists(k: int) -> None:
    """In 2-D the lists tile the plane: points near a list's edge have neighbours in adjacent
    lists, and a dense blob inside sparse background gives very different tau per group."""
    rng = np.random.default_rng(k)
    x = np.concatenate(
        [rng.uniform(-10, 10, size=(2500, 2)), rng.normal(scale=0.2, size=(500, 2))]
    ).astype(np.float32)
    dist, idx, stats = partitioned_candidates(x, x, k + 1, k + 9)
    assert stats.flat_queries == 0 and stats.pair_share < 0.5
    ref_d, ref_i = brute_knn(x, x, k + 1)
    np.testing.assert_array_equal(idx[:, : k + 1], ref_i)
    np.testing.assert_allclose(dist[:, : k + 1], ref_d, rtol=1e-12, atol=0)


def test_exact_index_rebuilds_its_partition_after_add() -> None:
    a, b = clustered(1500, 6, seed=8), clustered(700, 6, seed=9)
    q = clustered(200, 6, seed=10)
    index = ExactIndex(6, method="partitioned")
    index.add(a)
    check_equal(index.search(q, 4), *brute_knn(q, a, 4))
    index.add(b)  # the partition of `a` alone would miss b's rows
    check_equal(index.search(q, 4), *brute_knn(q, np.concatenate([a, b]), 4))


def test_partitioned_on_a_gpu_is_refused() -> None:
    with pytest.raises(UserInputError, match="method='partitioned' runs on the CPU"):
        ExactIndex(4, device="cuda", method="partitioned")


def test_concurrent_searches_restore_faiss_distance_setting() -> None:
    """The BLAS switch is process-global; overlapping searches must leave FAISS as it was."""
    before = faiss.cvar.distance_compute_blas_threshold
    x = clustered(2000, 6, seed=11)
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda s: knn_self(x, 2, method="partitioned"), range(3)))
    assert faiss.cvar.distance_compute_blas_threshold == before
    ref_d, ref_i = brute_knn(x, x, 2, self_search=True)
    for res in results:
        check_equal(res, ref_d, ref_i)
