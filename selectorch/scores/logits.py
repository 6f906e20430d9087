"""Scores computed from the model's logits."""

from __future__ import annotations

import torch

from selectorch._checks import check_positive_float
from selectorch.functional.logits import energy_score, softmax_score
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score


class LogitScore(Score):
    """Base of scores computed from ``(N, C)`` multiclass logits; nothing needs fitting.

    ``fit(logits, labels)`` only checks its input and returns ``self``; ``calibrate`` is what a
    threshold needs. In a :class:`~selectorch.SelectiveModel` the logits are the model's output
    (or the output of ``layer=`` when given).
    """

    input = "logits"

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        return None


@register_score("softmax")
class SoftmaxScore(LogitScore):
    """Negative maximum softmax probability (Hendrycks & Gimpel 2017), in ``[-1, -1/C]``.

    Example:
        >>> SoftmaxScore()(torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
        tensor([-0.9820, -0.5000])
    """

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return softmax_score(X)


@register_score("energy")
class EnergyScore(LogitScore):
    """Free energy ``-T * logsumexp(logits / T)`` (Liu et al. 2020): higher = more unusual.

    Args:
        temperature: The energy temperature ``T`` > 0.
    """

    def __init__(self, *, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return energy_score(X, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
