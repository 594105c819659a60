"""``raycollapse select INPUT --shards S``: the selection itself on S actors (imported only when
S != 1, so the default path never imports Ray).

Embedding inputs (Parquet shards, ``.npy``) are read by the actors; the driver then gathers only
the B chosen rows (file by file) for the report. Other inputs (images) are loaded on the driver.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raycollapse.curation.select import Selection
from raycollapse.data.inputs import EMBEDDING_COLUMN, load_features
from raycollapse.errors import UserInputError
from raycollapse.io.parquet import list_column_to_matrix
from raycollapse.io.storage import read_parquet
from raycollapse.stages.knn_shard_inputs import Piece
from raycollapse.stages.select_inputs import Pool, pool_of, read_pieces
from raycollapse.stages.select_shards import select_sharded

__all__ = ["ShardedSelection", "gather_rows", "select_input"]


@dataclass(frozen=True)
class ShardedSelection:
    """What ``select`` reports: the selection, N, d, the chosen rows and their ids (or None)."""

    selection: Selection
    n: int
    d: int
    chosen: np.ndarray
    ids: np.ndarray | None


def gather_rows(pool: Pool, index: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows ``index`` of a file pool and their ``id`` column (Parquet with ids), one file
    at a time: the driver holds one file's column, never the pool."""
    if pool.array is not None:
        return pool.array[index], None
    starts = np.concatenate([[0], np.cumsum(pool.counts)])
    rows: np.ndarray | None = None
    ids: np.ndarray | None = None
    for f, a, b in zip(pool.files, starts[:-1], starts[1:], strict=True):
        pos = np.flatnonzero((index >= a) & (index < b))
        if len(pos) == 0:
            continue
        local = index[pos] - a
        file_ids = None
        if f.endswith(".npy") and "://" not in f:  # memory-mapped: only the chosen rows
            got = np.load(f, mmap_mode="r")[np.sort(local)][np.argsort(np.argsort(local))]
        elif f.endswith(".npy"):
            got = read_pieces([Piece(f, 0, int(b - a))], EMBEDDING_COLUMN)[local]
        else:
            table = read_parquet(f)
            got = list_column_to_matrix(
                table.column(EMBEDDING_COLUMN).take(local).combine_chunks(), EMBEDDING_COLUMN, f
            )
            names = table.column_names
            file_ids = table.column("id").take(local).to_numpy() if "id" in names else None
        if rows is None:
            rows = np.empty((len(index), got.shape[1]), dtype=np.float32)
        rows[pos] = got
        if file_ids is not None:
            ids = np.zeros(len(index), dtype=np.int64) if ids is None else ids
            ids[pos] = file_ids
    assert rows is not None
    return rows, ids


def select_input(
    path: str | Path, sel: Any, shards: int, *, approximate: bool, cpus: float | None
) -> ShardedSelection:
    """Select ``sel.budget`` rows of INPUT by ``sel.method`` on ``shards`` actors."""
    try:
        pool = pool_of(str(path))
    except UserInputError:
        if not Path(str(path)).exists():
            raise
        pool = None  # images or pixel Parquet: features come from the driver
    ids: np.ndarray | None = None
    if pool is None:
        loaded = load_features(path)
        source: Any = loaded.features
        pool, ids = pool_of(source), loaded.ids
    else:
        source = str(path)
    if sel.budget is not None and sel.budget > pool.n:
        raise UserInputError(
            f"budget {sel.budget} is larger than the number of rows N={pool.n}; "
            f"pass --budget <= {pool.n}."
        )
    chosen_by = select_sharded(
        source,
        sel.method,
        sel.budget,
        shards=shards,
        seed=sel.seed,
        tau0=sel.tau0,
        decay=sel.decay,
        approximate=approximate,
        num_cpus_per_shard=cpus,
    )
    chosen, file_ids = gather_rows(pool, chosen_by.indices)
    if ids is not None:
        file_ids = ids[chosen_by.indices]
    return ShardedSelection(chosen_by, pool.n, chosen.shape[1], chosen, file_ids)
