"""Selection of the curation engine: one entry point, :func:`select`, over random, greedy
(k-center) and threshold decay.

Definitions in docs/design.md, "Greedy selection" and "Threshold decay", after Shi et al., "A
Closer Look at Model Collapse: From a Generalization-to-Memorization Perspective" (NeurIPS 2025,
arXiv 2509.16499). Every method returns exactly what the plain sequential definition returns
on canonical float64 distances (:func:`raycollapse.neighbors.distances.pair_distances`), ties to
the lowest index. Implementations live in :mod:`raycollapse.curation.greedy` and
:mod:`raycollapse.curation.threshold`.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from raycollapse.curation.greedy import GreedyResult, greedy_run, greedy_select, random_select
from raycollapse.curation.threshold import ThresholdResult, default_tau0, threshold_select
from raycollapse.errors import UserInputError

__all__ = [
    "METHODS",
    "GreedyResult",
    "Selection",
    "ThresholdResult",
    "default_tau0",
    "greedy_run",
    "greedy_select",
    "random_select",
    "select",
    "threshold_select",
]

METHODS = ("greedy", "threshold", "random")


@dataclass(frozen=True)
class Selection:
    """Output of :func:`select`: ``indices`` (int64, in the order chosen) and, for the
    threshold method, ``tau0``, ``tau_final`` and ``passes`` (see :class:`ThresholdResult`);
    for greedy, ``batches`` and ``pair_share`` (see :class:`GreedyResult`)."""

    indices: np.ndarray
    method: str
    tau0: float | None = None
    tau_final: float | None = None
    passes: int | None = None
    batches: int | None = None
    pair_share: float | None = None

    def threshold_report(self) -> dict[str, float | int]:
        """``tau0``, ``tau_final`` and ``passes`` of a threshold selection; empty otherwise."""
        if self.method != "threshold":
            return {}
        return {"tau0": self.tau0, "tau_final": self.tau_final, "passes": self.passes}


def select(
    x: Any,
    method: str,
    budget: int,
    *,
    seed: int = 0,
    tau0: float | None = None,
    decay: float = 0.9,
    max_passes: int = 10_000,
    device: str = "cpu",
    backend: str = "auto",
) -> Selection:
    """Choose ``budget`` rows of the features ``x`` (N, d) by ``method``.

    ``greedy``: :func:`~raycollapse.curation.greedy.greedy_run` (first point from ``seed``);
    ``threshold``: :func:`~raycollapse.curation.threshold.threshold_select` with ``tau0``
    (None: :func:`default_tau0`), ``decay`` and ``max_passes``; ``random``:
    :func:`random_select`, for which ``x`` may also be the number of candidates N (random
    selection needs no features). ``device`` and ``backend`` (greedy and threshold): see
    :func:`~raycollapse.neighbors.compute.resolve_compute`; the indices do not depend on them.
    Raises ``UserInputError`` for an unknown method and for the bad arguments each method
    refuses.
    """
    if method == "random":
        n = x if isinstance(x, numbers.Integral) and not isinstance(x, bool) else len(x)
        return Selection(random_select(int(n), budget, seed=seed), method)
    if method == "greedy":
        res = greedy_run(x, budget, seed=seed, device=device, backend=backend)
        return Selection(res.indices, method, batches=res.batches, pair_share=res.pair_share)
    if method == "threshold":
        th = threshold_select(
            x,
            budget,
            tau0=tau0,
            decay=decay,
            seed=seed,
            max_passes=max_passes,
            device=device,
            backend=backend,
        )
        return Selection(th.indices, method, th.tau0, th.tau_final, th.passes)
    raise UserInputError(
        f"selection method must be one of {', '.join(METHODS)}, got {method!r}; "
        "e.g. select.method=greedy"
    )
