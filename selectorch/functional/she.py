"""Simplified Hopfield energy, SHE (Zhang, Fu, Liu & Zhang, ICLR 2023).

"Out-of-distribution detection based on in-distribution data patterns memorization with modern
Hopfield energy": the memory of class ``c`` is its stored pattern ``s_c``, the mean of the
penultimate features of the training rows of class ``c`` that the classifier gets right. A test
row ``x`` predicted as class ``c`` by the head has the simplified Hopfield energy
``-x^T s_c``: features that resemble the memorised patterns of their predicted class get a low
energy, unfamiliar ones a high energy. The energy is already an uncertainty.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from selectorch.functional.shaping import head_logits


class SHEPatterns(NamedTuple):
    """What :func:`she_patterns` learns."""

    #: ``(C, D)`` stored pattern of each class (zeros for a class with no correct row).
    patterns: torch.Tensor
    #: ``(C,)`` number of correctly classified rows behind each pattern (float).
    counts: torch.Tensor


def she_patterns(
    X: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> SHEPatterns:
    """Stored patterns: per class, the mean of the rows of that class the head classifies right.

    A class with no correctly classified row keeps the zero pattern: rows predicted as that class
    then score ``0``, the highest score any non-negative (post-ReLU) feature row can get against
    non-negative patterns (never NaN).

    Args:
        X: ``(N, D)`` training features (the head's inputs).
        y: ``(N,)`` integer labels in ``[0, C)``.
        weight: ``(C, D)`` head weight.
        bias: ``(C,)`` head bias.

    Returns:
        :class:`SHEPatterns` ``(patterns (C, D), counts (C,))`` in ``X``'s dtype.

    Example:
        >>> X = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [2.0, 0.1]])
        >>> y = torch.tensor([0, 0, 1, 1])  # the last row is misclassified: it is not stored
        >>> she_patterns(X, y, torch.eye(2), torch.zeros(2)).patterns
        tensor([[2., 0.],
                [0., 2.]])
    """
    n_classes = weight.shape[0]
    preds = head_logits(X, weight, bias).argmax(dim=1)
    y = y.long()
    correct = preds == y
    sums = torch.zeros(n_classes, X.shape[1], dtype=X.dtype, device=X.device)
    sums.index_add_(0, y[correct], X[correct])
    counts = torch.bincount(y[correct], minlength=n_classes).to(X.dtype)
    return SHEPatterns(sums / counts.clamp_min(1)[:, None], counts)


def she_score(
    X: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, patterns: torch.Tensor
) -> torch.Tensor:
    """Simplified Hopfield energy ``-x^T s_c`` against the pattern of the head's predicted class.

    Args:
        X: ``(B, D)`` features (the head's inputs).
        weight: ``(C, D)`` head weight; ``argmax(x W^T + b)`` is the predicted class ``c``.
        bias: ``(C,)`` head bias.
        patterns: ``(C, D)`` stored patterns (:func:`she_patterns`).

    Returns:
        ``(B,)`` energies, higher = less like the memorised training patterns; in at least
        float32.

    Example:
        >>> patterns = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> she_score(torch.tensor([[3.0, 0.0], [0.0, 0.5]]), torch.eye(2), torch.zeros(2),
        ...           patterns)
        tensor([-6., -1.])
    """
    logits = head_logits(X, weight, bias)
    stored = patterns.to(logits.dtype)[logits.argmax(dim=1)]
    return -(X.to(logits.dtype) * stored).sum(dim=1)
