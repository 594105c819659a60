"""The sharded kNN on Ray actors equals the in-process core path, bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycollapse.cli.main import main
from raycollapse.curation.entropy import kl_entropy
from raycollapse.errors import UserInputError
from raycollapse.metrics.memorization import generalization_score, memorized_fraction
from raycollapse.neighbors.knn import knn_search, knn_self
from raycollapse.stages.knn_shards import ShardedIndex

N, D = 2003, 8  # 2003 is prime: no shard count divides it


def _data(seed: int = 0) -> np.ndarray:
    """Clustered points with exact duplicates straddling every boundary of 2, 3 and 4 shards."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(10, D))
    x = (centers[rng.integers(0, 10, N)] + rng.normal(size=(N, D))).astype(np.float32)
    for s in (2, 3, 4):
        for b in (np.arange(1, s) * N) // s:  # the first row of each shard after the first
            x[b] = x[b - 1]  # a pair split across the boundary
            x[b + 1] = x[b - 1]  # and a third copy: a triple over two shards
    x[100:103] = x[1500]  # copies far apart, in different shards
    return x


def _write_parquet(x: np.ndarray, folder, sizes: list[int]) -> None:
    """Uneven Parquet files (one of a single row) so shards cut through files."""
    folder.mkdir()
    start = 0
    for i, size in enumerate(sizes):
        part = x[start : start + size]
        emb = pa.FixedSizeListArray.from_arrays(pa.array(part.reshape(-1)), D)
        pq.write_table(pa.table({"embedding": emb}), folder / f"part-{i:03d}.parquet")
        start += size
    assert start == len(x)


@pytest.mark.parametrize(
    ("shards", "source", "method"),
    [
        (1, "array", "flat"),
        (2, "array", "partitioned"),
        (3, "parquet", "partitioned"),
        (4, "array", "auto"),
    ],
)
def test_sharded_equals_single_index(ray_local, tmp_path, shards, source, method):
    """Shards (flat or pruned by a partition) against the flat in-process search."""
    x = _data()
    rng = np.random.default_rng(1)
    gen = rng.normal(scale=4.0, size=(257, D)).astype(np.float32)
    gen[:40] = x[rng.integers(0, N, 40)] + 1e-3  # near copies: some count as memorized
    gen[40] = x[666]  # equal to a duplicated row
    if source == "parquet":
        _write_parquet(x, tmp_path / "emb", [700, 1, 899, 403])
        src = str(tmp_path / "emb")
    else:
        src = x
    # batch_size below the shard size: several query batches per shard, and a ragged last one
    with ShardedIndex.build(
        src, shards, num_cpus_per_shard=0.5, batch_size=300, method=method
    ) as index:
        assert (index.n, index.d, index.shards) == (N, D, shards)
        for k in (1, 3, 7):
            got, want = index.knn_self(k), knn_self(x, k, method="flat")
            np.testing.assert_array_equal(got.distances, want.distances)
            np.testing.assert_array_equal(got.indices, want.indices)
        got, want = index.search(gen, 5), knn_search(x, gen, 5, method="flat")
        np.testing.assert_array_equal(got.distances, want.distances)
        np.testing.assert_array_equal(got.indices, want.indices)
        assert index.entropy(3, 1e-10, bootstrap=50, seed=7) == kl_entropy(
            x, 3, 1e-10, bootstrap=50, seed=7
        )
        assert index.generalization_score(gen) == generalization_score(gen, x)
        memorized = index.memorized_fraction(gen)
        assert memorized == memorized_fraction(gen, x) and memorized > 0
        with pytest.raises(UserInputError, match="features"):
            index.search(gen[:, :3], 1)
        with pytest.raises(UserInputError, match="k must be"):
            index.knn_self(N)


def test_duplicate_groups_larger_than_k(ray_local):
    """Ten copies of one point over two shards: every copy has r_k = 0 for k < 10."""
    x = _data(2)[:200]
    x[95:105] = x[0]
    with ShardedIndex.build(x, 2, num_cpus_per_shard=0.5) as index:
        got, want = index.knn_self(4), knn_self(x, 4)
        assert index.entropy(4).n_duplicates == kl_entropy(x, 4).n_duplicates == 11
        # 1 of the 2 CPUs is held by these shards: a 1.5-CPU shard can never start now
        with pytest.raises(UserInputError, match="did not start within 1 s"):
            ShardedIndex.build(x, 1, num_cpus_per_shard=1.5, start_timeout_s=1)
    np.testing.assert_array_equal(got.distances, want.distances)
    np.testing.assert_array_equal(got.indices, want.indices)
    with pytest.raises(RuntimeError, match="shut down"):
        index.knn_self(2)


def test_bad_shard_counts():
    """Checked before Ray is touched: no actor is started."""
    x = _data()[:5]
    with pytest.raises(UserInputError, match="larger than the number of rows N=5"):
        ShardedIndex.build(x, 6)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(UserInputError, match="shards must be an integer"):
            ShardedIndex.build(x, bad)
    with pytest.raises(UserInputError, match="not Parquet"):
        ShardedIndex.build("/nonexistent/folder", 2)


def _cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_entropy_and_select_shards(ray_local, capsys, tmp_path):
    x = _data()[:600]
    npy = tmp_path / "x.npy"
    np.save(npy, x)
    _write_parquet(x, tmp_path / "emb", [250, 1, 349])
    runs = {}
    for name, src, shards in [
        ("npy1", npy, 1),
        ("npy2", npy, 2),
        ("pq1", tmp_path / "emb", 1),
        ("pq3", tmp_path / "emb", 3),
    ]:
        code, out, err = _cli(capsys, "entropy", src, "--k", 2, "--shards", shards, "--json")
        assert code == 0, err
        runs[name] = json.loads(out)
        assert runs[name].pop("shards") == shards
        runs[name].pop("seconds")
    assert runs["npy1"] == runs["npy2"] == runs["pq1"] == runs["pq3"]
    assert runs["npy1"]["n_duplicates"] == 6  # two triples: rows 100-102 and 499-501

    reports = []
    for shards in (1, 2):
        out_path = tmp_path / f"sel{shards}.npy"
        code, out, err = _cli(
            capsys, "select", npy, "--method", "random", "--budget", 50, "--out", out_path,
            "--shards", shards, "--json",
        )  # fmt: skip
        assert code == 0, err
        res = json.loads(out)
        reports.append((res["min_pairwise_distance"], res["entropy"]))
    assert reports[0] == reports[1] and None not in reports[0]

    # --shards larger than N: a clean error, exit status 2, nothing started
    code, _, err = _cli(capsys, "entropy", npy, "--shards", 601, "--json")
    assert code == 2 and "larger than the number of rows N=600" in err
    code, _, err = _cli(capsys, "entropy", tmp_path / "emb", "--shards", 601)
    assert code == 2 and "larger than the number of rows N=600" in err
    code, _, err = _cli(
        capsys, "select", npy, "--budget", 5, "--out", tmp_path / "s.npy", "--shards", 601
    )
    assert code == 2 and "larger than the number of rows N=600" in err


def test_bad_rows_in_a_shard_read_by_its_actor(ray_local, tmp_path, capsys):
    """A NaN read by a shard actor comes back as a UserInputError naming the global rows."""
    x = _data()[:50]
    x[37, 2] = np.nan
    _write_parquet(x, tmp_path / "emb", [20, 30])
    code, _, err = _cli(capsys, "entropy", tmp_path / "emb", "--shards", 2)
    assert code == 2 and "shard 1 (rows 25..49)" in err and "NaN" in err, err


def _shard_actor_nodes() -> list[str]:
    """The Ray node of every live shard actor, from the GCS actor table (the test Ray runs
    without the dashboard that ``ray.util.state`` needs)."""
    import ray._private.state as state

    return [
        a["Address"]["NodeID"]
        for a in state.actors().values()
        if a["ActorClassName"] == "KnnShard" and a["State"] == "ALIVE"
    ]


@pytest.mark.slow
def test_shards_spread_over_nodes(ray_cluster):
    """On 3 simulated nodes, 3 half-CPU shards (which would fit on one node) are spread out."""
    x = _data()[:400]
    with ShardedIndex.build(x, 3, num_cpus_per_shard=0.5) as index:
        nodes = _shard_actor_nodes()
        r = index.knn_self(3)
    assert len(nodes) == 3, nodes
    assert len(set(nodes)) > 1, nodes
    np.testing.assert_array_equal(r.distances, knn_self(x, 3).distances)
