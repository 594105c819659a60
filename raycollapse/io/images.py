"""Reading image files into uint8 arrays, with errors that name the file.

Shared by the data sources (training data) and the feature loaders (``raycollapse entropy DIR``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
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
