"""JointEnergy score of multi-label classifiers (Wang et al., NeurIPS 2021)."""

from __future__ import annotations

from typing import ClassVar

import torch

from selectorch.functional.joint_energy import joint_energy_score
from selectorch.scores.logits import LogitScore
from selectorch.scores.registry import register_score


@register_score("joint_energy")
class JointEnergyScore(LogitScore):
    """JointEnergy ``-sum_c T * softplus(z_c / T)`` of a multi-label classifier's log-odds.

    Wang et al., NeurIPS 2021, "Can multi-label classification networks know what they don't
    know?": the free energies of the ``C`` independent labels, summed. A sample on which some
    labels fire confidently gets a very negative energy; one on which no label fires gets an
    energy near 0 and is rejected first. Nothing is fitted (only a temperature, with
    ``temperature=None`` and labels); cost ``O(NC)``, one forward pass, compile-clean.

    The default ``task="multilabel"`` takes ``(N, C)`` log-odds. ``"multiclass"`` logits are
    treated output by output as if they were log-odds, and binary ``(N,)`` log-odds are one
    label (see :func:`~selectorch.functional.joint_energy.joint_energy_score`). See
    :class:`~selectorch.scores.LogitScore` for the temperature and label shapes.

    Args:
        task: ``"multilabel"`` (default), ``"multiclass"`` or ``"binary"``.
        temperature: The energy temperature ``T`` > 0, or ``None`` to fit it from labels.

    Example:
        >>> score = JointEnergyScore()
        >>> logits = torch.tensor([[8.0, -8.0, -8.0], [-8.0, -8.0, -8.0]])  # 2nd: no label
        >>> [round(v, 4) for v in score(logits).tolist()]
        [-8.001, -0.001]
    """

    requires_grad: ClassVar[bool] = False
    passes: ClassVar[int] = 1
    compile_clean: ClassVar[bool] = True

    def __init__(self, *, task: str = "multilabel", temperature: float | None = 1.0) -> None:
        super().__init__(task=task, temperature=temperature)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return joint_energy_score(X, self.temperature_, task=self.task)
