"""Pure tensor functions: the math of every score, nearest-neighbour search and thresholds.

Nothing here holds state; the modules in :mod:`selectorch.scores` store fitted buffers and call
these functions.
"""

from __future__ import annotations

from selectorch.functional.classwise import (
    class_banks,
    classwise_knn_score,
    classwise_knn_search,
    nearest_class,
)
from selectorch.functional.deup import (
    deup_score,
    error_predictor,
    kfold_indices,
    out_of_fold_predictions,
    train_error_predictor,
)
from selectorch.functional.distances import METRICS, pairwise_distance
from selectorch.functional.finite import finite_rows
from selectorch.functional.gaussian import (
    GaussianStats,
    class_sq_mahalanobis,
    fit_gaussian_stats,
    gaussian_precision,
    mahalanobis_score,
    means_sq_norms,
    pooled_covariance,
    relative_mahalanobis_score,
    shrunk_covariance,
    total_gaussian,
    update_gaussian_stats,
    whiten,
    whitening_matrix,
)
from selectorch.functional.gradnorm import gradnorm, gradnorm_score
from selectorch.functional.gram import (
    GramFeatures,
    gram_deviations,
    gram_features,
    gram_ranges,
    gram_score,
)
from selectorch.functional.hashing import hash_uniform
from selectorch.functional.joint_energy import joint_energy_score
from selectorch.functional.knn import STATS, knn_score, knn_search, knn_statistic
from selectorch.functional.logits import (
    LOGIT_TASKS,
    energy_score,
    entropy_score,
    gen_score,
    logit_predictions,
    margin_score,
    max_logit_score,
    mutual_information_score,
    predictive_variance_score,
    softmax_score,
)
from selectorch.functional.neighbours import (
    class_nearest_search,
    density_filter,
    dknn_nonconformity,
    dknn_score,
    lid_mle,
    lid_score,
    trust_ratio,
    trust_score,
)
from selectorch.functional.odin import odin_logits, odin_perturbation, odin_score
from selectorch.functional.outliers import (
    drop_self_matches,
    inlier_rows,
    leave_one_out_knn_score,
)
from selectorch.functional.pca import pca_reconstruction_error, principal_components
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
from selectorch.functional.shaping import (
    ASH_VARIANTS,
    ViMFit,
    activation_percentile,
    ash_keep,
    ash_score,
    ash_shape,
    fit_vim,
    head_energy,
    head_logits,
    react_score,
    vim_default_dim,
    vim_origin,
    vim_score,
)
from selectorch.functional.she import she_patterns, she_score
from selectorch.functional.temperature import fit_temperature, temperature_nll
from selectorch.functional.thresholds import (
    coverage_threshold,
    interpolated_quantile,
    min_calibration_size,
)

__all__ = [
    "gradnorm",
    "gradnorm_score",
    "GramFeatures",
    "gram_deviations",
    "gram_features",
    "gram_ranges",
    "gram_score",
    "joint_energy_score",
    "class_nearest_search",
    "density_filter",
    "dknn_nonconformity",
    "dknn_score",
    "lid_mle",
    "lid_score",
    "trust_ratio",
    "trust_score",
    "odin_logits",
    "odin_perturbation",
    "odin_score",
    "she_patterns",
    "she_score",
    "ASH_VARIANTS",
    "LOGIT_TASKS",
    "METRICS",
    "STATS",
    "GaussianStats",
    "RiskCoverage",
    "ViMFit",
    "activation_percentile",
    "ash_keep",
    "ash_score",
    "ash_shape",
    "augrc",
    "aupr_in",
    "aupr_out",
    "aurc",
    "auroc",
    "class_banks",
    "class_sq_mahalanobis",
    "classwise_knn_score",
    "classwise_knn_search",
    "coverage_at_risk",
    "coverage_threshold",
    "deup_score",
    "drop_self_matches",
    "eaurc",
    "energy_score",
    "entropy_score",
    "error_predictor",
    "finite_rows",
    "fit_gaussian_stats",
    "fit_temperature",
    "fit_vim",
    "fpr_at_tpr",
    "gaussian_precision",
    "gen_score",
    "hash_uniform",
    "head_energy",
    "head_logits",
    "inlier_rows",
    "interpolated_quantile",
    "kfold_indices",
    "knn_score",
    "knn_search",
    "knn_statistic",
    "leave_one_out_knn_score",
    "logit_predictions",
    "mahalanobis_score",
    "margin_score",
    "max_logit_score",
    "means_sq_norms",
    "midranks",
    "min_calibration_size",
    "mutual_information_score",
    "nearest_class",
    "oracle_aurc",
    "out_of_fold_predictions",
    "pairwise_distance",
    "pca_reconstruction_error",
    "pooled_covariance",
    "predictive_variance_score",
    "principal_components",
    "react_score",
    "relative_mahalanobis_score",
    "risk_at_coverage",
    "risk_coverage_curve",
    "shrunk_covariance",
    "softmax_score",
    "temperature_nll",
    "total_gaussian",
    "train_error_predictor",
    "update_gaussian_stats",
    "vim_default_dim",
    "vim_origin",
    "vim_score",
    "whiten",
    "whitening_matrix",
]
