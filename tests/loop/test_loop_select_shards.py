"""The loop's selection with knn.shards > 1 reads the candidates' embeddings from their Parquet
files on the actors and returns the indices of the plain single-node selection.

The run folder is laid out by hand as the loop lays it out (embedding shards {id, embedding},
training sets {id, origin, origin_id}), with ids shuffled inside and across files so that every
candidate list is a reordered subset of several files; the reference reads the vectors by id
straight from the Parquet files and runs the plain definitions of tests/helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import clustered, kl_entropy_direct, plain_greedy, plain_threshold

from raycollapse.config import load_config
from raycollapse.loop.catalog import Catalog
from raycollapse.loop.measure import pool_entropy_sharded
from raycollapse.loop.rundir import RunDir
from raycollapse.loop.runner import Loop
from raycollapse.seeds import derive_seed
from raycollapse.stages.knn_shard_inputs import plan_pieces
from raycollapse.stages.select_inputs import FileRows, pool_of, read_pieces

D, B, POOL, REAL = 5, 12, 40, 50
SELECT_PURPOSE = 2  # loop/runner.py: the selection seed is derive_seed(seed + select.seed, t, 2)


def _write_embeddings(folder: Path, ids: np.ndarray, x: np.ndarray, files: int, seed: int) -> None:
    """``x[i]`` under id ``ids[i]``, rows shuffled, cut into ``files`` Parquet files."""
    folder.mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(len(ids))
    for j, part in enumerate(np.array_split(order, files)):
        table = pa.table(
            {
                "id": pa.array(ids[part], pa.int64()),
                "embedding": pa.array(list(x[part]), pa.list_(pa.float32())),
            }
        )
        pq.write_table(table, folder / f"part-{j:05d}.parquet")


def _write_train_set(folder: Path, refs: list[tuple[str, int]]) -> None:
    folder.mkdir(parents=True)
    table = pa.table(
        {
            "id": pa.array(np.arange(len(refs)), pa.int64()),
            "origin": pa.array([o for o, _ in refs], pa.string()),
            "origin_id": pa.array([i for _, i in refs], pa.int64()),
        }
    )
    pq.write_table(table, folder / "part-00000.parquet")


def _vectors_by_id(folder: Path) -> dict[int, np.ndarray]:
    table = pa.concat_tables(pq.read_table(f) for f in sorted(folder.glob("*.parquet")))
    return {
        int(i): np.asarray(v, dtype=np.float32)
        for i, v in zip(
            table.column("id").to_pylist(), table.column("embedding").to_pylist(), strict=True
        )
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """Real data, and iterations 0 and 1 done: training sets and pools in feature space pixel."""
    root = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    real_ids = np.arange(REAL) * 3 + 1  # ids are not row numbers
    _write_embeddings(root / "real/embeddings/pixel", real_ids, clustered(REAL, D, 1), 2, 1)
    train0 = [("real", int(i)) for i in rng.choice(real_ids, B, replace=False)]  # unsorted
    _write_train_set(root / "iter_000/train_set", train0)
    for t in (0, 1):
        ids = np.arange(POOL) + 1000 * t
        _write_embeddings(
            root / f"iter_{t:03d}/embeddings/pixel", ids, clustered(POOL, D, 10 + t), 3, 20 + t
        )
    train1 = [("gen_0", int(i)) for i in rng.choice(POOL, B, replace=False)]
    _write_train_set(root / "iter_001/train_set", train1)
    return root


def _cfg(run: Path, paradigm: str, method: str, shards: int):
    return load_config(
        None,
        [
            f"loop.storage={run}",
            f"loop.paradigm={paradigm}",
            f"loop.train_size={B}",
            "loop.metric_features=[pixel]",
            "features.name=pixel",
            f"select.method={method}",
            "select.tau0=3.0",
            "select.decay=0.8",
            f"knn.shards={shards}",
        ],
    )


def _candidates(run: Path, paradigm: str) -> list[tuple[str, int]]:
    """The paradigm's candidates at iteration 2 (docs/design.md, "Paradigms")."""
    pools = [[(f"gen_{k}", i) for i in range(1000 * k, 1000 * k + POOL)] for k in (0, 1)]
    if paradigm == "accumulate":
        train0 = pq.read_table(run / "iter_000/train_set/part-00000.parquet")
        real = [("real", int(i)) for i in train0.column("origin_id").to_pylist()]
        return real + pools[0] + pools[1]
    return pools[1]  # replace, accumulate_all: the last pool


@pytest.mark.parametrize(
    "paradigm, method",
    [("replace", "greedy"), ("accumulate", "greedy"), ("accumulate", "threshold")],
)
def test_sharded_loop_selection_equals_plain(ray_local, run, paradigm, method):
    cfg = _cfg(run, paradigm, method, shards=2)
    loop = Loop(cfg, RunDir(str(run)), Catalog(str(run), 3), ["pixel"], log=lambda m: None)
    got = loop.next_train_set(2)

    cands = _candidates(run, paradigm)
    by_origin = {
        "real": _vectors_by_id(run / "real/embeddings/pixel"),
        "gen_0": _vectors_by_id(run / "iter_000/embeddings/pixel"),
        "gen_1": _vectors_by_id(run / "iter_001/embeddings/pixel"),
    }
    x = np.stack([by_origin[o][i] for o, i in cands])
    seed = derive_seed(int(cfg.seed) + int(cfg.select.seed), 2, SELECT_PURPOSE)
    if method == "greedy":
        idx = plain_greedy(x, B, seed)
    else:
        idx = plain_threshold(x, B, 3.0, 0.8, seed)
    assert got == [cands[int(i)] for i in idx]
    # and today's single-node path (the driver gathers the array) agrees
    one = Loop(_cfg(run, paradigm, method, 1), RunDir(str(run)), Catalog(str(run), 3), ["pixel"])
    assert one.next_train_set(2) == got


def test_embedding_rows_are_the_gathered_embeddings(run):
    """The rows the actors read are, concatenated, the driver's gathered rows in order."""
    cat = Catalog(str(run), 3)
    refs = _candidates(run, "accumulate")[::-1]  # every origin, reordered
    runs = cat.embedding_rows(refs, "pixel")
    assert len(runs) == 3 and not any(isinstance(r, str) for r in runs)  # one per origin run
    files = [r if isinstance(r, str) else FileRows(*r) for r in runs]
    pool = pool_of(files)
    assert pool.n == len(refs)
    bounds = np.array([0, 7, 41, len(refs)])
    got = np.concatenate(
        [read_pieces(p, "embedding") for p in plan_pieces(files, pool.counts, bounds)]
    )
    assert np.array_equal(got, cat.gather_embeddings(refs, "pixel"))
    # every row of an origin in stored order: its files themselves, no row lists
    folder = run / "iter_001/embeddings/pixel"
    stored = [
        ("gen_1", int(i))
        for f in sorted(folder.glob("*.parquet"))
        for i in pq.read_table(f).column("id").to_pylist()
    ]
    assert cat.embedding_rows(stored, "pixel") == [str(f) for f in sorted(folder.glob("*.parquet"))]


def test_sharded_pool_entropy_equals_plain(ray_local, run):
    x = np.stack(list(_vectors_by_id(run / "iter_001/embeddings/pixel").values()))
    got = pool_entropy_sharded(str(run / "iter_001/embeddings/pixel"), POOL, 2, 1e-10, 2)
    assert got == pytest.approx(kl_entropy_direct(x, 2), rel=1e-12)
