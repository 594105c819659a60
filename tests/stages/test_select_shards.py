"""Distributed selection equals the plain sequential definitions and the single-node code."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import brute_distances, clustered, plain_greedy, plain_threshold

from raycollapse.cli.main import main
from raycollapse.curation.greedy import greedy_select
from raycollapse.curation.greedy_shards import GreedyShard, common_space, sharded_greedy
from raycollapse.curation.threshold import default_tau0, threshold_select
from raycollapse.curation.threshold_shards import ThresholdShard, sharded_threshold
from raycollapse.errors import UserInputError
from raycollapse.stages.select_shards import select_sharded

N, D = 1201, 6  # prime: no shard count divides it


def _pool(seed: int = 0) -> np.ndarray:
    """Clustered points with exact duplicate rows in different shards and a duplicate pair."""
    x = clustered(N, D, seed, n_clusters=12)
    x[600:640] = x[:40]  # copies of shard-0 rows in a later shard
    x[1200] = x[7]
    return x


UNEVEN = [[0, N], [0, 1, 2, N], [0, 5, 400, 1111, N]]  # includes one-row shards


def _greedy_in_process(x: np.ndarray, budget: int, seed: int, bounds: list[int]) -> np.ndarray:
    parts = [(x[a:b], a) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    mean = common_space(
        [p.sum(axis=0, dtype=np.float64) for p, _ in parts], [len(p) for p, _ in parts]
    )
    shards = [GreedyShard(p, a, mean) for p, a in parts]
    smax = max(s.norm_max() for s in shards)
    for s in shards:
        s.begin(budget, smax)

    def add_top(index, rows, t):
        for s in shards:
            s.add(index, rows)
        return [s.top(t) for s in shards]

    return sharded_greedy(len(x), budget, seed, lambda i: x[i], add_top)[0]


def _threshold_in_process(x, budget, seed, bounds, tau0, decay=0.8):
    shards = [
        ThresholdShard(x[a:b], a, len(x), budget, seed)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]

    def open_rows(index, rows, a, b, tau):
        for s in shards:
            s.accept(index, rows)
        return [s.open_rows(a, b, tau) for s in shards]

    def dups(index, rows):
        for s in shards:
            s.accept(index, rows)
        return all(s.only_duplicates() for s in shards)

    return sharded_threshold(len(x), x.shape[1], budget, tau0, decay, 10_000, open_rows, dups)[0]


@pytest.mark.parametrize("bounds", UNEVEN)
def test_sharded_greedy_equals_plain_and_single_node(bounds):
    x = _pool()
    for seed, budget in [(0, 1), (1, 90), (2, 700)]:
        got = _greedy_in_process(x, budget, seed, bounds)
        assert np.array_equal(got, greedy_select(x, budget, seed))
        if budget <= 90:
            assert np.array_equal(got, plain_greedy(x, budget, seed))


def test_sharded_greedy_past_the_distinct_points():
    """Budget above the distinct rows: after the max distance hits 0, lowest unselected rows."""
    x = np.repeat(clustered(15, 3, 4), 3, axis=0)
    got = _greedy_in_process(x, 40, 3, [0, 11, 12, 45])
    assert np.array_equal(got, plain_greedy(x, 40, 3))


@pytest.mark.parametrize("bounds", UNEVEN)
def test_sharded_threshold_equals_plain_and_single_node(bounds):
    x = _pool()
    for seed, budget in [(0, 1), (1, 60), (3, 500)]:
        tau0 = default_tau0(x, budget, seed)
        got = _threshold_in_process(x, budget, seed, bounds, tau0)
        ref = threshold_select(x, budget, tau0=tau0, decay=0.8, seed=seed)
        assert np.array_equal(got.indices, ref.indices)
        assert (got.passes, got.tau_final) == (ref.passes, ref.tau_final)
        if budget <= 60:
            assert np.array_equal(got.indices, plain_threshold(x, budget, tau0, 0.8, seed))


def test_sharded_threshold_refuses_too_few_distinct_points():
    x = np.repeat(clustered(15, 3, 4), 3, axis=0)
    with pytest.raises(UserInputError, match="only 15 distinct points"):
        _threshold_in_process(x, 20, 0, [0, 11, 12, 45], 1.0)


def _coverage(x: np.ndarray, idx: np.ndarray) -> float:
    return float(brute_distances(x, x[idx]).min(axis=1).max())


def _write_parquet(x: np.ndarray, folder, sizes: list[int]) -> None:
    folder.mkdir()
    start = 0
    for i, size in enumerate(sizes):
        part = x[start : start + size]
        table = pa.table(
            {
                "id": np.arange(start, start + size) + 1000,
                "embedding": pa.array(list(part), type=pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, folder / f"part-{i:05d}.parquet")
        start += size


@pytest.mark.slow
def test_ray_shards_equal_single_node(ray_local, tmp_path):
    """Arrays, .npy and Parquet shards read by the actors; greedy, threshold, approximate."""
    x = _pool(1)
    np.save(tmp_path / "x.npy", x)
    _write_parquet(x, tmp_path / "emb", [500, 1, 700])
    for src, shards in [(x, 3), (str(tmp_path / "x.npy"), 2), (str(tmp_path / "emb"), 4)]:
        got = select_sharded(src, "greedy", 150, shards=shards, seed=5, num_cpus_per_shard=0.25)
        assert np.array_equal(got.indices, greedy_select(x, 150, 5))
    got = select_sharded(str(tmp_path / "emb"), "threshold", 120, shards=3, seed=2, decay=0.85)
    ref = threshold_select(x, 120, decay=0.85, seed=2)
    assert np.array_equal(got.indices, ref.indices) and got.tau0 == ref.tau0

    # Two-round greedy: B distinct rows; coverage radius within 4x the exact greedy's (each
    # round is a 2-approximation of k-center, and exact greedy is no better than optimal).
    exact = _coverage(x, greedy_select(x, 60, 0))
    approx = select_sharded(x, "greedy", 60, shards=4, seed=0, approximate=True).indices
    assert len(np.unique(approx)) == 60 and approx.min() >= 0 and approx.max() < N
    assert exact <= _coverage(x, approx) <= 4.0 * exact


def test_ray_shards_bad_input(ray_local, tmp_path):
    x = _pool()[:50]
    with pytest.raises(UserInputError, match="shards must be an integer >= 1"):
        select_sharded(x, "greedy", 5, shards=0)
    with pytest.raises(UserInputError, match="larger than the number of rows N=50"):
        select_sharded(x, "greedy", 5, shards=51)
    with pytest.raises(UserInputError, match="greedy selection only"):
        select_sharded(x, "threshold", 5, shards=2, approximate=True)
    with pytest.raises(UserInputError, match="does not exist"):
        select_sharded(str(tmp_path / "missing"), "greedy", 5, shards=2)
    _write_parquet(x, tmp_path / "emb", [20, 30])
    (tmp_path / "emb" / "part-00001.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserInputError, match="part-00001.parquet"):
        select_sharded(str(tmp_path / "emb"), "greedy", 5, shards=2)


def test_cli_select_shards(ray_local, tmp_path, capsys):
    x = _pool(2)[:400]
    _write_parquet(x, tmp_path / "emb", [150, 250])
    out = tmp_path / "sel.parquet"
    argv = ["select", tmp_path / "emb", "--budget", 40, "--out", out, "--shards", 3, "--json"]
    code = main([str(a) for a in argv])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    table = pq.read_table(out)
    want = plain_greedy(x, 40, 0)
    assert table.column("index").to_pylist() == want.tolist()
    assert table.column("id").to_pylist() == (want + 1000).tolist()
    res = json.loads(stdout)
    assert res["n"] == 400 and res["min_pairwise_distance"] == pytest.approx(
        float(np.sort(brute_distances(x[want], x[want]), axis=1)[:, 1].min())
    )
    code = main(
        [str(a) for a in ["select", tmp_path / "emb", "--budget", 4, "--out", out, "--shards", 0]]
    )
    assert code == 2 and "shards must be" in capsys.readouterr().err
