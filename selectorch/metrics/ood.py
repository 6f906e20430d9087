"""OOD-detection metrics from ``(score, is_ood)``: AUROC, AUPR-In, AUPR-Out, FPR at a TPR.

OOD is the positive class and a higher score means more likely OOD. Scores may take any real
value (``+inf`` included): they are turned into midranks before torchmetrics' binary curves
see them, so nothing is squashed by a sigmoid and ties stay ties.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from selectorch.functional.ranking import auroc
from selectorch.functional.selective import (
    aupr_in,
    aupr_out,
    check_ood_inputs,
    check_unit_interval,
    fpr_at_tpr,
)
from selectorch.metrics._inputs import check_score, to_is_ood

__all__ = ["AUPRIn", "AUPROut", "AUROC", "FPRAtTPR"]


class _OODMetric(Metric):
    """Stores ``(score, is_ood)`` pairs; subclasses turn them into a number in ``compute``."""

    is_differentiable: ClassVar[bool] = False
    higher_is_better: ClassVar[bool | None] = True
    full_state_update: ClassVar[bool] = False

    score: list[torch.Tensor]
    is_ood: list[torch.Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score", default=[], dist_reduce_fx="cat")
        self.add_state("is_ood", default=[], dist_reduce_fx="cat")

    def update(self, score: torch.Tensor, is_ood: torch.Tensor) -> None:
        """Store a batch.

        Args:
            score: ``(N,)`` uncertainties, higher = more likely OOD (``+inf`` allowed).
            is_ood: ``(N,)`` bool (or 0/1), ``True`` for out-of-distribution samples.

        Raises:
            TypeError: A non-tensor argument.
            ValueError: ``score`` is not ``(N,)`` or ``is_ood`` has another shape.
        """
        score = check_score(score)
        self.score.append(score.detach())
        self.is_ood.append(to_is_ood(score, is_ood, self.dtype).detach())

    def _state(self) -> tuple[torch.Tensor, torch.Tensor]:
        # lists of batches before a DDP sync, one gathered tensor after it
        if isinstance(self.score, list) and not self.score:
            raise ValueError(
                f"{type(self).__name__} has no samples; call update(score, is_ood) first."
            )
        return dim_zero_cat(self.score), dim_zero_cat(self.is_ood)


class AUROC(_OODMetric):
    """Area under the ROC curve for flagging OOD samples by their score.

    The Mann-Whitney statistic with midranks (:func:`selectorch.functional.auroc`): the chance
    that an OOD sample scores higher than an in-distribution one, ties counting one half.

    Example:
        >>> m = AUROC()
        >>> m.update(torch.tensor([1.0, 1e6, float("inf")]), torch.tensor([False, True, False]))
        >>> m.compute().item()
        0.5
    """

    def compute(self) -> torch.Tensor:
        """Return the AUROC as a 0-dim float64 tensor."""
        return auroc(*check_ood_inputs(*self._state()))


class AUPRIn(_OODMetric):
    """Area under the precision-recall curve, in-distribution = positive, low score = ID.

    See :func:`selectorch.functional.aupr_in` (trapezoidal rule, as OpenOOD).
    """

    def compute(self) -> torch.Tensor:
        """Return the AUPR-In as a 0-dim float64 tensor."""
        return aupr_in(*self._state())


class AUPROut(_OODMetric):
    """Area under the precision-recall curve, OOD = positive, high score = OOD.

    See :func:`selectorch.functional.aupr_out` (trapezoidal rule, as OpenOOD).
    """

    def compute(self) -> torch.Tensor:
        """Return the AUPR-Out as a 0-dim float64 tensor."""
        return aupr_out(*self._state())


class FPRAtTPR(_OODMetric):
    """Fraction of in-distribution samples flagged when at least ``tpr`` of OOD ones are.

    OpenOOD v1.5's FPR@95 with OOD as the positive class; see
    :func:`selectorch.functional.fpr_at_tpr`. Lower is better.

    Args:
        tpr: Required fraction of OOD samples flagged, in (0, 1]; 0.95 gives FPR@95.
        **kwargs: Passed to :class:`torchmetrics.Metric`.

    Raises:
        ValueError: ``tpr`` is not in (0, 1].
    """

    higher_is_better: ClassVar[bool | None] = False

    def __init__(self, tpr: float = 0.95, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tpr = check_unit_interval("tpr", tpr, low_open=True)

    def compute(self) -> torch.Tensor:
        """Return the FPR as a 0-dim float64 tensor."""
        return fpr_at_tpr(*self._state(), tpr=self.tpr)
