"""Distribution metrics of a point set seen one chunk of rows at a time.

The loop's pool (N = m x B rows) need not fit on the driver: these accumulators take it chunk by
chunk, in any order, and give the values :mod:`raycollapse.metrics.distribution` computes on the
whole array:

- :class:`GaussianStats`: mean and covariance (float64, ddof=1) merged per chunk with Chan et
  al.'s pairwise update (each chunk centred on its own mean, so no E[x x^T] - mu mu^T
  cancellation); the Fréchet distance is then :func:`~raycollapse.metrics.distribution.frechet_from_stats`,
  equal to :func:`~raycollapse.metrics.distribution.frechet_distance` up to float64 rounding.
- :class:`PrdcAccumulator`: precision / recall / density / coverage (Naeem et al. 2020) of the
  fake set against an in-memory real set, given each fake row's k-NN radius within the fake set
  (a self-kNN of the whole fake set, which the caller computes: in process or on kNN shard
  actors). Every comparison is the one :func:`~raycollapse.metrics.distribution.prdc` makes, on
  the same exact float64 distances, and the results are integer counts, so the values are equal
  to ``prdc``'s bit for bit, whatever the chunks.
"""

from __future__ import annotations

import numpy as np

from raycollapse.errors import UserInputError
from raycollapse.metrics.distribution import _ball_counts
from raycollapse.neighbors.knn import knn_search, knn_self
from raycollapse.neighbors.validate import as_features, check_k, check_same_dim

__all__ = ["GaussianStats", "PrdcAccumulator"]

# Values per float64 temporary in GaussianStats.add (8 MiB, whatever d): the chunk's float64
# copy is then no larger than a float32 chunk of the loop's default size.
_STATS_VALUES = 2**20


class GaussianStats:
    """Streamed mean (d,) and covariance (d, d) of the rows added, float64, unbiased (ddof=1)."""

    def __init__(self, name: str = "features") -> None:
        self.name = name
        self.n = 0
        self._mean: np.ndarray | None = None
        self._m2: np.ndarray | None = None  # sum of outer products of deviations from the mean

    def add(self, x: np.ndarray) -> None:
        """Add the rows of ``x`` (any number >= 1)."""
        x = as_features(x, self.name, min_rows=1)
        rows = max(1, _STATS_VALUES // x.shape[1])
        for s in range(0, x.shape[0], rows):
            self._merge(x[s : s + rows])

    def _merge(self, x: np.ndarray) -> None:
        nb = x.shape[0]
        mb = x.sum(axis=0, dtype=np.float64) / nb
        c = x.astype(np.float64) - mb
        m2b = c.T @ c
        if self._mean is None or self._m2 is None:
            self.n, self._mean, self._m2 = nb, mb, m2b
            return
        if mb.shape != self._mean.shape:
            raise UserInputError(
                f"{self.name}: rows of {mb.shape[0]} features after rows of "
                f"{self._mean.shape[0]}; embed every row with the same feature extractor"
            )
        na, n = self.n, self.n + nb
        delta = mb - self._mean
        # Chan, Golub & LeVeque (1979): exact merge of two (count, mean, M2) summaries.
        self._m2 += m2b + np.outer(delta, delta) * (na * nb / n)
        self._mean += delta * (nb / n)
        self.n = n

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """``(mean, covariance)`` of the rows added (at least 2)."""
        if self._mean is None or self._m2 is None or self.n < 2:
            raise UserInputError(
                f"{self.name} must have at least 2 points (rows), got {self.n}; provide more samples"
            )
        return self._mean.copy(), self._m2 / (self.n - 1)


class PrdcAccumulator:
    """Precision, recall, density and coverage of a fake set added chunk by chunk against the
    in-memory ``real`` set (definitions, strict ``<`` and distances: :func:`~raycollapse.metrics.distribution.prdc`).

    :meth:`add` takes a chunk of fake rows with each row's ``fake_radii`` (the distance to its
    k-th nearest other fake row in the WHOLE fake set, as ``knn_self(fake, k)`` gives). Holds the
    real set, its radii and per-real counts; per chunk, distance tiles bounded as in ``prdc``.
    """

    def __init__(self, real: np.ndarray, k: int = 5) -> None:
        self.real = as_features(real, "real")
        self.k = check_k(k, self.real.shape[0], what="real points", hint="Naeem et al. use k=5")
        self.real_radii = knn_self(self.real, self.k).distances[:, self.k - 1]
        self.m = 0  # fake rows so far
        self._precise = 0  # fakes inside some real ball
        self._density = 0  # (fake, real ball) pairs with the fake inside
        self._recalled = np.zeros(self.real.shape[0], dtype=bool)  # real inside some fake ball
        self._nearest = np.full(self.real.shape[0], np.inf)  # nearest fake so far

    def add(self, fake: np.ndarray, fake_radii: np.ndarray) -> None:
        """Add fake rows ``fake`` (n, d) whose k-NN radii among all fakes are ``fake_radii``."""
        fake = as_features(fake, "fake", min_rows=1)
        check_same_dim(self.real, fake, "real", "fake")
        radii = np.asarray(fake_radii, dtype=np.float64)
        if radii.shape != (fake.shape[0],):
            raise UserInputError(
                f"fake_radii must hold one radius per fake row ({fake.shape[0]}), got shape "
                f"{radii.shape}"
            )
        in_real = _ball_counts(fake, self.real, self.real_radii)
        self._precise += int(np.count_nonzero(in_real))
        self._density += int(in_real.sum())
        self._recalled |= _ball_counts(self.real, fake, radii) > 0
        # The nearest fake of each real: the minimum over chunks of the exact distances.
        np.minimum(self._nearest, knn_search(fake, self.real, 1).distances[:, 0], out=self._nearest)
        self.m += fake.shape[0]

    def result(self) -> dict[str, float]:
        """The four metrics of the fake rows added (more than k of them)."""
        check_k(self.k, self.m, what="fake points", hint="Naeem et al. use k=5")
        # Integer counts over the same denominators as prdc's np.mean / sum: the same floats.
        return {
            "precision": float(np.float64(self._precise) / self.m),
            "recall": float(np.mean(self._recalled)),
            "density": float(self._density / (self.k * self.m)),
            "coverage": float(np.mean(self._nearest < self.real_radii)),
        }
