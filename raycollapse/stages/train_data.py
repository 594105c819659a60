"""Training data for the Ray Train stage: driver side (a Ray Data dataset) and worker side.

- ``training_dataset`` (driver): Parquet shards ``{id, image (PNG), label, ...}`` read with
  ``ray.data.read_parquet`` (local folders and pyarrow URIs alike), or in-memory ``Records`` -> a
  materialised dataset ``{id, image, label}`` and the labels (checked on the driver, so every rank
  agrees on whether training can start). Materialised while the CPUs are still free: the training
  workers then take every CPU of a small cluster, and a dataset that still had read tasks to run
  would wait for a CPU forever. The blocks live in the object store, which spills to local disk
  beyond its memory: no training worker holds more than its own shard.
- ``read_shard`` / ``batch_to_arrays`` (worker): a worker's whole shard in memory as uint8
  arrays, sorted by id, decoded and prepared to ``data.resolution`` / ``data.channels``.
- ``ShardStream`` (worker): a shard too large for a worker's memory, streamed through a seeded
  shuffle buffer one epoch after another; its position is a checkpointable pair of integers.

Vector training sets (a ``vector`` column instead of ``image``, ``data/vectors.py``) travel as
they are: the worker gets float32 ``N x d`` arrays.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from raycollapse.data.records import Records
from raycollapse.data.vectors import VECTOR_COLUMN, column_vectors, is_vector_schema
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.seeds import derive_rng, derive_seed

_SCHEMAS = {
    "image": pa.schema([("id", pa.int64()), ("image", pa.binary()), ("label", pa.int64())]),
    VECTOR_COLUMN: pa.schema(
        [("id", pa.int64()), (VECTOR_COLUMN, pa.list_(pa.float32())), ("label", pa.int64())]
    ),
}
BYTES_PER_VALUE = 5
"""Memory of one decoded image value in the in-memory path: the uint8 array and its float32 copy."""


def _normalise(batch: pa.Table) -> pa.Table:
    """``{id, image|vector, label}`` with the training schema; a missing label becomes nulls."""
    if "label" not in batch.column_names:
        batch = batch.append_column("label", pa.nulls(batch.num_rows, pa.int64()))
    value = VECTOR_COLUMN if VECTOR_COLUMN in batch.column_names else "image"
    return batch.select(["id", value, "label"]).cast(_SCHEMAS[value])


def _check_columns(files: list[str], source: str | Path) -> tuple[str, list[bool]]:
    """The value column of the shards (``image`` or ``vector``) and whether each file has a label
    column; a file without ``id`` and a value column, or a mix of both kinds, is refused.
    Reads the Parquet footers only."""
    kinds, has_label = set(), []
    for f in files:
        fs, path = storage.open_fs(f)
        names = pq.read_schema(path, filesystem=fs).names
        if "id" in names and is_vector_schema(names):
            kinds.add(VECTOR_COLUMN)
        elif "id" in names and "image" in names:
            kinds.add("image")
        else:
            raise UserInputError(
                f"'{f}' needs 'id' and 'image' (or '{VECTOR_COLUMN}') columns (it has: "
                f"{', '.join(names)}); pass shards written by `raycollapse generate` or the records schema."
            )
        has_label.append("label" in names)
    if len(kinds) > 1:
        raise UserInputError(f"training set '{source}' mixes image and vector shards.")
    return kinds.pop(), has_label


def _read(files: list[str], columns: list[str]) -> ray.data.Dataset:
    # Local paths absolute: read tasks run in other processes (and, with shared storage, nodes).
    paths = [f if "://" in f else str(Path(f).absolute()) for f in files]
    ds = ray.data.read_parquet(paths)
    # Blocks in file order, not completion order: a streamed shard is read in this order.
    ds.context.execution_options.preserve_order = True
    ds = ds.select_columns(columns)
    return ds.map_batches(_normalise, batch_format="pyarrow", zero_copy_batch=True)


def training_files(source: str | Path) -> list[str]:
    """The Parquet files of a training set folder or URI; none is a user error."""
    files = storage.list_files(source, ".parquet")
    if not files:
        raise UserInputError(
            f"training set '{source}' holds no Parquet files; pass a folder of shards written by "
            "`raycollapse generate` / the loop, or in-memory records."
        )
    return files


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
    files = training_files(source)
    value, has_label = _check_columns(files, source)
    # Files with and without labels are read apart: one read needs one schema.
    labelled = [f for f, h in zip(files, has_label, strict=True) if h]
    unlabelled = [f for f, h in zip(files, has_label, strict=True) if not h]
    parts = [_read(labelled, ["id", value, "label"])] if labelled else []
    parts += [_read(unlabelled, ["id", value])] if unlabelled else []
    ds = (parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]).materialize()
    labels = [
        b.column("label").fill_null(-1).to_numpy()
        for b in ds.select_columns(["label"]).iter_batches(batch_format="pyarrow")
    ]
    return ds, np.concatenate(labels).astype(np.int64), str(source)


def shard_bytes(n: int, workers: int, data: dict[str, Any]) -> int:
    """Memory one worker's shard takes in the in-memory path (decoded, uint8 + float32)."""
    per_image = int(data["resolution"]) ** 2 * int(data["channels"]) * BYTES_PER_VALUE
    return -(-n // workers) * per_image


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
    if VECTOR_COLUMN in batch.column_names:  # vectors: no decoding, no resizing
        return ids, column_vectors(batch.column(VECTOR_COLUMN), "training set"), labels
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
    parts = [p for p in parts if len(p[0])] or parts[:1]  # an empty batch has no vector dimension
    ids = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    images = np.concatenate([p[1] for p in parts]) if parts else np.zeros((0, 1, 1, 1), np.uint8)
    labels = np.concatenate([p[2] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(ids, kind="stable")
    return ids[order], images[order], labels[order]


def rank_seed(seed: int, rank: int) -> int:
    """A per-rank seed for the index stream and the noise generator."""
    return derive_seed(seed, rank)


class ShardStream:
    """Batches from a dataset shard that need not fit in memory: seeded, resumable.

    Epoch ``e`` reads the shard in its (fixed, order-preserving) block order and passes the rows
    through a shuffle buffer of ``buffer`` images drawn with ``derive_rng(seed, e)``: each
    draw takes a random row of the full buffer and refills it from the stream; the last
    ``buffer`` rows leave in a random permutation. A batch may span two epochs (as the in-memory
    ``IndexStream``). ``position`` = (epoch, rows of it handed out) fully determines what comes
    next, so a resumed stream replays the epoch up to there and continues identically.
    Memory: the buffer plus one block of encoded rows.
    """

    def __init__(self, shard: Any, data: dict[str, Any], seed: int, buffer: int) -> None:
        if buffer < 1:
            raise UserInputError(f"train.stream_buffer must be >= 1, got {buffer}.")
        self.shard, self.data, self.seed, self.buffer = shard, data, seed, buffer
        self.epoch, self.offset = 0, 0
        self._rows: Iterator[tuple[np.ndarray, int]] | None = None

    @property
    def position(self) -> tuple[int, int]:
        """(epoch, rows of that epoch already handed out)."""
        return self.epoch, self.offset

    def seek(self, epoch: int, offset: int) -> None:
        """Continue at ``position`` ``(epoch, offset)`` (a checkpoint's)."""
        self.epoch, self.offset, self._rows = int(epoch), int(offset), None

    def _epoch_rows(self, epoch: int) -> Iterator[tuple[np.ndarray, int]]:
        rng = derive_rng(self.seed, epoch)
        images: list[np.ndarray] = []
        labels: list[int] = []
        for batch in self.shard.iter_batches(batch_size=256, batch_format="pyarrow"):
            _, imgs, labs = batch_to_arrays(batch, self.data)
            for image, label in zip(imgs, labs, strict=True):
                images.append(image)
                labels.append(int(label))
                if len(images) > self.buffer:
                    j = int(rng.integers(len(images)))
                    # swap-remove: O(1), and the draw alone decides which row leaves
                    images[j], images[-1] = images[-1], images[j]
                    labels[j], labels[-1] = labels[-1], labels[j]
                    yield images.pop(), labels.pop()
        for j in rng.permutation(len(images)):
            yield images[j], labels[j]

    def next(self, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """The next ``batch_size`` rows: ``(uint8 images N x R x R x C, labels with -1)``."""
        images, labels = [], []
        empty_epochs = 0
        while len(images) < batch_size:
            if self._rows is None:
                self._rows = self._epoch_rows(self.epoch)
                for _ in range(self.offset):  # replay up to the resumed position
                    next(self._rows)
            row = next(self._rows, None)
            if row is None:  # the epoch is over: the next one, in a new order
                empty_epochs = empty_epochs + 1 if self.offset == 0 else 0
                if empty_epochs > 1:
                    raise UserInputError("this worker's share of the training set is empty.")
                self.epoch, self.offset, self._rows = self.epoch + 1, 0, None
                continue
            images.append(row[0])
            labels.append(row[1])
            self.offset += 1
        return np.stack(images), np.asarray(labels, np.int64)
