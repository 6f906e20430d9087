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
from selectorch.functional.selective import (
    RiskCoverage,
    augrc,
    aupr_in,
    aupr_out,
    aurc,
    coverage_at_risk,
    eaurc,
    fpr_at_tpr,
    oracle_aurc,
    risk_at_coverage,
    risk_coverage_curve,
)
from selectorch.functional.thresholds import (
    coverage_threshold,
    interpolated_quantile,
    min_calibration_size,
)

__all__ = [
    "METRICS",
    "STATS",
    "RiskCoverage",
    "augrc",
    "aupr_in",
    "aupr_out",
    "aurc",
    "auroc",
    "coverage_at_risk",
    "coverage_threshold",
    "eaurc",
    "energy_score",
    "finite_rows",
    "fpr_at_tpr",
    "interpolated_quantile",
    "knn_score",
    "knn_search",
    "knn_statistic",
    "midranks",
    "min_calibration_size",
    "oracle_aurc",
    "pairwise_distance",
    "risk_at_coverage",
    "risk_coverage_curve",
    "softmax_score",
]
