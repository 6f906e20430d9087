"""ODINScore: temperature-scaled softmax after one input perturbation step (Liang et al. 2018)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from selectorch._checks import check_positive_float
from selectorch.functional.logits import check_logits
from selectorch.functional.odin import check_std, odin_logits, odin_perturbation, odin_score
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score


@register_score("odin")
class ODINScore(Score):
    """ODIN (Liang, Li & Srikant, ICLR 2018): ``-max softmax(f(x') / T)`` of a perturbed input.

    The input moves one step against the loss of its predicted class,
    ``x' = x - epsilon * sign(-grad_x log softmax(f(x) / T)[pred]) / std``, and the score is the
    negative temperature-scaled maximum softmax probability of the model's logits on ``x'``.
    ``std`` is the normalisation std of the inputs (one number, or one per channel of
    ``(B, C, ...)`` inputs, e.g. ``(0.229, 0.224, 0.225)`` for ImageNet), so that ``epsilon``
    is a step in pixel units as in the paper.

    In a :class:`~selectorch.SelectiveModel` (``layer=None``) each batch costs two forward
    passes and one backward pass to the input: the model runs on the first positional input
    under ``torch.enable_grad()``, even inside ``torch.no_grad()`` (gradients are taken with
    respect to the input only; the parameters get no ``.grad``), then again on ``x'`` without
    gradients. The returned output is the first pass's, unchanged. ``torch.inference_mode()``
    is refused with an error, as are integer inputs (token ids) and recordings, which have no
    model to differentiate. Run the model in eval mode: the gradient of a sum of per-sample
    losses is per sample only when samples do not interact (batch norm in train mode mixes
    them).

    Not compile-clean: ``torch.autograd.grad`` cannot sit inside one graph, so
    ``torch.compile(sel, fullgraph=True)`` raises dynamo's ``Unsupported`` error naming this
    reason; ``torch.compile(sel)`` runs the gradient step eagerly and gives the eager result.

    Standalone, ``ODINScore()(logits)`` scores the logits it is given without perturbing
    anything (the temperature-scaled softmax score); :meth:`perturbed_logits` gives the
    logits of the perturbed input of a model.

    Args:
        temperature: ``T`` > 0 (paper: 1000).
        epsilon: Perturbation size >= 0 in pixel units (paper: 0.0014 on CIFAR; tune it on
            held-out data). 0 gives the temperature-scaled softmax score, still in two passes.
        std: The inputs' normalisation std: a number or a sequence of one per channel.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
        >>> odin = ODINScore(std=(0.5, 0.25, 0.5))
        >>> x = torch.randn(4, 3, 2, 2)
        >>> odin(odin.perturbed_logits(net, x)).shape
        torch.Size([4])
        >>> odin.requires_grad, odin.passes, odin.compile_clean
        (True, 2, False)
    """

    input = "logits"
    requires_grad = True
    passes = 2
    compile_clean = False

    def __init__(
        self,
        *,
        temperature: float = 1000.0,
        epsilon: float = 0.0014,
        std: float | Sequence[float] = 1.0,
    ) -> None:
        super().__init__()
        self.temperature = check_positive_float("temperature", temperature)
        if (
            isinstance(epsilon, bool)
            or not isinstance(epsilon, numbers.Real)
            or not (0 <= epsilon < math.inf)
        ):
            raise ValueError(
                f"Expected argument `epsilon` to be a finite number >= 0, got {epsilon!r}."
            )
        self.epsilon = float(epsilon)
        self.std = check_std(std)

    def _check_input(self, X: Any, name: str = "X") -> torch.Tensor:
        return check_logits(X, "multiclass", name=name)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return odin_score(X, self.temperature)

    def perturb(
        self, x: torch.Tensor, logits: torch.Tensor, *, retain_graph: bool = False
    ) -> torch.Tensor:
        """The input moved one ODIN step; see :func:`selectorch.functional.odin.odin_perturbation`.

        Args:
            x: ``(B, C, ...)`` input that requires grad.
            logits: ``(B, K)`` logits computed from ``x`` with gradients on.
            retain_graph: Keep the graph of ``logits``.

        Returns:
            ``(B, C, ...)`` detached perturbed input.
        """
        return odin_perturbation(
            x,
            logits,
            temperature=self.temperature,
            epsilon=self.epsilon,
            std=self.std,
            retain_graph=retain_graph,
        )

    def perturbed_logits(
        self, model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
    ) -> torch.Tensor:
        """The model's logits on the perturbed input (two passes); score them with ``self``.

        Args:
            model: Callable ``(B, C, ...) -> (B, K)`` logits, in eval mode.
            x: ``(B, C, ...)`` floating input.

        Returns:
            ``(B, K)`` detached logits.
        """
        return odin_logits(
            model, x, temperature=self.temperature, epsilon=self.epsilon, std=self.std
        )

    def hparams(self) -> dict[str, Any]:
        out = super().hparams()
        out["std"] = self.std if isinstance(self.std, float) else list(self.std)
        return out

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, epsilon={self.epsilon}, std={self.std}"
