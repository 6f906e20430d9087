"""Gram-matrix score (Sastry & Oore, ICML 2020) over several hooked conv layers."""

from __future__ import annotations

from typing import ClassVar

import torch

from selectorch._checks import check_int, check_open_fraction
from selectorch.functional.gram import (
    DEVIATION_EPS,
    GramFeatures,
    gram_deviations,
    gram_ranges,
    gram_score,
)
from selectorch.scores.layers import LayerScore
from selectorch.scores.registry import register_score


def held_out_rows(n: int, fraction: float, device: torch.device | None = None) -> torch.Tensor:
    """``(n,)`` bool: ``floor(n * fraction)`` evenly spaced rows (at least one, never all).

    Row ``i`` is held out when ``floor((i + 1) * fraction) > floor(i * fraction)``, so the
    held-out rows are spread over the data rather than taken from its end.

    Example:
        >>> held_out_rows(10, 0.2).nonzero().flatten().tolist()
        [4, 9]
    """
    idx = torch.arange(n, device=device, dtype=torch.float64)
    held = torch.floor((idx + 1) * fraction) > torch.floor(idx * fraction)
    if not held.any():
        held[-1] = True
    return held

@register_score("gram")
class GramScore(LayerScore):
    """Deviation of Gram-matrix statistics from their per-class training ranges, over layers.

    Sastry & Oore, ICML 2020, "Detecting out-of-distribution examples with Gram matrices". Each
    hooked conv layer is recorded as its Gram features
    (:class:`~selectorch.functional.gram.GramFeatures`, set as this score's :attr:`pool`: for
    every power ``p = 1..powers`` and channel, the signed ``p``-th root of a row sum of
    ``F^p (F^p)^T``); feature maps must be channels-first ``(B, C, *spatial)``. Use it as
    ``SelectiveModel(model, GramScore(), layer=["layer1", "layer2", ...])``, or standalone on a
    dict ``{layer: (N, P * C_l) Gram features, ..., "logits": (N, K)}``.

    ``fit(X)`` uses the predicted class ``argmax(logits)`` of every row (as the paper; labels
    ``y`` are not used). Every ``1 / normalize_fraction``-th row (evenly spaced, so that data
    sorted by class is split alike) is held out; on the others it keeps, per predicted class,
    the minimum and maximum of every Gram feature. A value deviates by ``0`` inside its range
    and by ``(min - v) / |min|`` or ``(v - max) / |max|`` outside (see
    :mod:`selectorch.functional.gram`); a layer's deviation, summed over powers and channels,
    is divided by its mean on the held-out rows; the score is the sum over layers.
    A class predicted by no fitting row is judged against the range of all rows. Scoring is
    ``O(B * sum_l P C_l)`` after the pooling, which costs ``O(P C_l S_l)`` per layer and sample
    (``S_l`` spatial positions). Compile-clean.

    Args:
        powers: Number of Gram powers ``P`` (paper: 10).
        normalize_fraction: Share of the fitting rows held out, in ``(0, 1)``, to estimate each
            layer's mean deviation (at least one row).

    Attributes:
        pool: The :class:`~selectorch.functional.gram.GramFeatures` pooling of hooked layers.
        mins_: ``(K, D)`` per-class minima of all layers' features side by side.
        maxs_: ``(K, D)`` per-class maxima.
        class_counts_: ``(K,)`` fitting rows predicted as each class.
        normalizer_: ``(L,)`` mean held-out deviation of each layer (floored at ``1e-6``).

    Example:
        >>> pool = GramFeatures(powers=3)
        >>> maps = {"a": torch.rand(100, 4, 6, 6), "b": torch.rand(100, 8, 3, 3)}
        >>> X = {name: pool(x) for name, x in maps.items()} | {"logits": torch.randn(100, 3)}
        >>> score = GramScore(powers=3).fit(X)
        >>> score.mins_.shape, score(X).shape
        (torch.Size([3, 36]), torch.Size([100]))
    """

    requires_grad: ClassVar[bool] = False
    passes: ClassVar[int] = 1
    compile_clean: ClassVar[bool] = True
    fitted_buffers: ClassVar[tuple[str, ...]] = (
        "dims_",
        "mins_",
        "maxs_",
        "class_counts_",
        "normalizer_",
    )

    mins_: torch.Tensor
    maxs_: torch.Tensor
    class_counts_: torch.Tensor
    normalizer_: torch.Tensor

    def __init__(self, *, powers: int = 10, normalize_fraction: float = 0.2) -> None:
        super().__init__()
        self.powers = check_int("powers", powers)
        self.normalize_fraction = check_open_fraction("normalize_fraction", normalize_fraction)
        self.pool = GramFeatures(self.powers)
        self.register_buffer("mins_", torch.empty(0, 0))
        self.register_buffer("maxs_", torch.empty(0, 0))
        self.register_buffer("class_counts_", torch.empty(0))
        self.register_buffer("normalizer_", torch.empty(0))

    @property
    def num_classes(self) -> int:
        """Number of classes ``K`` of the fitted logits (0 before fit)."""
        return self.mins_.shape[0]

    def _fit_layers(
        self, features: list[torch.Tensor], logits: torch.Tensor, y: torch.Tensor | None
    ) -> None:
        n = logits.shape[0]
        if n < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 rows to fit: the ranges come from some "
                f"rows and each layer's mean deviation from the held-out normalize_fraction="
                f"{self.normalize_fraction} of them (at least one row), got {n}."
            )
        held_out = held_out_rows(n, self.normalize_fraction, logits.device)
        X = torch.cat(features, dim=1)
        classes = logits.argmax(dim=1)
        ranges = gram_ranges(X[~held_out], classes[~held_out], logits.shape[1])
        dims = [f.shape[1] for f in features]
        held = gram_deviations(X[held_out], classes[held_out], ranges.mins, ranges.maxs, dims)
        self._set_buffer("mins_", ranges.mins)
        self._set_buffer("maxs_", ranges.maxs)
        self._set_buffer("class_counts_", ranges.counts)
        self._set_buffer("normalizer_", held.mean(dim=0).clamp_min(DEVIATION_EPS))

    def _score_layers(self, features: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != self.mins_.shape[0]:
            raise ValueError(
                f"Expected `X['logits']` to have {self.mins_.shape[0]} classes, as when "
                f"{type(self).__name__} was fitted, got {logits.shape[1]}."
            )
        X = torch.cat(features, dim=1)
        deviations = gram_deviations(X, logits.argmax(dim=1), self.mins_, self.maxs_, self._dims)
        return gram_score(deviations, self.normalizer_)

    def extra_repr(self) -> str:
        return f"powers={self.powers}, normalize_fraction={self.normalize_fraction}"
