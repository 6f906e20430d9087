"""torchmetrics ``Metric``\\ s for selective prediction and OOD detection.

Every metric takes uncertainty scores (higher = less trustworthy, any real value, ``+inf``
included) and stores its inputs in states with ``dist_reduce_fx="cat"``, so results are exact
and gathered from every rank under DDP.

- From ``(score, correct)`` or ``(score, preds, target)``: :class:`AURC`, :class:`EAURC`,
  :class:`AUGRC`, :class:`RiskAtCoverage`, :class:`CoverageAtRisk`, :class:`RiskCoverageCurve`.
- From ``(score, is_ood)``: :class:`AUROC`, :class:`AUPRIn`, :class:`AUPROut`,
  :class:`FPRAtTPR`.
- :class:`SelectiveMetric`: any torchmetrics metric on all / selected / rejected samples;
  :class:`SelectiveCalibrationError` is the calibration error of the kept predictions.

The math lives in :mod:`selectorch.functional.selective`.
"""

from __future__ import annotations

from selectorch.metrics.ood import AUROC, AUPRIn, AUPROut, FPRAtTPR
from selectorch.metrics.risk_coverage import (
    AUGRC,
    AURC,
    EAURC,
    CoverageAtRisk,
    RiskAtCoverage,
    RiskCoverageCurve,
)
from selectorch.metrics.selective import SUBSETS, SelectiveCalibrationError, SelectiveMetric

__all__ = [
    "AUGRC",
    "AUPRIn",
    "AUPROut",
    "AURC",
    "AUROC",
    "EAURC",
    "SUBSETS",
    "CoverageAtRisk",
    "FPRAtTPR",
    "RiskAtCoverage",
    "RiskCoverageCurve",
    "SelectiveCalibrationError",
    "SelectiveMetric",
]
