"""What one trial of a sweep computes, without Ray: testable on its own, called by the trainables
of :mod:`raycollapse.sweeps.tuner`.

- select trials: one selection on a fixed pool and its quality (:func:`select_trial`);
- loop trials: one loop run, one metrics row per iteration (:func:`run_loop_trial`);
- the objective a trial reports after each iteration (:func:`objective_value`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from omegaconf import DictConfig

from raycollapse.curation.entropy import kl_entropy
from raycollapse.curation.select import greedy_select, random_select, threshold_select
from raycollapse.neighbors.knn import knn_search, knn_self


def select_indices(x: np.ndarray, sel: Any) -> np.ndarray:
    """The rows of ``x`` that ``sel`` (the ``select`` config section) chooses, in order chosen."""
    if sel.method == "greedy":
        return greedy_select(x, sel.budget, seed=sel.seed)
    if sel.method == "threshold":
        return threshold_select(
            x, sel.budget, tau0=sel.tau0, decay=sel.decay, seed=sel.seed
        ).indices
    return random_select(len(x), sel.budget, seed=sel.seed)


def select_trial(x: np.ndarray, cfg: DictConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Select ``cfg.select.budget`` rows of the pool ``x`` with ``cfg.select``; measure them.

    Returns the indices (in the order chosen) and the metrics: ``entropy`` (KL entropy of the
    selection, ``knn.k``, ``knn.eps``; docs/design.md, "KL entropy"), ``min_pairwise_distance``
    (smallest distance between two selected rows), ``coverage_radius`` (largest distance from a
    pool row to its nearest selected row) and ``seconds`` (the selection alone). Distances are
    exact Euclidean (``neighbors.knn``).
    """
    start = time.perf_counter()
    idx = select_indices(x, cfg.select)
    seconds = time.perf_counter() - start
    chosen = x[idx]
    return idx, {
        "entropy": kl_entropy(chosen, k=cfg.knn.k, eps=cfg.knn.eps).entropy,
        "min_pairwise_distance": float(knn_self(chosen, 1).distances[:, 0].min()),
        "coverage_radius": float(knn_search(chosen, x, 1).distances[:, 0].max()),
        "seconds": seconds,
    }


def objective_value(values: list[float | None], reduce: str) -> float:
    """The objective after the iterations so far: the last value, or the mean of the defined
    ones (``reduce="mean"``); NaN while undefined (a scheduler then lets the trial continue)."""
    defined = [float(v) for v in values if v is not None and math.isfinite(v)]
    if reduce == "last":
        last = values[-1] if values else None
        return float(last) if last is not None else math.nan
    return float(np.mean(defined)) if defined else math.nan


def run_loop_trial(
    cfg: DictConfig,
    report: Callable[[dict[str, Any]], None],
    log: Callable[[str], None],
) -> None:
    """Run (or resume) the loop of ``cfg``; ``report`` each iteration's metrics row.

    One ``run_loop(cfg, on_iteration=...)``: each finished iteration is logged to TensorBoard in
    the trial's run folder (``cfg.tracking.tensorboard``; Ray Tune logs to MLflow / W&B), then
    reported. The run folder holds every finished iteration, so a trial stopped between two
    reports (by ASHA, or a killed sweep) resumes with ``raycollapse run`` on its config, and a
    restarted trial skips what is done (its finished iterations are reported again).
    """
    from raycollapse.loop.runner import run_loop
    from raycollapse.tracking import make_tracker

    tracker = make_tracker(cfg, external=False)

    def on_iteration(row: dict[str, Any]) -> None:
        tracker(row)
        report(row)

    run_loop(cfg, log=log, on_iteration=on_iteration)
