"""SHE (Zhang et al., ICLR 2023): simplified Hopfield energy against stored class patterns."""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch

from selectorch.functional.she import she_patterns, she_score
from selectorch.scores.base import Score
from selectorch.scores.head import HeadMixin
from selectorch.scores.mahalanobis import check_labels
from selectorch.scores.registry import register_score


@register_score("she")
class SHEScore(HeadMixin, Score):
    """Simplified Hopfield energy ``-x^T s_c``, ``c`` the head's predicted class.

    ``fit(X, y)`` stores one pattern per class: ``s_c`` is the mean of the features of the
    training rows of class ``c`` that the head classifies correctly (Zhang et al., ICLR 2023).
    A row is scored against the pattern of the class the head predicts for it; rows unlike the
    memorised patterns score high. Fitting is one pass; scoring is one head application and one
    gathered inner product, ``O(B C D)``.

    A class with no correctly classified training row keeps the zero pattern, and rows predicted
    as it score exactly ``0``: for post-ReLU features and patterns (the intended input) that is
    the top of the range, so they are rejected first among finite scores (a warning names such
    classes at fit). Labels are required.

    The input is the head's input (``layer=`` the layer before the head and ``head=`` the head in
    :class:`~selectorch.SelectiveModel`, or :meth:`set_head` standalone).

    Attributes:
        patterns_: ``(C, D)`` stored pattern of each class.
        class_counts_: ``(C,)`` correctly classified rows behind each pattern.

    Example:
        >>> fc = torch.nn.Linear(16, 3)
        >>> X = torch.randn(300, 16)  # labelled by the head itself: every row is correct
        >>> score = SHEScore().set_head(fc.weight, fc.bias).fit(X, fc(X).argmax(dim=1))
        >>> score.patterns_.shape, score(torch.randn(4, 16)).shape
        (torch.Size([3, 16]), torch.Size([4]))
    """

    input = "embedding"
    fitted_buffers = ("head_weight_", "head_bias_", "patterns_", "class_counts_")
    head_dependent_buffers = ("patterns_", "class_counts_")
    requires_grad: ClassVar[bool] = False
    passes: ClassVar[int] = 1
    compile_clean: ClassVar[bool] = True

    patterns_: torch.Tensor
    class_counts_: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("patterns_", torch.empty(0, 0))
        self.register_buffer("class_counts_", torch.empty(0))

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        name = type(self).__name__
        y = check_labels(name, y)
        n_classes = self.head_weight_.shape[0]
        if bool(((y < 0) | (y >= n_classes)).any()):
            raise ValueError(
                f"Expected argument `y` to hold class indices in [0, {n_classes}) (the classes "
                f"of the head, weight {tuple(self.head_weight_.shape)}), got values from "
                f"{int(y.min())} to {int(y.max())}."
            )
        fitted = she_patterns(X, y, self.head_weight_, self.head_bias_)
        if not bool((fitted.counts > 0).any()):
            raise ValueError(
                f"{name} stores the training rows that the head classifies correctly, but none "
                f"of the {X.shape[0]} rows is: check that `y` holds the head's class indices "
                "and that `X` holds the head's inputs."
            )
        empty = (fitted.counts == 0).nonzero().flatten().tolist()
        if empty:
            warnings.warn(
                f"{name}: no training row of classes {empty} is classified correctly, so they "
                "keep the zero pattern and rows predicted as them score 0.",
                stacklevel=5,  # the caller of fit (through HeadMixin.fit and torch.no_grad)
            )
        self._set_buffer("patterns_", fitted.patterns)
        self._set_buffer("class_counts_", fitted.counts)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return she_score(X, self.head_weight_, self.head_bias_, self.patterns_)
