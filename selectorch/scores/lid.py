"""Local intrinsic dimensionality (LID) of each sample among its nearest reference embeddings."""

from __future__ import annotations

from typing import ClassVar

import torch

from selectorch._checks import check_int
from selectorch.functional.knn import DEFAULT_CHUNK_SIZE, row_sq_norms
from selectorch.functional.neighbours import lid_score
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score


@register_score("lid")
class LIDScore(Score):
    """Local intrinsic dimensionality from the k nearest reference embeddings (Ma et al. 2018).

    The maximum-likelihood estimate from the Euclidean distances ``r_1 <= ... <= r_k`` to the
    ``k`` nearest reference rows, ``LID = -(mean_i log(r_i / r_k))^{-1}``
    (:func:`~selectorch.functional.neighbours.lid_mle`). Near the data the neighbours lie along
    the few directions of the manifold (low LID); off it they spread out in many (high LID),
    so higher means more uncertain. The score depends on the *shape* of the neighbourhood, not
    its size: scaling all embeddings leaves it unchanged.

    Zero distances give the estimator's limits, never NaN: a query equal to a reference row has
    LID 0 (``log(0 / r_k) = -inf`` in the mean), as has one whose ``k`` neighbours all coincide
    with it; ``k`` equal positive distances give ``+inf`` (rejected). Scoring the reference rows
    themselves thus gives 0: calibrate on held-out rows, as always.

    The search is the exact chunked search of :class:`~selectorch.scores.KNNScore` (memory one
    ``(B, chunk_size)`` block, bank centred on its mean for precision).

    Args:
        k: Number of neighbours, at least 2 and at most the bank size (Ma et al. use 20).
        chunk_size: Bank rows searched at a time.

    Attributes:
        bank_: ``(M, D)`` reference embeddings centred on ``mean_``.
        mean_: ``(D,)`` mean of the reference embeddings.

    Example:
        >>> score = LIDScore(k=10).fit(torch.randn(500, 8))
        >>> score(torch.randn(4, 8)).shape
        torch.Size([4])
    """

    input = "embedding"
    fitted_buffers = ("bank_",)
    requires_grad: ClassVar[bool] = False
    passes: ClassVar[int] = 1
    compile_clean: ClassVar[bool] = True

    bank_: torch.Tensor
    mean_: torch.Tensor
    bank_sq_norms_: torch.Tensor

    def __init__(self, *, k: int = 20, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.k = check_int("k", k)
        if k < 2:
            raise ValueError(
                f"Expected argument `k` to be at least 2 (LID compares the k distances), got {k}."
            )
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.register_buffer("bank_", torch.empty(0, 0))
        self.register_buffer("mean_", torch.empty(0))
        # derived from bank_ (not saved): squared row norms for the search
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
        self._set_buffer("mean_", X.mean(dim=0))
        self.bank_ = X.detach() - self.mean_

    def _refresh_derived(self) -> None:
        self._check_k(self.bank_.shape[0])
        work = torch.promote_types(self.bank_.dtype, torch.float32)
        self.bank_sq_norms_ = row_sq_norms(self.bank_, work)  # no (M, D) temporary

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        query = X.to(self.mean_.dtype) - self.mean_
        return lid_score(
            query, self.bank_, self.k, bank_sq_norms=self.bank_sq_norms_, chunk_size=self.chunk_size
        )

    def extra_repr(self) -> str:
        chunk = "" if self.chunk_size == DEFAULT_CHUNK_SIZE else f", chunk_size={self.chunk_size}"
        return f"k={self.k}{chunk}"
