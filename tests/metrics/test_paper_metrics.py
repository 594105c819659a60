"""The paper's metric variants: its generalization score (min MSE over all DINOv2 tokens to a
training subset) and FID with torchvision's Inception-v3, against direct computations."""

import numpy as np
import pytest
import torch
from helpers import frechet_reference

from raycollapse.config import load_config
from raycollapse.errors import UserInputError
from raycollapse.metrics.paper import paper_generalization_score, paper_metrics, paper_settings
from raycollapse.seeds import derive_rng

torch.set_num_threads(1)


def _mse_loop(gen, train):
    """memorization_score_npy.py's loops: per generated item the smallest np.mean((a - b) ** 2)."""
    total = 0.0
    for g in gen:
        total += min(np.mean((g.astype("float") - t.astype("float")) ** 2) for t in train)
    return total / len(gen)


def test_paper_generalization_score_is_the_mean_min_mse():
    rng = np.random.default_rng(0)
    gen = rng.normal(size=(7, 5, 3)).astype(np.float32)
    train = rng.normal(size=(9, 5, 3)).astype(np.float32)
    train[4] = gen[2] + 1e-3  # one near copy
    assert paper_generalization_score(gen, train) == pytest.approx(_mse_loop(gen, train), rel=1e-9)
    # not the mean Euclidean distance (the project's score), nor over CLS only
    flat_d = np.sqrt(((gen.reshape(7, 1, -1) - train.reshape(1, 9, -1)) ** 2).sum(-1)).min(1).mean()
    assert paper_generalization_score(gen, train) != pytest.approx(flat_d, rel=1e-3)
    with pytest.raises(UserInputError):
        paper_generalization_score(gen, train[:, :4])


@pytest.mark.slow  # DINOv2 and two Inception-v3 builds, 2048-d Fréchet distances: ~20 s
def test_paper_metrics_row():
    cfg = load_config(None, [
        "seed=3", "features.name=dinov2", "features.pretrained=none", "features.dinov2_preprocess=hf",
        "metrics.paper_generalization=true", "metrics.paper_generalization_generated=2",
        "metrics.paper_generalization_train=2", "metrics.fid_torchvision=true",
        "metrics.fid_torchvision_generated=3", "metrics.torchvision_inception=none",
    ])  # fmt: skip
    assert paper_settings(load_config(None, [])) is None  # off by default: no columns, no work
    assert paper_metrics(None, generated=None, train=None, real=None, iteration=0) == {}
    s = paper_settings(cfg)
    rng = np.random.default_rng(1)
    gen = rng.integers(0, 256, (4, 8, 8), dtype=np.uint8)
    train = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    real = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    row = paper_metrics(s, generated=gen, train=train, real=real, iteration=2)
    assert set(row) == {"generalization_score_paper", "fid_torchvision"}

    from raycollapse.features.dinov2 import dinov2_tokens
    from raycollapse.features.extractors import build_extractor
    from raycollapse.features.torchvision_inception import (
        TorchvisionInception,
        resolve_torchvision_inception,
    )

    ext = build_extractor("dinov2", "none", dinov2_preprocess="hf")
    pick = np.sort(derive_rng(3, 2, 0x6E5).permutation(3)[:2])  # seeded subset of (seed, iteration)
    expected = _mse_loop(dinov2_tokens(ext, gen[:2]), dinov2_tokens(ext, train[pick]))
    assert row["generalization_score_paper"] == pytest.approx(expected, rel=1e-5)
    net = TorchvisionInception(resolve_torchvision_inception("none"))
    assert row["fid_torchvision"] == pytest.approx(
        frechet_reference(net(gen[:3]), net(real)), rel=1e-4, abs=1e-8
    )
