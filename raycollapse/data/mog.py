"""Mixtures of Gaussians: parameters, exact sampling, log-density and the true entropy.

docs/design.md, "Mixture of Gaussians". A mixture ``p(x) = sum_i w_i N(x; mu_i, Sigma_i)`` in
``d`` dimensions with ``K`` components:

- sampling is exact: the component of each sample is drawn from ``w``, then
  ``x = mu_i + L_i z`` with ``L_i`` the Cholesky factor of ``Sigma_i`` and ``z ~ N(0, I)``;
- the entropy ``H = -E[log p(X)]`` (nats) is closed form for ``K = 1``:
  ``H = (d/2) log(2 pi e) + (1/2) log det Sigma``;
- for ``K > 1`` it has no closed form; :func:`mixture_entropy` estimates it by Monte Carlo:
  ``H_hat = -(1/n) sum_j log p(x_j)`` over ``n`` exact samples, an unbiased estimate with
  standard error ``s / sqrt(n)`` (``s`` the sample standard deviation of ``log p(x_j)``), and
  ``sum_i w_i H_i <= H <= sum_i w_i H_i + H(w)`` (:func:`entropy_bounds`) as a check.

Pure numpy (float64); nothing here imports Ray or torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from raycollapse.errors import UserInputError

LOG_2PI = math.log(2.0 * math.pi)


@dataclass(frozen=True)
class Mixture:
    """``weights`` (K,) summing to 1, ``means`` (K, d), ``covariances`` (K, d, d) SPD."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray

    @property
    def components(self) -> int:
        return len(self.weights)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def cholesky(self) -> np.ndarray:
        """Lower Cholesky factors (K, d, d)."""
        return np.linalg.cholesky(self.covariances)

    def to_dict(self) -> dict[str, Any]:
        """Plain lists (JSON)."""
        return {
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covariances": self.covariances.tolist(),
        }


def make_mixture(weights: Any, means: Any, covariances: Any) -> Mixture:
    """A checked :class:`Mixture`; weights are normalised to sum 1.

    Raises ``UserInputError`` naming the ``data.mog`` key for a shape mismatch, a non-positive
    weight or a covariance that is not symmetric positive definite.
    """
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    mu = np.asarray(means, dtype=np.float64)
    cov = np.asarray(covariances, dtype=np.float64)
    k = len(w)
    if k < 1 or mu.ndim != 2 or mu.shape[0] != k or mu.shape[1] < 1:
        raise UserInputError(
            f"data.mog.means must be K={k} lists of d >= 1 numbers (one per weight), got shape {mu.shape}."
        )
    d = mu.shape[1]
    if cov.shape != (k, d, d):
        raise UserInputError(
            f"data.mog.covariances must be K={k} matrices of {d} x {d} (K x d x d), got shape {cov.shape}."
        )
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise UserInputError(f"data.mog.weights must be positive numbers, got {w.tolist()}.")
    for i, c in enumerate(cov):
        if not np.allclose(c, c.T, rtol=1e-10, atol=1e-12):
            raise UserInputError(f"data.mog.covariances[{i}] is not symmetric.")
        if not np.all(np.isfinite(c)) or np.linalg.eigvalsh(c).min() <= 0:
            raise UserInputError(
                f"data.mog.covariances[{i}] is not positive definite; every covariance needs positive eigenvalues."
            )
    return Mixture(w / w.sum(), mu, cov)


def random_mixture(
    components: int, dim: int, *, seed: int, spread: float = 1.0, scale: float = 0.2
) -> Mixture:
    """A seeded random mixture: equal weights, means uniform in ``[-spread, spread]^d``, each
    covariance ``R diag(s^2) R^T`` with a random rotation ``R`` and axis deviations ``s``
    log-uniform in ``[scale / 2, scale]``."""
    if components < 1 or dim < 1:
        raise UserInputError(
            f"data.mog.components and data.mog.dim must be >= 1, got {components} and {dim}."
        )
    if spread <= 0 or scale <= 0:
        raise UserInputError(
            f"data.mog.spread and data.mog.scale must be > 0, got {spread} and {scale}."
        )
    rng = np.random.default_rng(seed)
    means = rng.uniform(-spread, spread, size=(components, dim))
    covs = np.empty((components, dim, dim))
    for i in range(components):
        q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
        rot = q * np.sign(np.diag(r))  # Haar-distributed rotation
        s = scale * np.exp(rng.uniform(math.log(0.5), 0.0, size=dim))
        covs[i] = (rot * s**2) @ rot.T
        covs[i] = 0.5 * (covs[i] + covs[i].T)
    return make_mixture(np.full(components, 1.0 / components), means, covs)


def mixture_from_config(mog: Any) -> Mixture:
    """The mixture of a ``data.mog`` section: given parameters, or seeded random ones."""
    k, d = int(mog.components), int(mog.dim)
    rand = random_mixture(
        k, d, seed=int(mog.seed), spread=float(mog.spread), scale=float(mog.scale)
    )
    params = {"weights": rand.weights, "means": rand.means, "covariances": rand.covariances}
    for key, shape in (("weights", (k,)), ("means", (k, d)), ("covariances", (k, d, d))):
        value = getattr(mog, key)
        if value is None:
            continue
        arr = np.asarray(_plain(value), dtype=np.float64)
        if arr.shape != shape:
            raise UserInputError(
                f"data.mog.{key} has shape {arr.shape}, but data.mog.components={k} and "
                f"data.mog.dim={d} need {shape}; make them agree."
            )
        params[key] = arr
    return make_mixture(params["weights"], params["means"], params["covariances"])


def _plain(value: Any) -> Any:
    """Nested lists of an OmegaConf list (or plain lists) as plain Python lists."""
    if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
        return value
    return [_plain(v) for v in value]


def sample_mixture(mix: Mixture, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` exact samples ``(x float64 (n, d), component int64 (n,))``."""
    comp = rng.choice(mix.components, size=n, p=mix.weights).astype(np.int64)
    z = rng.standard_normal((n, mix.dim))
    x = mix.means[comp] + np.einsum("nij,nj->ni", mix.cholesky()[comp], z)
    return x, comp


def component_log_pdf(mix: Mixture, x: np.ndarray) -> np.ndarray:
    """``log N(x_j; mu_i, Sigma_i)`` as an (n, K) array."""
    x = np.asarray(x, dtype=np.float64)
    chol = mix.cholesky()
    out = np.empty((len(x), mix.components))
    for i in range(mix.components):
        y = np.linalg.solve(chol[i], (x - mix.means[i]).T)  # L^-1 (x - mu)
        logdet = 2.0 * np.log(np.diag(chol[i])).sum()
        out[:, i] = -0.5 * (mix.dim * LOG_2PI + logdet + (y * y).sum(axis=0))
    return out


def log_pdf(mix: Mixture, x: np.ndarray) -> np.ndarray:
    """``log p(x_j)`` of the mixture (log-sum-exp over components), shape (n,)."""
    a = component_log_pdf(mix, x) + np.log(mix.weights)
    top = a.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=1, keepdims=True)))[:, 0]


def gaussian_entropy(cov: np.ndarray) -> float:
    """Closed-form entropy (nats) of ``N(mu, cov)``: ``(d/2) log(2 pi e) + (1/2) log det cov``."""
    cov = np.asarray(cov, dtype=np.float64)
    _, logdet = np.linalg.slogdet(cov)
    return 0.5 * (cov.shape[0] * (LOG_2PI + 1.0) + logdet)


def entropy_bounds(mix: Mixture) -> tuple[float, float]:
    """``(sum_i w_i H_i, sum_i w_i H_i + H(w))``: the true entropy lies between them; the upper
    bound is reached as the components separate."""
    inner = float(
        sum(w * gaussian_entropy(c) for w, c in zip(mix.weights, mix.covariances, strict=True))
    )
    return inner, inner - float((mix.weights * np.log(mix.weights)).sum())


@dataclass(frozen=True)
class EntropyEstimate:
    """The true entropy (nats): ``value`` with standard error ``stderr`` (0 when exact)."""

    value: float
    stderr: float
    method: str  # "closed form" or "monte carlo"
    samples: int = 0


def mixture_entropy(mix: Mixture, *, mc_samples: int = 200000, seed: int = 0) -> EntropyEstimate:
    """The entropy of ``mix``: closed form for one component, else Monte Carlo (module docstring).

    The Monte Carlo draws are seeded by ``seed`` and evaluated in chunks (memory stays small).
    """
    if mix.components == 1:
        return EntropyEstimate(gaussian_entropy(mix.covariances[0]), 0.0, "closed form")
    if mc_samples < 1000:
        raise UserInputError(f"data.mog.mc_samples must be >= 1000, got {mc_samples}.")
    rng = np.random.default_rng(seed)
    total = total_sq = 0.0
    chunk = 100000
    for lo in range(0, mc_samples, chunk):
        x, _ = sample_mixture(mix, min(chunk, mc_samples - lo), rng)
        lp = log_pdf(mix, x)
        total += float(lp.sum())
        total_sq += float((lp * lp).sum())
    mean = total / mc_samples
    var = max(0.0, total_sq / mc_samples - mean * mean) * mc_samples / (mc_samples - 1)
    return EntropyEstimate(-mean, math.sqrt(var / mc_samples), "monte carlo", mc_samples)
