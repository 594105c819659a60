"""Sampling precision (bf16 autocast), channels-last on CUDA and torch.compile (issue: speed on
every device). CUDA is not here: the autocast path runs on the CPU through ``amp_dtype``, the
channels-last conversion is checked on the weights' strides, and compile runs inductor on the CPU."""

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from raycollapse.diffusion.sampling import (
    make_scheduler,
    sample_images,
    sampling_autocast,
    sampling_network,
)
from raycollapse.diffusion.train_parts import channels_last_on_cuda
from raycollapse.diffusion.trainer import train_loop
from raycollapse.diffusion.unet import build_unet
from raycollapse.diffusion.vector_sampling import sample_vectors
from raycollapse.errors import UserInputError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return build_unet("tiny", resolution=8, channels=1, seed=0).eval()


def test_sampling_autocast_rules():
    assert sampling_autocast("fp32", "cpu") is None
    assert sampling_autocast("auto", "cpu") is None  # the CPU samples in fp32: bits unchanged
    with pytest.raises(UserInputError, match="sample.precision=bf16 needs a CUDA GPU"):
        sampling_autocast("bf16", "cpu")
    with pytest.raises(UserInputError, match="auto, fp32 or bf16"):
        sampling_autocast("fp16", "cpu")


def test_bf16_autocast_is_applied_to_the_network_only(tiny):
    """bf16 must change the bits (else the autocast is not applied) but stay an fp32 sampler:
    the images stay close to fp32's and identical whatever the batch of ids asked for."""
    sched = make_scheduler(num_train_timesteps=20)
    kw = dict(seed=4, sampler="ddim", steps=5, eta=0.5, group_size=4)
    fp32 = sample_images(tiny, sched, np.arange(8), **kw)
    bf16 = sample_images(tiny, sched, np.arange(8), amp_dtype=torch.bfloat16, **kw)
    again = sample_images(tiny, sched, [5, 1, 6], amp_dtype=torch.bfloat16, **kw)
    assert not np.array_equal(fp32, bf16)
    assert np.array_equal(again, bf16[[5, 1, 6]])
    diff = np.abs(fp32.astype(int) - bf16.astype(int))
    # 5 steps of a random tiny UNet: bf16's 8-bit mantissa moves pixels by a few levels of 255
    assert diff.mean() < 4.0 and np.median(diff) <= 2, (diff.mean(), np.median(diff))


def test_channels_last_on_cuda_only():
    unet = build_unet("tiny", resolution=8, channels=1, seed=0)
    # (a convolution with one input channel has the same strides in both layouts)
    conv = next(m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1)
    channels_last_on_cuda(unet, "cpu")
    assert conv.weight.is_contiguous()
    # The conversion itself does not need a GPU: ask for it as CUDA would.
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    channels_last_on_cuda(unet, "cuda")
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # same values, other strides
    mlp = build_unet("mlp", resolution=0, channels=0, dim=2, seed=0)
    weights = [p.data_ptr() for p in mlp.parameters()]
    channels_last_on_cuda(mlp, "cuda")  # no convolutions: left as it is
    assert [p.data_ptr() for p in mlp.parameters()] == weights


def test_channels_last_network_samples_like_the_contiguous_one(tiny):
    """NHWC weights compute the same convolutions (up to rounding): the sampler must not depend on
    the layout of the network it is handed."""
    sched = make_scheduler(num_train_timesteps=20)
    nhwc = build_unet("tiny", resolution=8, channels=1, seed=0).eval()
    channels_last_on_cuda(nhwc, "cuda")
    kw = dict(seed=2, sampler="ddim", steps=4, eta=0.0, group_size=4)
    a = sample_images(tiny, sched, np.arange(4), **kw)
    b = sample_images(nhwc, sched, np.arange(4), **kw)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_compiled_training_and_sampling_match_eager():
    """train.compile / sample.compile on the MoG MLP: the same losses and samples up to rounding,
    and the saved weights keep their names (no ``_orig_mod.`` prefix). Traced with the
    ``aot_eager`` backend (Dynamo and AOTAutograd, what the wrapper and the optimiser, EMA and
    checkpoint see); inductor's C++ generation would add a minute on 2 cores."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 2)).astype(np.float32)
    sched = make_scheduler(num_train_timesteps=50)
    kw = dict(noise_scheduler=sched, steps=8, batch_size=16, lr=1e-3, warmup_steps=2, seed=1)
    eager = build_unet("mlp", resolution=0, channels=0, dim=2, seed=0)
    compiled = build_unet("mlp", resolution=0, channels=0, dim=2, seed=0)
    _, res_e = train_loop(eager, x, None, **kw)
    counters.clear()
    _, res_c = train_loop(compiled, x, None, compile="aot_eager", **kw)
    assert counters["stats"]["unique_graphs"] >= 1  # the steps did go through Dynamo
    np.testing.assert_allclose(res_c.losses, res_e.losses, rtol=1e-4, atol=1e-6)
    assert set(compiled.state_dict()) == set(eager.state_dict())
    for k, v in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[k], v, rtol=1e-4, atol=1e-5)
    net = sampling_network(eager, "cpu", compile="aot_eager")
    skw = dict(seed=0, sampler="ddim", steps=5, eta=0.5, group_size=8)
    a = sample_vectors(eager, sched, np.arange(8), **skw)
    counters.clear()
    b = sample_vectors(net, sched, np.arange(8), **skw)
    assert counters["stats"]["unique_graphs"] >= 1
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
