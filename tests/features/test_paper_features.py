"""The paper's feature pipelines: DINOv2 with the Hugging Face processor (all tokens) and
torchvision's Inception-v3 as FID.py uses it, against references written with torchvision's
PIL transforms and freshly built networks."""

import numpy as np
import pytest
import torch
from torchvision import transforms

from raycollapse.errors import UserInputError
from raycollapse.features.dinov2 import dinov2_tokens
from raycollapse.features.extractors import build_extractor
from raycollapse.features.torchvision_inception import (
    TORCHVISION_INCEPTION_FILE,
    TorchvisionInception,
    resolve_torchvision_inception,
    torchvision_inception_v3,
)
from raycollapse.features.weights import WeightCaches

torch.set_num_threads(1)

HF_REFERENCE = transforms.Compose(
    [
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ]
)
FID_PY_REFERENCE = transforms.Compose(
    [
        transforms.Resize((299, 299)),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ]
)


def _pil(images):
    from PIL import Image

    return [Image.fromarray(im if im.ndim == 3 and im.shape[-1] == 3 else np.repeat(im.reshape(*im.shape[:2], 1), 3, axis=-1)) for im in images]  # fmt: skip


def test_dinov2_hf_preprocessing_cls_and_tokens():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    tall = rng.integers(0, 256, (1, 40, 24, 3), dtype=np.uint8)  # non-square: shorter side -> 256
    gray = rng.integers(0, 256, (1, 8, 8), dtype=np.uint8)
    ext = build_extractor("dinov2", "none", dinov2_preprocess="hf")
    for images in (rgb, tall, gray):
        ref_in = torch.stack([HF_REFERENCE(im) for im in _pil(images)])
        # transformers rescales in float64, ToTensor divides in float32: one rounding apart
        np.testing.assert_allclose(ext._prepare(images).numpy(), ref_in.numpy(), atol=2e-6)
    with torch.inference_mode():
        ref_tokens = ext.net.forward_features(ref_in).numpy()
    tokens = dinov2_tokens(ext, gray)
    assert tokens.shape == (1, 257, 384)
    np.testing.assert_allclose(tokens, ref_tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ext(gray), ref_tokens[:, 0], rtol=1e-4, atol=1e-4)  # CLS token
    with pytest.raises(UserInputError, match="224"):
        build_extractor("dinov2", "none", dinov2_preprocess="hf", dinov2_image_size=112)


def test_torchvision_inception_features_and_weights(tmp_path):
    caches = WeightCaches(
        hf_hub=tmp_path / "hf", torch_checkpoints=tmp_path / "ckpt", clip_urls=tmp_path / "clip",
        cleanfid=(tmp_path / "cf",),
    )  # fmt: skip
    with pytest.raises(UserInputError, match=TORCHVISION_INCEPTION_FILE):
        resolve_torchvision_inception(None, caches)
    with pytest.raises(UserInputError, match="does not exist"):
        resolve_torchvision_inception(str(tmp_path / "missing.pth"), caches)
    with pytest.raises(UserInputError, match="neither"):
        resolve_torchvision_inception("IMAGENET1K_V2", caches)
    # a weights file in torch hub's cache is found by the tag; its values are loaded
    import torchvision

    state = torchvision_inception_v3().state_dict()
    state = {k: (v + 0.01 if k == "Conv2d_1a_3x3.conv.weight" else v) for k, v in state.items()}
    (tmp_path / "ckpt").mkdir()
    path = tmp_path / "ckpt" / TORCHVISION_INCEPTION_FILE
    torch.save(state, path)
    w = resolve_torchvision_inception(None, caches)
    assert w.path == str(path) and not w.random
    net = TorchvisionInception(w, batch_size=2)
    ref = torchvision.models.inception_v3(
        weights=None, aux_logits=True, init_weights=False, transform_input=False
    )
    ref.load_state_dict(state)
    ref.fc = torch.nn.Identity()
    ref.eval()
    images = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = ref(torch.stack([FID_PY_REFERENCE(im) for im in _pil(images)])).numpy()
    got = net(images)
    assert got.shape == (2, 2048)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(UserInputError, match="do not fit"):
        TorchvisionInception(resolve_torchvision_inception(str(bad), caches))
