"""Risk-coverage metrics: AURC, E-AURC, AUGRC, risk at a coverage, coverage at a risk, the curve.

Each metric stores every score and loss it is given (``dist_reduce_fx="cat"``, so they are
gathered from all ranks under DDP) and calls :mod:`selectorch.functional.selective` in
``compute``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from selectorch.functional.selective import (
    RiskCoverage,
    augrc,
    aurc,
    check_unit_interval,
    coverage_at_risk,
    eaurc,
    risk_at_coverage,
    risk_coverage_curve,
)
from selectorch.metrics._inputs import check_score, to_loss

__all__ = ["AUGRC", "AURC", "EAURC", "CoverageAtRisk", "RiskAtCoverage", "RiskCoverageCurve"]


class _RiskCoverageMetric(Metric):
    """Stores ``(score, loss)`` pairs; subclasses turn them into a number in ``compute``.

    ``update(score, correct)`` takes ``(N,)`` bool ``correct`` (loss ``1 - correct``) or
    ``(N,)`` floating losses in [0, 1]; ``update(score, preds, target)`` takes ``(N,)`` class
    ids or ``(N, C)`` class scores and ``(N,)`` integer targets (loss = wrong prediction).
    Scores are stored in their own floating dtype (so that no ties are created), losses in the
    metric's dtype.
    """

    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = False
    full_state_update: ClassVar[bool] = False

    score: list[torch.Tensor]
    loss: list[torch.Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score", default=[], dist_reduce_fx="cat")
        self.add_state("loss", default=[], dist_reduce_fx="cat")

    def update(
        self,
        score: torch.Tensor,
        correct_or_preds: torch.Tensor,
        target: torch.Tensor | None = None,
    ) -> None:
        """Store a batch.

        Args:
            score: ``(N,)`` uncertainties, higher = less trustworthy (``+inf`` allowed).
            correct_or_preds: Without ``target``, ``(N,)`` bool ``correct`` or ``(N,)`` float
                losses in [0, 1]; with ``target``, ``(N,)`` class ids or ``(N, C)`` scores.
            target: ``(N,)`` integer class ids, or ``None``.

        Raises:
            TypeError: A non-tensor or an ambiguous dtype (e.g. integer ``correct``).
            ValueError: A shape that is not ``(N,)`` like ``score`` (``(N, C)`` for preds).
        """
        score = check_score(score)
        loss = to_loss(score, correct_or_preds, target, self.dtype)
        self.score.append(score.detach())
        self.loss.append(loss.detach())

    def _state(self) -> tuple[torch.Tensor, torch.Tensor]:
        # lists of batches before a DDP sync, one gathered tensor after it
        if isinstance(self.score, list) and not self.score:
            raise ValueError(
                f"{type(self).__name__} has no samples; call update(score, correct) first."
            )
        return dim_zero_cat(self.score), dim_zero_cat(self.loss)


class AURC(_RiskCoverageMetric):
    """Area under the risk-coverage curve (see :func:`selectorch.functional.aurc`).

    The mean selective risk over coverages ``k/n`` (Geifman et al.), with tied scores broken
    fairly (the mean over their orders). Lower is better.

    Example:
        >>> m = AURC()
        >>> m.update(torch.tensor([1.0, 2.0]), torch.tensor([True, False]))
        >>> m.compute().item()
        0.25
    """

    def compute(self) -> torch.Tensor:
        """Return the AURC as a 0-dim float64 tensor."""
        return aurc(*self._state())


class EAURC(_RiskCoverageMetric):
    """Excess AURC: AURC minus the AURC of the oracle that ranks by the loss itself.

    See :func:`selectorch.functional.eaurc`. Lower is better; 0 for a perfect ranking.
    """

    def compute(self) -> torch.Tensor:
        """Return the E-AURC as a 0-dim float64 tensor."""
        return eaurc(*self._state())


class AUGRC(_RiskCoverageMetric):
    """Area under the generalized risk-coverage curve (Traub et al. 2024).

    The generalized risk at a threshold is the fraction of all samples that are kept and
    wrong; see :func:`selectorch.functional.augrc`. Lower is better.
    """

    def compute(self) -> torch.Tensor:
        """Return the AUGRC as a 0-dim float64 tensor."""
        return augrc(*self._state())


class RiskAtCoverage(_RiskCoverageMetric):
    """Selective risk at the smallest threshold whose coverage is at least ``coverage``.

    Tied scores are kept together, so the coverage reached may exceed the target. Lower is
    better.

    Args:
        coverage: Target coverage in (0, 1].
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``coverage`` is not in (0, 1].
    """

    def __init__(self, coverage: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.coverage = check_unit_interval("coverage", coverage, low_open=True)

    def compute(self) -> torch.Tensor:
        """Return the selective risk as a 0-dim float64 tensor."""
        return risk_at_coverage(*self._state(), self.coverage)


class CoverageAtRisk(_RiskCoverageMetric):
    """Largest coverage whose selective risk is at most ``risk``; 0 if no threshold reaches it.

    Only whole groups of tied scores can be kept. Higher is better.

    Args:
        risk: Target selective risk in [0, 1].
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``risk`` is not in [0, 1].
    """

    higher_is_better: ClassVar[bool | None] = True

    def __init__(self, risk: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.risk = check_unit_interval("risk", risk, low_open=False)

    def compute(self) -> torch.Tensor:
        """Return the coverage as a 0-dim float64 tensor."""
        return coverage_at_risk(*self._state(), self.risk)


class RiskCoverageCurve(_RiskCoverageMetric):
    """The exact risk-coverage curve, one point per distinct score.

    ``compute`` returns a :class:`~selectorch.functional.RiskCoverage` named tuple
    ``(threshold, coverage, risk, generalized_risk)``; see
    :func:`selectorch.functional.risk_coverage_curve`.
    """

    higher_is_better: ClassVar[bool | None] = None

    def compute(self) -> RiskCoverage:
        """Return the curve."""
        return risk_coverage_curve(*self._state())
