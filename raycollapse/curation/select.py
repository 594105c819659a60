"""Selection algorithms of the curation engine: random, greedy (k-center) and threshold decay.

Definitions in DESIGN.md ("Definitions") after Shi et al., "A Closer Look at Model Collapse:
From a Generalization-to-Memorization Perspective" (NeurIPS 2025, arXiv 2509.16499). Every
function returns exactly what the plain sequential definition returns on canonical float64
distances (:func:`exact_distances`), ties to the lowest index. Implementations live in
:mod:`raycollapse.curation.greedy` and :mod:`raycollapse.curation.threshold`; this module is the public
entry point.
"""

from __future__ import annotations

from raycollapse.curation.greedy import exact_distances, greedy_select, random_select
from raycollapse.curation.threshold import ThresholdResult, default_tau0, threshold_select

__all__ = [
    "ThresholdResult",
    "default_tau0",
    "exact_distances",
    "greedy_select",
    "random_select",
    "threshold_select",
]
