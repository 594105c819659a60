"""Selection algorithms against plain sequential float64 references (docs/design.md, "Greedy
selection", "Threshold decay").

The references below are the definitions written as the simplest possible loops; the fast
implementations must return exactly the same indices, thresholds and pass counts.
"""

from __future__ import annotations

import numpy as np
import pytest

from raycollapse.curation.select import (
    default_tau0,
    greedy_run,
    greedy_select,
    random_select,
    select,
    threshold_select,
)
from raycollapse.errors import UserInputError

# ------------------------------------------------------------------------------- references


def _dist_to(x64: np.ndarray, c: int) -> np.ndarray:
    return np.sqrt(((x64 - x64[c]) ** 2).sum(axis=1))


def ref_greedy(x: np.ndarray, budget: int, seed: int = 0) -> np.ndarray:
    x64 = x.astype(np.float64)
    n = len(x64)
    c = int(np.random.default_rng(seed).integers(n))
    mind = np.full(n, np.inf)
    selected = np.zeros(n, dtype=bool)
    out = []
    for _ in range(budget):
        out.append(c)
        selected[c] = True
        mind = np.minimum(mind, _dist_to(x64, c))
        c = int(np.argmax(mind))
        if mind[c] <= 0.0:
            c = int(np.argmin(selected))
    return np.array(out, dtype=np.int64)


def ref_threshold(x, budget, tau0, decay=0.9, seed=0):
    """Returns (indices, tau_final, passes, pass_of_each_accepted, tau_of_each_pass)."""
    x64 = x.astype(np.float64)
    n = len(x64)
    order = np.random.default_rng(seed).permutation(n)
    acc: list[int] = []
    pass_of: list[int] = []
    taus: list[float] = []
    done = np.zeros(n, dtype=bool)
    tau, passes = tau0, 0
    while True:
        passes += 1
        taus.append(tau)
        for i in order:
            if done[i]:
                continue
            if not acc or (np.sqrt(((x64[acc] - x64[i]) ** 2).sum(axis=1)) > tau).all():
                acc.append(int(i))
                pass_of.append(passes)
                done[i] = True
                if len(acc) == budget:
                    return np.array(acc), tau, passes, np.array(pass_of), taus
        tau = tau * decay


# ------------------------------------------------------------------------------------- data


def clustered(n: int, d: int, seed: int, dup_frac: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = 3.0 * rng.standard_normal((12, d))
    x = means[rng.integers(0, 12, n)] + 0.4 * rng.standard_normal((n, d))
    if dup_frac:
        m = int(dup_frac * n)
        x[rng.integers(0, n, m)] = x[rng.integers(0, n, m)]
    return x.astype(np.float32)


def isotropic(n: int, d: int, seed: int, dup_frac: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    if dup_frac:
        m = int(dup_frac * n)
        x[rng.integers(0, n, m)] = x[rng.integers(0, n, m)]
    return x.astype(np.float32)


def grid(n: int, d: int, seed: int, dup_frac: float = 0.0) -> np.ndarray:
    """Small integer coordinates: many exactly tied distances and exact duplicates."""
    return np.random.default_rng(seed).integers(0, 6, (n, d)).astype(np.float32)


def offset(n: int, d: int, seed: int, dup_frac: float = 0.0) -> np.ndarray:
    """Far from the origin with a tiny spread: stresses the bounds of the float32 products."""
    return (1000.0 + clustered(n, d, seed, dup_frac).astype(np.float64) * 1e-3).astype(np.float32)


DATA = {"clustered": clustered, "isotropic": isotropic, "grid": grid, "offset": offset}

# ------------------------------------------------------------------------------ random_select


def test_random_select_reproducible_and_matches_numpy():
    a = random_select(1000, 100, seed=7)
    assert a.dtype == np.int64
    assert np.array_equal(a, random_select(1000, 100, seed=7))
    assert np.array_equal(a, np.random.default_rng(7).choice(1000, 100, replace=False))
    assert len(np.unique(a)) == 100
    assert not np.array_equal(a, random_select(1000, 100, seed=8))
    assert np.array_equal(np.sort(random_select(50, 50)), np.arange(50))


# ------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_matches_reference(kind, seed):
    rng = np.random.default_rng(100 + seed)
    n, d = int(rng.integers(300, 1500)), int(rng.choice([2, 5, 16, 64]))
    x = DATA[kind](n, d, seed, dup_frac=0.2 if seed == 1 else 0.0)
    budget = int(rng.integers(1, n // 2))
    got = greedy_select(x, budget, seed=seed)
    assert got.dtype == np.int64
    assert np.array_equal(got, ref_greedy(x, budget, seed=seed))


@pytest.mark.parametrize("kind", ["clustered", "grid"])
def test_greedy_whole_pool_with_duplicates(kind):
    x = DATA[kind](400, 3, 5, dup_frac=0.3)
    got = greedy_select(x, 400, seed=3)
    assert np.array_equal(got, ref_greedy(x, 400, seed=3))
    assert np.array_equal(np.sort(got), np.arange(400))


def test_greedy_all_points_identical():
    x = np.ones((20, 3), dtype=np.float32)
    got = greedy_select(x, 6, seed=2)
    assert np.array_equal(got, ref_greedy(x, 6, seed=2))
    first = np.random.default_rng(2).integers(20)
    assert got[0] == first and list(got[1:]) == [i for i in range(20) if i != first][:5]


def test_greedy_large_clustered_uses_pruning_and_stays_exact():
    """Low intrinsic dimension: the triangle inequality rules out most (point, centre) pairs
    and consecutive farthest points go in batches; the result is still the plain loop's."""
    x = clustered(4000, 3, 9)
    res = greedy_run(x, 1500, seed=4)
    assert np.array_equal(res.indices, ref_greedy(x, 1500, seed=4))
    assert res.batches < 1499 // 4  # 1,499 steps after the first, many per product round
    assert res.pair_share < 0.1  # the plain loop evaluates all 4000 x 1500 pairs


def test_greedy_in_high_dimension_batches_without_pruning():
    """Within-cluster noise in 24 dimensions defeats the pruning (most pairs are evaluated),
    but batching still serves several steps per product."""
    x = clustered(4000, 24, 9)
    res = greedy_run(x, 1500, seed=4)
    assert np.array_equal(res.indices, ref_greedy(x, 1500, seed=4))
    assert res.batches < 1499 // 4 and res.pair_share > 0.5


def test_greedy_threaded_scan_and_blas_threads_restored():
    from threadpoolctl import threadpool_info

    before = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    x = isotropic(33_000, 64, 5)  # N * d >= 2**21: the full scan is split over threads
    res = greedy_run(x, 40, seed=1)
    assert np.array_equal(res.indices, ref_greedy(x, 40, seed=1))
    assert res.pair_share == 1.0  # isotropic: every batch went through the full scan
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == before


def test_greedy_float64_input_is_cast_to_float32():
    x = isotropic(300, 8, 3).astype(np.float64) + 1e-9
    assert np.array_equal(greedy_select(x, 50), greedy_select(x.astype(np.float32), 50))


# --------------------------------------------------------------------------------- threshold


def _check_threshold(x, budget, tau0, decay, seed):
    res = threshold_select(x, budget, tau0=tau0, decay=decay, seed=seed)
    idx, tau_final, passes, pass_of, taus = ref_threshold(x, budget, tau0, decay, seed)
    assert res.indices.dtype == np.int64
    assert np.array_equal(res.indices, idx)
    assert res.tau_final == tau_final and res.passes == passes and res.tau0 == tau0
    assert res.indices[0] == np.random.default_rng(seed).permutation(len(x))[0]
    assert res.tau_final == pytest.approx(tau0 * decay ** (passes - 1), rel=1e-12)
    x64 = x.astype(np.float64)
    for p in range(1, passes + 1):  # same-pass acceptances are > that pass's tau apart
        pts = x64[idx[pass_of == p]]
        if len(pts) > 1:
            dist = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))
            assert (dist[np.triu_indices(len(pts), 1)] > taus[p - 1]).all()
    return res


@pytest.mark.parametrize("kind", list(DATA))
@pytest.mark.parametrize("seed", [0, 1])
def test_threshold_matches_reference(kind, seed):
    rng = np.random.default_rng(200 + seed)
    n, d = int(rng.integers(300, 900)), int(rng.choice([2, 8, 32]))
    x = DATA[kind](n, d, seed, dup_frac=0.2 if seed == 1 else 0.0)
    distinct = len(np.unique(x, axis=0))
    budget = int(rng.integers(1, min(distinct, n // 3) + 1))
    decay = float(rng.choice([0.5, 0.8, 0.9]))
    tau0 = default_tau0(x, budget, seed=seed)
    res = _check_threshold(x, budget, tau0, decay, seed)
    assert res.tau0 == tau0
    default = threshold_select(x, budget, decay=decay, seed=seed)  # tau0=None
    assert default.tau0 == tau0 and np.array_equal(default.indices, res.indices)


def test_threshold_all_distinct_points_whole_pool():
    x = grid(150, 3, 1)
    x = np.unique(x, axis=0)
    _check_threshold(x, len(x), tau0=3.0, decay=0.7, seed=2)


def test_threshold_ties_at_tau_are_rejected():
    # integer grid with tau = 1.0 and 2.0: many distances equal tau exactly (strict > required)
    x = np.unique(grid(400, 2, 4), axis=0)
    _check_threshold(x, len(x) // 3, tau0=2.0, decay=0.5, seed=0)
    # tau0 equal to an actual canonical distance in continuous data
    y = clustered(500, 16, 6)
    tau0 = float(np.sqrt(((y[3].astype(np.float64) - y[11]) ** 2).sum()))
    _check_threshold(y, 150, tau0=tau0, decay=0.95, seed=1)


def test_threshold_large_block_path():
    x = clustered(3000, 16, 8)
    _check_threshold(x, 800, tau0=default_tau0(x, 800), decay=0.9, seed=0)


def test_threshold_too_few_distinct_points_raises():
    x = np.repeat(isotropic(7, 4, 0), 5, axis=0)  # 7 distinct points, 35 rows
    with pytest.raises(UserInputError, match="only 7 distinct points.*budget 8"):
        threshold_select(x, 8, tau0=0.1)
    assert len(threshold_select(x, 7, tau0=0.1).indices) == 7


def test_threshold_max_passes():
    x = isotropic(100, 4, 0)
    with pytest.raises(UserInputError, match="max_passes=2"):
        threshold_select(x, 100, tau0=1e6, max_passes=2)


# ------------------------------------------------------------------------------ default tau0


def ref_tau0(x: np.ndarray, seed: int) -> float:
    """The documented rule as a loop: 4096 seeded pairs i != j, median of the positive
    float64 distances, 1.0 when there are none."""
    n = len(x)
    if n < 2:
        return 1.0
    rng = np.random.default_rng(seed)
    first = rng.integers(n, size=4096)
    second = rng.integers(n - 1, size=4096)
    dists = []
    for i, j in zip(first.tolist(), second.tolist(), strict=True):
        j = j + 1 if j >= i else j  # skip i itself
        dist = float(np.sqrt(((x[i].astype(np.float64) - x[j].astype(np.float64)) ** 2).sum()))
        if dist > 0.0:
            dists.append(dist)
    return float(np.median(dists)) if dists else 1.0


@pytest.mark.parametrize("kind", list(DATA))
def test_default_tau0_follows_its_rule(kind):
    x = DATA[kind](800, 8, 0, dup_frac=0.3)
    for seed in (0, 3):
        assert default_tau0(x, 100, seed=seed) == ref_tau0(x, seed)
    if kind != "grid":  # integer distances: other pairs may well share the median
        assert default_tau0(x, 100, seed=0) != default_tau0(x, 100, seed=3)


def test_default_tau0_without_scale_information():
    assert default_tau0(np.ones((10, 3), dtype=np.float32), 2) == 1.0
    assert default_tau0(np.zeros((1, 3), dtype=np.float32), 1) == 1.0
    two = np.array([[0, 0], [3, 4]], dtype=np.float32)  # every pair is the same two points
    assert default_tau0(two, 1) == 5.0 == ref_tau0(two, 0)


# ------------------------------------------------------------------------------------ select


def test_select_dispatches_to_each_definition():
    x = clustered(400, 5, 3)
    g = select(x, "greedy", 30, seed=2)
    assert np.array_equal(g.indices, ref_greedy(x, 30, seed=2)) and g.tau0 is None
    t = select(x, "threshold", 30, seed=2, tau0=2.0, decay=0.5)
    idx, tau_final, passes, _, _ = ref_threshold(x, 30, 2.0, 0.5, 2)
    assert np.array_equal(t.indices, idx)
    assert t.threshold_report() == {"tau0": 2.0, "tau_final": tau_final, "passes": passes}
    assert g.threshold_report() == {}
    r = select(400, "random", 30, seed=2)  # random needs only N
    assert np.array_equal(r.indices, np.random.default_rng(2).choice(400, 30, replace=False))
    assert np.array_equal(select(x, "random", 30, seed=2).indices, r.indices)


def test_select_unknown_method():
    with pytest.raises(
        UserInputError,
        match=r"selection method must be one of greedy, threshold, random, got 'kcenter'",
    ):
        select(clustered(50, 2, 0), "kcenter", 5)


# ---------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("budget", [0, -3, 101, 2.5, True])
def test_bad_budget(budget):
    x = isotropic(100, 3, 0)
    for call in (
        lambda: greedy_select(x, budget),
        lambda: threshold_select(x, budget),
        lambda: default_tau0(x, budget),
        lambda: random_select(100, budget),
    ):
        with pytest.raises(UserInputError, match=f"budget.*{budget}"):
            call()


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1, float("nan"), "0.9"])
def test_bad_decay(decay):
    with pytest.raises(UserInputError, match=f"decay.*{decay}"):
        threshold_select(isotropic(50, 3, 0), 5, decay=decay)


@pytest.mark.parametrize("tau0", [0, -1.0, float("nan"), float("inf")])
def test_bad_tau0(tau0):
    with pytest.raises(UserInputError, match=f"tau0.*{tau0}"):
        threshold_select(isotropic(50, 3, 0), 5, tau0=tau0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_features(bad):
    x = isotropic(50, 3, 0)
    x[7, 1] = bad
    for call in (
        lambda: greedy_select(x, 5),
        lambda: threshold_select(x, 5),
        lambda: default_tau0(x, 5),
    ):
        with pytest.raises(UserInputError, match="7"):
            call()


def test_other_bad_arguments():
    with pytest.raises(UserInputError, match="n must be a positive integer, got 0"):
        random_select(0, 1)
    x = isotropic(50, 3, 0)
    for bad in (0, 2.5):
        with pytest.raises(UserInputError, match=f"max_passes.*{bad}"):
            threshold_select(x, 5, max_passes=bad)
    with pytest.raises(UserInputError, match="d=170000"):
        greedy_select(np.zeros((2, 170_000), dtype=np.float32), 1)
