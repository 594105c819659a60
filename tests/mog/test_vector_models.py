"""The vector denoiser (preset ``mlp``), the vector samplers and the empirical (fully fitted)
denoiser of a finite training set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raycollapse.diffusion.empirical import EmpiricalDenoiser, memorization_reference
from raycollapse.diffusion.mlp import VectorDenoiser
from raycollapse.diffusion.sampling import make_scheduler
from raycollapse.diffusion.unet import (
    architecture_mismatch,
    build_unet,
    check_model_data,
    check_resolution,
)
from raycollapse.diffusion.vector_sampling import sample_vectors
from raycollapse.errors import UserInputError


def test_mlp_preset_builds_seeded_and_round_trips(tmp_path):
    a = build_unet("mlp", resolution=8, channels=1, dim=5, seed=3)
    b = build_unet("mlp", resolution=8, channels=1, dim=5, seed=3)
    assert isinstance(a, VectorDenoiser) and a.config.dim == 5
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    x = torch.randn(7, 5)
    out = a(x, torch.full((7,), 10)).sample
    assert out.shape == (7, 5) and torch.count_nonzero(out) == 0  # zero-initialised last layer
    torch.nn.init.normal_(a.out.weight)
    a.save_pretrained(tmp_path / "unet", safe_serialization=True)
    c = VectorDenoiser.from_pretrained(tmp_path / "unet", use_safetensors=True)
    t = torch.tensor([0, 5, 999, 3, 3, 3, 100])
    assert torch.equal(a(x, t).sample, c(x, t).sample)
    assert a(x, 5).sample.shape == (7, 5)  # a scalar timestep broadcasts
    meta = {"preset": "mlp", "resolution": 8, "channels": 1}
    assert architecture_mismatch(c, meta) is None
    small = VectorDenoiser(dim=5, hidden=8)
    assert "hidden" in architecture_mismatch(small, meta)


def test_class_conditional_mlp_uses_the_label():
    m = build_unet(
        "mlp", resolution=8, channels=1, dim=2, class_conditional=True, num_classes=3, seed=0
    )
    torch.nn.init.normal_(m.out.weight)
    x, t = torch.randn(4, 2), torch.full((4,), 50)
    y0, y1 = (
        m(x, t, class_labels=torch.zeros(4, dtype=torch.long)).sample,
        m(x, t, class_labels=torch.ones(4, dtype=torch.long)).sample,
    )
    assert not torch.allclose(y0, y1)
    assert m.class_embedding.num_embeddings == 4  # + the null label


def test_vector_presets_and_data_must_match():
    check_resolution("mlp", 3)  # no resolution rule for vectors
    check_model_data("mlp", "mog")
    check_model_data("tiny", "digits")
    with pytest.raises(UserInputError, match="model.preset"):
        check_model_data("tiny", "mog")
    with pytest.raises(UserInputError, match="vector data"):
        check_model_data("mlp", "digits")
    with pytest.raises(UserInputError, match="data dimension"):
        build_unet("mlp", resolution=8, channels=1)


def _posterior_mean_direct(x: np.ndarray, train: np.ndarray, a: float) -> np.ndarray:
    """E[x0 | xt] under the empirical distribution, written out with a double loop."""
    out = np.zeros_like(x, dtype=np.float64)
    for j in range(len(x)):
        logw = np.array([-np.sum((x[j] - np.sqrt(a) * p) ** 2) / (2 * (1 - a)) for p in train])
        w = np.exp(logw - logw.max())
        out[j] = (w / w.sum()) @ train
    return out


def test_empirical_denoiser_is_the_posterior_mean():
    sched = make_scheduler()
    rng = np.random.default_rng(0)
    train = rng.normal(size=(20, 3))
    x = rng.normal(size=(6, 3))
    model = EmpiricalDenoiser(train, sched)
    for t in (0, 40, 500, 999):
        a = float(sched.alphas_cumprod[t])
        m = model.posterior_mean(x, np.full(6, t))
        assert np.allclose(m, _posterior_mean_direct(x, train, a), atol=1e-9)
        eps = model(torch.as_tensor(x), t).sample.numpy()
        assert np.allclose(eps, (x - np.sqrt(a) * m) / np.sqrt(1 - a), atol=1e-9)


@pytest.mark.parametrize("sampler, eta", [("ddpm", 0.0), ("ddim", 1.0)])
def test_sampling_the_empirical_denoiser_returns_training_points(sampler, eta):
    """The memorization limit: every sample is a training point (to 1e-3), points at +-3 too
    (the vector samplers do not clip to [-1, 1])."""
    sched = make_scheduler(100, 1e-4, 0.2)  # few steps: the test stays fast
    train = np.random.default_rng(1).uniform(-3, 3, size=(16, 2)).astype(np.float32)
    x = sample_vectors(EmpiricalDenoiser(train, sched), sched, np.arange(96), seed=2,
                       sampler=sampler, steps=100, eta=eta, group_size=32)  # fmt: skip
    dist = np.sqrt(((x[:, None, :] - train[None]) ** 2).sum(-1))
    assert x.dtype == np.float32 and dist.min(axis=1).max() < 1e-3
    assert len(np.unique(dist.argmin(axis=1))) > 8  # many training points, not one
    # Per-sample reproducibility: a subset of ids gives the same values.
    sub = sample_vectors(EmpiricalDenoiser(train, sched), sched, [5, 70], seed=2,
                         sampler=sampler, steps=100, eta=eta, group_size=32)  # fmt: skip
    assert np.array_equal(sub, x[[5, 70]])


def test_memorization_reference_collapses_without_selection():
    sched = make_scheduler(100, 1e-4, 0.2)
    train0 = np.random.default_rng(3).normal(size=(32, 2)).astype(np.float32)
    kw = dict(iterations=3, pool_multiple=2, k=2, sampler="ddpm", steps=100, group_size=32)
    none = memorization_reference(train0, sched, method="none", **kw)
    greedy = memorization_reference(train0, sched, method="greedy", **kw)
    assert (
        none[0]["distinct_train"] == 32 and none[0]["entropy_train"] == greedy[0]["entropy_train"]
    )
    assert none[-1]["distinct_train"] < 28  # resampling with replacement loses points
    assert greedy[-1]["distinct_train"] > none[-1]["distinct_train"]
    assert greedy[-1]["entropy_train"] > none[-1]["entropy_train"]
    assert all(r["generalization_score"] < 1e-3 for r in none)  # every sample is a copy
