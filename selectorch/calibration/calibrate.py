"""Thresholds for a coverage or a risk target, globally or per predicted class, with a report."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from selectorch._checks import check_choice, check_fraction, check_open_fraction
from selectorch.calibration.bounds import BOUNDS
from selectorch.calibration.risk import METHODS, risk_threshold
from selectorch.functional.thresholds import (
    conformal_rank,
    coverage_threshold,
    min_calibration_size,
)


def check_target(
    coverage: float | None, risk: float | None, delta: float, bound: str, method: str
) -> None:
    """Check that exactly one of ``coverage`` / ``risk`` is given, and the options.

    Raises:
        ValueError: Both or neither target, or an option out of range.
    """
    if (coverage is None) == (risk is None):
        raise ValueError(
            "Expected exactly one of the arguments `coverage` (fraction of samples to keep) or "
            f"`risk` (error rate allowed among kept samples), got coverage={coverage!r}, "
            f"risk={risk!r}."
        )
    if coverage is not None:
        check_fraction("coverage", coverage)
    else:
        check_open_fraction("risk", risk)
    # the risk options are checked with a coverage target too: a typo never passes silently
    check_open_fraction("delta", delta)
    check_choice("bound", bound, BOUNDS)
    check_choice("method", method, METHODS)


def _group(
    scores: torch.Tensor,
    losses: torch.Tensor | None,
    *,
    coverage: float | None,
    risk: float | None,
    delta: float,
    bound: str,
    method: str,
) -> tuple[float, dict[str, Any]]:
    """Threshold and report entries for one group of calibration samples."""
    n = scores.numel()
    entry: dict[str, Any] = {"n": n}
    if coverage is not None:
        threshold = coverage_threshold(scores, coverage).item()
        entry.update(target_coverage=coverage)
    else:
        result = risk_threshold(scores, losses, risk=risk, delta=delta, bound=bound, method=method)
        threshold = result.threshold
        entry.update(
            target_risk=risk,
            delta=delta,
            bound=bound,
            method=method,
            feasible=result.feasible,
            risk_upper_bound=result.upper_bound,
            tests=result.tests,
        )
    kept = (scores <= threshold) & torch.isfinite(scores)
    entry["threshold"] = threshold
    entry["coverage"] = kept.double().mean().item() if n else float("nan")
    if losses is not None:
        entry["risk"] = losses[kept].double().mean().item() if kept.any() else float("nan")
    return threshold, entry


def calibrate_thresholds(
    scores: torch.Tensor,
    *,
    coverage: float | None = None,
    risk: float | None = None,
    delta: float = 0.1,
    losses: torch.Tensor | None = None,
    preds: torch.Tensor | None = None,
    num_classes: int | None = None,
    bound: str = "clopper-pearson",
    method: str = "sgr",
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Thresholds for a coverage or a risk target, globally or per predicted class.

    Args:
        scores: ``(n,)`` calibration scores.
        coverage: Target coverage in (0, 1]; the threshold is the ``ceil((n + 1) * coverage)``-th
            smallest score (a finite-sample guarantee).
        risk: Target selective risk in (0, 1), certified with probability ``1 - delta``; see
            :func:`~selectorch.calibration.risk_threshold`.
        delta: Allowed failure probability of the risk promise.
        losses: ``(n,)`` losses in [0, 1]; required with ``risk``, reported with ``coverage``.
        preds: ``(n,)`` predicted classes: one threshold per class (Mondrian calibration).
        num_classes: Number of classes with ``preds`` (default ``preds.max() + 1``).
        bound: ``"clopper-pearson"`` (0/1 losses) or ``"hoeffding-bentkus"`` (losses in [0, 1]).
        method: ``"sgr"`` or ``"fixed-sequence"`` multiple-testing correction.

    Returns:
        ``(threshold, report)``: a 0-dim threshold tensor (or ``(C,)`` with ``preds``) and a
        dict of plain Python values (n, targets, achieved coverage and risk on the calibration
        set, the confidence bound, the threshold; ``"classes"`` holds one entry per class).

    Raises:
        ValueError: Bad targets, missing losses for a risk target, shapes that differ, or (with
            a coverage target) a class with too few calibration samples for its rank.
    """
    check_target(coverage, risk, delta, bound, method)
    scores = scores.detach().flatten()
    n = scores.numel()
    if n == 0:
        raise ValueError("Expected at least one calibration score, got none.")
    if risk is not None and losses is None:
        raise ValueError(
            "A `risk` target needs labels (or a correctness flag) in the calibration data, "
            "to know which kept predictions are wrong."
        )
    if losses is not None:
        losses = losses.detach().flatten().to(scores.device, torch.float64)
        if losses.numel() != n:
            raise ValueError(
                f"Expected {n} losses, one per calibration score, got {losses.numel()}."
            )
        if not bool(((losses >= 0) & (losses <= 1)).all()):
            raise ValueError("Expected losses in [0, 1]; rescale a bounded loss first.")
    options = {"coverage": coverage, "risk": risk, "delta": delta, "bound": bound, "method": method}
    if preds is None:
        threshold, report = _group(scores, losses, **options)
        _warn_infeasible(report, "")
        return torch.tensor(threshold, dtype=scores.dtype, device=scores.device), report

    preds = preds.detach().flatten().to(scores.device)
    if preds.numel() != n:
        raise ValueError(
            f"Expected {n} predicted classes, one per calibration score, got {preds.numel()}."
        )
    num_classes = int(preds.max()) + 1 if num_classes is None else num_classes
    thresholds, classes, short = [], [], []
    for c in range(num_classes):
        mask = preds == c
        n_class = int(mask.sum())
        if coverage is not None and coverage < 1 and conformal_rank(n_class, coverage) > n_class:
            short.append((c, n_class))
            continue
        threshold, entry = _group(scores[mask], None if losses is None else losses[mask], **options)
        _warn_infeasible(entry, f" for class {c}")
        thresholds.append(threshold)
        classes.append({"class": c, **entry})
    if short:
        raise ValueError(
            f"per_class=True with coverage={coverage} needs at least "
            f"{min_calibration_size(coverage)} calibration samples predicted as each class; "
            f"too few for (class, n): {short}."
        )
    threshold = torch.tensor(thresholds, dtype=scores.dtype, device=scores.device)
    kept = (scores <= threshold[preds.long()]) & torch.isfinite(scores)
    report: dict[str, Any] = {
        "n": n,
        "per_class": True,
        **{k: v for k, v in options.items() if v is not None},
    }
    report["coverage"] = kept.double().mean().item()
    if losses is not None:
        report["risk"] = losses[kept].double().mean().item() if kept.any() else float("nan")
    report["classes"] = classes
    return threshold, report


def _warn_infeasible(entry: dict[str, Any], where: str) -> None:
    if entry.get("feasible") is False:
        warnings.warn(
            f"No threshold{where} certifies selective risk <= {entry['target_risk']} with "
            f"probability {1 - entry['delta']:.3g} from n={entry['n']} calibration samples; "
            "keeping nothing (threshold = -inf). Use more calibration data, a looser risk or "
            "delta, or a better score.",
            stacklevel=4,
        )
