"""Feature extractors: uint8 images -> embedding vectors (no Ray here; the stage wraps these).

=========  ==============================================  =====  ===========  ==================
name       network                                         dim    input        normalisation
=========  ==============================================  =====  ===========  ==================
pixel      none: ``images_to_pixels`` (v / 255, flat)      H*W*C  native       none
clip       open_clip image tower (default ViT-B-32)        512    224 x 224    OpenAI CLIP mean/std
dinov2     timm ViT-S/14 DINOv2, CLS token                 384    224 x 224    ImageNet mean/std
inception  TF FID Inception-v3 (clean-fid), 2048-d pool    2048   299 x 299    (x - 128) / 128
=========  ==============================================  =====  ===========  ==================

Every model extractor turns grayscale into RGB (the channel repeated), resizes on the device the
way its model was trained (shorter side, bicubic with antialiasing, centre crop; Inception:
clean-fid's resize, see :mod:`~raycollapse.features.inception`), and returns the raw
(un-normalised) features unless ``normalize=True``. ``pretrained="none"`` builds the same
architecture with random weights from a fixed seed (what the tests use). One module per family:
:mod:`~raycollapse.features.clip`, :mod:`~raycollapse.features.dinov2`,
:mod:`~raycollapse.features.inception`; shared classes in :mod:`~raycollapse.features.base`.

Weights are resolved by ``check_weights_available`` (``extractor_weights``), which the driver
calls before any work; ``build_extractor`` repeats it on each worker and loads the result.
"""

from __future__ import annotations

from raycollapse.errors import UserInputError
from raycollapse.features.base import Extractor, PixelExtractor
from raycollapse.features.clip import clip_extractor
from raycollapse.features.dinov2 import dinov2_extractor
from raycollapse.features.inception import inception_extractor
from raycollapse.features.weights import (
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINOV2_MODEL,
    check_weights_available,
)

__all__ = ["Extractor", "build_extractor", "extractor_from_config"]


def build_extractor(
    name: str,
    pretrained: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    clip_model: str = DEFAULT_CLIP_MODEL,
    dinov2_model: str = DEFAULT_DINOV2_MODEL,
    dinov2_image_size: int = 224,
    normalize: bool = False,
    amp: bool = False,
    dinov2_preprocess: str = "timm",
) -> Extractor:
    """Build the extractor ``name`` with weights ``pretrained`` (tag, file, ``"none"``; None = default).

    ``dinov2_preprocess``: timm or hf (features.dinov2_preprocess, :mod:`~raycollapse.features.dinov2`).
    """
    if dtype not in ("float32", "float16"):
        raise UserInputError(f"features dtype '{dtype}' is not supported; use float32 or float16.")
    w = check_weights_available(name, pretrained, clip_model=clip_model, dinov2_model=dinov2_model)
    common = dict(device=device, dtype=dtype, normalize=normalize)
    if name == "pixel":
        return PixelExtractor("pixel", w, dim=None, input_size=None, **common)
    if name == "clip":
        return clip_extractor(w, amp=amp, **common)
    if name == "dinov2":
        return dinov2_extractor(
            w, image_size=dinov2_image_size, amp=amp, preprocess=dinov2_preprocess, **common
        )
    return inception_extractor(w, amp=amp, **common)


def extractor_from_config(features: object, *, device: str = "cpu") -> Extractor:
    """``build_extractor`` from a ``features`` config section (DictConfig, dataclass or dict)."""
    get = features.get if hasattr(features, "get") else lambda k, d=None: getattr(features, k, d)
    return build_extractor(
        get("name"),
        get("pretrained"),
        device=device,
        dtype=get("dtype", "float32"),
        clip_model=get("clip_model", DEFAULT_CLIP_MODEL),
        dinov2_model=get("dinov2_model", DEFAULT_DINOV2_MODEL),
        dinov2_image_size=int(get("dinov2_image_size", 224)),
        normalize=bool(get("normalize", False)),
        amp=bool(get("amp", False)),
        dinov2_preprocess=str(get("dinov2_preprocess", "timm")),
    )
