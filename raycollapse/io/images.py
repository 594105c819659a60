"""Reading images (files, encoded bytes, pixel arrays) into uint8 arrays, with errors that name
the file or row.

Shared by the data sources (training data), the feature loaders (``raycollapse entropy DIR``) and
the stages: :func:`decode_column` is the one decoder of an image column.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from raycollapse.errors import UserInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path so ids are deterministic."""
    root = Path(folder)
    if not root.exists():
        raise UserInputError(f"image folder '{root}' does not exist; pass an existing folder.")
    if not root.is_dir():
        raise UserInputError(f"'{root}' is not a folder of images.")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(
            f"image folder '{root}' holds no image files ({', '.join(IMAGE_SUFFIXES)}); "
            "point to a folder that contains images."
        )
    return files


def decode_image(
    data: bytes | str | Path, channels: int | None = None, *, name: str = ""
) -> np.ndarray:
    """Decode encoded bytes or a file path to a uint8 array ``H x W x C``.

    ``channels``: 1 converts to grayscale ("L"), 3 to RGB, ``None`` keeps 1 or 3 as stored
    (palette and alpha images become RGB). Raises ``UserInputError`` naming the file when it is
    unreadable or truncated.
    """
    label = name or (str(data) if isinstance(data, str | Path) else "<bytes>")
    try:
        src = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
        with Image.open(src) as img:
            img.load()  # forces a full decode so truncated files fail here, not later
            mode = {1: "L", 3: "RGB"}.get(channels or 0)
            if mode is None:
                mode = "L" if img.mode in ("L", "1", "I", "I;16", "F") else "RGB"
            arr = np.asarray(img.convert(mode), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise UserInputError(
            f"cannot read image '{label}': {exc}. Remove or replace the file."
        ) from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _array_image(value: Any, name: str) -> np.ndarray:
    """A pixel-array cell -> uint8 ``H x W x C`` (rules in :func:`decode_value`)."""
    arr = np.asarray(value)
    if arr.dtype == object or arr.ndim not in (1, 2, 3):
        raise UserInputError(
            f"{name}: image array must be H x W, H x W x C or a flat list of pixels."
        )
    if arr.ndim == 1:
        for c in (1, 3):
            side = int(round((arr.size / c) ** 0.5))
            if side * side * c == arr.size:
                arr = arr.reshape(side, side, c)
                break
        else:
            raise UserInputError(
                f"{name}: a flat image of {arr.size} values is not a square 1- or 3-channel image."
            )
    if arr.dtype.kind not in "biuf":  # complex would lose its imaginary part; strings, dates
        raise UserInputError(f"{name}: image arrays must hold real numbers, not {arr.dtype}.")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise UserInputError(f"{name}: the image holds NaN or infinite values.")
        if arr.min() < 0 or arr.max() > 1:
            raise UserInputError(f"{name}: float image arrays must be in [0, 1].")
        arr = np.round(arr * 255)
    elif arr.size and (arr.min() < 0 or arr.max() > 255):
        raise UserInputError(f"{name}: integer image arrays must be in 0..255.")
    arr = arr.astype(np.uint8)
    return arr[:, :, None] if arr.ndim == 2 else arr


def decode_value(value: Any, channels: int | None = None, *, name: str) -> np.ndarray:
    """One image cell -> uint8 ``H x W x C``: encoded bytes and ``Path`` files are decoded
    (:func:`decode_image`, converted to ``channels``); pixel arrays (nested ``H x W (x C)``, or
    flat square 1- or 3-channel lists; floats in [0, 1] scaled by 255, integers in 0..255) keep
    their channels (``prepare_image`` converts them). A null or malformed cell raises
    ``UserInputError`` naming ``name``."""
    if value is None:
        raise UserInputError(f"{name}: the image is null; drop or fill that row.")
    if isinstance(value, bytes | bytearray):
        return decode_image(bytes(value), channels, name=name)
    if isinstance(value, Path):  # a file; a str cell is data, never taken for a path
        return decode_image(value, channels, name=str(value))
    return _array_image(value, name)


def iter_column(
    values: Any,
    channels: int | None = None,
    *,
    name: str = "",
    first_row: int = 0,
    row_names: Sequence[str] | None = None,
) -> Iterator[np.ndarray]:
    """The images of a column one at a time (memory: one decoded image); see :func:`decode_column`."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        if hasattr(values, "to_numpy_ndarray"):  # fixed-shape tensor column: one numeric array
            values = values.to_numpy_ndarray()
        else:
            values = values.to_pylist()
    if isinstance(values, np.ndarray) and values.dtype != object:
        # N x H x W [x C] numbers: the rows as they are (a tensor batch of uint8 images)
        yield from values if values.ndim == 4 else values[..., None]
        return
    for i, value in enumerate(values):
        label = row_names[i] if row_names is not None else f"{name} row {first_row + i}"
        yield decode_value(value, channels, name=label)


def decode_column(
    values: Any,
    channels: int | None = None,
    *,
    name: str = "",
    first_row: int = 0,
    row_names: Sequence[str] | None = None,
) -> list[np.ndarray]:
    """An image column -> a list of uint8 ``H x W x C`` arrays, one per row.

    ``values``: a pyarrow array (binary, lists, or a fixed-shape tensor column), a numeric
    numpy array ``N x H x W [x C]`` (rows kept as they are), or a sequence of cells: encoded
    bytes, ``Path`` files, pixel arrays (see :func:`decode_value`). ``channels`` converts encoded
    images. Errors name the row: ``row_names[i]`` when given, else ``"{name} row {first_row + i}"``.
    """
    return list(iter_column(values, channels, name=name, first_row=first_row, row_names=row_names))
