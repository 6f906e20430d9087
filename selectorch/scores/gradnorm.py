"""GradNorm (Huang, Geng & Li, NeurIPS 2021): the norm of the last layer's KL gradient."""

from __future__ import annotations

from typing import ClassVar

import torch

from selectorch._checks import check_positive_float
from selectorch.functional.gradnorm import gradnorm_score
from selectorch.scores.base import Score
from selectorch.scores.head import HeadMixin
from selectorch.scores.registry import register_score


@register_score("gradnorm")
class GradNormScore(HeadMixin, Score):
    """Negative GradNorm: ``-(1/T) ||softmax(z / T) - 1/C||_1 ||h||_1`` (higher = more unusual).

    GradNorm is the L1 norm of the gradient of ``KL(uniform || softmax(z / T))`` with respect to
    the weight of the classifier head ``z = W h + b``. That gradient is the outer product
    ``(p - 1/C) h^T / T``, so its norm is the product of two L1 norms (derivation in
    :mod:`selectorch.functional.gradnorm`): no backward pass and no loop over samples, the whole
    batch in one head application, ``O(B C D)``. In-distribution inputs get a peaked softmax and
    strong features, hence a large gradient; the uncertainty is its negative, in ``(-inf, 0]``.
    Like the paper, it takes the weight's gradient only (not the bias's).

    The input is the head's input ``h`` (``layer=`` the layer before the head, ``head=`` the head
    in :class:`~selectorch.SelectiveModel`, or :meth:`set_head` standalone). Nothing is fitted
    beyond the head, so :meth:`fit` is optional. Made for post-ReLU features: the score grows
    with ``||h||_1``, so a far-away row of large norm (say every feature at -25) looks
    confident; on real post-ReLU features unusual inputs activate fewer units.

    Args:
        temperature: ``T`` > 0 dividing the logits (paper: 1).

    Example:
        >>> fc = torch.nn.Linear(16, 3)
        >>> score = GradNormScore().set_head(fc.weight, fc.bias)
        >>> score(torch.rand(4, 16)).shape
        torch.Size([4])
    """

    input = "embedding"
    # nothing to fit: the head is checked by HeadMixin.is_fitted
    fitted_buffers = ()
    requires_grad: ClassVar[bool] = False
    passes: ClassVar[int] = 1
    compile_clean: ClassVar[bool] = True

    def __init__(self, *, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return gradnorm_score(X, self.head_weight_, self.head_bias_, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
