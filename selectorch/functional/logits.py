"""Scores computed from a classifier's logits, as uncertainties (higher = less trustworthy)."""

from __future__ import annotations

import torch


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def softmax_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative maximum softmax probability (Hendrycks & Gimpel 2017).

    Args:
        logits: ``(N, C)`` logits; half precision is computed in float32.
        temperature: Divides the logits before the softmax.

    Returns:
        Tensor of shape ``(N,)`` in ``[-1, -1/C]``.

    Example:
        >>> softmax_score(torch.tensor([[0.0, 0.0]])).item()
        -0.5
    """
    return -torch.softmax(_upcast(logits) / temperature, dim=-1).amax(dim=-1)


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Free energy ``-T * logsumexp(logits / T)`` (Liu et al. 2020): higher = less in-distribution.

    Args:
        logits: ``(N, C)`` logits; half precision is computed in float32.
        temperature: The energy temperature ``T``.

    Returns:
        Tensor of shape ``(N,)``.
    """
    return -temperature * torch.logsumexp(_upcast(logits) / temperature, dim=-1)
