"""Evaluation math of selective prediction: risk-coverage curves and OOD-detection curves.

Scores are uncertainties (higher = less trustworthy, any real value, ``+inf`` included). A
sample is kept at threshold ``t`` when ``score <= t``, so samples with equal scores are always
kept or rejected together and every curve has one point per distinct score.

Losses are per-sample values in [0, 1]: ``1 - correct`` for classification, or any bounded
user-given loss. Every function computes in float64 and returns float64 tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from selectorch.functional.ranking import midranks

__all__ = [
    "RiskCoverage",
    "aupr_in",
    "aupr_out",
    "augrc",
    "aurc",
    "coverage_at_risk",
    "eaurc",
    "fpr_at_tpr",
    "oracle_aurc",
    "risk_at_coverage",
    "risk_coverage_curve",
]

# round-off allowed when a selective risk is compared with a target risk
_RISK_TOLERANCE = 1e-12


class RiskCoverage(NamedTuple):
    """The risk-coverage curve: one point per distinct score, thresholds increasing.

    Attributes:
        threshold: ``(T,)`` the distinct scores, increasing.
        coverage: ``(T,)`` fraction of samples with ``score <= threshold``, increasing to 1.
        risk: ``(T,)`` selective risk: mean loss of the kept samples.
        generalized_risk: ``(T,)`` sum of the kept losses over *all* ``n`` samples (the joint
            probability of being kept and wrong, Traub et al. 2024).
    """

    threshold: torch.Tensor
    coverage: torch.Tensor
    risk: torch.Tensor
    generalized_risk: torch.Tensor


def _check_score_loss(score: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``(N,)`` scores and ``(N,)`` losses in [0, 1]; return them (loss as float64)."""
    if score.ndim != 1 or loss.shape != score.shape:
        raise ValueError(
            f"Expected arguments `score` and `loss` to have the same shape (N,), got "
            f"{tuple(score.shape)} and {tuple(loss.shape)}."
        )
    if score.numel() == 0:
        raise ValueError("Expected at least one sample, got empty `score` and `loss`.")
    if torch.isnan(score).any():
        raise ValueError("Argument `score` holds NaN; give failed samples +inf instead.")
    loss = loss.double()
    bad = ~((loss >= 0) & (loss <= 1))
    if bad.any():
        first = loss[bad][:3].tolist()
        raise ValueError(
            f"Expected argument `loss` to hold values in [0, 1], got {int(bad.sum())} outside "
            f"(first: {first})."
        )
    return score, loss


def _groups(score: torch.Tensor, loss: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sort by score and group ties.

    Returns:
        ``(thresholds, counts, ends, cum_start, cum_end)``: per distinct score (increasing), its
        number of samples, the number kept at it (``ends = counts.cumsum()``), and the summed
        loss of the samples kept before and at it.
    """
    order = torch.argsort(score, stable=True)
    sorted_score = score[order]
    thresholds, counts = torch.unique_consecutive(sorted_score, return_counts=True)
    ends = counts.cumsum(0)
    cum_loss = loss[order].cumsum(0)
    cum_end = cum_loss[ends - 1]
    cum_start = torch.cat([cum_end.new_zeros(1), cum_end[:-1]])
    return thresholds, counts, ends, cum_start, cum_end


def risk_coverage_curve(score: torch.Tensor, loss: torch.Tensor) -> RiskCoverage:
    """Exact risk-coverage curve, one point per distinct score (no binning).

    At threshold ``t_j`` (the ``j``-th distinct score) the kept samples are those with
    ``score <= t_j``: ``b_j`` of the ``n`` samples with summed loss ``L_j``. Then coverage is
    ``b_j / n``, selective risk ``L_j / b_j`` and generalized risk ``L_j / n``.

    Args:
        score: ``(N,)`` uncertainties, higher = less trustworthy; ``+inf`` allowed, NaN not.
        loss: ``(N,)`` losses in [0, 1], e.g. ``(~correct).float()``.

    Returns:
        A :class:`RiskCoverage` of ``(T,)`` tensors (float64, thresholds in the score's dtype).

    Raises:
        ValueError: Shapes differ, no samples, a NaN score or a loss outside [0, 1].

    Example:
        >>> curve = risk_coverage_curve(torch.tensor([0.1, 0.2, 0.2]), torch.tensor([0.0, 1, 0]))
        >>> curve.coverage.tolist(), curve.risk.tolist()
        ([0.3333333333333333, 1.0], [0.0, 0.3333333333333333])
    """
    score, loss = _check_score_loss(score, loss)
    thresholds, _, ends, _, cum_end = _groups(score, loss)
    n = score.numel()
    kept = ends.double()
    return RiskCoverage(thresholds, kept / n, cum_end / kept, cum_end / n)


def aurc(score: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Area under the risk-coverage curve (Geifman et al.), with ties broken fairly.

    Without ties, ``AURC = (1/n) * sum_{k=1..n} L(k) / k`` where ``L(k)`` is the summed loss of
    the ``k`` most confident samples: the mean selective risk over coverages ``k/n``. Samples
    with equal scores have no order, so within a tie group the kept loss is interpolated
    linearly between the group's distinct-threshold points: for ``a < k <= b`` (the group
    spans ranks ``a+1..b``) ``L(k) = L(a) + (k - a) * (L(b) - L(a)) / (b - a)``. This is exactly
    the mean of Geifman's AURC over all orders of the tied samples.

    Args:
        score: ``(N,)`` uncertainties, higher = less trustworthy.
        loss: ``(N,)`` losses in [0, 1].

    Returns:
        A 0-dim float64 tensor in [0, 1]; lower is better.

    Raises:
        ValueError: As :func:`risk_coverage_curve`.

    Example:
        >>> aurc(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 1.0])).item()
        0.25
    """
    score, loss = _check_score_loss(score, loss)
    _, counts, ends, cum_start, cum_end = _groups(score, loss)
    n = score.numel()
    group = torch.repeat_interleave(torch.arange(counts.numel(), device=score.device), counts)
    k = torch.arange(1, n + 1, device=score.device, dtype=torch.float64)
    start = (ends - counts).double()[group]
    per_sample = ((cum_end - cum_start) / counts.double())[group]
    kept_loss = cum_start[group] + (k - start) * per_sample
    return (kept_loss / k).mean()


def oracle_aurc(loss: torch.Tensor) -> torch.Tensor:
    """AURC of the oracle that keeps the smallest losses first: ``aurc(loss, loss)``.

    For 0/1 losses with error rate ``e`` it tends to ``e + (1 - e) * ln(1 - e)`` as ``n`` grows
    (Geifman et al.).

    Args:
        loss: ``(N,)`` losses in [0, 1].

    Returns:
        A 0-dim float64 tensor.
    """
    return aurc(loss.double(), loss)


def eaurc(score: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Excess AURC: ``aurc(score, loss) - oracle_aurc(loss)``; 0 for a perfect ranking.

    Never negative: the oracle's risk at each ``k`` is the smallest possible.

    Args:
        score: ``(N,)`` uncertainties, higher = less trustworthy.
        loss: ``(N,)`` losses in [0, 1].

    Returns:
        A 0-dim float64 tensor; lower is better.
    """
    return aurc(score, loss) - oracle_aurc(loss)


def augrc(score: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Area under the generalized risk-coverage curve (Traub et al. 2024).

    The trapezoidal area under the points ``(0, 0)`` and ``(b_j / n, L_j / n)`` of every distinct
    threshold: ``AUGRC = sum_j (b_j - b_{j-1}) * (L_{j-1} + L_j) / (2 n^2)``, as in the authors'
    fd-shifts code. For 0/1 losses with error rate ``e`` it equals
    ``(1 - AUROC_f) * e * (1 - e) + e^2 / 2``, where ``AUROC_f`` is the AUROC of the score for
    telling failures from successes (ties count one half).

    Args:
        score: ``(N,)`` uncertainties, higher = less trustworthy.
        loss: ``(N,)`` losses in [0, 1].

    Returns:
        A 0-dim float64 tensor in [0, 0.5]; lower is better.
    """
    score, loss = _check_score_loss(score, loss)
    _, counts, _, cum_start, cum_end = _groups(score, loss)
    n = score.numel()
    return (counts.double() * (cum_start + cum_end)).sum() / (2.0 * n * n)


def check_unit_interval(name: str, value: float, *, low_open: bool) -> float:
    """Return ``value`` as a float if it lies in (0, 1] (``low_open``) or [0, 1], else raise."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"Expected argument `{name}` to be a number in {interval}, got {value!r}.")
    return float(value)


def risk_at_coverage(score: torch.Tensor, loss: torch.Tensor, coverage: float) -> torch.Tensor:
    """Selective risk at the smallest threshold whose coverage is at least ``coverage``.

    Ties are kept together, so the coverage reached may exceed the target.

    Args:
        score: ``(N,)`` uncertainties, higher = less trustworthy.
        loss: ``(N,)`` losses in [0, 1].
        coverage: Target coverage in (0, 1].

    Returns:
        A 0-dim float64 tensor.
    """
    coverage = check_unit_interval("coverage", coverage, low_open=True)
    score, loss = _check_score_loss(score, loss)
    _, _, ends, _, cum_end = _groups(score, loss)
    needed = math.ceil(coverage * score.numel() - 1e-9)  # samples to keep, robust to round-off
    index = torch.searchsorted(ends, ends.new_tensor([needed]))[0]
    return cum_end[index] / ends[index].double()


def coverage_at_risk(score: torch.Tensor, loss: torch.Tensor, risk: float) -> torch.Tensor:
    """Largest coverage whose selective risk is at most ``risk``; 0 when no threshold has it.

    Only whole tie groups can be kept; risks are compared up to 1e-12 of round-off.

    Args:
        score: ``(N,)`` uncertainties, higher = less trustworthy.
        loss: ``(N,)`` losses in [0, 1].
        risk: Target selective risk in [0, 1].

    Returns:
        A 0-dim float64 tensor.
    """
    risk = check_unit_interval("risk", risk, low_open=False)
    curve = risk_coverage_curve(score, loss)
    ok = curve.risk <= risk + _RISK_TOLERANCE
    return torch.where(ok, curve.coverage, torch.zeros_like(curve.coverage)).max()


# -- OOD detection ---------------------------------------------------------------------------


def check_ood_inputs(
    score: torch.Tensor, is_ood: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``(N,)`` scores and 0/1 labels with both classes; return labels as bool."""
    if score.ndim != 1 or is_ood.shape != score.shape:
        raise ValueError(
            f"Expected arguments `score` and `is_ood` to have the same shape (N,), got "
            f"{tuple(score.shape)} and {tuple(is_ood.shape)}."
        )
    if torch.isnan(score).any():
        raise ValueError("Argument `score` holds NaN; give failed samples +inf instead.")
    if is_ood.dtype != torch.bool:
        if not ((is_ood == 0) | (is_ood == 1)).all():
            raise ValueError("Expected argument `is_ood` to hold only 0/1 (or bool) values.")
        is_ood = is_ood.bool()
    n_ood = int(is_ood.sum())
    if n_ood == 0 or n_ood == is_ood.numel():
        raise ValueError(
            f"OOD metrics need both in-distribution and OOD samples, got {n_ood} OOD of "
            f"{is_ood.numel()}."
        )
    return score, is_ood


def _unit_ranks(score: torch.Tensor) -> torch.Tensor:
    """Map scores into (0, 1] by midrank / n: order and ties kept, so no sigmoid is applied."""
    return midranks(score) / score.numel()


def _pr_area(rank: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    # imported here: torchmetrics takes seconds to import and only the OOD curves need it
    from torchmetrics.functional.classification import binary_precision_recall_curve

    precision, recall, _ = binary_precision_recall_curve(rank, positive.long(), validate_args=False)
    return -torch.trapezoid(precision.double(), recall.double())  # recall decreases


def aupr_out(score: torch.Tensor, is_ood: torch.Tensor) -> torch.Tensor:
    """Area under the precision-recall curve with OOD as the positive class.

    The curve is torchmetrics' exact binary PR curve (one point per distinct score, plus
    ``(recall 0, precision 1)``), integrated with the trapezoidal rule, as OpenOOD does with
    ``sklearn.metrics.auc(recall, precision)``.

    Args:
        score: ``(N,)`` uncertainties, higher = more likely OOD; any real value.
        is_ood: ``(N,)`` bool (or 0/1), ``True`` for out-of-distribution samples.

    Returns:
        A 0-dim float64 tensor in [0, 1]; higher is better.

    Raises:
        ValueError: Shapes differ, a score is NaN, labels are not 0/1, or a class is absent.
    """
    score, is_ood = check_ood_inputs(score, is_ood)
    return _pr_area(_unit_ranks(score), is_ood)


def aupr_in(score: torch.Tensor, is_ood: torch.Tensor) -> torch.Tensor:
    """Area under the precision-recall curve with in-distribution as the positive class.

    Like :func:`aupr_out`, with the labels flipped and the score negated (lower uncertainty =
    more likely in-distribution).

    Args:
        score: ``(N,)`` uncertainties, higher = more likely OOD.
        is_ood: ``(N,)`` bool (or 0/1), ``True`` for out-of-distribution samples.

    Returns:
        A 0-dim float64 tensor in [0, 1]; higher is better.
    """
    score, is_ood = check_ood_inputs(score, is_ood)
    return _pr_area(_unit_ranks(-score), ~is_ood)


def fpr_at_tpr(score: torch.Tensor, is_ood: torch.Tensor, tpr: float = 0.95) -> torch.Tensor:
    """False positive rate at a true positive rate of at least ``tpr``, OOD = positive.

    OpenOOD v1.5's convention (``roc_curve(is_ood, -conf)`` then the FPR at the first point
    with ``TPR >= tpr``): flag a sample as OOD when ``score >= t``, take the largest ``t`` that
    flags at least ``tpr`` of the OOD samples, and return the fraction of in-distribution
    samples it flags. Equal scores are flagged together.

    Args:
        score: ``(N,)`` uncertainties, higher = more likely OOD.
        is_ood: ``(N,)`` bool (or 0/1), ``True`` for out-of-distribution samples.
        tpr: Required fraction of OOD samples flagged, in (0, 1].

    Returns:
        A 0-dim float64 tensor in [0, 1]; lower is better.
    """
    tpr = check_unit_interval("tpr", tpr, low_open=True)
    score, is_ood = check_ood_inputs(score, is_ood)
    n_ood = int(is_ood.sum())
    n_id = is_ood.numel() - n_ood
    from torchmetrics.functional.classification import binary_roc  # slow import, see _pr_area

    fpr_curve, tpr_curve, _ = binary_roc(_unit_ranks(score), is_ood.long(), validate_args=False)
    # back to exact counts: the curve is in float32
    flagged_ood = torch.round(tpr_curve.double() * n_ood)
    flagged_id = torch.round(fpr_curve.double() * n_id)
    first = torch.nonzero(flagged_ood >= math.ceil(tpr * n_ood - 1e-9))[0, 0]
    return flagged_id[first] / n_id
