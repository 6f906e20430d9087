"""Thresholds with promises: a coverage with a finite-sample guarantee, or a selective risk
certified by a confidence bound, globally or per predicted class."""

from __future__ import annotations

from selectorch.calibration.bounds import (
    BOUNDS,
    BinomialCDFPath,
    binomial_cdf,
    clopper_pearson_pvalue,
    hoeffding_bentkus_pvalue,
    upper_bound,
)
from selectorch.calibration.calibrate import calibrate_thresholds, check_target
from selectorch.calibration.risk import METHODS, RiskThreshold, risk_threshold

__all__ = [
    "BOUNDS",
    "METHODS",
    "BinomialCDFPath",
    "RiskThreshold",
    "binomial_cdf",
    "calibrate_thresholds",
    "check_target",
    "clopper_pearson_pvalue",
    "hoeffding_bentkus_pvalue",
    "risk_threshold",
    "upper_bound",
]
