"""raycollapse.io.embedding_stream: bounded chunks in storage order, rows by id, against the
rows written (by id, straight from the arrays that were stored)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycollapse.errors import UserInputError
from raycollapse.io.embedding_stream import (
    chunk_rows_for,
    embedding_dim,
    embedding_files,
    iter_embeddings,
    iter_ids_embeddings,
    read_in_id_order,
    read_rows,
    read_smallest_ids,
    row_counts,
    smallest_ids,
)

N, D = 53, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """Three files, ids scattered over them (not row numbers), several row groups each; the
    vectors in storage order and their ids."""
    root = tmp_path_factory.mktemp("emb")
    rng = np.random.default_rng(0)
    ids = rng.permutation(N) * 5 + 3
    x = rng.normal(size=(N, D)).astype(np.float32)
    for j, part in enumerate(np.array_split(np.arange(N), 3)):
        table = pa.table(
            {
                "id": pa.array(ids[part], pa.int64()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[part].reshape(-1)), D),
            }
        )
        pq.write_table(table, root / f"part-{j:05d}.parquet", row_group_size=6)
    return root, ids, x


@pytest.mark.parametrize("rows", [1, 5, 1000])
def test_chunks_are_bounded_and_in_storage_order(folder, rows: int) -> None:
    root, ids, x = folder
    files = embedding_files(str(root))
    chunks = list(iter_embeddings(files, rows))
    assert all(1 <= len(c) <= rows for c in chunks)
    assert np.array_equal(np.concatenate(chunks), x)
    pairs = list(iter_ids_embeddings(files, rows))
    assert np.array_equal(np.concatenate([i for i, _ in pairs]), ids)
    assert np.array_equal(np.concatenate([v for _, v in pairs]), x)
    assert row_counts(files) == [18, 18, 17] and embedding_dim(files) == D


@pytest.mark.parametrize("rows", [1, 7, 1000])
def test_rows_by_id(folder, rows: int) -> None:
    root, ids, x = folder
    files = embedding_files(str(root))
    order = np.argsort(ids)
    got_ids, got = read_in_id_order(files, rows)
    assert np.array_equal(got_ids, ids[order]) and np.array_equal(got, x[order])
    for count in (1, 20, N, N + 4):
        assert np.array_equal(smallest_ids(files, count), ids[order][:count])
        got_ids, got = read_smallest_ids(files, count, rows)
        assert np.array_equal(got_ids, ids[order][:count])
        assert np.array_equal(got, x[order][:count])
    want = np.array([17, 0, 3, 17, 9])  # any order, repeats
    assert np.array_equal(read_rows(files[0], want, rows), x[want])


def test_errors(folder, tmp_path) -> None:
    root, _, _ = folder
    with pytest.raises(UserInputError, match="no Parquet shards under"):
        embedding_files(str(tmp_path))
    with pytest.raises(UserInputError, match="chunk_rows must be a positive integer"):
        next(iter_embeddings(embedding_files(str(root)), 0))
    with pytest.raises(UserInputError, match="rows out of range"):
        read_rows(embedding_files(str(root))[0], np.array([18]), 4)
    bad = tmp_path / "part-00000.parquet"
    bad.write_bytes((root / "part-00000.parquet").read_bytes()[:100])
    with pytest.raises(UserInputError, match="damaged or incomplete"):
        list(iter_embeddings([str(bad)], 4))
    assert chunk_rows_for(2048) == 1024 and chunk_rows_for(8, 4) == 1
