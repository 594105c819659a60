"""torchvision's ImageNet Inception-v3 as the paper's FID code uses it (``fid_torchvision``).

The paper's ``FID.py`` builds ``torchvision.models.inception_v3(pretrained=True,
transform_input=False)``, replaces ``fc`` by the identity (2048-d pool features) and feeds it PIL
images resized to 299 x 299 (bilinear), ``ToTensor`` and ``Normalize(0.5, 0.5)``: inputs in
[-1, 1]. This is a different network from clean-fid's TensorFlow Inception
(:mod:`~raycollapse.features.inception`), so its FID values differ from ``fid``.

Weights (``metrics.torchvision_inception``): ``None`` looks for torchvision's ``IMAGENET1K_V1``
file in torch hub's checkpoints folder (where torchvision downloads it), a path loads that file,
``"none"`` builds the architecture with random He-initialised weights from a fixed seed (tests).
Nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from raycollapse.errors import UserInputError
from raycollapse.features.base import load_error, seeded, to_rgb255
from raycollapse.features.weights import (
    ResolvedWeights,
    WeightCaches,
    _from_file,
    _looks_like_path,
    load_state_dict_file,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "TORCHVISION_INCEPTION_FILE",
    "TorchvisionInception",
    "resolve_torchvision_inception",
    "torchvision_inception_v3",
]

TORCHVISION_TAG = "IMAGENET1K_V1"
TORCHVISION_INCEPTION_URL = "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth"
TORCHVISION_INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"
SIZE = 299
MODEL = "inception-v3-torchvision"


def resolve_torchvision_inception(
    pretrained: str | None, caches: WeightCaches | None = None
) -> ResolvedWeights:
    """Resolve the weights offline: ``None`` / ``IMAGENET1K_V1`` (torch hub's cache), a file, or
    ``"none"``. Raises ``UserInputError`` naming where it looked and how to supply the file."""
    text = None if pretrained is None else str(pretrained).strip()
    hint = (
        f"Download torchvision's Inception-v3 ({TORCHVISION_INCEPTION_URL}) on a machine with internet "
        f"and pass metrics.torchvision_inception=/path/to/{TORCHVISION_INCEPTION_FILE}."
    )
    if text is not None and text.lower() == "none":
        return ResolvedWeights("inception_torchvision", MODEL, None, None, "random")
    if text is not None and (_looks_like_path(text) or Path(text).exists()):
        return _from_file("inception_torchvision", MODEL, text, hint)
    if text is not None and text != TORCHVISION_TAG:
        raise UserInputError(
            f"'{text}' is neither the torchvision tag '{TORCHVISION_TAG}' nor an existing file; pass "
            f"metrics.torchvision_inception={TORCHVISION_TAG}, a file, or none."
        )
    found_in = caches or WeightCaches.default()
    cand = found_in.torch_checkpoints / TORCHVISION_INCEPTION_FILE
    if cand.is_file():
        return ResolvedWeights("inception_torchvision", MODEL, TORCHVISION_TAG, str(cand), "torch")
    raise UserInputError(
        f"torchvision Inception-v3 weights ('{TORCHVISION_TAG}') are not available on this machine "
        f"(no download is attempted); looked in: {cand}. {hint} "
        "metrics.torchvision_inception=none uses random weights (tests only)."
    )


def torchvision_inception_v3() -> torch.nn.Module:
    """torchvision's Inception-v3 (1000 classes, auxiliary head, no input transform), random
    He-initialised weights from a fixed seed; the ``IMAGENET1K_V1`` state dict loads strictly."""
    import torch
    import torchvision

    with seeded():
        net = torchvision.models.inception_v3(
            weights=None, aux_logits=True, init_weights=False, transform_input=False
        )
        # He init keeps random activations at a usable scale through eval-mode BatchNorm.
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return net


def _prepare(device: str) -> Callable[[np.ndarray], torch.Tensor]:
    """FID.py's transform: PIL bilinear resize to 299 x 299, ``/ 255``, ``(x - 0.5) / 0.5``."""
    import torch
    from PIL import Image

    def prepare(images: np.ndarray) -> torch.Tensor:
        rgb = np.clip(np.rint(to_rgb255(images)), 0, 255).astype(np.uint8)
        arr = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BILINEAR))
                for im in rgb
            ]
        )
        x = torch.from_numpy(arr).to(device).permute(0, 3, 1, 2).float().div(255.0)
        return x.sub(0.5).div(0.5).contiguous()

    return prepare


class TorchvisionInception:
    """``images (N, H, W[, C]) -> (N, 2048)`` float64 pool features of torchvision's Inception-v3."""

    def __init__(self, w: ResolvedWeights, device: str = "cpu", batch_size: int = 256) -> None:
        import torch

        net = torchvision_inception_v3()
        if not w.random:
            try:
                net.load_state_dict(load_state_dict_file(str(w.path)), strict=True)
            except (RuntimeError, KeyError) as exc:
                raise load_error(w, exc) from None
        net.fc = torch.nn.Identity()
        self.net = net.to(device).eval()
        self.weights = w
        self.batch_size = int(batch_size)
        self._prepare = _prepare(device)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(images), self.batch_size):
                x = self._prepare(np.asarray(images[s : s + self.batch_size]))
                out.append(self.net(x).double().cpu().numpy())
        return np.concatenate(out)
