"""Rank statistics of scores (no sigmoid or clipping: any real-valued score works)."""

from __future__ import annotations

import torch


def midranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``values`` with ties given the mean of their ranks.

    Args:
        values: ``(N,)`` real values; ``+inf`` and ``-inf`` are ranked like any value.

    Returns:
        ``(N,)`` float64 ranks.

    Example:
        >>> midranks(torch.tensor([3.0, 1.0, 3.0])).tolist()
        [2.5, 1.0, 2.5]
    """
    _, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    return (ends - (counts.double() - 1) / 2)[inverse]


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of ``scores`` for telling ``positive`` rows from the rest.

    Computed from the Mann-Whitney U statistic with midranks, so ties count one half and the
    scores may take any real value (torchmetrics' binary AUROC squashes scores outside [0, 1]
    with a sigmoid, which ties large distances together).

    Args:
        scores: ``(N,)`` scores, higher = more likely positive (for OOD detection: higher =
            more uncertain, positive = out-of-distribution).
        positive: ``(N,)`` bool (or 0/1) labels.

    Returns:
        A 0-dim float64 tensor in [0, 1].

    Raises:
        ValueError: Shapes differ, a score is NaN, or one class is absent.
    """
    positive = positive.bool().flatten()
    scores = scores.flatten()
    if scores.shape != positive.shape:
        raise ValueError(
            f"Expected `scores` and `positive` to have the same length, got {scores.numel()} "
            f"and {positive.numel()}."
        )
    if torch.isnan(scores).any():
        raise ValueError("Argument `scores` holds NaN; AUROC is undefined.")
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"AUROC needs both classes, got {n_pos} positive and {n_neg} negative rows."
        )
    ranks = midranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return u / (n_pos * n_neg)
