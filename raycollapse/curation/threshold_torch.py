"""Threshold decay with its matrix products in torch, on any device (CUDA or the CPU).

The walk, the cached bounds and every decision are those of
:class:`~raycollapse.curation.threshold_state.ThresholdState` (docs/design.md, "Threshold decay"); only
the two float32 products move to the device: candidates against the accepted points, and the
conflicts inside a block. Their error bounds hold for any summation order, so the decisions,
hence the accepted indices, are the CPU path's. Borderline cases are settled with the canonical
float64 formula on the host, as on the CPU.
"""

from __future__ import annotations

import numpy as np

from raycollapse.curation.threshold_state import _COLS, ThresholdState
from raycollapse.neighbors.compute import Compute

__all__ = ["TorchThreshold"]


class TorchThreshold(ThresholdState):
    """:class:`ThresholdState` whose products run on ``compute.device``. The centred rows live on
    the device; accepted rows are uploaded in bulk when a product first needs them."""

    def __init__(self, x: np.ndarray, budget: int, compute: Compute) -> None:
        import torch

        super().__init__(x, budget)
        self.dev = torch.device(compute.device)
        self.xa_d = torch.from_numpy(self.sp.xa).to(self.dev)
        self.acc_xa_d = torch.empty((budget, x.shape[1]), dtype=torch.float32, device=self.dev)
        self.acc_s2f_d = torch.empty(budget, dtype=torch.float32, device=self.dev)
        self.synced = 0  # accepted rows already on the device

    def _sync(self, a_end: int) -> None:
        import torch

        if a_end > self.synced:
            sl = slice(self.synced, a_end)
            self.acc_xa_d[sl] = torch.from_numpy(self.acc_xa[sl]).to(self.dev)
            self.acc_s2f_d[sl] = torch.from_numpy(self.acc_s2f[sl]).to(self.dev)
            self.synced = a_end

    def _qmin(self, rows: np.ndarray, lo: int, a_end: int) -> np.ndarray:
        import torch

        self._sync(a_end)
        xr = self.xa_d[torch.from_numpy(rows).to(self.dev)]
        qmin = torch.full((len(rows),), float("inf"), dtype=torch.float32, device=self.dev)
        for c0 in range(lo, a_end, _COLS):
            c1 = min(c0 + _COLS, a_end)
            t = xr @ self.acc_xa_d[c0:c1].T
            t *= -2.0
            t += self.acc_s2f_d[c0:c1]
            torch.minimum(qmin, t.min(dim=1).values, out=qmin)
        return qmin.cpu().numpy()

    def _gram(self, ok: np.ndarray) -> np.ndarray:
        import torch

        xo = self.xa_d[torch.from_numpy(ok).to(self.dev)]
        return (xo @ xo.T).cpu().numpy()
