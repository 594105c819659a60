"""Exact kNN (raycollapse.neighbors.knn) against brute-force float64 numpy."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from helpers import brute_distances, brute_knn, brute_knn_self

from raycollapse.errors import UserInputError
from raycollapse.neighbors.device import faiss_has_gpu
from raycollapse.neighbors.distances import pair_distances
from raycollapse.neighbors.knn import (
    ExactIndex,
    KnnResult,
    drop_self,
    knn_search,
    knn_self,
    merge_topk,
)
from raycollapse.neighbors.validate import as_features, check_k


@pytest.fixture(autouse=True, params=["faiss-default", "faiss-blas"])
def faiss_distance_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run every test on both FAISS distance paths: its default for these small batches
    (direct differences, in this FAISS version) and the BLAS path |q|^2 + |x|^2 - 2 q.x in
    float32 (large batches; older FAISS versions from 20 queries on), whose cancellation error
    the exact recompute must remove."""
    if request.param == "faiss-blas":
        monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 1)
    return request.param


def with_duplicates(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.normal(size=(n, d)).astype(np.float32) + 5.0  # offset: float32 cancellation
    x[10] = x[3]  # a pair
    x[50] = x[40]
    x[77] = x[40]  # a triple
    return x


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("batch_size", [1, 7, 64, 4096])
def test_knn_search_matches_brute_force(k: int, batch_size: int) -> None:
    rng = np.random.default_rng(k)
    db = rng.normal(size=(203, 6)).astype(np.float32)
    queries = rng.normal(size=(45, 6)).astype(np.float32)
    res = knn_search(db, queries, k, batch_size=batch_size)
    ref_d, ref_i = brute_knn(brute_distances(queries, db), k)
    assert res.distances.dtype == np.float64 and res.indices.dtype == np.int64
    assert res.distances.shape == res.indices.shape == (45, k)
    np.testing.assert_array_equal(res.indices, ref_i)
    np.testing.assert_allclose(res.distances, ref_d, rtol=1e-12, atol=0)


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("batch_size", [13, 4096])
def test_knn_self_matches_brute_force_with_duplicates(k: int, batch_size: int) -> None:
    x = with_duplicates(np.random.default_rng(0), 150, 5)
    res = knn_self(x, k, batch_size=batch_size)
    ref_d, ref_i = brute_knn_self(x, k)
    np.testing.assert_array_equal(res.indices, ref_i)
    np.testing.assert_allclose(res.distances, ref_d, rtol=1e-12, atol=0)
    # Duplicates are exactly 0 (FAISS's own float32 value is not, at offset 5).
    assert res.distances[3, 0] == 0.0 and res.indices[3, 0] == 10
    assert res.distances[40, 0] == 0.0 and res.indices[40, 0] == 50
    assert (res.indices != np.arange(150)[:, None]).all()  # never the point itself


def test_knn_self_large_duplicate_group_distances() -> None:
    """A group of 30 identical rows (more than FAISS is asked for): distances still exact."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    x[20:50] = x[20]
    res = knn_self(x, 4, batch_size=17)
    ref_d, ref_i = brute_knn_self(x, 4)
    np.testing.assert_allclose(res.distances, ref_d, rtol=1e-12, atol=0)
    outside = np.r_[0:20, 50:120]
    np.testing.assert_array_equal(res.indices[outside], ref_i[outside])
    assert (res.distances[20:50] == 0.0).all()
    assert (res.indices[20:50] >= 20).all() and (res.indices[20:50] < 50).all()
    assert (res.indices != np.arange(120)[:, None]).all()


def test_knn_self_all_identical() -> None:
    x = np.ones((30, 3), dtype=np.float32)
    res = knn_self(x, 3)
    assert (res.distances == 0.0).all()
    assert (res.indices != np.arange(30)[:, None]).all()


def test_queries_from_database_and_single_query() -> None:
    rng = np.random.default_rng(2)
    db = rng.normal(size=(80, 3)).astype(np.float32)
    res = knn_search(db, db[5:6], 2)
    assert res.indices[0, 0] == 5 and res.distances[0, 0] == 0.0
    res = knn_search(db, db, 80)  # k == N is allowed for a search
    ref_d, ref_i = brute_knn(brute_distances(db, db), 80)
    np.testing.assert_array_equal(res.indices, ref_i)


def test_flat_index_multiple_adds_and_data() -> None:
    rng = np.random.default_rng(3)
    a = rng.normal(size=(40, 5)).astype(np.float32)
    b = rng.normal(size=(25, 5)).astype(np.float32)
    index = ExactIndex(5)
    index.add(a)
    index.add(b)
    assert index.ntotal == 65
    np.testing.assert_array_equal(index.data(), np.concatenate([a, b]))
    q = rng.normal(size=(9, 5)).astype(np.float32)
    res = index.search(q, 4, batch_size=4)
    _, ref_i = brute_knn(brute_distances(q, np.concatenate([a, b])), 4)
    np.testing.assert_array_equal(res.indices, ref_i)


@pytest.mark.parametrize("k", [1, 4])
def test_merge_topk_of_shards_equals_single_index(k: int) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    x[150] = x[3]  # duplicates in different shards: the tie goes to the lower global index
    x[199] = x[3]
    q = np.concatenate([rng.normal(size=(30, 4)).astype(np.float32), x[3:4]])
    bounds = [0, 50, 57, 200]  # uneven shards, one smaller than k + 8
    results, offsets = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        shard = ExactIndex(4)
        shard.add(x[lo:hi])
        results.append(shard.search(q, min(k, hi - lo)))
        offsets.append(lo)
    merged = merge_topk(results, offsets, k)
    ref_d, ref_i = brute_knn(brute_distances(q, x), k)
    np.testing.assert_array_equal(merged.indices, ref_i)
    np.testing.assert_allclose(merged.distances, ref_d, rtol=1e-12, atol=0)
    assert merged.indices[-1, 0] == 3
    single = knn_search(x, q, k)
    np.testing.assert_array_equal(merged.indices, single.indices)
    np.testing.assert_array_equal(merged.distances, single.distances)


def test_sharded_self_knn_with_drop_self_equals_knn_self() -> None:
    rng = np.random.default_rng(5)
    x = with_duplicates(rng, 120, 3)
    k = 3
    bounds = [0, 40, 41, 120]
    results = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        shard = ExactIndex(3)
        shard.add(x[lo:hi])
        results.append(shard.search(x, min(k + 1, hi - lo)))
    merged = merge_topk(results, bounds[:-1], k + 1)
    sharded = drop_self(merged, np.arange(120), k)
    single = knn_self(x, k)
    np.testing.assert_array_equal(sharded.indices, single.indices)
    np.testing.assert_array_equal(sharded.distances, single.distances)


def test_drop_self_rule() -> None:
    # Query 7 has exact duplicates 2 and 5 ranked before itself: remove 7 by index.
    res = KnnResult(np.array([[0.0, 0.0, 0.0, 1.0]]), np.array([[2, 5, 7, 9]]))
    out = drop_self(res, np.array([7]), 3)
    np.testing.assert_array_equal(out.indices, [[2, 5, 9]])
    # Self absent (more duplicates than returned): drop the last.
    out = drop_self(res, np.array([11]), 3)
    np.testing.assert_array_equal(out.indices, [[2, 5, 7]])
    np.testing.assert_array_equal(out.distances, [[0.0, 0.0, 0.0]])


def test_threads_argument_is_scoped() -> None:
    before = faiss.omp_get_max_threads()
    x = np.random.default_rng(6).normal(size=(60, 3)).astype(np.float32)
    a = knn_self(x, 2, threads=1)
    assert faiss.omp_get_max_threads() == before
    b = knn_self(x, 2)
    np.testing.assert_array_equal(a.indices, b.indices)


@pytest.mark.skipif(faiss_has_gpu(), reason="the GPU build of FAISS is installed")
def test_cuda_device_without_faiss_gpu_is_an_error() -> None:
    x = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(UserInputError, match="faiss-gpu is not installed"):
        knn_self(x, 1, device="cuda")
    with pytest.raises(UserInputError, match="'tpu'"):
        knn_search(x, x, 1, device="tpu")


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros(10, dtype=np.float32), r"shape \(10,\)"),
        (np.zeros((2, 3, 4)), r"shape \(2, 3, 4\)"),
        (np.zeros((1, 4)), "at least 2 points.*got 1"),
        (np.zeros((5, 0)), r"shape \(5, 0\)"),
        (np.array([["a", "b"], ["c", "d"]]), "dtype <U1"),
        (np.ones((3, 2), dtype=bool), "dtype bool"),
        ([[1.0, 2.0], [3.0]], "could not be read"),
        (np.array([[1e300, 0.0], [0.0, 0.0]]), "too large for float32"),
    ],
)
def test_as_features_rejects(bad: object, match: str) -> None:
    with pytest.raises(UserInputError, match=match):
        as_features(bad, name="pool")
    with pytest.raises(UserInputError, match="pool"):
        as_features(bad, name="pool")


def test_as_features_nan_inf_rows_reported() -> None:
    x = np.zeros((10, 3))
    x[4, 1] = np.nan
    x[7, 0] = np.inf
    x[7, 2] = np.nan
    with pytest.raises(UserInputError, match=r"2 of 10 rows \(first bad row index: 4\)"):
        as_features(x)
    with pytest.raises(UserInputError, match="first bad row index: 4"):
        knn_self(x, 2)


def test_as_features_converts_without_needless_copy() -> None:
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    assert as_features(x) is x
    y = as_features(np.arange(12).reshape(4, 3)[:, ::-1])
    assert y.dtype == np.float32 and y.flags.c_contiguous
    np.testing.assert_array_equal(y, np.arange(12).reshape(4, 3)[:, ::-1])


def test_check_k_and_search_k_errors() -> None:
    assert check_k(3, 4) == 3
    with pytest.raises(UserInputError, match="N=4, got 4; lower --k"):
        check_k(4, 4)
    with pytest.raises(UserInputError, match="got 0"):
        check_k(0, 4)
    with pytest.raises(UserInputError, match="got -2"):
        check_k(-2, 4)
    with pytest.raises(UserInputError, match="2.5"):
        check_k(2.5, 4)
    x = np.random.default_rng(7).normal(size=(6, 2))
    with pytest.raises(UserInputError, match="N=6, got 6"):
        knn_self(x, 6)
    with pytest.raises(UserInputError, match="N=6, got 7"):
        knn_search(x, x, 7)
    with pytest.raises(UserInputError, match="got 0"):
        knn_search(x, x, 0)
    with pytest.raises(UserInputError, match="3 features but the index has d=2"):
        knn_search(x, np.zeros((2, 3)), 1)
    with pytest.raises(UserInputError, match="batch_size.*got 0"):
        knn_self(x, 1, batch_size=0)


def test_near_ties_below_float32_resolution_are_ranked_exactly() -> None:
    # On the BLAS path (see faiss_distance_path) FAISS's float32 error here is ~0.3 in squared
    # distance (large offset), far more than the gaps between each query's 6 close neighbours
    # (~1e-4): the extra candidates and the exact recompute must still rank them exactly.
    rng = np.random.default_rng(12)
    d = 8
    queries = (1000.0 + 10.0 * rng.normal(size=(40, d))).astype(np.float32)
    near = queries[:, None, :] + 0.01 * rng.normal(size=(40, 6, d))
    db = np.concatenate([near.reshape(-1, d), 1000.0 + 10.0 * rng.normal(size=(100, d))])
    db = db.astype(np.float32)
    db[5] = queries[0]  # an exact duplicate: 0.0, first
    for k in (1, 3, 6):
        res = knn_search(db, queries, k)
        ref_d, ref_i = brute_knn(brute_distances(queries, db), k)
        np.testing.assert_array_equal(res.indices, ref_i)
        np.testing.assert_allclose(res.distances, ref_d, rtol=1e-12, atol=0)
        assert res.indices[0, 0] == 5 and res.distances[0, 0] == 0.0


def test_pair_distances_per_row_exact_across_chunks() -> None:
    """Each row's value is its own float64 reduction, whatever rows are computed with it: rows
    beyond the first 65,536-row chunk, and one row against many, give the same bits."""
    rng = np.random.default_rng(12)
    # different magnitudes: a float32 difference would round, the float64 one is exact
    a = (rng.normal(size=(70_000, 12)) * 1000.0).astype(np.float32)
    b = (rng.normal(size=(70_000, 12)) * 1e-3).astype(np.float32)
    b[5] = a[5]
    got = pair_distances(a, b)
    assert got.dtype == np.float64 and got[5] == 0.0
    for i in (0, 1, 65_535, 65_536, 69_999):
        alone = np.sqrt(((a[i].astype(np.float64) - b[i].astype(np.float64)) ** 2).sum())
        assert got[i] == alone
    want = np.sqrt(((a.astype(np.float64) - b.astype(np.float64)) ** 2).sum(axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)
    one = pair_distances(a, b[7])
    assert np.array_equal(one, pair_distances(a, np.repeat(b[7:8], len(a), axis=0)))
