"""Pure tensor functions: the math of every score, nearest-neighbour search and thresholds.

Nothing here holds state; the modules in :mod:`selectorch.scores` store fitted buffers and call
these functions.
"""

from __future__ import annotations

from selectorch.functional.distances import METRICS, pairwise_distance
from selectorch.functional.finite import finite_rows
from selectorch.functional.knn import STATS, knn_score, knn_search, knn_statistic
from selectorch.functional.logits import energy_score, softmax_score
from selectorch.functional.ranking import auroc, midranks
from selectorch.functional.thresholds import (
    coverage_threshold,
    interpolated_quantile,
    min_calibration_size,
)

__all__ = [
    "METRICS",
    "STATS",
    "auroc",
    "coverage_threshold",
    "energy_score",
    "finite_rows",
    "interpolated_quantile",
    "knn_score",
    "knn_search",
    "knn_statistic",
    "midranks",
    "min_calibration_size",
    "pairwise_distance",
    "softmax_score",
]
