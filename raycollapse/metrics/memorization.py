"""Memorization metrics on feature arrays, built on exact kNN: the generalization score and
the memorized fraction (docs/design.md, "Generalization score" and "Memorized fraction"; Shi et
al., NeurIPS 2025, arXiv 2509.16499).

All distances are Euclidean. The ``*_from_distances`` forms take precomputed nearest-neighbour
distances, for the sharded Ray path.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from raycollapse.errors import UserInputError
from raycollapse.neighbors.knn import knn_search
from raycollapse.neighbors.validate import as_distances, as_features, check_same_dim

__all__ = [
    "generalization_from_distances",
    "generalization_score",
    "memorized_fraction",
    "memorized_from_distances",
]


def generalization_from_distances(d1: np.ndarray) -> float:
    """Mean of ``d1``, each generated sample's distance to its nearest training sample."""
    return float(as_distances(d1, "d1").mean())


def generalization_score(generated: np.ndarray, train: np.ndarray) -> float:
    """Average minimum distance: mean over ``generated`` rows of the Euclidean distance to the
    nearest ``train`` row (the paper's generalization score; higher = less copying)."""
    gen = as_features(generated, "generated", min_rows=1)
    tr = as_features(train, "train", min_rows=1)
    check_same_dim(gen, tr, "generated", "train")
    return generalization_from_distances(knn_search(tr, gen, 1).distances[:, 0])


def memorized_from_distances(d1: np.ndarray, d2: np.ndarray, ratio: float = 1 / 3) -> float:
    """Share of samples with ``d1 < d2 / (1 / ratio)`` (strict; ``d1 < d2 / 3`` exactly for the
    default, docs/design.md "Memorized fraction"), from nearest and second-nearest
    training distances. A sample equal to two identical training rows (d1 = d2 = 0) does not
    count: the rule compares it with the second copy, which is as close."""
    d1 = as_distances(d1, "d1")
    d2 = as_distances(d2, "d2")
    if d1.shape != d2.shape:
        raise UserInputError(f"d1 and d2 must have the same shape, got {d1.shape} and {d2.shape}")
    if not (isinstance(ratio, numbers.Real) and 0 < ratio and math.isfinite(ratio)):
        raise UserInputError(f"ratio must be a positive number, got {ratio!r}; the paper uses 1/3")
    # Divide as the definition does: ratio * d2 differs from d2 / 3 by one rounding step.
    return float(np.mean(d1 < d2 / (1.0 / ratio)))


def memorized_fraction(generated: np.ndarray, train: np.ndarray, ratio: float = 1 / 3) -> float:
    """Share of ``generated`` rows whose nearest ``train`` row is much closer than the second
    nearest: d1 < d2 / (1 / ratio) (docs/design.md, "Memorized fraction": d1 < d2 / 3). Needs at
    least 2 training rows."""
    gen = as_features(generated, "generated", min_rows=1)
    tr = as_features(train, "train")
    check_same_dim(gen, tr, "generated", "train")
    res = knn_search(tr, gen, 2)
    return memorized_from_distances(res.distances[:, 0], res.distances[:, 1], ratio)
