"""Gram-matrix deviations (Sastry & Oore, ICML 2020, "Detecting out-of-distribution examples
with Gram matrices").

**Features.** A channels-first feature map ``(B, C, *spatial)`` is flattened to ``F`` of shape
``(C, S)`` per sample. For each power ``p = 1..P`` the Gram matrix of the elementwise power,
``G_p = F^p (F^p)^T`` (``C x C``, over the spatial axis), is reduced to its row sums, and the
signed ``p``-th root of each row sum is kept: ``sign(r) |r|^(1/p)`` with ``r = G_p 1``. That is
``P * C`` values per sample, power-major (``[p=1: C values, p=2: C values, ...]``); the order
(Gram, row sums, root) is that of the authors' code. ``G_p 1 = F^p (F^p)^T 1`` is computed as
``F^p`` times the column sums of ``F^p``, ``O(C S)`` instead of ``O(C^2 S)``. Each channel
``i`` is scaled by its largest magnitude ``m_i`` and the column sums by the sample's largest
``M`` (the root of the row sum is multiplied back by ``m_i M``), so that powers up to ``P``
never overflow in float32 and a weak channel keeps its relative precision.

**Deviations.** For each predicted class, layer, power and channel, the minimum and maximum
over the training rows. A value ``v`` deviates by ``0`` inside ``[min, max]``,
``(min - v) / |min|`` below and ``(v - max) / |max|`` above (``|min|``, ``|max|`` floored at
:data:`DEVIATION_EPS`). A layer's deviation is the sum over its powers and channels; the total
is the sum over layers of each layer's deviation divided by its mean on held-out
in-distribution rows (the paper's ``E_va[delta_l]``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from selectorch._checks import check_int

#: Floor of ``|min|`` and ``|max|`` in the relative deviation, and of a layer's normaliser.
DEVIATION_EPS = 1e-6


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def gram_features(x: torch.Tensor, powers: int = 10) -> torch.Tensor:
    """Row sums of the order-``p`` Gram matrices of a feature map, ``p = 1..powers``.

    Args:
        x: ``(B, C, *spatial)`` channels-first feature map, at least 3 dims (``(B, C, H, W)``
            from a conv layer, ``(B, C, L)`` from a 1-D conv). Token sequences ``(B, L, C)``
            must be transposed to ``(B, C, L)`` first; ``(B, D)`` vectors have no spatial axis.
        powers: Number of powers ``P`` (paper: 10).

    Returns:
        ``(B, P * C)`` features, power-major, in at least float32.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` has fewer than 3 dims, or ``powers`` is not an integer >= 1.

    Example:
        >>> x = torch.tensor([[[1.0, 2.0], [0.0, 3.0]]])  # B=1, C=2, L=2
        >>> gram_features(x, powers=2)  # p=1: (1*1 + 2*5, 0*1 + 3*5); p=2: sqrt(1 + 4*13), ...
        tensor([[11.0000, 15.0000,  7.2801, 10.8167]])
    """
    powers = check_int("powers", powers)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = f"dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"Expected argument `x` to be a floating-point tensor, got {got}.")
    if x.ndim < 3:
        raise ValueError(
            f"Expected argument `x` to be a channels-first feature map (B, C, *spatial) with at "
            f"least 3 dims, got shape {tuple(x.shape)}: Gram features need a spatial axis. "
            "Record a convolutional layer (or transpose (B, L, C) tokens to (B, C, L))."
        )
    F = _upcast(x).flatten(2)  # (B, C, S)
    tiny = torch.finfo(F.dtype).tiny
    channel_max = F.abs().amax(dim=2, keepdim=True).clamp_min(tiny)  # (B, C, 1) = m_i
    sample_max = channel_max.amax(dim=1, keepdim=True)  # (B, 1, 1) = M
    base = F / channel_max  # entries in [-1, 1]
    ratio = (channel_max / sample_max).transpose(1, 2)  # (B, 1, C), m_j / M in (0, 1]
    scale = (channel_max * sample_max)[:, :, 0]  # (B, C): the root of (m_i M)^p
    out = []
    power, ratio_power = base, ratio
    for p in range(1, powers + 1):
        if p > 1:
            power, ratio_power = power * base, ratio_power * ratio
        # sum_j (F_js / M)^p = sum_j (m_j / M)^p (F_js / m_j)^p: (B, 1, S)
        column_sums = torch.bmm(ratio_power, power)
        # (G_p 1)_i / (m_i M)^p = sum_s (F_is / m_i)^p column_sums_s: (B, C)
        rows = torch.bmm(power, column_sums.transpose(1, 2))[:, :, 0]
        out.append(rows.sign() * rows.abs().pow(1.0 / p) * scale)
    return torch.cat(out, dim=1)


class GramFeatures:
    """Picklable pooling callable ``(B, C, *spatial) -> (B, P * C)``: :func:`gram_features`.

    Give it as ``pool=`` to :class:`~selectorch.Recorder` or
    :class:`~selectorch.SelectiveModel` (a :class:`~selectorch.scores.GramScore` sets it as its
    ``pool``), so that each hooked conv layer is recorded as its Gram features.

    Args:
        powers: Number of powers ``P`` (paper: 10).

    Example:
        >>> GramFeatures(powers=3)(torch.rand(2, 4, 5, 5)).shape
        torch.Size([2, 12])
    """

    def __init__(self, powers: int = 10) -> None:
        self.powers = check_int("powers", powers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return gram_features(x, self.powers)

    def __repr__(self) -> str:
        return f"GramFeatures(powers={self.powers})"

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self) and other.powers == self.powers

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.powers))


class GramRanges(NamedTuple):
    """What :func:`gram_ranges` learns."""

    #: ``(K, D)`` per-class minimum of every feature.
    mins: torch.Tensor
    #: ``(K, D)`` per-class maximum of every feature.
    maxs: torch.Tensor
    #: ``(K,)`` number of rows behind each class's range (float; 0 = the overall range).
    counts: torch.Tensor


def gram_ranges(X: torch.Tensor, classes: torch.Tensor, num_classes: int) -> GramRanges:
    """Per-class minimum and maximum of every feature column.

    A class with no row gets the range over all rows (so a sample predicted as a class never
    seen in training is judged against every class's range together; never NaN).

    Args:
        X: ``(N, D)`` features, ``N >= 1``.
        classes: ``(N,)`` class of each row (the predicted class), in ``[0, num_classes)``.
        num_classes: Number of classes ``K``.

    Returns:
        :class:`GramRanges` ``(mins (K, D), maxs (K, D), counts (K,))``.

    Example:
        >>> X = torch.tensor([[1.0], [3.0], [-2.0]])
        >>> r = gram_ranges(X, torch.tensor([0, 0, 1]), 3)
        >>> r.mins.flatten().tolist(), r.maxs.flatten().tolist()  # class 2: all rows
        ([1.0, -2.0, -2.0], [3.0, -2.0, 3.0])
    """
    classes = classes.long()
    index = classes[:, None].expand_as(X)
    shape = (num_classes, X.shape[1])
    mins = X.new_zeros(shape).scatter_reduce(0, index, X, "amin", include_self=False)
    maxs = X.new_zeros(shape).scatter_reduce(0, index, X, "amax", include_self=False)
    counts = torch.bincount(classes, minlength=num_classes).to(X.dtype)
    empty = (counts == 0)[:, None]
    mins = torch.where(empty, X.amin(dim=0, keepdim=True), mins)
    maxs = torch.where(empty, X.amax(dim=0, keepdim=True), maxs)
    return GramRanges(mins, maxs, counts)


def gram_deviations(
    X: torch.Tensor,
    classes: torch.Tensor,
    mins: torch.Tensor,
    maxs: torch.Tensor,
    dims: list[int],
) -> torch.Tensor:
    """Each row's deviation from its class's ranges, summed per layer.

    Args:
        X: ``(N, D)`` features of all layers side by side, ``D = sum(dims)``.
        classes: ``(N,)`` class of each row, in ``[0, K)``.
        mins: ``(K, D)`` per-class minima.
        maxs: ``(K, D)`` per-class maxima.
        dims: Width of each layer's block of columns, in order.

    Returns:
        ``(N, L)`` deviations, ``>= 0``, in at least float32.

    Example:
        >>> mins, maxs = torch.tensor([[1.0, -2.0]]), torch.tensor([[2.0, 4.0]])
        >>> X = torch.tensor([[1.5, 6.0], [0.5, -3.0]])  # (6-4)/4; (1-0.5)/1 + (-2+3)/2
        >>> gram_deviations(X, torch.tensor([0, 0]), mins, maxs, [2])
        tensor([[0.5000],
                [1.0000]])
    """
    X = _upcast(X)
    classes = classes.long()
    low, high = mins.to(X.dtype)[classes], maxs.to(X.dtype)[classes]
    below = (low - X).clamp_min(0) / low.abs().clamp_min(DEVIATION_EPS)
    above = (X - high).clamp_min(0) / high.abs().clamp_min(DEVIATION_EPS)
    deviation = below + above
    return torch.stack([block.sum(dim=1) for block in deviation.split(dims, dim=1)], dim=1)


def gram_score(deviations: torch.Tensor, normalizer: torch.Tensor) -> torch.Tensor:
    """Total deviation ``sum_l delta_l / E_va[delta_l]`` (higher = more unusual).

    Args:
        deviations: ``(N, L)`` per-layer deviations (:func:`gram_deviations`).
        normalizer: ``(L,)`` mean deviation of each layer on held-out in-distribution rows.

    Returns:
        ``(N,)`` scores, ``>= 0``.

    Example:
        >>> gram_score(torch.tensor([[1.0, 4.0]]), torch.tensor([0.5, 2.0]))
        tensor([4.])
    """
    return (deviations / normalizer.to(deviations.dtype).clamp_min(DEVIATION_EPS)).sum(dim=1)
