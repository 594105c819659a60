"""Sample grids: many small uint8 images tiled into one PNG (``samples.png``, ``generate --grid``)."""

from __future__ import annotations

import numpy as np

from raycollapse.errors import UserInputError


def image_grid(
    images: np.ndarray, columns: int | None = None, pad: int = 1, pad_value: int = 128
) -> np.ndarray:
    """Tile uint8 ``N x H x W x C`` images into one ``uint8`` image (gray padding between tiles)."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[:, :, :, None]
    n, h, w, c = arr.shape
    if n == 0:
        raise UserInputError("no images to put in a grid.")
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        grid[top : top + h, left : left + w] = arr[i]
    return grid[:, :, 0] if c == 1 else grid


def save_grid(images: np.ndarray, path: str, *, min_side: int = 256) -> None:
    """Write a PNG grid, enlarged with nearest-neighbour so that small images stay visible."""
    from PIL import Image

    grid = image_grid(images)
    scale = max(1, int(np.ceil(min_side / max(grid.shape[:2]))))
    pil = Image.fromarray(grid)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    pil.save(path, format="PNG")
