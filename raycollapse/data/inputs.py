"""Reading the INPUT of ``raycollapse entropy`` / ``select``: embeddings or images -> features.

INPUT may be

- a ``.npy`` array: ``N x d`` embeddings, or images ``N x H x W`` / ``N x H x W x C`` (uint8 or
  float), flattened to pixel features;
- a Parquet file, or a folder of Parquet shards, with an ``embedding`` column (list of floats) or an
  ``image`` column (encoded image bytes, or arrays of pixel values);
- a folder of image files (pixel features).

Pixel features: uint8 values are scaled to [0, 1] (``v / 255``); float images are used as given.
Rows keep the input's order (Parquet shards in sorted file-name order), so row ``i`` of the
features is row ``i`` of the input, and a selection's indices refer to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from raycollapse.errors import UserInputError
from raycollapse.io import storage
from raycollapse.io.images import decode_column, list_image_files
from raycollapse.io.parquet import list_column_to_matrix

EMBEDDING_COLUMN = "embedding"
IMAGE_COLUMN = "image"


@dataclass(frozen=True)
class LoadedFeatures:
    """Features read from an INPUT, one row per input row."""

    features: np.ndarray  # float32 (N, d)
    ids: np.ndarray | None  # int64 (N,) when the input carries an ``id`` column
    kind: str  # "embedding" or "pixels"
    source: str


def load_features(
    path: str | Path, *, embedding_column: str = EMBEDDING_COLUMN, image_column: str = IMAGE_COLUMN
) -> LoadedFeatures:
    """Read any supported INPUT (see module docstring) into a float32 feature matrix."""
    p = Path(path)
    if not p.exists():
        raise UserInputError(
            f"input '{p}' does not exist; pass a .npy file, a Parquet file or folder, or an image folder."
        )
    if p.is_file() and p.suffix == ".npy":
        return _from_npy(p)
    if p.is_file() and p.suffix == ".parquet":
        return _from_parquet([p], p, embedding_column, image_column)
    if p.is_dir():
        shards = sorted(p.rglob("*.parquet"))
        if shards:
            return _from_parquet(shards, p, embedding_column, image_column)
        files = list_image_files(p)  # raises a clear error for an empty folder
        return LoadedFeatures(_stack_pixels(decode_column(files), str(p)), None, "pixels", str(p))
    raise UserInputError(
        f"input '{p}' is not a supported format; use a .npy array, a .parquet file, "
        "a folder of Parquet shards or a folder of image files."
    )


def images_to_pixels(images: np.ndarray) -> np.ndarray:
    """``N x ...`` images -> float32 ``N x (prod of the rest)``; uint8 scaled by 1/255."""
    arr = np.asarray(images)
    flat = arr.reshape(arr.shape[0], -1)
    if arr.dtype == np.uint8:
        return flat.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(arr.dtype, np.number):
        raise UserInputError(f"images have non-numeric dtype {arr.dtype}; expected uint8 or float.")
    return flat.astype(np.float32)


def _from_npy(p: Path) -> LoadedFeatures:
    try:
        arr = np.load(p, allow_pickle=False)
    except ValueError as exc:
        raise UserInputError(
            f"cannot read '{p}' as a numeric .npy array ({exc}); save it with np.save of a numeric array."
        ) from None
    if arr.ndim == 2:
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise UserInputError(
                f"'{p}' has non-numeric dtype {arr.dtype}; expected float embeddings."
            )
        return LoadedFeatures(arr.astype(np.float32, copy=False), None, "embedding", str(p))
    if arr.ndim in (3, 4):
        return LoadedFeatures(images_to_pixels(arr), None, "pixels", str(p))
    raise UserInputError(
        f"'{p}' has shape {arr.shape}; expected N x d embeddings, N x H x W or N x H x W x C images."
    )


def _from_parquet(
    files: list[Path], root: Path, embedding_column: str, image_column: str
) -> LoadedFeatures:
    try:
        dataset = pads.dataset([str(f) for f in files], format="parquet")
        names = dataset.schema.names
    except (pa.ArrowInvalid, OSError) as exc:
        raise UserInputError(f"cannot read Parquet input '{root}': {exc}") from None
    if embedding_column in names:
        column, kind = embedding_column, "embedding"
    elif image_column in names:
        column, kind = image_column, "pixels"
    else:
        raise UserInputError(
            f"Parquet input '{root}' has neither an '{embedding_column}' nor an '{image_column}' column "
            f"(it has: {', '.join(names)}); write embeddings as '{embedding_column}' or images as "
            f"'{image_column}', or run `raycollapse embed` first."
        )
    wanted = [column] + (["id"] if "id" in names else [])
    table = pa.concat_tables(storage.read_parquet(str(f), columns=wanted) for f in files)
    values = table.column(column).combine_chunks()
    if kind == "embedding":
        feats = list_column_to_matrix(values, column, str(root))
    elif pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):
        feats = _stack_pixels(decode_column(values, name=str(root)), str(root))
    else:
        feats = images_to_pixels(list_column_to_matrix(values, column, str(root), dtype=None))
    ids = table.column("id").to_numpy().astype(np.int64) if "id" in wanted else None
    return LoadedFeatures(feats, ids, kind, str(root))


def _stack_pixels(images: list[np.ndarray], source: str) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
        first, other = (
            images[0].shape,
            next(im.shape for im in images if im.shape != images[0].shape),
        )
        raise UserInputError(
            f"images in '{source}' differ in size ({first} and {other}) so their pixel rows differ in "
            "dimension; resize them to one size (or use `raycollapse embed` to get embeddings)."
        )
    return images_to_pixels(np.stack(images))
