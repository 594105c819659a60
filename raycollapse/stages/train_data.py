"""Training data for the Ray Train stage: driver side (a materialised dataset) and worker side.

- ``training_dataset`` (driver): Parquet shards ``{id, image (PNG), label, ...}`` or in-memory
  ``Records`` -> a materialised Ray Data dataset ``{id, image, label}`` and the labels (checked on
  the driver, so every rank agrees on whether training can start). Materialised while the CPUs
  are still free: the training workers then take every CPU of a small cluster, and a dataset that
  still had read tasks to run would wait for a CPU forever.
- ``read_shard`` / ``batch_to_arrays`` (worker): a worker's whole shard in memory as uint8
  arrays, sorted by id, decoded and prepared to ``data.resolution`` / ``data.channels``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raycollapse.data.records import Records
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.seeds import derive_seed

_SCHEMA = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("label", pa.int64())])


def training_dataset(source: str | Path | Records) -> tuple[ray.data.Dataset, np.ndarray, str]:
    """``(materialised dataset, labels (-1 = none), source name)`` for Parquet shards or Records."""
    if isinstance(source, Records):
        from ray.data.extensions import ArrowTensorArray

        table = pa.table(
            {
                "id": pa.array(source.ids, pa.int64()),
                "image": ArrowTensorArray.from_numpy(source.images),  # no PNG round trip
                "label": pa.array(source.labels, pa.int64()),
            }
        )
        return ray.data.from_arrow(table).materialize(), source.labels, source.source
    files = storage.list_files(source, ".parquet")
    if not files:
        raise UserInputError(
            f"training set '{source}' holds no Parquet files; pass a folder of shards written by "
            "`raycollapse generate` / the loop, or in-memory records."
        )
    # Read on the driver with pyarrow, not ray.data.read_parquet: training sets are small (they
    # fit in memory by design), the labels must be checked here anyway (every rank has to agree
    # on whether training can start), and read_parquet imports fsspec's HTTP filesystem, which
    # fails without aiohttp in this environment.
    tables = []
    for f in files:
        fs, path = storage.open_fs(f)
        names = pq.read_schema(path, filesystem=fs).names
        if "image" not in names or "id" not in names:
            raise UserInputError(
                f"'{f}' needs 'id' and 'image' columns (it has: {', '.join(names)}); pass shards "
                "written by `raycollapse generate` or the records schema."
            )
        table = storage.read_parquet(f, ["id", "image"] + (["label"] if "label" in names else []))
        if "label" not in names:
            table = table.append_column("label", pa.nulls(table.num_rows, pa.int64()))
        tables.append(table.select(["id", "image", "label"]).cast(_SCHEMA))
    labels = np.concatenate([t.column("label").fill_null(-1).to_numpy() for t in tables])
    return ray.data.from_arrow(tables).materialize(), labels.astype(np.int64), str(source)


def batch_to_arrays(
    batch: pa.Table, data: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(ids, uint8 images N x R x R x C, labels with -1)`` from a pyarrow batch of training rows.

    Encoded images are decoded and prepared to ``data.resolution`` / ``data.channels``; with
    ``data.on_small=skip`` images below the resolution are dropped.
    """
    from raycollapse.data.records import TooSmall, prepare_checked
    from raycollapse.io.images import iter_column

    ids = batch.column("id").to_numpy().astype(np.int64)
    labels = (
        batch.column("label").fill_null(-1).to_numpy().astype(np.int64)
        if "label" in batch.column_names
        else np.full(len(ids), -1, np.int64)
    )
    res, ch, small = int(data["resolution"]), int(data["channels"]), str(data["on_small"])
    names = [f"id {i}" for i in ids]
    keep, images = [], []
    # One image decoded at a time (encoded bytes, or the rows of a tensor column of in-memory
    # Records), prepared, then dropped: memory stays one batch of prepared images.
    decoded = iter_column(batch.column("image"), ch, row_names=names)
    for j, image in enumerate(decoded):
        try:
            images.append(
                prepare_checked(image, resolution=res, channels=ch, on_small=small, name=names[j])
            )
            keep.append(j)
        except TooSmall:
            continue
    if not images:
        return ids[:0], np.zeros((0, res, res, ch), np.uint8), labels[:0]
    return ids[keep], np.stack(images), labels[keep]


def read_shard(shard: Any, data: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A worker's whole dataset shard in memory, sorted by id (its order must not depend on
    which block arrived first, or the seeded index stream would pick other images)."""
    parts = [
        batch_to_arrays(b, data)
        for b in shard.iter_batches(batch_size=4096, batch_format="pyarrow")
    ]
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    images = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 1, 1, 1), np.uint8)
    labels = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    return ids[order], images[order], labels[order]


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed for the index stream and the noise generator."""
    return derive_seed(seed, rank)
