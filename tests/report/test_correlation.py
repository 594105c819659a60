"""Pearson's r of the reports: against closed forms, the textbook formula and scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import pearsonr

from raycollapse.report.correlation import pearson, rows_correlation


def test_closed_forms():
    x = [0.0, 1.0, 2.0, 3.0, 7.5]
    assert pearson(x, [3 * v - 2 for v in x]).r == pytest.approx(1.0, abs=1e-15)
    assert pearson(x, [-0.5 * v + 9 for v in x]).r == pytest.approx(-1.0, abs=1e-15)
    # x = (-1, 0, 1), y = (1, -2, 1): the sum of products is 0, so r = 0 exactly.
    assert pearson([-1, 0, 1], [1, -2, 1]).r == 0.0
    # x = (1, 2, 3), y = (1, 3, 2): Sxy = 1, Sxx = Syy = 2, r = 1/2.
    assert pearson([1, 2, 3], [1, 3, 2]).r == pytest.approx(0.5, abs=1e-15)


def test_equals_the_formula_and_scipy():
    rng = np.random.default_rng(3)
    for n in (2, 3, 10, 200):
        x = rng.normal(size=n) * 40 + 1e3  # a large mean: the centring must be done
        y = 0.3 * x + rng.normal(size=n) * 5
        mx, my = sum(x) / n, sum(y) / n
        num = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
        den = math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))
        c = pearson(list(x), list(y))
        assert c.n == n and c.reason is None
        assert c.r == pytest.approx(num / den, rel=1e-12, abs=1e-12)
        assert c.r == pytest.approx(pearsonr(x, y).statistic, rel=1e-10, abs=1e-12)


def test_missing_values_are_dropped_pairwise():
    x = [1.0, None, 2.0, float("nan"), 4.0, 5.0, "text"]
    y = [2.0, 3.0, None, 1.0, 3.0, 7.0, 1.0]
    c = pearson(x, y)
    assert c.n == 3 and c.r == pytest.approx(pearsonr([1, 4, 5], [2, 3, 7]).statistic, rel=1e-12)
    rows = [{"entropy_train": a, "generalization_score": b} for a, b in zip(x, y, strict=True)]
    assert rows_correlation(rows) == c


@pytest.mark.parametrize(
    ("x", "y", "n", "reason"),
    [
        ([], [], 0, "fewer than 2 points"),
        ([1.0], [2.0], 1, "fewer than 2 points"),
        ([1.0, None], [2.0, 3.0], 1, "fewer than 2 points"),
        ([0.1, 0.1, 0.1], [1.0, 2.0, 3.0], 3, "zero variance (x constant)"),  # mean(x) != 0.1
        ([1.0, 2.0], [4.0, 4.0], 2, "zero variance (y constant)"),
    ],
)
def test_undefined_is_none_with_a_reason(x, y, n, reason):
    c = pearson(x, y)
    assert (c.r, c.n, c.reason) == (None, n, reason)
    assert c.as_dict() == {"r": None, "n": n, "undefined": reason}
    assert "undefined" in c.text() and "nan" not in c.text().lower()
