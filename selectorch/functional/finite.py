"""Which rows of a batch are finite."""

from __future__ import annotations

import math

import torch


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool, ``True`` where every entry of row ``x[i]`` is finite (empty batches work).

    Args:
        x: ``(N, ...)`` tensor; ``(N,)`` counts each entry as a row.

    Returns:
        ``(N,)`` bool tensor on ``x``'s device.

    Example:
        >>> finite_rows(torch.tensor([[1.0, float("nan")], [0.0, 2.0]])).tolist()
        [False, True]
    """
    width = math.prod(x.shape[1:])
    return torch.isfinite(x.reshape(x.shape[0], width)).all(dim=1)
