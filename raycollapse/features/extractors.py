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
way its model was trained (shorter side, bicubic with antialiasing, centre crop), and returns the
raw (un-normalised) features unless ``normalize=True``. Inception follows clean-fid's "clean"
mode exactly: a per-channel float PIL bicubic resize to 299 x 299 (``cleanfid.resize``), so with
clean-fid's own TorchScript file the features equal clean-fid's. ``pretrained="none"`` builds
the same architecture with random weights from a fixed seed (what the tests use); for Inception
that is the pytorch-fid/clean-fid FID architecture (torchvision Inception-v3 with the FID blocks),
He-initialised so random features keep a usable scale.

Weights are resolved by ``check_weights_available`` (``extractor_weights``), which the driver
calls before any work; ``build_extractor`` repeats it on each worker and loads the result.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from raycollapse.data.inputs import images_to_pixels
from raycollapse.errors import UserInputError
from raycollapse.features.weights import (
    CLEANFID_FILE,
    DEFAULT_CLIP_MODEL,
    DEFAULT_DINOV2_MODEL,
    RANDOM_SEED,
    ResolvedWeights,
    check_weights_available,
    load_state_dict_file,
)

if TYPE_CHECKING:
    import torch

__all__ = ["Extractor", "build_extractor", "check_weights_available", "ResolvedWeights"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_SIZE = 299


class Extractor:
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

    def _features(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

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


def _resize_crop_normalise(
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


# ---------------------------------------------------------------------------------------------
# Builders


@contextlib.contextmanager
def _seeded() -> Iterator[None]:
    """Random weights from ``RANDOM_SEED`` without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        yield


def _load_error(w: ResolvedWeights, exc: Exception) -> UserInputError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return UserInputError(
        f"{w.name} weights '{w.path}' do not fit the {w.model} architecture ({first[:300]}); pass the "
        f"checkpoint of {w.model} (or set features.clip_model / features.dinov2_model to match the file)."
    )


def _build_clip(w: ResolvedWeights, device: str) -> tuple[torch.nn.Module, int, int, tuple, tuple]:
    import open_clip

    with _seeded():
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
            raise _load_error(w, exc) from None
    pp = open_clip.get_model_preprocess_cfg(model)
    visual = model.visual  # only the image tower is kept: the text tower is ~40% of the memory
    del model
    size = visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    return visual, int(visual.output_dim), size, tuple(pp.get("mean", ())), tuple(pp.get("std", ()))


def _build_dinov2(w: ResolvedWeights, image_size: int) -> torch.nn.Module:
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with _seeded():
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
            raise _load_error(w, exc) from None
    return net


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
    with _seeded():
        net = fid_inception_v3()
    if not w.random:
        try:
            net.load_state_dict(load_state_dict_file(str(w.path)), strict=True)
        except (RuntimeError, KeyError) as exc:
            raise _load_error(w, exc) from None
    net.fc = torch.nn.Identity()
    net = net.to(device).eval()
    return net, lambda x: net(x / 255.0 * 2.0 - 1.0)  # as pytorch-fid: [0, 1] -> [-1, 1]


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
) -> Extractor:
    """Build the extractor ``name`` with weights ``pretrained`` (tag, file, ``"none"``; None = default)."""
    if dtype not in ("float32", "float16"):
        raise UserInputError(f"features dtype '{dtype}' is not supported; use float32 or float16.")
    w = check_weights_available(name, pretrained, clip_model=clip_model, dinov2_model=dinov2_model)
    common = dict(device=device, dtype=dtype, normalize=normalize)
    if name == "pixel":
        return PixelExtractor("pixel", w, dim=None, input_size=None, **common)
    if name == "clip":
        net, dim, size, mean, std = _build_clip(w, device)
        net = net.to(device).eval()
        prepare = _resize_crop_normalise(size, mean, std, device)
        return TorchExtractor(
            "clip",
            w,
            net=net,
            forward=net,
            prepare=prepare,
            dim=dim,
            input_size=size,
            amp=amp,
            **common,
        )
    if name == "dinov2":
        net = _build_dinov2(w, dinov2_image_size).to(device).eval()
        cfg = net.pretrained_cfg
        prepare = _resize_crop_normalise(
            dinov2_image_size,
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
            input_size=dinov2_image_size,
            amp=amp,
            **common,
        )
    net, forward = _build_inception(w, device)
    return TorchExtractor(
        "inception",
        w,
        net=net,
        forward=forward,
        prepare=_cleanfid_prepare(device),
        dim=2048,
        input_size=INCEPTION_SIZE,
        amp=amp,
        **common,
    )


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
    )
