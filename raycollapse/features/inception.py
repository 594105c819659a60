"""Inception features: the TensorFlow FID Inception-v3 (clean-fid / pytorch-fid), 2048-d pool
features at 299 x 299.

clean-fid's "clean" mode is followed exactly: a per-channel float PIL bicubic resize to 299 x 299
(``cleanfid.resize``), then ``(x - 128) / 128``, so with clean-fid's own TorchScript file the
features equal clean-fid's. With random weights (``pretrained="none"``) the network is the FID
architecture (torchvision Inception-v3 with the FID blocks), He-initialised so random features
keep a usable scale.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from raycollapse.errors import UserInputError
from raycollapse.features.base import TorchExtractor, load_error, seeded, to_rgb255
from raycollapse.features.weights import CLEANFID_FILE, ResolvedWeights, load_state_dict_file

if TYPE_CHECKING:
    import torch

__all__ = ["INCEPTION_SIZE", "fid_inception_v3", "inception_extractor"]

INCEPTION_SIZE = 299


def _cleanfid_prepare(device: str) -> Callable[[np.ndarray], torch.Tensor]:
    """clean-fid's "clean" resize: per channel, float PIL bicubic to 299 x 299, values in [0, 255]."""
    import torch
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (INCEPTION_SIZE, INCEPTION_SIZE))

    def prepare(images: np.ndarray) -> torch.Tensor:
        rgb = to_rgb255(images)
        if rgb.shape[1:3] != (INCEPTION_SIZE, INCEPTION_SIZE):
            rgb = np.stack([resize(im) for im in rgb])
        return (
            torch.from_numpy(np.ascontiguousarray(rgb)).to(device).permute(0, 3, 1, 2).contiguous()
        )

    return prepare


def fid_inception_v3() -> torch.nn.Module:
    """The TF FID Inception-v3 architecture (pytorch-fid / clean-fid), randomly initialised.

    ``cleanfid.inception_pytorch.fid_inception_v3`` builds the same network but always downloads
    its weights; this builds it offline from the same blocks. ``fc`` (1008 classes) is kept so a
    pytorch-fid state dict loads strictly; callers replace it with ``Identity`` for 2048-d features.
    """
    import torch
    import torchvision
    from cleanfid.inception_pytorch import (
        FIDInceptionA,
        FIDInceptionC,
        FIDInceptionE_1,
        FIDInceptionE_2,
    )

    net = torchvision.models.inception_v3(
        weights=None, num_classes=1008, aux_logits=False, init_weights=False
    )
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    # He init: PyTorch's default conv init shrinks activations ~1e-8 over 90 layers of
    # eval-mode BatchNorm (running stats 0/1), which would leave random features all equal.
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
    return net


def _build_inception(w: ResolvedWeights, device: str) -> tuple[torch.nn.Module, Callable]:
    import torch

    if w.fmt == "torchscript":
        # clean-fid's own file (see extractor_weights: TorchScript runs no pickled Python).
        # Recent torch releases mark torch.jit.load deprecated; clean-fid's file exists only in this
        # format. Should jit.load go away, pytorch-fid's state dict of the same network works.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            net = torch.jit.load(str(w.path), map_location=device).eval()
        if not hasattr(net, "layers"):
            raise UserInputError(
                f"TorchScript file '{w.path}' is not clean-fid's {CLEANFID_FILE} (it has no 'layers'); "
                "pass that file or a state dict of the FID Inception (pytorch-fid's file)."
            )
        layers = net.layers
        return net, lambda x: layers.forward((x - 128.0) / 128.0)  # as cleanfid InceptionV3W
    with seeded():
        net = fid_inception_v3()
    if not w.random:
        try:
            net.load_state_dict(load_state_dict_file(str(w.path)), strict=True)
        except (RuntimeError, KeyError) as exc:
            raise load_error(w, exc) from None
    net.fc = torch.nn.Identity()
    net = net.to(device).eval()
    return net, lambda x: net(x / 255.0 * 2.0 - 1.0)  # as pytorch-fid: [0, 1] -> [-1, 1]


def inception_extractor(
    w: ResolvedWeights, *, device: str, amp: bool, **common: Any
) -> TorchExtractor:
    """The FID Inception with weights ``w`` on ``device``; ``common``: dtype, normalize."""
    net, forward = _build_inception(w, device)
    return TorchExtractor(
        "inception",
        w,
        net=net,
        forward=forward,
        prepare=_cleanfid_prepare(device),
        dim=2048,
        input_size=INCEPTION_SIZE,
        device=device,
        amp=amp,
        **common,
    )
