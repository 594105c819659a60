"""The Pearson correlation between two per-iteration metrics (the paper: training-set entropy
against generalization score, r = 0.91 over its runs).

No Ray, no plotting: :func:`pearson` is the one computation, used by the run report, the sweep
report and ``summary.json``. An undefined correlation (fewer than two points, or a metric that
does not vary) is ``r = None`` with the reason, never a silent NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

X_METRIC = "entropy_train"
Y_METRIC = "generalization_score"


@dataclass(frozen=True)
class Correlation:
    """Pearson's r over ``n`` points; ``r`` is ``None`` when undefined, ``reason`` says why."""

    r: float | None
    n: int
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """``{"r", "n", "undefined"}`` for JSON (``undefined``: the reason, or null)."""
        return {"r": self.r, "n": self.n, "undefined": self.reason}

    def text(self) -> str:
        """``r = 0.912 (n = 12)``, or ``r undefined (n = 1: fewer than 2 points)``."""
        if self.r is None:
            return f"r undefined (n = {self.n}: {self.reason})"
        return f"r = {self.r:.3f} (n = {self.n})"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def paired(xs: Sequence[Any], ys: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """The pairs where both values are finite numbers (None, NaN and text are dropped)."""
    pairs = [(a, b) for a, b in ((_number(x), _number(y)) for x, y in zip(xs, ys, strict=True))]
    kept = [(a, b) for a, b in pairs if a is not None and b is not None]
    x = np.array([a for a, _ in kept], dtype=np.float64)
    y = np.array([b for _, b in kept], dtype=np.float64)
    return x, y


def pearson(
    xs: Sequence[Any], ys: Sequence[Any], names: tuple[str, str] = ("x", "y")
) -> Correlation:
    """Pearson's r = sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2)
    over the pairs where both values are finite numbers (see :func:`paired`).

    Undefined (``r=None``) with fewer than 2 pairs or when either side is constant (all its
    values equal: the denominator is 0; ``names`` name the sides in the reason). Computed in float64, clipped to [-1, 1] (rounding).
    """
    x, y = paired(xs, ys)
    n = len(x)
    if n < 2:
        return Correlation(None, n, "fewer than 2 points")
    # Equal values are tested directly: their mean may differ from them by an ulp, which would
    # give a tiny non-zero variance and a meaningless r.
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        side = names[0] if np.ptp(x) == 0 else names[1]
        return Correlation(None, n, f"zero variance ({side} constant)")
    dx, dy = x - x.mean(), y - y.mean()
    r = float(np.sum(dx * dy) / math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy))))
    return Correlation(min(1.0, max(-1.0, r)), n)


def rows_correlation(
    rows: Iterable[dict[str, Any]], x: str = X_METRIC, y: str = Y_METRIC
) -> Correlation:
    """:func:`pearson` of metric ``x`` against metric ``y`` over metrics rows (dicts)."""
    rows = list(rows)
    return pearson([r.get(x) for r in rows], [r.get(y) for r in rows], (x, y))
