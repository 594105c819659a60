"""The fully fitted model: the optimal denoiser of a finite training set (the memorization limit).

docs/design.md, "Mixture of Gaussians". A DDPM trained to zero loss on training points
``x_1 ... x_N`` learns the exact score of their empirical distribution. Under the forward process
``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps`` (``a_t`` = ``alphas_cumprod``) the minimiser of the
epsilon-prediction loss is

    eps*(x_t, t) = (x_t - sqrt(a_t) m(x_t)) / sqrt(1 - a_t),
    m(x_t) = sum_i softmax_i(-|x_t - sqrt(a_t) x_i|^2 / (2 (1 - a_t))) x_i,

the posterior mean of ``x_0`` given ``x_t``. Sampled with the DDPM or DDIM sampler it generates
(up to the sampler's last, tiny noise level) only training points: every sample is a copy.

``memorization_reference`` runs the self-consuming loop (replace paradigm) with this model in
place of the trained one: the trajectory the loop's entropy is compared with.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from raycollapse.curation.entropy import kl_entropy
from raycollapse.curation.select import select
from raycollapse.diffusion.vector_sampling import sample_vectors
from raycollapse.neighbors.knn import knn_search
from raycollapse.seeds import derive_seed


class EmpiricalDenoiser(torch.nn.Module):
    """``eps*(x_t, t)`` of the empirical distribution of ``train`` (N x d) for ``train_scheduler``.

    Called like a diffusers model: ``model(x_t, t).sample``; ``config.dim`` is ``d``. Computed in
    float64 (the softmax over training points is sharp at small ``t``).
    """

    def __init__(self, train: np.ndarray, train_scheduler: Any) -> None:
        super().__init__()
        self.register_buffer("points", torch.as_tensor(np.asarray(train), dtype=torch.float64))
        ac = torch.as_tensor(np.asarray(train_scheduler.alphas_cumprod), dtype=torch.float64)
        self.register_buffer("alphas_cumprod", ac)
        self.config = SimpleNamespace(dim=int(self.points.shape[1]))

    def posterior_mean(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``m(x_t) = E[x_0 | x_t]`` under the empirical distribution (module docstring)."""
        a = self.alphas_cumprod[t.long()].to(torch.float64)[:, None]
        x64 = x.to(torch.float64)
        # |x - s p|^2 = |x|^2 - 2 s x.p + s^2 |p|^2; the |x|^2 term cancels in the softmax.
        s = a.sqrt()
        sq = -2.0 * s * (x64 @ self.points.T) + a * (self.points * self.points).sum(1)[None, :]
        return torch.softmax(-sq / (2.0 * (1.0 - a)), dim=1) @ self.points

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels=None):
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        a = self.alphas_cumprod[t.long()].to(torch.float64)[:, None]
        m = self.posterior_mean(sample, t)
        eps = (sample.to(torch.float64) - a.sqrt() * m) / (1.0 - a).sqrt()
        return SimpleNamespace(sample=eps.to(sample.dtype))


def memorization_reference(
    train0: np.ndarray,
    train_scheduler: Any,
    *,
    iterations: int,
    pool_multiple: float,
    method: str = "none",
    k: int = 3,
    eps: float = 1e-10,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    sample_eta: float = 0.0,
    group_size: int = 64,
    tau0: float | None = None,
    decay: float = 0.9,
) -> list[dict[str, Any]]:
    """The loop (replace paradigm) with the fully fitted model, from training set ``train0``.

    Each iteration ``t``: the pool is ``round(m B)`` samples of ``EmpiricalDenoiser(train_t)``;
    ``train_{t+1}`` is ``B`` of them chosen by ``method`` (``none``/``random``: a seeded subset,
    ``greedy``, ``threshold``). Returns one row per iteration: ``entropy_train`` (KL, ``k``,
    ``eps``), ``distinct_train`` (distinct points of the training set, to 1e-6),
    ``generalization_score`` (mean distance from the first ``B`` pool samples to their nearest
    training point; ~0 here) and ``entropy_pool``.
    """
    train = np.asarray(train0, dtype=np.float32)
    b = len(train)
    n_pool = int(round(pool_multiple * b))
    rows: list[dict[str, Any]] = []
    for t in range(iterations):
        model = EmpiricalDenoiser(train, train_scheduler)
        pool = sample_vectors(
            model, train_scheduler, np.arange(n_pool), seed=derive_seed(seed, t, 4),
            sampler=sampler, steps=steps, eta=sample_eta, group_size=group_size,
        )  # fmt: skip
        d1 = knn_search(train, pool[:b], 1).distances[:, 0]
        rows.append(
            {
                "iteration": t,
                "entropy_train": kl_entropy(train, k=k, eps=eps).entropy,
                "entropy_pool": kl_entropy(pool, k=k, eps=eps).entropy,
                "distinct_train": int(len(np.unique(np.round(train, 6), axis=0))),
                "generalization_score": float(d1.mean()),
            }
        )
        sel_seed = derive_seed(seed, t + 1, 2)
        if method in ("none", "random") or n_pool == b:
            idx = select(n_pool, "random", b, seed=sel_seed).indices
        else:
            idx = select(pool, method, b, seed=sel_seed, tau0=tau0, decay=decay).indices
        train = pool[np.asarray(idx)]
    return rows
