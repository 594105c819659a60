"""The metrics stage streams the pool (loop/pool_metrics.py): its values are the definitions on
the whole arrays, in process and with the pool's kNN on shard actors, and with shards > 1 the
driver never holds the pool's vectors.

Run folders are laid out by hand as the loop lays them out (tests/loop/test_loop_select_shards.py:
embedding shards {id, embedding} with ids shuffled inside and across files, training sets of
refs to the real data and an earlier pool); references read the vectors by id from the files
and apply the plain definitions of tests/helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import clustered, frechet_reference, kl_entropy_direct, nearest_two

from raycollapse.io import embedding_stream as stream_module
from raycollapse.io import parquet as parquet_module
from raycollapse.io.parquet import list_column_to_matrix
from raycollapse.loop.catalog import Catalog
from raycollapse.loop.measure import iteration_metrics
from raycollapse.loop.pool_metrics import feature_metrics
from raycollapse.metrics.distribution import frechet_distance, prdc

K, EPS = 3, 1e-10


def _write_embeddings(folder: Path, ids: np.ndarray, x: np.ndarray, files: int, seed: int) -> None:
    folder.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(len(ids))
    for j, part in enumerate(np.array_split(order, files)):
        rows = x[part]
        table = pa.table(
            {
                "id": pa.array(ids[part], pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(rows.reshape(-1)), x.shape[1]
                ),
            }
        )
        pq.write_table(table, folder / f"part-{j:05d}.parquet")


def _make_run(root: Path, n_real: int, n_pool: int, b: int, d: int) -> dict:
    """Real data, pools gen_0 and gen_1 in feature space pixel, and iteration 1's training set
    (refs into real and gen_0, unsorted); the arrays by id for the references."""
    rng = np.random.default_rng(0)
    real_ids = np.arange(n_real) * 3 + 1  # ids are not row numbers
    real = {int(i): v for i, v in zip(real_ids, clustered(n_real, d, 1), strict=True)}
    _write_embeddings(root / "real/embeddings/pixel", real_ids, np.stack(list(real.values())), 2, 1)
    (root / "real/data").mkdir(parents=True)  # the real images' folder: its schema says "no MoG"
    pq.write_table(pa.table({"id": pa.array(real_ids, pa.int64())}), root / "real/data/p.parquet")
    pools = []
    for t in (0, 1):
        ids = np.arange(n_pool) + 1000 * t
        x = clustered(n_pool, d, 10 + t, offset=0.5 * t)
        _write_embeddings(root / f"iter_{t:03d}/embeddings/pixel", ids, x, 3, 20 + t)
        pools.append(dict(zip(ids.tolist(), x, strict=True)))
    refs = [("real", int(i)) for i in rng.choice(real_ids, b // 2, replace=False)]
    refs += [("gen_0", int(i)) for i in rng.choice(n_pool, b - b // 2, replace=False)]
    refs = [refs[i] for i in rng.permutation(len(refs))]
    by_origin = {"real": real, "gen_0": pools[0]}
    return {
        "refs": refs,
        "real_x": np.stack([real[i] for i in sorted(real)]),
        "pool_x": np.stack([pools[1][i] for i in sorted(pools[1])]),  # id order
        "train_x": np.stack([by_origin[o][i] for o, i in refs]),
    }


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("run")
    return root, _make_run(root, n_real=50, n_pool=45, b=12, d=5)


def _check_values(got: dict, info: dict) -> None:
    """The row's values against the definitions on the whole arrays."""
    pool_x, real_x, train_x = info["pool_x"], info["real_x"], info["train_x"]
    gen_x = pool_x[: len(train_x)]  # the first len(train) generated samples, by id
    d1, d2 = nearest_two(train_x, gen_x)
    expected = {
        "entropy_train": kl_entropy_direct(train_x, K, EPS),
        "entropy_pool": kl_entropy_direct(pool_x, K, EPS),
        "entropy_generated": kl_entropy_direct(gen_x, K, EPS),
        "generalization_score": float(d1.mean()),
        "memorized_fraction": float(np.mean(d1 < d2 / 3)),
        "fd": frechet_reference(pool_x, real_x),
    }
    for key, value in expected.items():
        tol = 1e-6 if key == "fd" else 1e-9  # sqrtm of a singular product vs eigh
        assert got[key] == pytest.approx(value, rel=tol, abs=1e-12), key
    # today's whole-array values: the Fréchet distance up to the order of float64 sums, PRDC
    # bit for bit (its definitions against brute force: tests/metrics/test_streaming.py)
    assert got["fd"] == pytest.approx(frechet_distance(pool_x, real_x), rel=1e-9)
    assert {m: got[m] for m in ("precision", "recall", "density", "coverage")} == prdc(
        real_x, pool_x, k=5
    )


@pytest.mark.parametrize("chunk_rows", [1, 7, 10**6])
def test_in_process_metrics_equal_the_definitions(small, chunk_rows: int) -> None:
    root, info = small
    cat = Catalog(str(root), 3)
    got = feature_metrics(
        cat, "gen_1", info["refs"], "pixel", k=K, eps=EPS, shards=1, with_prdc=True,
        chunk_bytes=4 * 5 * chunk_rows,
    )  # fmt: skip
    _check_values(got, info)
    assert set(cat._emb) <= {("real", "pixel")}  # no pool cached (neither gen_1 nor gen_0)


def test_sharded_metrics_row_equals_the_definitions_and_streams_the_pool(
    ray_local, small, monkeypatch
) -> None:
    """With shards > 1 the driver turns at most one chunk (7 rows) of the pool's Parquet into
    vectors at a time, each row once (every reader of the project goes through list_column_to_matrix: a
    counting one sees each conversion) and caches no pool in the Catalog; the actors read the
    rest in their own processes."""
    root, info = small
    sizes: list[int] = []

    def counting(values, column, source, *args, **kwargs):
        out = list_column_to_matrix(values, column, source, *args, **kwargs)
        if "iter_001" in str(source):
            sizes.append(len(out))
        return out

    for module in (parquet_module, stream_module):
        monkeypatch.setattr(module, "list_column_to_matrix", counting)
    cat = Catalog(str(root), 3)
    row = iteration_metrics(
        cat, 1, info["refs"], features=["pixel"], k=K, eps=EPS, fid_available=False, shards=2,
        chunk_bytes=4 * 5 * 7,
    )  # fmt: skip
    _check_values({**row, "fd": row["fd_pixel"]}, info)
    assert row["fid"] is None and row["train_size"] == len(info["refs"])
    assert row["share_real"] == row["share_gen_0"] == 0.5
    assert max(sizes) <= 7 and sum(sizes) == len(info["pool_x"])  # one pass over the pool
    assert set(cat._emb) == {("real", "pixel")}
