"""CLIP image features: the open_clip image tower (default ViT-B-32, 512-d, 224 x 224, OpenAI
CLIP mean/std)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raycollapse.errors import UserInputError
from raycollapse.features.base import TorchExtractor, load_error, resize_crop_normalise, seeded
from raycollapse.features.weights import ResolvedWeights

if TYPE_CHECKING:
    import torch

__all__ = ["clip_extractor"]


def _build_clip(w: ResolvedWeights, device: str) -> tuple[torch.nn.Module, int, int, tuple, tuple]:
    import open_clip

    with seeded():
        model = open_clip.create_model(w.model, pretrained=None, force_quick_gelu=w.quick_gelu)
    if not w.random:
        if w.fmt == "safetensors" and not str(w.path).endswith(".safetensors"):
            # open_clip picks its loader by suffix; a misnamed file would go to torch.load and fail.
            raise UserInputError(
                f"'{w.path}' is a safetensors file; rename it to end in .safetensors."
            )
        try:
            open_clip.load_checkpoint(model, str(w.path), strict=True, weights_only=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise load_error(w, exc) from None
    pp = open_clip.get_model_preprocess_cfg(model)
    visual = model.visual  # only the image tower is kept: the text tower is ~40% of the memory
    del model
    size = visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    return visual, int(visual.output_dim), size, tuple(pp.get("mean", ())), tuple(pp.get("std", ()))


def clip_extractor(w: ResolvedWeights, *, device: str, amp: bool, **common: Any) -> TorchExtractor:
    """The CLIP image tower with weights ``w`` on ``device``; ``common``: dtype, normalize."""
    net, dim, size, mean, std = _build_clip(w, device)
    net = net.to(device).eval()
    prepare = resize_crop_normalise(size, mean, std, device)
    return TorchExtractor(
        "clip",
        w,
        net=net,
        forward=net,
        prepare=prepare,
        dim=dim,
        input_size=size,
        device=device,
        amp=amp,
        **common,
    )
