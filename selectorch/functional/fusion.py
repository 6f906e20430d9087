"""Standardising several scores on reference values and combining them into one."""

from __future__ import annotations

import torch

STANDARDIZE = ("pvalue", "zscore")
COMBINE = ("mean", "max", "fisher")


def empirical_pvalues(scores: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Conformal p-values ``(1 + #{r >= s}) / (n + 1)`` of scores against sorted references.

    A small p-value means the score is unusually high (uncertain) next to the reference.

    Args:
        scores: ``(N, K)`` scores of ``K`` components.
        reference: ``(K, n)`` reference scores of each component, sorted ascending.

    Returns:
        ``(N, K)`` p-values in ``(0, 1]``.

    Example:
        >>> empirical_pvalues(torch.tensor([[2.5]]), torch.tensor([[1.0, 2.0, 3.0]])).tolist()
        [[0.5]]
    """
    n = reference.shape[1]
    below = torch.searchsorted(reference.contiguous(), scores.T.contiguous(), side="left").T
    return (1.0 + (n - below).to(scores.dtype)) / (n + 1.0)


def zscores(scores: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(scores - mean) / std`` per component: ``(N, K)`` with ``(K,)`` statistics."""
    return (scores - mean) / std


def combine_standardized(values: torch.Tensor, standardize: str, combine: str) -> torch.Tensor:
    """One uncertainty per row from ``(N, K)`` standardised component values (higher = worse).

    * p-values: ``"mean"`` -> mean of ``1 - p``; ``"max"`` -> ``1 - min p`` (the most alarming
      component decides); ``"fisher"`` -> Fisher's ``-2 sum log p``.
    * z-scores: ``"mean"`` -> mean z; ``"max"`` -> max z (``"fisher"`` needs p-values).

    Args:
        values: ``(N, K)`` p-values or z-scores.
        standardize: ``"pvalue"`` or ``"zscore"``.
        combine: ``"mean"``, ``"max"`` or ``"fisher"``.

    Returns:
        ``(N,)`` combined scores.
    """
    if standardize == "pvalue":
        if combine == "fisher":
            return -2.0 * values.log().sum(dim=1)
        values = 1.0 - values
    return values.amax(dim=1) if combine == "max" else values.mean(dim=1)
