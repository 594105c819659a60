"""Reading a run's Parquet shard folders back into arrays, in id order."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raycollapse.io import storage
from raycollapse.io.images import decode_image


def _concat(uri: str, columns: list[str]) -> pa.Table:
    files = storage.list_files(uri)
    if not files:
        raise FileNotFoundError(f"no Parquet shards under '{uri}'")
    table = pa.concat_tables(storage.read_parquet(f, columns=columns) for f in files)
    return table.sort_by("id")


def read_images(uri: str, channels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, images uint8 N x H x W x C, labels with -1 for none)`` of an image shard folder."""
    table = _concat(uri, ["id", "image", "label"])
    ids = table.column("id").to_numpy().astype(np.int64)
    images = np.stack([decode_image(b, channels) for b in table.column("image").to_pylist()])
    labels = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
    return ids, images, labels


def read_embeddings(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, float32 N x d)`` of an embedding shard folder."""
    table = _concat(uri, ["id", "embedding"])
    values = table.column("embedding").combine_chunks()
    dim = len(values[0]) if len(values) else 0
    x = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(values), dim)
    return table.column("id").to_numpy().astype(np.int64), x
