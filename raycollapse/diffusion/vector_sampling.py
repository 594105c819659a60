"""The DDPM / DDIM samplers for vector models: float ``N x d`` samples instead of uint8 images.

The same schedulers (``sampling.sampling_scheduler``), the same per-sample generators and the same
aligned groups of ids as ``diffusion.sampling.sample_images``, so the reproducibility contract
of that module holds unchanged (sample ``i`` depends only on model, seed, ``i``, sampler settings
and ``group_size``). Two differences, both because vectors are not pixels:

- the samples are returned as float32 values, not quantised to uint8;
- the predicted ``x_0`` is not clipped to [-1, 1] (the scheduler's ``clip_sample`` is turned off
  for sampling): a Gaussian has unbounded support, and clipping would cut its tails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from raycollapse.diffusion.sampling import run_sampler, sampling_scheduler
from raycollapse.errors import UserInputError


def unclipped(train_scheduler: Any):
    """The training scheduler with ``clip_sample=False`` (same betas and timesteps): itself when
    it is already unclipped, else a copy."""
    from diffusers import DDPMScheduler

    if not train_scheduler.config.clip_sample:
        return train_scheduler
    return DDPMScheduler.from_config(train_scheduler.config, clip_sample=False)


def model_dim(model: torch.nn.Module) -> int:
    """The vector dimension ``d`` a vector model takes (``config.dim``)."""
    return int(model.config.dim)


def sample_vector_group(
    model: torch.nn.Module,
    train_scheduler: Any,
    ids: np.ndarray,
    *,
    seed: int,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    labels: np.ndarray | None = None,
    guidance: float | None = None,
    null_label: int | None = None,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """Run the sampler on exactly these ids as one network batch; float32 ``N x d``."""
    x = run_sampler(
        model, sampling_scheduler(unclipped(train_scheduler), sampler, steps), ids,
        (model_dim(model),), seed=seed, sampler=sampler, eta=eta, labels=labels,
        guidance=guidance, null_label=null_label, device=device, amp_dtype=amp_dtype,
    )  # fmt: skip
    return x.detach().float().cpu().numpy()


def sample_vectors(
    model: torch.nn.Module,
    train_scheduler: Any,
    ids: Sequence[int] | np.ndarray,
    *,
    seed: int,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    labels_for: Callable[[np.ndarray], np.ndarray | None] | None = None,
    guidance: float | None = None,
    null_label: int | None = None,
    group_size: int = 64,
    device: torch.device | str = "cpu",
    amp_dtype: torch.dtype | None = None,
) -> np.ndarray:
    """The samples with these ids (any order, any subset of a pool): float32 ``N x d``.

    As ``diffusion.sampling.sample_images`` (aligned groups of ``group_size`` ids, labels a
    function of the id), for a vector model (``diffusion.mlp`` or ``diffusion.empirical``).
    """
    ids_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
    dim = model_dim(model)
    if ids_arr.size == 0:
        return np.zeros((0, dim), dtype=np.float32)
    if ids_arr.min() < 0 or seed < 0:
        raise UserInputError(
            f"sample ids and the seed must be non-negative integers (seed {seed})."
        )
    if group_size < 1:
        raise UserInputError(f"sample.group_size must be >= 1, got {group_size}.")
    if eta < 0:
        raise UserInputError(f"sample.eta must be >= 0, got {eta}.")
    model.eval()
    train_scheduler = unclipped(train_scheduler)  # once, not per group
    out = np.zeros((len(ids_arr), dim), dtype=np.float32)
    for g in np.unique(ids_arr // group_size):
        group_ids = np.arange(g * group_size, (g + 1) * group_size, dtype=np.int64)
        vecs = sample_vector_group(
            model, train_scheduler, group_ids, seed=seed, sampler=sampler, steps=steps, eta=eta,
            labels=labels_for(group_ids) if labels_for is not None else None,
            guidance=guidance, null_label=null_label, device=device, amp_dtype=amp_dtype,
        )  # fmt: skip
        mask = ids_arr // group_size == g
        out[mask] = vecs[ids_arr[mask] - g * group_size]
    return out
