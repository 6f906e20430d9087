"""kNN distance scores: distance to the nearest reference embeddings."""

from __future__ import annotations

import torch

from selectorch._checks import check_choice, check_int
from selectorch.functional.distances import METRICS, prepare_bank
from selectorch.functional.knn import STATS, knn_score
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score


@register_score("knn")
class KNNScore(Score):
    """Distance to the k nearest reference embeddings (Sun et al. 2022, "deep nearest neighbors").

    The search is exact and runs on the bank's device: a chunked matrix product with a running
    top-k, so memory stays bounded by a block of distances and the full query x bank matrix is
    never built.

    Args:
        k: Number of neighbours, ``1 <= k <= bank size``.
        metric: ``"euclidean"`` or ``"cosine"`` (``1 - cosine similarity``).
        stat: How the k distances become one score: ``"max"`` (k-th neighbour), ``"mean"``,
            ``"median"`` or ``"min"``.

    Attributes:
        bank_: ``(M, D)`` reference embeddings (L2-normalised for cosine).

    Example:
        >>> score = KNNScore(k=5, stat="mean").fit(torch.randn(1000, 32))
        >>> score = score.calibrate(torch.randn(200, 32), coverage=0.9)
        >>> score.select(torch.randn(10, 32))["selected"].shape
        torch.Size([10])
    """

    input = "embedding"
    fitted_buffers = ("bank_",)

    bank_: torch.Tensor
    bank_sq_norms_: torch.Tensor

    def __init__(self, *, k: int = 1, metric: str = "euclidean", stat: str = "max") -> None:
        super().__init__()
        self.k = check_int("k", k)
        self.metric = check_choice("metric", metric, METRICS)
        self.stat = check_choice("stat", stat, STATS)
        self.register_buffer("bank_", torch.empty(0, 0))
        # derived from bank_ (not saved): squared row norms for euclidean search
        self.register_buffer("bank_sq_norms_", torch.empty(0), persistent=False)

    def _expected_dim(self) -> int | None:
        return self.bank_.shape[1] if self.is_fitted else None

    def _check_k(self, bank_size: int) -> None:
        if self.k > bank_size:
            raise ValueError(
                f"Expected argument `k` to be at most the bank size {bank_size}, got k={self.k}."
            )

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        self._check_k(X.shape[0])
        self.bank_ = prepare_bank(X.detach(), self.metric).clone()

    def _refresh_derived(self) -> None:
        self._check_k(self.bank_.shape[0])
        self.bank_sq_norms_ = self.bank_.pow(2).sum(dim=1)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        norms = self.bank_sq_norms_ if self.metric == "euclidean" else None
        X = X.to(self.bank_.dtype)
        return knn_score(
            X, self.bank_, self.k, metric=self.metric, stat=self.stat, bank_sq_norms=norms
        )

    def extra_repr(self) -> str:
        return f"k={self.k}, metric={self.metric!r}, stat={self.stat!r}"


@register_score("euclidean")
class EuclideanScore(KNNScore):
    """kNN score with Euclidean distance (seapig's name). See :class:`KNNScore`.

    Args:
        k: Number of neighbours.
        stat: ``"max"``, ``"mean"``, ``"median"`` or ``"min"`` over the k distances.
    """

    def __init__(self, *, k: int = 1, stat: str = "max") -> None:
        super().__init__(k=k, metric="euclidean", stat=stat)

    def extra_repr(self) -> str:
        return f"k={self.k}, stat={self.stat!r}"


@register_score("cosine")
class CosineScore(KNNScore):
    """kNN score with cosine distance ``1 - cos`` (seapig's name). See :class:`KNNScore`.

    Args:
        k: Number of neighbours.
        stat: ``"max"``, ``"mean"``, ``"median"`` or ``"min"`` over the k distances.
    """

    def __init__(self, *, k: int = 1, stat: str = "max") -> None:
        super().__init__(k=k, metric="cosine", stat=stat)

    def extra_repr(self) -> str:
        return f"k={self.k}, stat={self.stat!r}"
