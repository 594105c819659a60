"""One PNG per numeric metric: the metric against iteration, one line (with markers) per run.

matplotlib is imported inside the functions and drawn on an explicit Agg canvas (no pyplot, no
``matplotlib.use``): importing this module changes nothing, and rendering touches no global
backend state, so it is safe next to a user's interactive session or in a worker thread.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

from raycollapse.report.collect import RunData

# The paper's headline quantities first, in the order a reader compares them.
_KEY_ORDER = (
    "entropy_train",
    "entropy_pool",
    "entropy_generated",
    "generalization_score",
    "memorized_fraction",
    "fid",
    "precision",
    "recall",
    "density",
    "coverage",
)

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")

GROUPS = (
    "Entropy, generalization and memorization",
    "Fidelity and diversity",
    "Training-set lineage",
    "Timings and throughput",
    "Other metrics",
)


@dataclass
class MetricPlot:
    """A rendered plot: ``png`` is ``None`` when no run has a value for the metric."""

    metric: str
    group: str
    png: bytes | None
    runs: list[str]  # runs drawn (those with at least one value)


def metric_group(name: str) -> str:
    """The report section a metric belongs to, from its name."""
    if name.startswith("entropy") or name in ("generalization_score", "memorized_fraction"):
        return GROUPS[0]
    if name.startswith("fd_") or name in ("fid", "precision", "recall", "density", "coverage"):
        return GROUPS[1]
    if name.startswith("share_"):
        return GROUPS[2]
    if name.startswith("seconds") or "throughput" in name or name.endswith("_per_s"):
        return GROUPS[3]
    return GROUPS[4]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _sort_key(name: str) -> tuple[int, int, str]:
    # fd_<features> sit beside fid: the same Fréchet distance in another feature space.
    known = "fid" if name.startswith("fd_") else name
    rank = _KEY_ORDER.index(known) if known in _KEY_ORDER else len(_KEY_ORDER)
    # share_gen_10 after share_gen_9: compare the trailing number as a number.
    head, _, tail = name.rpartition("_")
    return (
        GROUPS.index(metric_group(name)),
        rank,
        f"{head}_{int(tail):06d}" if tail.isdigit() else name,
    )


def metric_names(runs: Sequence[RunData]) -> list[str]:
    """Every key that holds a number (or null) in some row of some run, ``iteration`` excluded.

    A key whose values are all null still counts (e.g. ``fid`` without Inception weights): the
    report says it has no values rather than silently dropping it.
    """
    names: set[str] = set()
    for run in runs:
        for row in run.rows:
            names.update(
                k for k, v in row.items() if k != "iteration" and (v is None or _is_number(v))
            )
    # A key that is only ever null and never a number anywhere stays only if it is a known metric
    # or a metric-like family: a stray null text field should not get a plot.
    numeric = {k for run in runs for row in run.rows for k, v in row.items() if _is_number(v)}
    names = {n for n in names if n in numeric or n in _KEY_ORDER or n.startswith("fd_")}
    return sorted(names, key=_sort_key)


def series(run: RunData, metric: str) -> tuple[list[int], list[float]]:
    """``(iterations, values)`` of one run; a missing or null value is NaN, drawn as a gap."""
    xs = [int(r["iteration"]) for r in run.rows]
    ys = [float(r[metric]) if _is_number(r.get(metric)) else math.nan for r in run.rows]
    return xs, ys


def plot_metric(metric: str, runs: Sequence[RunData], *, dpi: int = 100) -> MetricPlot:
    """One PNG: ``metric`` against iteration, one line with markers per run that has a value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    drawn = [(run.name, *series(run, metric)) for run in runs]
    drawn = [d for d in drawn if any(math.isfinite(y) for y in d[2])]
    if not drawn:
        return MetricPlot(metric, metric_group(metric), None, [])
    fig = Figure(figsize=(4.8, 3.1), dpi=dpi)
    FigureCanvasAgg(fig)  # attaches the Agg canvas to this figure only
    ax = fig.add_subplot()
    for j, (name, xs, ys) in enumerate(drawn):
        # Runs with equal values would hide each other: vary the marker and keep lines translucent.
        marker = _MARKERS[j % len(_MARKERS)]
        ax.plot(xs, ys, marker=marker, markersize=4, linewidth=1.5, alpha=0.85, label=name)
    # One x range for every plot (all runs' iterations), so plots line up and a metric with a
    # single point does not get fractional iteration ticks.
    every = [int(r["iteration"]) for run in runs for r in run.rows]
    ax.set_xlim(min(every) - 0.3, max(every) + 0.3)
    ax.set_title(metric, fontsize=10)
    ax.set_xlabel("iteration", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # iterations are whole numbers
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return MetricPlot(metric, metric_group(metric), buf.getvalue(), [d[0] for d in drawn])


def plot_all(runs: Sequence[RunData], *, dpi: int = 100) -> list[MetricPlot]:
    """A plot per metric of :func:`metric_names`, in report order."""
    return [plot_metric(name, runs, dpi=dpi) for name in metric_names(runs)]


def plot_scatter(
    groups: Sequence[tuple[str, Sequence[float], Sequence[float]]],
    x_label: str,
    y_label: str,
    title: str,
    *,
    dpi: int = 100,
    max_legend: int = 12,
) -> bytes | None:
    """One PNG: ``y`` against ``x``, one colour and marker per group (a run or a trial);
    ``None`` when no group has a point. The legend lists at most ``max_legend`` groups."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn = [(name, list(xs), list(ys)) for name, xs, ys in groups if len(xs)]
    if not drawn:
        return None
    fig = Figure(figsize=(4.8, 3.6), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for j, (name, xs, ys) in enumerate(drawn):
        ax.scatter(xs, ys, s=18, marker=_MARKERS[j % len(_MARKERS)], alpha=0.8, label=name)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(x_label, fontsize=9)
    ax.set_ylabel(y_label, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    if len(drawn) <= max_legend:
        ax.legend(fontsize=7, loc="best", frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_param(
    key: str, xs: Sequence[object], ys: Sequence[float], y_label: str, *, dpi: int = 100
) -> bytes | None:
    """One PNG: the final objective of each trial against one swept value ``key``. Numbers sit on
    a numeric axis; anything else (names, lists) on one category per distinct value, in order of
    first appearance. ``None`` when no trial has a finite objective."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [
        (x, float(y)) for x, y in zip(xs, ys, strict=True) if _is_number(y) and math.isfinite(y)
    ]
    if not points:
        return None
    fig = Figure(figsize=(4.8, 3.1), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if all(_is_number(x) for x, _ in points):
        ax.scatter([x for x, _ in points], [y for _, y in points], s=22)
    else:
        labels = list(dict.fromkeys(str(x) for x, _ in points))
        ax.scatter([labels.index(str(x)) for x, _ in points], [y for _, y in points], s=22)
        ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
        ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_title(f"final {y_label} vs {key}", fontsize=10)
    ax.set_xlabel(key, fontsize=9)
    ax.set_ylabel(y_label, fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
