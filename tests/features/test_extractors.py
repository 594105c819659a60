"""Feature extractors with random weights (nothing can be downloaded here), and the weights check."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from raycollapse.data.inputs import images_to_pixels
from raycollapse.errors import UserInputError
from raycollapse.features.base import to_rgb255
from raycollapse.features.extractors import build_extractor
from raycollapse.features.weights import (
    CLEANFID_FILE,
    PYTORCH_FID_FILE,
    WeightCaches,
    check_weights_available,
    detect_format,
    load_state_dict_file,
)

DIMS = {"clip": 512, "dinov2": 384, "inception": 2048}
INPUT_SIZES = {"clip": 224, "dinov2": 224, "inception": 299}


@pytest.fixture(scope="module")
def gray8() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8)


@pytest.fixture(scope="module")
def rgb32() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


@pytest.fixture
def empty_caches(tmp_path) -> WeightCaches:
    """Every folder a tag is looked up in is an empty one of this test, so no tag can resolve
    from what this machine happens to have cached."""
    return WeightCaches(
        hf_hub=tmp_path / "hf",
        torch_checkpoints=tmp_path / "torch" / "checkpoints",
        clip_urls=tmp_path / "clip",
        cleanfid=(tmp_path / "cleanfid", tmp_path / "cwd"),
    )


def test_pixel_equals_images_to_pixels(gray8, rgb32):
    ext = build_extractor("pixel", None)
    for images in (gray8, rgb32, gray8[..., 0]):
        out = ext(images)
        np.testing.assert_array_equal(out, images_to_pixels(images))
        assert out.dtype == np.float32
    half = build_extractor("pixel", "none", dtype="float16")(rgb32)
    assert half.dtype == np.float16 and half.shape == (2, 32 * 32 * 3)
    assert ext.dim is None and ext.input_size is None


def test_to_rgb255_gray_alpha_float():
    gray = np.full((1, 4, 4), 7, np.uint8)
    assert to_rgb255(gray).shape == (1, 4, 4, 3) and to_rgb255(gray).max() == 7
    rgba = np.zeros((1, 4, 4, 4), np.uint8)
    assert to_rgb255(rgba).shape == (1, 4, 4, 3)
    np.testing.assert_allclose(to_rgb255(np.ones((1, 2, 2, 3), np.float32)), 255.0)
    with pytest.raises(UserInputError, match="channels"):
        to_rgb255(np.zeros((1, 2, 2, 5), np.uint8))


@pytest.mark.parametrize("name", ["clip", "dinov2", "inception"])
def test_model_extractor_shape_dtype_random(name, gray8, rgb32):
    ext = build_extractor(name, "none")
    assert ext.dim == DIMS[name] and ext.input_size == INPUT_SIZES[name]
    assert ext.weights.random and "random" in ext.weights.describe()
    out_gray = ext(gray8)
    assert out_gray.shape == (3, DIMS[name]) and out_gray.dtype == np.float32
    assert np.isfinite(out_gray).all()
    assert not np.allclose(out_gray[0], out_gray[1])  # random features still depend on the image
    ext.dtype = np.dtype("float16")  # same network, float16 output
    out_rgb = ext(rgb32)
    assert out_rgb.shape == (2, DIMS[name]) and out_rgb.dtype == np.float16
    assert np.isfinite(out_rgb).all()


def test_random_weights_are_deterministic():
    """Every actor builds the same random network (a fixed seed), so shards match across actors."""
    a = build_extractor("inception", "none").net.state_dict()
    b = build_extractor("inception", "none").net.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_local_safetensors_file_gives_identical_output(tmp_path, rgb32):
    from safetensors.torch import save_file

    random_ext = build_extractor("dinov2", "none")
    path = tmp_path / "dinov2_random.safetensors"
    save_file({k: v.contiguous() for k, v in random_ext.net.state_dict().items()}, str(path))
    assert detect_format(path) == "safetensors"
    loaded = build_extractor("dinov2", str(path), normalize=True)
    assert not loaded.weights.random and loaded.weights.path == str(path)
    want = random_ext(rgb32)
    got = loaded(rgb32)
    np.testing.assert_allclose(
        got, want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("name", "needles"),
    [
        ("clip", ["ViT-B-32", "laion2b_s34b_b79k", "open_clip_pytorch_model.bin", "--pretrained"]),
        ("dinov2", ["vit_small_patch14_dinov2.lvd142m", "model.safetensors", "--pretrained"]),
        ("inception", [CLEANFID_FILE, "--pretrained", "looked in"]),
    ],
)
def test_unreachable_tag_names_model_and_fix(name, needles, empty_caches):
    with pytest.raises(UserInputError) as info:
        check_weights_available(name, None, caches=empty_caches)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg
    assert "not available" in msg and "none" in msg
    assert str(empty_caches.hf_hub if name != "inception" else empty_caches.cleanfid[0]) in msg


def test_default_caches_follow_the_libraries_environment(tmp_path, monkeypatch):
    """Without ``caches`` the libraries' own folders are searched, as their variables set them."""
    import torch
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    caches = WeightCaches.default()
    assert caches.hf_hub == tmp_path / "hf"
    assert caches.torch_checkpoints == Path(torch.hub.get_dir()) / "checkpoints"
    assert caches.clip_urls == tmp_path / "home" / ".cache" / "clip"
    assert caches.cleanfid[-1] == tmp_path


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_inception_tag_found_in_each_cleanfid_folder_and_torch_hub(empty_caches):
    for folder in (*empty_caches.cleanfid, empty_caches.torch_checkpoints):
        name = PYTORCH_FID_FILE if folder == empty_caches.torch_checkpoints else CLEANFID_FILE
        folder.mkdir(parents=True)
        torch.save({"w": torch.ones(1)}, folder / name)
        w = check_weights_available("inception", None, caches=empty_caches)
        assert w.path == str(folder / name) and w.tag == "clean-fid" and w.fmt == "torch"
        (folder / name).unlink()


def test_tag_found_in_hf_cache(empty_caches):
    """A tag resolves to the file in the HF cache layout, with no network access."""
    snap = (
        empty_caches.hf_hub / "models--timm--vit_small_patch14_dinov2.lvd142m" / "snapshots" / "abc"
    )
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    refs = snap.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc")
    w = check_weights_available("dinov2", None, caches=empty_caches)
    assert (
        w.path == str(snap / "model.safetensors") and w.tag == "lvd142m" and w.fmt == "safetensors"
    )


def test_missing_file_and_unknown_tag(tmp_path):
    with pytest.raises(UserInputError, match="does not exist"):
        check_weights_available("clip", str(tmp_path / "nope.safetensors"))
    with pytest.raises(UserInputError, match="laion2b_s34b_b79k"):
        check_weights_available("clip", "not-a-tag")
    with pytest.raises(UserInputError, match="clean-fid"):
        check_weights_available("inception", "not-a-tag")
    with pytest.raises(UserInputError, match="is a folder"):
        check_weights_available("dinov2", str(tmp_path))
    with pytest.raises(UserInputError, match="unknown features"):
        check_weights_available("resnet", None)
    assert check_weights_available("pixel", "whatever").describe() == "none"


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_state_dict_loading_is_weights_only(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"module.w": torch.ones(2)}}, good)
    assert list(load_state_dict_file(good)) == ["w"]
    evil = tmp_path / "evil.pth"
    torch.save({"w": _Evil()}, evil, pickle_module=pickle)
    with pytest.raises(UserInputError, match="safely"):
        load_state_dict_file(evil)
    script = tmp_path / "script.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(script))
    assert detect_format(script) == "torchscript"
    with pytest.raises(UserInputError, match="TorchScript"):
        check_weights_available("clip", str(script))


class _FakeCleanFid(torch.nn.Module):
    """Stands in for clean-fid's TorchScript Inception: a ``layers`` module giving 2048 x 1 x 1."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Conv2d(3, 2048, 4)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_inception_torchscript_file_used_like_cleanfid(tmp_path, gray8):
    path = tmp_path / CLEANFID_FILE
    module = torch.jit.script(_FakeCleanFid())
    module.save(str(path))
    ext = build_extractor("inception", str(path))
    assert ext.weights.fmt == "torchscript"
    out = ext(gray8)
    assert out.shape == (3, 2048)
    # clean-fid: PIL bicubic 299 x 299 on [0, 255] floats, then (x - 128) / 128 into `layers`
    from cleanfid.resize import make_resizer

    resize = make_resizer("PIL", False, "bicubic", (299, 299))
    x = np.stack([resize(np.repeat(im, 3, axis=-1)) for im in gray8])
    with torch.no_grad():
        want = module.layers((torch.from_numpy(x).permute(0, 3, 1, 2) - 128) / 128).reshape(3, 2048)
    np.testing.assert_allclose(out, want.numpy(), rtol=1e-5, atol=1e-6)
