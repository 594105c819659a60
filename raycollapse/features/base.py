"""The extractor classes and the pre-processing every model family shares.

An :class:`Extractor` maps uint8 (or float in [0, 1]) images ``N x H x W [x C]`` to ``N x dim``
embeddings; :class:`TorchExtractor` wraps a network with its ``prepare`` (images -> model input)
and ``forward``. The families live in :mod:`~raycollapse.features.clip`,
:mod:`~raycollapse.features.dinov2` and :mod:`~raycollapse.features.inception`;
:func:`raycollapse.features.extractors.build_extractor` picks one.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from raycollapse.data.inputs import images_to_pixels
from raycollapse.errors import UserInputError
from raycollapse.features.weights import RANDOM_SEED, ResolvedWeights

if TYPE_CHECKING:
    import torch

__all__ = [
    "Extractor",
    "PixelExtractor",
    "TorchExtractor",
    "load_error",
    "resize_crop_normalise",
    "seeded",
    "to_rgb255",
]


class Extractor(abc.ABC):
    """Callable ``images (N, H, W[, C]) -> (N, dim)`` embeddings of ``dtype``.

    ``dim`` / ``input_size`` are ``None`` for ``pixel`` (they follow the images' own size).
    """

    def __init__(
        self,
        name: str,
        weights: ResolvedWeights,
        *,
        dim: int | None,
        input_size: int | None,
        device: str,
        dtype: str,
        normalize: bool,
    ) -> None:
        self.name = name
        self.weights = weights
        self.dim = dim
        self.input_size = input_size
        self.device = device
        self.dtype = np.dtype(dtype)
        self.normalize = normalize

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.ndim not in (3, 4) or len(images) == 0:
            raise UserInputError(
                f"{self.name} extractor expects a non-empty N x H x W or N x H x W x C image array, "
                f"got shape {images.shape}."
            )
        feats = self._features(images).astype(np.float32, copy=False)
        if self.normalize:
            norms = np.linalg.norm(feats, axis=1, keepdims=True)
            feats = feats / np.maximum(norms, np.float32(1e-12))
        return feats.astype(self.dtype, copy=False)

    @abc.abstractmethod
    def _features(self, images: np.ndarray) -> np.ndarray:
        """The raw float features (N, dim) of validated images."""

    def __repr__(self) -> str:
        return f"Extractor({self.name}, dim={self.dim}, weights={self.weights.describe()}, device={self.device})"


class PixelExtractor(Extractor):
    """Raw pixels, exactly ``images_to_pixels`` (uint8 / 255), so entropies match ``raycollapse entropy``."""

    def _features(self, images: np.ndarray) -> np.ndarray:
        return images_to_pixels(images)


class TorchExtractor(Extractor):
    """A torch network behind ``prepare`` (uint8 NHWC -> model input) and ``forward``."""

    def __init__(
        self,
        name: str,
        weights: ResolvedWeights,
        *,
        net: torch.nn.Module | None,
        forward: Callable[[torch.Tensor], torch.Tensor],
        prepare: Callable[[np.ndarray], torch.Tensor],
        dim: int,
        input_size: int,
        device: str,
        dtype: str,
        normalize: bool,
        amp: bool,
    ) -> None:
        super().__init__(
            name,
            weights,
            dim=dim,
            input_size=input_size,
            device=device,
            dtype=dtype,
            normalize=normalize,
        )
        self.net = net  # kept so tests and callers can inspect / save the module
        self._forward = forward
        self._prepare = prepare
        self._amp = amp and device.startswith("cuda")

    def _features(self, images: np.ndarray) -> np.ndarray:
        import torch

        x = self._prepare(images)
        with torch.inference_mode():
            ctx = (
                torch.autocast("cuda", dtype=torch.float16)
                if self._amp
                else contextlib.nullcontext()
            )
            with ctx:
                out = self._forward(x)
        return out.float().reshape(len(images), -1).cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Pre-processing: uint8 (or float in [0, 1]) NHW[C] -> float RGB in [0, 255], then model inputs


def to_rgb255(images: np.ndarray) -> np.ndarray:
    """``N x H x W [x C]`` -> float32 ``N x H x W x 3`` in [0, 255].

    Grayscale repeats its channel, an alpha channel is dropped; float images are taken to be in
    [0, 1] (what ``images_to_pixels`` produces).
    """
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    channels = arr.shape[-1]
    if channels in (2, 4):  # gray+alpha, RGBA: drop alpha (PIL convert("RGB") does the same)
        arr = arr[..., : channels - 1]
        channels -= 1
    if channels == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif channels != 3:
        raise UserInputError(
            f"images have {channels} channels; expected 1 (gray), 3 (RGB) or 4 (RGBA)."
        )
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating):
        return np.clip(arr.astype(np.float32) * 255.0, 0.0, 255.0)
    raise UserInputError(f"images have dtype {arr.dtype}; expected uint8 or float in [0, 1].")


def resize_crop_normalise(
    size: int, mean: tuple, std: tuple, device: str
) -> Callable[[np.ndarray], torch.Tensor]:
    """Shorter side -> ``size`` (bicubic, antialias: close to PIL), centre crop, then (x - mean) / std."""
    import torch
    import torch.nn.functional as F

    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)

    def prepare(images: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(to_rgb255(images)).to(device).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
            x = F.interpolate(
                x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True
            )
            top, left = (new_h - size) // 2, (new_w - size) // 2
            # clamp: torchvision's PIL pipeline yields uint8, so bicubic overshoot is cut there too
            x = x[..., top : top + size, left : left + size].clamp(0.0, 255.0)
        return ((x / 255.0 - mean_t) / std_t).contiguous()

    return prepare


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """Random weights from ``RANDOM_SEED`` without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def load_error(w: ResolvedWeights, exc: Exception) -> UserInputError:
    """The error for a weights file that does not fit the architecture, naming both."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    # torch's load_state_dict opens with "Error(s) in loading state_dict for X:"; the next
    # line says what (missing / unexpected keys, size mismatch).
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    first = lines[0] if lines else type(exc).__name__
    return UserInputError(
        f"{w.name} weights '{w.path}' do not fit the {w.model} architecture ({first[:300]}); pass the "
        f"checkpoint of {w.model} (or set features.clip_model / features.dinov2_model to match the file)."
    )
