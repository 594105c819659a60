"""Embedding shard folders read a bounded number of rows at a time.

An embedding shard folder holds Parquet files ``{id, embedding}`` (the loop's pools and real
data). :func:`iter_embeddings` yields the vectors in *storage order* (the files in
:func:`~raycollapse.io.storage.list_files` order, rows in file order: the global row numbering of
the sharded kNN index, ``stages/knn_shards.py``) in chunks of at most ``chunk_rows`` rows, so a
reader holds one chunk, never the folder. The other readers hold what they return: the rows of
the smallest ids (:func:`read_smallest_ids`), given rows (:func:`read_rows`) or, where the caller
needs all of them, every row in id order with a single copy (:func:`read_in_id_order`).

Files are opened with a read buffer (``buffer_size``), so Arrow streams a column chunk page by
page instead of reading a whole row group into memory first.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.parquet import list_column_to_matrix

__all__ = [
    "CHUNK_BYTES",
    "chunk_rows_for",
    "embedding_dim",
    "embedding_files",
    "file_ids",
    "iter_embeddings",
    "iter_ids_embeddings",
    "read_in_id_order",
    "read_rows",
    "read_smallest_ids",
    "row_counts",
    "smallest_ids",
]

EMBEDDING = "embedding"
# Default bytes of float32 vectors per chunk: large enough that per-chunk overheads (a FAISS
# index of the chunk, Python calls) vanish, small next to a pool (d = 2048: 1024 rows). A
# consumer's working set is a few times this (the metrics stage: a float64 copy, the chunk's
# FAISS index), so it stays small too.
CHUNK_BYTES = 8 * 2**20
_READ_BUFFER = 2**20  # Arrow's read buffer per column chunk (see the module docstring)


def chunk_rows_for(d: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows of ``d`` float32 values that fit in ``chunk_bytes`` (at least 1)."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise UserInputError(f"chunk_bytes must be a positive integer, got {chunk_bytes!r}")
    return max(1, chunk_bytes // (4 * max(1, int(d))))


def embedding_files(uri: str) -> list[str]:
    """The Parquet files of an embedding shard folder, in storage order."""
    files = storage.list_files(uri)
    if not files:
        raise UserInputError(
            f"no Parquet shards under '{uri}'; re-run the command (or stage) that writes them."
        )
    return files


def _open(path: str) -> pq.ParquetFile:
    fs, inner = storage.open_fs(path)
    try:
        return pq.ParquetFile(inner, filesystem=fs, buffer_size=_READ_BUFFER, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _damaged(path, exc) from None


def _damaged(path: str, exc: BaseException) -> UserInputError:
    return UserInputError(
        f"cannot read Parquet file '{path}': {exc}. The file is damaged or incomplete: "
        "replace it, or remove it and re-run the command that wrote it."
    )


def row_counts(files: Sequence[str]) -> list[int]:
    """Rows per file, from the Parquet footers (no data read)."""
    return [_open(f).metadata.num_rows for f in files]


def embedding_dim(files: Sequence[str], column: str = EMBEDDING) -> int | None:
    """The vector dimension stated by the first file's schema (a fixed-size list column), or
    None when the schema does not say (a variable-size list: the data say it)."""
    field = _open(files[0]).schema_arrow.field(column)
    return field.type.list_size if pa.types.is_fixed_size_list(field.type) else None


def file_ids(path: str) -> np.ndarray:
    """The ``id`` column of one file, int64, in row order."""
    try:
        table = _open(path).read(columns=["id"])
    except (pa.ArrowInvalid, OSError, KeyError) as exc:
        raise _damaged(path, exc) from None
    return table.column("id").to_numpy().astype(np.int64)


def _batches(path: str, columns: list[str], rows: int) -> Iterator[pa.RecordBatch]:
    try:
        yield from _open(path).iter_batches(batch_size=rows, columns=columns, use_threads=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise _damaged(path, exc) from None


def iter_embeddings(
    files: Sequence[str], chunk_rows: int, column: str = EMBEDDING
) -> Iterator[np.ndarray]:
    """The float32 vectors of ``files`` in storage order, at most ``chunk_rows`` rows at a time
    (a chunk never spans two files)."""
    for _, x in _iter(files, chunk_rows, column, with_ids=False):
        yield x


def iter_ids_embeddings(
    files: Sequence[str], chunk_rows: int, column: str = EMBEDDING
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`iter_embeddings` with each chunk's ids: ``(int64 ids, float32 vectors)``."""
    for ids, x in _iter(files, chunk_rows, column, with_ids=True):
        assert ids is not None
        yield ids, x


def _iter(
    files: Sequence[str], chunk_rows: int, column: str, *, with_ids: bool
) -> Iterator[tuple[np.ndarray | None, np.ndarray]]:
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise UserInputError(f"chunk_rows must be a positive integer, got {chunk_rows!r}")
    columns = [column, "id"] if with_ids else [column]
    for f in files:
        for batch in _batches(f, columns, chunk_rows):
            if batch.num_rows:
                ids = batch.column(1).to_numpy().astype(np.int64) if with_ids else None
                yield ids, list_column_to_matrix(batch.column(0), column, f)


def smallest_ids(files: Sequence[str], count: int) -> np.ndarray:
    """The ``count`` smallest ids of ``files``, sorted, reading only their id columns."""
    ids = np.concatenate([file_ids(f) for f in files])
    count = min(int(count), len(ids))
    if count <= 0:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.partition(ids, count - 1)[:count])


def read_rows(path: str, rows: np.ndarray, chunk_rows: int, column: str = EMBEDDING) -> np.ndarray:
    """Rows ``rows`` (positions in the file, any order) of one file's vectors, in that order,
    reading the file ``chunk_rows`` rows at a time."""
    rows = np.asarray(rows, dtype=np.int64)
    out: np.ndarray | None = None
    start = 0
    for x in iter_embeddings([path], chunk_rows, column):
        at = np.flatnonzero((rows >= start) & (rows < start + len(x)))
        if out is None:
            out = np.empty((len(rows), x.shape[1]), dtype=np.float32)
        out[at] = x[rows[at] - start]
        start += len(x)
    if out is None or (len(rows) and (rows.min() < 0 or rows.max() >= start)):
        raise UserInputError(f"rows out of range for '{path}' ({start} rows)")
    return out


def read_smallest_ids(
    files: Sequence[str], count: int, chunk_rows: int, column: str = EMBEDDING
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of the ``count`` rows with the smallest ids, in id order, reading the
    files ``chunk_rows`` rows at a time: holds the ids of every row (8 bytes per row) and the
    ``count`` rows, never the rest."""
    want = smallest_ids(files, count)
    got_ids: list[np.ndarray] = []
    got_x: list[np.ndarray] = []
    for ids, x in iter_ids_embeddings(files, chunk_rows, column) if len(want) else ():
        keep = np.isin(ids, want)
        got_ids.append(ids[keep])
        got_x.append(x[keep])
    if not got_x:
        return want, np.empty((0, 0), dtype=np.float32)
    out_ids = np.concatenate(got_ids)
    order = np.argsort(out_ids, kind="stable")
    return out_ids[order], np.concatenate(got_x)[order]


def read_in_id_order(
    files: Sequence[str], chunk_rows: int, column: str = EMBEDDING
) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, vectors)`` of every row in id order, as :func:`raycollapse.io.parquet.read_embeddings`,
    but into one preallocated array: the vectors exist once (no concatenated table, no sorted
    copy), plus one chunk while it is placed."""
    per_file = [file_ids(f) for f in files]
    ids = np.concatenate(per_file)
    order = np.argsort(ids, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(ids), dtype=order.dtype)  # stored row i goes to rank[i]
    del per_file
    out: np.ndarray | None = None
    start = 0
    for x in iter_embeddings(files, chunk_rows, column):
        if out is None:
            out = np.empty((len(ids), x.shape[1]), dtype=np.float32)
        elif x.shape[1] != out.shape[1]:
            raise UserInputError(
                f"embedding shards under the same folder differ in dimension ({out.shape[1]} "
                f"and {x.shape[1]}); re-embed"
            )
        out[rank[start : start + len(x)]] = x
        start += len(x)
    if out is None:
        out = np.empty((0, 0), dtype=np.float32)
    return ids[order], out
