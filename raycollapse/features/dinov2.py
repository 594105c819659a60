"""DINOv2 image features: timm ViT-S/14 DINOv2, the CLS token (384-d, 224 x 224 by default,
ImageNet mean/std).

Two pre-processings (features.dinov2_preprocess): ``timm`` (the shorter side resized to the
input size on the device, bicubic with antialiasing) and ``hf``, the Hugging Face
``facebook/dinov2-small`` processor the paper's code uses (``AutoImageProcessor``: PIL bicubic
resize of the shorter side to 256 on uint8 images, centre crop 224, ``x / 255``, ImageNet
mean/std). The network is the same; :func:`dinov2_tokens` gives every output token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from raycollapse.errors import UserInputError
from raycollapse.features.base import (
    TorchExtractor,
    load_error,
    resize_crop_normalise,
    seeded,
    to_rgb255,
)
from raycollapse.features.weights import ResolvedWeights, load_state_dict_file

if TYPE_CHECKING:
    import torch

__all__ = ["HF_CROP", "HF_RESIZE", "dinov2_extractor", "dinov2_tokens", "hf_prepare"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# facebook/dinov2-small's preprocessor_config.json: size.shortest_edge 256, crop_size 224.
HF_RESIZE = 256
HF_CROP = 224


def _build_dinov2(w: ResolvedWeights, image_size: int) -> torch.nn.Module:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with seeded():
        # num_classes=0: forward returns the pooled CLS token (global_pool="token"), 384-d for ViT-S.
        net = timm.create_model(w.model, pretrained=False, num_classes=0, img_size=image_size)
    if w.random:
        import torch

        # DINOv2's LayerScale starts at 1e-5 (its training init): random blocks are then nearly
        # the identity and every image gets the same CLS token. At 1 random features vary with
        # the image, as the tests and CPU dry runs of the loop need.
        with torch.no_grad():
            for name, param in net.named_parameters():
                if name.endswith((".ls1.gamma", ".ls2.gamma")):
                    param.fill_(1.0)
    else:
        state = load_state_dict_file(str(w.path))
        try:
            # converts Meta's original DINOv2 files and resamples the position embedding to img_size
            state = checkpoint_filter_fn(state, net)
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
            net.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise load_error(w, exc) from None
    return net


def hf_prepare(device: str) -> Callable[[np.ndarray], torch.Tensor]:
    """The Hugging Face DINOv2 processor: PIL bicubic shorter side -> 256 (uint8, as the
    processor resizes PIL images), centre crop 224, ``(x / 255 - mean) / std`` in float32."""
    import torch
    from PIL import Image

    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)

    def one(rgb: np.ndarray) -> np.ndarray:
        im = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8))
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        # transformers' get_resize_output_image_size: the long side is int(256 * long / short)
        new_long = int(HF_RESIZE * long / short)
        size = (HF_RESIZE, new_long) if w <= h else (new_long, HF_RESIZE)
        im = im.resize(size, Image.Resampling.BICUBIC)
        arr = np.asarray(im)
        top = (arr.shape[0] - HF_CROP) // 2
        left = (arr.shape[1] - HF_CROP) // 2
        arr = arr[top : top + HF_CROP, left : left + HF_CROP]
        # as transformers' rescale: float64 product, then float32; normalise in float32
        scaled = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
        return ((scaled - mean) / std).transpose(2, 0, 1)

    def prepare(images: np.ndarray) -> torch.Tensor:
        batch = np.stack([one(im) for im in to_rgb255(images)])
        return torch.from_numpy(np.ascontiguousarray(batch)).to(device)

    return prepare


def dinov2_extractor(
    w: ResolvedWeights,
    *,
    image_size: int,
    device: str,
    amp: bool,
    preprocess: str = "timm",
    **common: Any,
) -> TorchExtractor:
    """DINOv2 with weights ``w`` at ``image_size`` on ``device``; ``preprocess``: timm or hf
    (see the module docstring); ``common``: dtype, normalize."""
    if preprocess not in ("timm", "hf"):
        raise UserInputError(f"features.dinov2_preprocess must be timm or hf, got {preprocess!r}.")
    if preprocess == "hf" and image_size != HF_CROP:
        raise UserInputError(
            f"features.dinov2_preprocess=hf crops to {HF_CROP} pixels; set features.dinov2_image_size={HF_CROP}."
        )
    net = _build_dinov2(w, image_size).to(device).eval()
    cfg = net.pretrained_cfg
    if preprocess == "hf":
        prepare = hf_prepare(device)
    else:
        prepare = resize_crop_normalise(
            image_size,
            tuple(cfg.get("mean", IMAGENET_MEAN)),
            tuple(cfg.get("std", IMAGENET_STD)),
            device,
        )
    return TorchExtractor(
        "dinov2",
        w,
        net=net,
        forward=net,
        prepare=prepare,
        dim=int(net.num_features),
        input_size=image_size,
        device=device,
        amp=amp,
        **common,
    )


def dinov2_tokens(
    extractor: TorchExtractor, images: np.ndarray, batch_size: int = 256
) -> np.ndarray:
    """Every output token of a DINOv2 ``extractor`` (CLS first, then the patches), after the
    final norm: float32 ``N x tokens x dim`` (Hugging Face's ``last_hidden_state``)."""
    import torch

    net = extractor.net
    if net is None or extractor.name != "dinov2":
        raise UserInputError(f"dinov2_tokens needs a dinov2 extractor, got {extractor.name}.")
    out = []
    with torch.inference_mode():
        for s in range(0, len(images), batch_size):
            x = extractor._prepare(np.asarray(images[s : s + batch_size]))
            out.append(net.forward_features(x).float().cpu().numpy())
    return np.concatenate(out)
