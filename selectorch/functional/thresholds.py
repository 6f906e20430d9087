"""Thresholds from calibration scores."""

from __future__ import annotations

import math

import torch


def min_calibration_size(coverage: float) -> int:
    """Smallest number of calibration scores for which :func:`coverage_threshold` is finite.

    The rank ``ceil((n + 1) * coverage)`` must not exceed ``n``, which holds from
    ``n >= coverage / (1 - coverage)`` on.

    Args:
        coverage: Target coverage in (0, 1).

    Returns:
        The minimum ``n``.
    """
    return max(1, math.ceil(coverage / (1.0 - coverage) - 1e-9))


def conformal_rank(n: int, coverage: float) -> int:
    """The rank ``ceil((n + 1) * coverage)`` (1-based), robust to float round-off."""
    return math.ceil((n + 1) * coverage - 1e-9)


def coverage_threshold(scores: torch.Tensor, coverage: float) -> torch.Tensor:
    """Threshold that keeps at least ``coverage`` of new exchangeable samples in expectation.

    The threshold is the ``ceil((n + 1) * coverage)``-th smallest of the ``n`` calibration
    scores. For a new score ``s`` exchangeable with them, ``P(s <= threshold) >= coverage``.
    ``coverage == 1`` gives ``+inf`` (every sample with a finite score is kept).

    Args:
        scores: ``(n,)`` calibration scores.
        coverage: Target coverage in (0, 1].

    Returns:
        A 0-dim tensor with the threshold, on the device and in the dtype of ``scores``.

    Raises:
        ValueError: ``n`` is too small for the rank; the message says how many are needed.

    Example:
        >>> coverage_threshold(torch.arange(1.0, 10.0), 0.8).item()
        8.0
    """
    n = scores.numel()
    if coverage >= 1.0:
        return torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    rank = conformal_rank(n, coverage)
    if rank > n:
        raise ValueError(
            f"coverage={coverage} needs at least {min_calibration_size(coverage)} calibration "
            f"samples for the finite-sample rank ceil((n + 1) * coverage), got n={n}."
        )
    return torch.sort(scores.flatten()).values[rank - 1]


def interpolated_quantile(sorted_scores: torch.Tensor, q: float) -> torch.Tensor:
    """Linear-interpolation quantile of already sorted scores (numpy's default method).

    Unlike :func:`torch.quantile` it has no size limit.

    Args:
        sorted_scores: ``(n,)`` scores in increasing order, ``n >= 1``.
        q: Quantile in [0, 1].

    Returns:
        A 0-dim tensor.
    """
    n = sorted_scores.numel()
    pos = q * (n - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    low, high = sorted_scores[lo], sorted_scores[hi]
    if frac == 0.0:
        return low.clone()
    # an infinite end wins (as in numpy): plain interpolation would give inf - inf = NaN
    inner = low + frac * (high - low)
    return torch.where(torch.isinf(low), low, torch.where(torch.isinf(high), high, inner))
