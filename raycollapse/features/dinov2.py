"""DINOv2 image features: timm ViT-S/14 DINOv2, the CLS token (384-d, 224 x 224 by default,
ImageNet mean/std)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raycollapse.features.base import TorchExtractor, load_error, resize_crop_normalise, seeded
from raycollapse.features.weights import ResolvedWeights, load_state_dict_file

if TYPE_CHECKING:
    import torch

__all__ = ["dinov2_extractor"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def dinov2_extractor(
    w: ResolvedWeights, *, image_size: int, device: str, amp: bool, **common: Any
) -> TorchExtractor:
    """DINOv2 with weights ``w`` at ``image_size`` on ``device``; ``common``: dtype, normalize."""
    net = _build_dinov2(w, image_size).to(device).eval()
    cfg = net.pretrained_cfg
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
