"""Parquet columns as arrays: list columns to matrices, and a run's shard folders in id order."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.images import decode_column


def list_column_to_matrix(
    values: pa.Array | pa.ChunkedArray,
    column: str,
    source: str,
    dtype: Any = np.float32,
) -> np.ndarray:
    """A (fixed-size or variable) list column -> writeable ``N x d`` array of ``dtype`` (float32
    by default; ``None`` keeps the stored type, e.g. uint8 pixels).

    Null rows, a non-list type and rows of different length raise ``UserInputError`` naming
    ``column`` and ``source``.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if values.null_count:
        raise UserInputError(
            f"column '{column}' of '{source}' has {values.null_count} null rows; drop or fill them."
        )
    if pa.types.is_fixed_size_list(values.type):
        dim = values.type.list_size
    elif pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
        lengths = values.value_lengths().to_numpy(zero_copy_only=False)
        if len(lengths) and lengths.min() != lengths.max():
            first = int(np.argmax(lengths != lengths[0]))
            raise UserInputError(
                f"rows of column '{column}' of '{source}' differ in dimension: row 0 has {lengths[0]} values, "
                f"row {first} has {lengths[first]}; every row must have the same dimension."
            )
        dim = int(lengths[0]) if len(lengths) else 0
    else:
        raise UserInputError(
            f"column '{column}' of '{source}' has type {values.type}; expected a list of numbers."
        )
    flat = values.flatten().to_numpy(zero_copy_only=False)
    # One copy at most, and always a writeable array the caller owns (Arrow views are read-only).
    out = flat.astype(flat.dtype if dtype is None else dtype, copy=not flat.flags.writeable)
    return out.reshape(len(values), dim)


def _concat(uri: str, columns: list[str]) -> pa.Table:
    files = storage.list_files(uri)
    if not files:
        raise UserInputError(
            f"no Parquet shards under '{uri}'; re-run the command (or stage) that writes them."
        )
    table = pa.concat_tables(storage.read_parquet(f, columns=columns) for f in files)
    return table.sort_by("id")


def read_images(uri: str, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, images uint8 N x H x W x C, labels with -1 for none)`` of an image shard folder."""
    table = _concat(uri, ["id", "image", "label"])
    ids = table.column("id").to_numpy().astype(np.int64)
    images = np.stack(decode_column(table.column("image"), channels, name=uri))
    labels = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
    return ids, images, labels


def read_embeddings(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, float32 N x d)`` of an embedding shard folder."""
    table = _concat(uri, ["id", "embedding"])
    x = list_column_to_matrix(table.column("embedding"), "embedding", uri)
    return table.column("id").to_numpy().astype(np.int64), x
