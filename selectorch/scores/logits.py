"""Scores computed from the model's logits, with an optional fitted temperature."""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch

from selectorch._checks import (
    check_choice,
    check_fraction,
    check_int,
    check_positive_float,
)
from selectorch.functional.logits import (
    LOGIT_TASKS,
    check_logits,
    energy_score,
    entropy_score,
    gen_score,
    margin_score,
    max_logit_score,
    mutual_information_score,
    predictive_variance_score,
    softmax_score,
)
from selectorch.functional.temperature import check_labels, fit_temperature
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score


class LogitScore(Score):
    """Base of scores computed from a classifier's logits; usable without ``fit``.

    Input shapes by ``task`` (labels for :meth:`fit` in brackets):

    - ``"multiclass"``: ``(N, C)`` logits, ``C >= 2`` [``(N,)`` integer classes].
    - ``"binary"``: ``(N,)`` or ``(N, 1)`` log-odds, or ``(N, 2)`` logits [``(N,)`` in {0, 1}].
      A log-odds ``z`` is scored as the centred logits ``(-z/2, z/2)``, so a confident negative
      is exactly as confident as a confident positive.
    - ``"multilabel"``: ``(N, C)`` log-odds of independent labels [``(N, C)`` in {0, 1}]; the
      score is the mean over labels of the per-label binary score.

    Ensemble scores take the members' logits in a last axis: ``(N, C, M)``.

    The temperature ``T`` divides the logits. A number (default 1) fixes it. With
    ``temperature=None``, ``fit(logits, labels)`` fits it by LBFGS (NLL for multiclass, BCE for
    binary and multilabel) on held-out data, not the training set; it is 1 until then. It lives
    in the 0-dim buffer ``temperature_``, so ``state_dict``, ``.to()`` and ``torch.compile``
    carry it. Only ``calibrate`` is needed to select; in a :class:`~selectorch.SelectiveModel`
    the logits are the model's output (or the output of ``layer=`` when given).

    Args:
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        temperature: A fixed temperature > 0, or ``None`` to fit it from labels.

    Attributes:
        temperature_: 0-dim tensor, the temperature in use.

    Example:
        >>> logits = torch.randn(500, 10) * 3  # held-out logits and their labels
        >>> labels = torch.distributions.Categorical(logits=logits / 2).sample()
        >>> score = EntropyScore(temperature=None).fit(logits, labels)  # T close to 2
        >>> score = score.calibrate(logits, coverage=0.9)
        >>> score.select(torch.randn(4, 10))["selected"].shape
        torch.Size([4])
    """

    input = "logits"
    #: Whether the logits carry a last axis of ensemble members.
    ensemble: ClassVar[bool] = False

    temperature_: torch.Tensor

    def __init__(self, *, task: str = "multiclass", temperature: float | None = 1.0) -> None:
        super().__init__()
        self.task = check_choice("task", task, LOGIT_TASKS)
        self.temperature = (
            None if temperature is None else check_positive_float("temperature", temperature)
        )
        self.register_buffer("temperature_", torch.tensor(self._initial_temperature))

    @property
    def _initial_temperature(self) -> float:
        return 1.0 if self.temperature is None else self.temperature

    def _check_input(self, X: Any, name: str = "X") -> torch.Tensor:
        return check_logits(X, self.task, ensemble=self.ensemble, name=name)

    def fit(
        self, X: torch.Tensor, y: torch.Tensor | None = None, *, copy: bool = True
    ) -> LogitScore:
        """Fit the temperature on held-out logits and labels; fitting again starts over.

        Only a score built with ``temperature=None`` fits its temperature, from ``y``; without
        ``y`` it stays at 1 and a warning says so. A fixed temperature ignores ``y`` beyond its
        row count (so a labelled loader in :meth:`SelectiveModel.fit
        <selectorch.SelectiveModel.fit>` is fine).
        The score moves to ``X``'s device, and any threshold is dropped.

        Args:
            X: Logits shaped as ``task`` needs, without NaN or Inf.
            y: Optional labels: ``(N,)`` integer classes (multiclass), ``(N,)`` values in
                ``[0, 1]`` (binary), ``(N, C)`` values in ``[0, 1]`` (multilabel).
            copy: If False, fit may overwrite X in place (saves one copy of the bank); X must
                not be used afterwards.

        Returns:
            ``self``.

        Raises:
            ValueError: ``X`` or ``y`` has the wrong shape or values, or ``X`` is empty or has
                rows with NaN or Inf.
        """
        X = self._check_input(X)
        if self.temperature is None and y is not None:
            y = check_labels(y, X, self.task, ensemble=self.ensemble)
        # Score.fit takes (N, D) rows: hand it a 2-D view, and _fit the task's shape back
        self._fit_shape = tuple(X.shape[1:])
        try:
            super().fit(X.reshape(X.shape[0], math.prod(self._fit_shape)), y, copy=copy)
        finally:
            del self._fit_shape
        if self.temperature is None and y is None:
            warnings.warn(
                f"{type(self).__name__}.fit got no labels `y`, so the temperature is not fitted "
                "and stays at 1, as given. Pass fit(logits, labels) with held-out labels to fit "
                "it, or a fixed temperature=... to silence this warning.",
                stacklevel=2,
            )
        return self

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        temperature = torch.tensor(self._initial_temperature)
        if self.temperature is None and y is not None:
            logits = X.reshape(X.shape[0], *self._fit_shape)
            temperature = fit_temperature(logits, y, task=self.task, ensemble=self.ensemble)
        self._set_buffer("temperature_", temperature)

    def extra_repr(self) -> str:
        return f"task={self.task!r}, temperature={self.temperature}"


@register_score("softmax")
class SoftmaxScore(LogitScore):
    """Negative maximum softmax probability (Hendrycks & Gimpel 2017), in ``[-1, -1/C]``.

    Binary: ``-max(p, 1 - p)``. See :class:`LogitScore` for tasks and the temperature.

    Example:
        >>> SoftmaxScore()(torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
        tensor([-0.9820, -0.5000])
    """

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return softmax_score(X, self.temperature_, task=self.task)


@register_score("max_logit")
class MaxLogitScore(LogitScore):
    """Negative maximum logit ``-max(z / T)`` (Hendrycks et al. 2022).

    Binary: ``-|z| / 2T``. See :class:`LogitScore` for tasks and the temperature.

    Example:
        >>> MaxLogitScore()(torch.tensor([[4.0, 0.0], [0.0, 0.0]]))
        tensor([-4., -0.])
    """

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return max_logit_score(X, self.temperature_, task=self.task)


@register_score("energy")
class EnergyScore(LogitScore):
    """Free energy ``-T * logsumexp(logits / T)`` (Liu et al. 2020): higher = more unusual.

    Binary: ``-T log(2 cosh(z / 2T))``, the same for ``z`` and ``-z``. See :class:`LogitScore`.

    Args:
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        temperature: The energy temperature ``T`` > 0, or ``None`` to fit it from labels.

    Example:
        >>> EnergyScore(temperature=1.0)(torch.zeros(1, 4))
        tensor([-1.3863])
    """

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return energy_score(X, self.temperature_, task=self.task)


@register_score("entropy")
class EntropyScore(LogitScore):
    """Entropy of the predicted distribution, in ``[0, log C]`` nats.

    Binary: the entropy of ``sigmoid(z / T)``. See :class:`LogitScore`.

    Example:
        >>> EntropyScore()(torch.zeros(1, 4))
        tensor([1.3863])
    """

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return entropy_score(X, self.temperature_, task=self.task)


@register_score("margin")
class MarginScore(LogitScore):
    """Negative probability margin ``-(p_top1 - p_top2)``, in ``[-1, 0]``.

    Binary: ``-|2p - 1|``. See :class:`LogitScore`.

    Example:
        >>> MarginScore()(torch.tensor([[50.0, 0.0, 0.0], [1.0, 1.0, -50.0]]))
        tensor([-1., -0.])
    """

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return margin_score(X, self.temperature_, task=self.task)


@register_score("gen")
class GENScore(LogitScore):
    """Generalized entropy of the top-M probabilities (Liu, Lochman & Zach, CVPR 2023).

    ``sum_{j <= M} p_(j)^gamma (1 - p_(j))^gamma`` over the sorted probabilities (the paper's
    confidence is its negative); ``M > C`` uses all classes. See :class:`LogitScore`.

    Args:
        gamma: Exponent in ``(0, 1]``; small values weigh the tails (paper: 0.1).
        M: Number of top classes, an integer ``>= 1`` (paper: 100 on ImageNet-1k).
        task: ``"multiclass"``, ``"binary"`` or ``"multilabel"``.
        temperature: A fixed temperature > 0, or ``None`` to fit it from labels.

    Example:
        >>> GENScore(gamma=1.0)(torch.zeros(1, 2))
        tensor([0.5000])
    """

    def __init__(
        self,
        *,
        gamma: float = 0.1,
        M: int = 100,
        task: str = "multiclass",
        temperature: float | None = 1.0,
    ) -> None:
        super().__init__(task=task, temperature=temperature)
        self.gamma = check_fraction("gamma", gamma)
        self.M = check_int("M", M)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return gen_score(X, self.temperature_, gamma=self.gamma, M=self.M, task=self.task)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, M={self.M}, {super().extra_repr()}"


@register_score("mutual_information")
class MutualInformationScore(LogitScore):
    """Mutual information of an ensemble: ``H(mean p) - mean H(p)`` (epistemic uncertainty).

    Takes ``(N, C, M)`` logits of ``M`` members (``(N, 1, M)`` or ``(N, 2, M)`` binary). It is 0
    when the members agree; the temperature (fitted on the members' mean probability) scales
    every member. See :class:`LogitScore`.

    Example:
        >>> logits = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])  # 2 members disagree
        >>> MutualInformationScore()(logits)
        tensor([0.6926])
    """

    ensemble = True

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return mutual_information_score(X, self.temperature_, task=self.task)


@register_score("predictive_variance")
class PredictiveVarianceScore(LogitScore):
    """Variance of an ensemble's probabilities across members, averaged over classes.

    Takes ``(N, C, M)`` logits of ``M`` members; population variance (divided by ``M``). See
    :class:`LogitScore`.

    Example:
        >>> logits = torch.tensor([[[50.0, -50.0], [-50.0, 50.0]]])  # 2 members disagree
        >>> PredictiveVarianceScore()(logits)
        tensor([0.2500])
    """

    ensemble = True

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return predictive_variance_score(X, self.temperature_, task=self.task)
