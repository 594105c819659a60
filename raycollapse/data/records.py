"""Training data as records: ``{id, image (uint8 H x W x C), label (nullable), source}``.

Sources (``data.source``; readers in ``data/sources.py``):

- ``digits``: scikit-learn's 1,797 8x8 digits, shipped with scikit-learn (the embedded default).
  Values 0..16 become uint8 as ``round(v * 255 / 16)``.
- ``cifar10``: a CIFAR-10 python-batches folder (``data_batch_1`` ... ``data_batch_5``) or one
  batch file; read with a restricted unpickler that only rebuilds numpy arrays.
- ``folder``: any folder of image files (FFHQ PNGs, ...), recursive, sorted by path; no labels.
- ``parquet``: a Parquet file or folder of shards with an image column holding encoded image bytes
  (PNG, JPEG, ...) or pixel arrays (nested ``H x W (x C)`` lists, or flat lists of a square image
  with 1 or 3 channels), and an optional integer label column.

Every image is converted to ``data.channels`` (1 = grayscale "L", 3 = RGB), its shorter side is
resized to ``data.resolution`` (PIL Lanczos when shrinking, bicubic when enlarging) and the
centre is cropped to ``resolution x resolution``. Images whose shorter side is below the
resolution are upscaled, skipped or refused by ``data.on_small`` (digits always upscale: their
native size is 8). Unreadable files are skipped and counted, or refused naming the file, by
``data.on_corrupt``; a run never crashes half way through a folder.

``data.n`` takes a seeded subset: a permutation from ``data.seed``, walked in order, keeping the
first ``n`` readable images (so skipped files are replaced, not lost), then sorted by id. Ids are
the index in the full source (file order for folders, row order for Parquet and CIFAR).

Parquet encoding written by ``Records.to_arrow_table``: ``id`` int64, ``image`` PNG bytes (lossless,
portable, small), ``label`` nullable int64, ``source`` string.

``data/sources.py: load_records`` reads a whole source into memory (the loop's training sets).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from raycollapse.errors import UserInputError


@dataclass
class Records:
    """A set of images in memory. ``labels`` is -1 where there is none."""

    ids: np.ndarray  # int64 (N,)
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,), -1 = no label
    source: str
    skipped: int = 0  # unreadable (or too small, with on_small=skip) images left out
    skipped_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def __post_init__(self) -> None:
        n = len(self.ids)
        if self.images.shape[0] != n or self.labels.shape[0] != n:
            raise ValueError("ids, images and labels must have the same length")
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise ValueError("images must be uint8 N x H x W x C")

    @property
    def has_labels(self) -> bool:
        return bool(len(self.labels)) and bool((self.labels >= 0).all())

    def to_arrow_table(self) -> pa.Table:
        """``{id: int64, image: PNG bytes, label: nullable int64, source: string}``."""
        return pa.table(
            {
                "id": pa.array(self.ids, pa.int64()),
                "image": pa.array([encode_png(im) for im in self.images], pa.binary()),
                "label": pa.array(self.labels, pa.int64(), mask=self.labels < 0),
                "source": pa.array([self.source] * len(self), pa.string()),
            }
        )


def encode_png(image: np.ndarray) -> bytes:
    """uint8 ``H x W x C`` (C = 1 or 3) -> PNG bytes."""
    arr = image[:, :, 0] if image.shape[2] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def convert_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """uint8 ``H x W x C`` -> ``channels`` (ITU-R 601 luma for RGB -> gray, as PIL's "L")."""
    if image.ndim == 2:
        image = image[:, :, None]
    c = image.shape[2]
    if c == channels:
        return image
    if c == 4:
        image, c = image[:, :, :3], 3
    if c == 1 and channels == 3:
        return np.repeat(image, 3, axis=2)
    if c == 3 and channels == 1:
        return np.asarray(Image.fromarray(image).convert("L"))[:, :, None]
    raise UserInputError(f"cannot convert an image with {image.shape[2]} channels to {channels}.")


class TooSmall(Exception):
    """An image below the resolution with ``on_small=error|skip`` (handled by the callers)."""


def prepare_image(
    image: np.ndarray, *, resolution: int, channels: int, on_small: str = "upscale"
) -> np.ndarray:
    """Channels, then resize the shorter side to ``resolution``, then centre-crop: uint8 ``R x R x C``.

    Raises ``TooSmall`` for an image below the resolution unless ``on_small == "upscale"``.
    """
    img = convert_channels(image, channels)
    h, w = img.shape[:2]
    if min(h, w) < resolution and on_small != "upscale":
        raise TooSmall(f"{w}x{h}")
    if (h, w) != (resolution, resolution):
        scale = resolution / min(h, w)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        # Lanczos to shrink (least aliasing); bicubic to enlarge (less ringing than Lanczos on 8x8).
        resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BICUBIC
        pil = Image.fromarray(img[:, :, 0] if channels == 1 else img)
        arr = np.asarray(pil.resize((nw, nh), resample=resample))
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
        arr = arr[top : top + resolution, left : left + resolution]
        img = arr[:, :, None] if arr.ndim == 2 else arr
    return np.ascontiguousarray(img, dtype=np.uint8)


def prepare_checked(
    image: np.ndarray, *, resolution: int, channels: int, on_small: str, name: str
) -> np.ndarray:
    """``prepare_image`` with the ``on_small=error`` message naming the image."""
    try:
        return prepare_image(image, resolution=resolution, channels=channels, on_small=on_small)
    except TooSmall as exc:
        if on_small == "skip":
            raise
        raise UserInputError(
            f"image '{name}' is {exc}, smaller than data.resolution={resolution}; set data.on_small=upscale "
            "(resize up) or data.on_small=skip, or lower data.resolution."
        ) from None


def subset_order(total: int, n: int | None, seed: int) -> np.ndarray:
    """The order in which candidates are tried: all ids, or a seeded permutation when ``n`` is set."""
    if n is None:
        return np.arange(total, dtype=np.int64)
    if n < 1:
        raise UserInputError(f"data.n must be >= 1 (or null for all), got {n}.")
    if n > total:
        raise UserInputError(
            f"data.n={n} but the source holds only {total} images; lower data.n or use null."
        )
    return np.random.default_rng(seed).permutation(total).astype(np.int64)
