"""Centred float32 coordinates with rigorous error bounds on product-based distances, the tool
that lets greedy selection and threshold decay take every decision exactly as the canonical
formula (docs/design.md, "Greedy selection") while computing most distances by matrix products.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from raycollapse.errors import UserInputError
from raycollapse.neighbors.distances import pair_distances

__all__ = ["ApproxSpace"]

_U32 = 2.0**-24  # unit roundoff of float32
_U64 = 2.0**-53  # unit roundoff of float64
_CHUNK = 1 << 16  # rows per chunk of the float64 norms


class ApproxSpace:
    """Centred float32 copy of the features with rigorous bounds on product-based distances.

    ``xa[i] = float32(x[i] - mean)`` (float32 subtraction of one fixed float32 vector) and
    ``s2[i] = |xa[i]|^2`` (float64). For the approximate squared distance
    ``q = s2[i] + s2[j] - 2 * float32_dot(xa[i], xa[j])``:

    * ``|q - |xa_i - xa_j|^2| <= E = 3 gamma_d s_i s_j + 4 (d + 3) u64 (s_i + s_j)^2`` (float32
      dot products of any summation order obey ``gamma_d = d u32 / (1 - d u32)``);
    * ``| |xa_i - xa_j| - |x_i - x_j| | <= F = 1.02 u32 (s_i + s_j)`` (rounding of the centring);
    * the canonical float64 value is within a factor ``rel = 1 + 2 (d + 4) u64`` of the true one.

    :meth:`lower` and :meth:`upper` turn ``q`` into bounds of the canonical distance.
    """

    def __init__(self, x: np.ndarray, mean: np.ndarray | None = None) -> None:
        n, d = x.shape
        self.d = d
        if mean is None:
            mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.mean = np.asarray(mean, dtype=np.float32)
        # any fixed translation works (shards of one pool share one); rounding is bounded by F
        self.xa = x - self.mean
        self.s2 = np.empty(n, dtype=np.float64)
        for s in range(0, n, _CHUNK):
            xa64 = self.xa[s : s + _CHUNK].astype(np.float64)
            self.s2[s : s + _CHUNK] = np.einsum("ij,ij->i", xa64, xa64)
        self.s = np.sqrt(self.s2)
        du = d * _U32
        if du >= 0.01:
            raise UserInputError(
                f"features have d={d} dimensions; at most {int(0.01 / _U32)} are supported, "
                "reduce the dimension (e.g. PCA) first"
            )
        self.gamma = du / (1.0 - du)
        self.c64 = 4.0 * (d + 3) * _U64
        self.rel = (1.0 + 2.0 * (d + 4) * _U64) * (1.0 + 1e-12)

    def centre(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(xa, s2, s)`` of other float32 ``rows`` in this space (e.g. another shard's)."""
        xa = rows - self.mean
        xa64 = xa.astype(np.float64)
        s2 = np.einsum("ij,ij->i", xa64, xa64)
        return xa, s2, np.sqrt(s2)

    def err(self, si: np.ndarray | float, sj: np.ndarray | float) -> tuple[Any, Any]:
        """The bounds (E, F) of the class docstring for norms ``si`` and ``sj``."""
        ssum = si + sj
        return 3.0 * self.gamma * si * sj + self.c64 * ssum * ssum, 1.02 * _U32 * ssum

    def lower(self, q: Any, e: Any, f: Any) -> Any:
        """Lower bound of the canonical distance given approximate squared distance ``q``."""
        return (np.sqrt(np.maximum(q - e, 0.0)) - f) / self.rel

    def upper(self, q: Any, e: Any, f: Any) -> Any:
        """Upper bound of the canonical distance given approximate squared distance ``q``."""
        return (np.sqrt(np.maximum(q + e, 0.0)) + f) * self.rel

    def q_limits(self, tau: float, e: float, f: float) -> tuple[float, float]:
        """Scalars ``(qu, ql)`` for one threshold ``tau`` and scalar bounds ``e``, ``f``:
        ``q <= qu`` implies ``upper(q, e, f) <= tau`` (the canonical distance is <= tau) and
        ``q >= ql`` implies ``lower(q, e, f) > tau`` (it is > tau). :meth:`upper` and
        :meth:`lower` are monotone in ``q`` as computed (each float operation is), so one
        comparison of ``q`` replaces both bounds; the limits are checked with those very
        functions and moved outwards until they hold."""
        qu = (tau / self.rel - f) ** 2 - e if tau / self.rel > f else -np.inf
        while qu > -np.inf and self.upper(qu, e, f) > tau:
            qu -= abs(qu) * 1e-15 + 1e-300
        ql = (tau * self.rel + f) ** 2 + e
        while not self.lower(ql, e, f) > tau:
            ql += abs(ql) * 1e-15 + 1e-300
        return float(qu), float(ql)


def valid_prefix(sp: ApproxSpace, x: np.ndarray, top: np.ndarray, mt: np.ndarray) -> np.ndarray:
    """The longest prefix of ``top`` (points in (-m, index) order, ``mt`` their m) whose
    points are each at canonical distance >= their own m from the earlier ones: adding them
    together takes the same greedy steps as adding them one by one (see :class:`_Greedy`)."""
    xt, s2, s = sp.xa[top], sp.s2[top], sp.s[top]
    e, f = sp.err(s[:, None], s[None, :])
    lb = sp.lower(s2[:, None] + s2[None, :] - 2.0 * (xt @ xt.T), e, f)
    bad = np.tril(lb < mt[:, None], -1)  # pair (j, i < j) not proven harmless
    for j in np.flatnonzero(bad.any(axis=1)).tolist():
        prev = top[:j][bad[j, :j]]
        if (pair_distances(x[prev], x[top[j]]) < mt[j]).any():
            return top[:j]
    return top
