"""What the embedding stage reads: the input pool cut into shards, and a shard's mini-batches.

INPUT is a folder (or URI) of Parquet image shards as ``raycollapse generate`` writes them (or
of vector shards: a ``vector`` column and no image column, ``data/vectors.py``), one
Parquet file, a ``.npy`` of images or a folder of image files. :func:`plan_shards` turns it into
:class:`ShardTask` rows (one output shard each, deterministic names) before any work starts, so
every bad input is an error naming the file; :func:`iter_shard` then streams one shard's images
in mini-batches inside the actor.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycollapse.data.vectors import VECTOR_COLUMN, column_vectors, is_vector_schema
from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.images import decode_column, list_image_files

SHARD_ROWS = 4096  # rows per shard when INPUT is a .npy or an image folder


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: rows ``start:stop`` of a source, written to ``out``.

    ``kind``: ``parquet`` (a Parquet shard: ``source`` is its URI, ids from its ``id`` column or
    ``offset + row``), ``npy`` (rows of a .npy image array) or ``files`` (``files``: image paths
    joined by newlines). Plain str/int fields so it travels as a Ray Data row.
    """

    kind: str
    source: str
    start: int
    stop: int
    out: str
    offset: int = 0
    files: str = ""
    has_id: bool = False
    has_label: bool = False
    vectors: bool = False  # a Parquet shard of vectors (``vector`` column) instead of images

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def to_item(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def columns(cls) -> tuple[str, ...]:
        """The fields, as the columns of a Ray Data row."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> ShardTask:
        """Back from a row whose values may be numpy scalars."""
        conv = {
            "kind": str, "source": str, "out": str, "files": str,
            "start": int, "stop": int, "offset": int, "has_id": bool, "has_label": bool,
            "vectors": bool,
        }  # fmt: skip
        return cls(**{k: f(spec[k]) for k, f in conv.items()})


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) :].lstrip("/") if path.startswith(root + "/") else path.rsplit("/", 1)[-1]


def plan_shards(
    input_uri: str, out_uri: str, *, shard_rows: int = SHARD_ROWS, image_column: str = "image"
) -> list[ShardTask]:
    """The shards of INPUT (Parquet shards, a Parquet file, a .npy of images, an image folder)."""
    text = str(input_uri)
    local = "://" not in text
    if local and text.endswith(".npy"):
        return _plan_npy(Path(text), out_uri, shard_rows)
    if local and Path(text).is_dir() and not storage.list_files(text, ".parquet"):
        files = [str(f) for f in list_image_files(text)]  # clear error for a folder without images
        tasks = []
        for i, lo in enumerate(range(0, len(files), shard_rows)):
            chunk = files[lo : lo + shard_rows]
            out = storage.join(out_uri, f"part-{i:05d}.parquet")
            tasks.append(
                ShardTask(
                    "files", text, lo, lo + len(chunk), out, offset=lo, files="\n".join(chunk)
                )
            )
        return tasks
    if not storage.exists(text):
        raise UserInputError(
            f"input '{text}' does not exist; pass a folder of Parquet image shards, a .parquet file, "
            "a .npy of images or a folder of image files."
        )
    shards = storage.list_files(text, ".parquet")
    if not shards:
        raise UserInputError(
            f"input '{text}' holds no Parquet shards or images; pass a folder of Parquet image shards "
            "(as written by `raycollapse generate`), a .npy of images or an image folder."
        )
    tasks, offset = [], 0
    for shard in shards:
        fs, path = storage.open_fs(shard)
        try:
            md = pq.read_metadata(path, filesystem=fs)
        except (pa.ArrowInvalid, OSError) as exc:
            raise UserInputError(f"cannot read Parquet shard '{shard}': {exc}") from None
        names = md.schema.to_arrow_schema().names
        vectors = image_column not in names and is_vector_schema(names)
        if image_column not in names and not vectors:
            extra = (
                " It already holds embeddings: use it directly with `raycollapse entropy` / `select`."
                if "embedding" in names
                else ""
            )
            raise UserInputError(
                f"Parquet shard '{shard}' has no '{image_column}' column (it has: {', '.join(names)}); "
                f"embed needs images as encoded bytes in an '{image_column}' column, as `raycollapse "
                f"generate` writes them.{extra}"
            )
        out = storage.join(
            out_uri, _relative(shard, text) if shard != text else shard.rsplit("/", 1)[-1]
        )
        has_id, has_label = "id" in names, "label" in names
        tasks.append(
            ShardTask("parquet", shard, 0, md.num_rows, out, offset, "", has_id, has_label, vectors)
        )
        offset += md.num_rows
    return tasks


def _plan_npy(path: Path, out_uri: str, shard_rows: int) -> list[ShardTask]:
    if not path.is_file():
        raise UserInputError(f"input '{path}' does not exist; pass an existing .npy of images.")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        raise UserInputError(f"cannot read '{path}' as a numeric .npy array ({exc}).") from None
    if arr.ndim == 2:
        raise UserInputError(
            f"'{path}' has shape {arr.shape}: that is N x d features, not images; use it directly with "
            "`raycollapse entropy` / `select`, or pass images (N x H x W or N x H x W x C)."
        )
    if arr.ndim not in (3, 4) or len(arr) == 0:
        raise UserInputError(
            f"'{path}' has shape {arr.shape}; embed needs images N x H x W or N x H x W x C."
        )
    n, source = len(arr), str(path.absolute())
    return [
        ShardTask(
            "npy",
            source,
            lo,
            min(lo + shard_rows, n),
            storage.join(out_uri, f"part-{i:05d}.parquet"),
            lo,
        )
        for i, lo in enumerate(range(0, n, shard_rows))
    ]


def iter_shard(
    task: ShardTask, batch_size: int, image_column: str = "image"
) -> Iterator[tuple[np.ndarray, list[np.ndarray], pa.Array | None]]:
    """Mini-batches ``(ids, images, labels)`` of a shard; memory is one mini-batch of pixels.

    For a vector shard ``images`` is a float32 ``N x d`` array of the vectors."""
    if task.kind == "npy":
        arr = np.load(task.source, mmap_mode="r", allow_pickle=False)
        for lo in range(task.start, task.stop, batch_size):
            hi = min(lo + batch_size, task.stop)
            block = np.asarray(arr[lo:hi])
            yield (
                np.arange(lo, hi, dtype=np.int64),
                list(block if block.ndim == 4 else block[..., None]),
                None,
            )
        return
    if task.kind == "files":
        files = task.files.split("\n")
        for lo in range(0, len(files), batch_size):
            chunk = files[lo : lo + batch_size]
            ids = np.arange(task.offset + lo, task.offset + lo + len(chunk), dtype=np.int64)
            yield ids, decode_column([Path(f) for f in chunk]), None
        return
    fs, path = storage.open_fs(task.source)
    if task.vectors:
        image_column = VECTOR_COLUMN
    columns = (
        [image_column] + (["id"] if task.has_id else []) + (["label"] if task.has_label else [])
    )
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        seen = 0
        for rb in pf.iter_batches(batch_size=batch_size, columns=columns):
            col = rb.column(image_column)
            if not task.vectors and not (
                pa.types.is_binary(col.type) or pa.types.is_large_binary(col.type)
            ):
                raise UserInputError(
                    f"column '{image_column}' of '{task.source}' has type {col.type}; expected encoded "
                    "image bytes (PNG), as `raycollapse generate` writes them."
                )
            n = rb.num_rows
            if task.has_id:
                id_col = rb.column("id")
                if id_col.null_count:
                    raise UserInputError(f"'{task.source}' has null ids; every row needs an id.")
                ids = id_col.to_numpy(zero_copy_only=False).astype(np.int64)
            else:
                ids = np.arange(task.offset + seen, task.offset + seen + n, dtype=np.int64)
            if task.vectors:
                images = column_vectors(col, task.source)
            else:
                images = decode_column(col, name=task.source, first_row=seen)
            yield ids, images, (rb.column("label") if task.has_label else None)
            seen += n
