"""Thresholds that control the selective risk with a confidence bound."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from selectorch.calibration.bounds import BinomialCDFPath, pvalue, upper_bound

METHODS = ("sgr", "fixed-sequence")


@dataclass(frozen=True)
class RiskThreshold:
    """Outcome of :func:`risk_threshold`.

    Attributes:
        threshold: Keep samples with ``score <= threshold``; ``-inf`` when no threshold is
            certified (keep nothing).
        feasible: Whether a threshold met the target.
        kept: Calibration samples kept at the threshold.
        empirical_risk: Mean loss of the kept calibration samples (``nan`` if none).
        upper_bound: The ``1 - delta`` upper confidence bound on the selective risk there.
        tests: How many hypotheses were tested (the multiplicity the level accounts for).
    """

    threshold: float
    feasible: bool
    kept: int
    empirical_risk: float
    upper_bound: float
    tests: int


def _candidates(
    scores: torch.Tensor, losses: torch.Tensor
) -> tuple[list[float], list[int], list[float], list[float]]:
    """Distinct thresholds (ascending), with the kept count and loss sum at each (ties together),
    and the running loss sum of every row in score order."""
    order = torch.argsort(scores, stable=True)
    ordered, ordered_losses = scores[order].double(), losses[order].double()
    values, counts = torch.unique_consecutive(ordered, return_counts=True)
    ends = counts.cumsum(0)
    running = ordered_losses.cumsum(0)
    return values.tolist(), ends.tolist(), running[ends - 1].tolist(), running.tolist()


def _fixed_sequence_pvalues(
    kept: list[int],
    loss_sums: list[float],
    running: list[float],
    *,
    bound: str,
    risk: float,
    binary: bool,
) -> Iterator[float]:
    """The p-value of each candidate in order, in O(1) amortised per row (see BinomialCDFPath).

    Clopper-Pearson tests ``P(Bin(n, risk) <= errors)``; Hoeffding-Bentkus's binomial part
    tests ``ceil(loss sum)`` errors: both counts grow by 0 or 1 per row, so one path serves.
    """
    path = BinomialCDFPath(risk)
    previous = 0
    for n, total in zip(kept, loss_sums, strict=True):
        while path.n < n:
            count = round(running[path.n]) if binary else math.ceil(running[path.n] - 1e-9)
            path.add(min(1, max(0, count - previous)))
            previous = count
        if bound == "clopper-pearson":
            yield path.cdf
        else:
            mean = total / n
            a = min(mean, risk)
            h = (a * math.log(a / risk) if a > 0 else 0.0) + (1 - a) * math.log(
                (1 - a) / (1 - risk)
            )
            yield min(math.exp(-n * h), math.e * path.cdf, 1.0)


def risk_threshold(
    scores: torch.Tensor,
    losses: torch.Tensor,
    *,
    risk: float,
    delta: float,
    bound: str = "clopper-pearson",
    method: str = "sgr",
) -> RiskThreshold:
    """The largest-coverage threshold whose selective risk is at most ``risk`` w.p. ``1 - delta``.

    The selective risk of a threshold is the mean loss of the samples it keeps. For each tested
    threshold an upper confidence bound on it is computed from the kept calibration samples
    (Clopper-Pearson for 0/1 losses, Hoeffding-Bentkus for losses in [0, 1]); testing several
    thresholds is corrected for:

    * ``"sgr"``: the binary search of Geifman & El-Yaniv (2017, "Selective classification for
      deep neural networks"), ``ceil(log2 n)`` tests, each at level ``delta / ceil(log2 n)``.
    * ``"fixed-sequence"``: thresholds tested in increasing order, each at level ``delta``,
      stopping at the first that fails (fixed-sequence testing as in Learn-then-Test, Angelopoulos
      et al. 2021); the sequence starts at the smallest number of kept samples that could pass
      with zero losses, ``ceil(log(delta) / log(1 - risk))``.

    Non-finite scores (fail-closed samples) are never kept by any finite threshold.

    Args:
        scores: ``(n,)`` calibration scores.
        losses: ``(n,)`` losses in [0, 1] (``1 - correct`` for classification).
        risk: Target selective risk in (0, 1).
        delta: Allowed probability, over the calibration draw, that the promise fails, in (0, 1).
        bound: ``"clopper-pearson"`` (0/1 losses) or ``"hoeffding-bentkus"``.
        method: ``"sgr"`` or ``"fixed-sequence"``.

    Returns:
        A :class:`RiskThreshold`; ``threshold = -inf`` and ``feasible = False`` when no threshold
        can be certified.
    """
    binary = bool(((losses == 0) | (losses == 1)).all())
    finite = torch.isfinite(scores)
    values, kept, loss_sums, running = _candidates(scores[finite], losses[finite])
    m = len(values)

    def certified(j: int, level: float) -> bool:
        return pvalue(bound, loss_sums[j], kept[j], risk, binary) <= level

    best, tests, level = -1, 0, delta
    if m and method == "sgr":
        steps = max(1, math.ceil(math.log2(m + 1)))
        level = delta / steps
        lo, hi = 0, m - 1
        while lo <= hi and tests < steps:
            mid = (lo + hi + 1) // 2
            tests += 1
            if certified(mid, level):
                best, lo = mid, mid + 1
            else:
                hi = mid - 1
    elif m:
        if bound == "clopper-pearson" and not binary:
            pvalue(bound, loss_sums[0], kept[0], risk, binary)  # raises: needs 0/1 losses
        start = math.ceil(math.log(delta) / math.log1p(-risk) - 1e-9)
        pvalues = _fixed_sequence_pvalues(
            kept, loss_sums, running, bound=bound, risk=risk, binary=binary
        )
        for j, fast in enumerate(pvalues):
            if kept[j] < start:
                continue
            tests += 1
            # the running p-value may be off by rounding: decide exactly near the level
            passed = fast <= delta if abs(fast - delta) > 1e-9 else certified(j, delta)
            if not passed:
                break
            best = j
    if best < 0:
        return RiskThreshold(float("-inf"), False, 0, float("nan"), 1.0, tests)
    ucb = upper_bound(bound, loss_sums[best], kept[best], level, binary)
    return RiskThreshold(
        threshold=values[best],
        feasible=True,
        kept=kept[best],
        empirical_risk=loss_sums[best] / kept[best],
        upper_bound=ucb,
        tests=tests,
    )
