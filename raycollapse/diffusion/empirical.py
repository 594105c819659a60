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
    float64 numpy (the softmax over training points is sharp at small ``t``; numpy keeps these
    small products off torch's thread pool).
    """

    def __init__(self, train: np.ndarray, train_scheduler: Any) -> None:
        super().__init__()
        self.points = np.asarray(train, dtype=np.float64)
        self.sq_norms = (self.points * self.points).sum(axis=1)
        self.alphas_cumprod = np.asarray(train_scheduler.alphas_cumprod, dtype=np.float64)
        self.config = SimpleNamespace(dim=int(self.points.shape[1]))

    def posterior_mean(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        """``m(x_t) = E[x_0 | x_t]`` (float64 ``N x d``) under the empirical distribution."""
        a = self.alphas_cumprod[np.asarray(t, dtype=np.int64)][:, None]
        # |x - s p|^2 = |x|^2 - 2 s x.p + s^2 |p|^2; the |x|^2 term cancels in the softmax.
        sq = -2.0 * np.sqrt(a) * (np.asarray(x, dtype=np.float64) @ self.points.T)
        logits = -(sq + a * self.sq_norms[None, :]) / (2.0 * (1.0 - a))
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (w / w.sum(axis=1, keepdims=True)) @ self.points

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels=None):
        t = np.broadcast_to(np.asarray(torch.as_tensor(timestep).cpu()), (sample.shape[0],))
        x = sample.detach().cpu().numpy().astype(np.float64)
        a = self.alphas_cumprod[t.astype(np.int64)][:, None]
        eps = (x - np.sqrt(a) * self.posterior_mean(x, t)) / np.sqrt(1.0 - a)
        return SimpleNamespace(
            sample=torch.as_tensor(eps, dtype=sample.dtype, device=sample.device)
        )


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
