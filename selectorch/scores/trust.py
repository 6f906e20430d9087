"""Trust score: distance to the predicted class over the distance to the nearest other class."""

from __future__ import annotations

import numbers
from typing import ClassVar

import torch

from selectorch._checks import check_int
from selectorch.functional.classwise import class_banks
from selectorch.functional.knn import DEFAULT_CHUNK_SIZE, row_sq_norms
from selectorch.functional.neighbours import class_nearest_search, density_filter, trust_score
from selectorch.scores.base import Score
from selectorch.scores.mahalanobis import check_labels
from selectorch.scores.predicted import ClassBanksMixin, PredictedClassMixin
from selectorch.scores.registry import register_score


@register_score("trust")
class TrustScore(ClassBanksMixin, PredictedClassMixin, Score):
    """Inverse trust score (Jiang et al. 2018, "To trust or not to trust a classifier").

    ``fit(X, y)`` keeps, for every class, its reference rows minus the ``alpha`` fraction of
    lowest density (the rows whose distance to their ``k``-th nearest other row of the class is
    largest: the paper's alpha-high-density set). A sample predicted as class ``c`` scores

        ``d(x, nearest kept row of c) / d(x, nearest kept row of any other class)``,

    the reciprocal of the paper's trust score, so that higher means less trustworthy: above 1,
    the sample lies closer to another class than to the one predicted. Distances are
    Euclidean; a query on a row of another class scores ``+inf``, one on rows of both classes
    scores 1 (:func:`~selectorch.functional.neighbours.trust_ratio`).

    **Where the predicted class comes from**, as for
    :class:`~selectorch.scores.ClassWiseKNNScore`: :meth:`score_with_preds` takes it
    (:class:`~selectorch.SelectiveModel` passes the model's ``argmax``, see
    :attr:`needs_preds`), and so do :meth:`score`, :meth:`calibrate` and :meth:`select`
    through ``preds=``. ``forward(X)`` alone, and any ``preds=None``, predicts the class of the
    nearest kept row (a 1-nearest-neighbour classifier): the score is then the nearest over the
    second-nearest class distance, in ``[0, 1]``, a margin of the kNN classifier rather than a
    check of the model. A predicted class outside ``[0, C)`` scores ``+inf``.

    **Cost.** The class banks are stored padded in one ``(C, M_max, D)`` tensor; each batch
    compares every query with every kept row (``O(B C M_max D)``), a ``(B, chunk_size)`` block
    of distances at a time, keeping a running per-class minimum; the full queries x bank
    matrix is never built. The two distances used are recomputed exactly from their rows.

    Args:
        k: Neighbours of the density radius (the paper's ``k``; only used when ``alpha > 0``,
            which then needs ``k + 1`` rows per class).
        alpha: Fraction in ``[0, 1)`` of each class's rows dropped as low-density; 0 keeps all.
        chunk_size: About how many bank rows (over all classes) are compared per step.

    Attributes:
        bank_: ``(C, M_max, D)`` kept rows of each class, centred on ``mean_``; padding rows
            are ``+inf``.
        mean_: ``(D,)`` mean of the kept rows.

    Example:
        >>> X, y = torch.randn(300, 16), torch.randint(3, (300,))
        >>> score = TrustScore(k=5, alpha=0.1).fit(X, y)
        >>> score.score_with_preds(torch.randn(4, 16), torch.tensor([0, 2, 1, 0])).shape
        torch.Size([4])
    """

    input = "embedding"
    fitted_buffers = ("bank_", "mean_")
    requires_grad: ClassVar[bool] = False
    passes: ClassVar[int] = 1
    compile_clean: ClassVar[bool] = True

    bank_: torch.Tensor
    mean_: torch.Tensor
    bank_sq_norms_: torch.Tensor

    def __init__(
        self, *, k: int = 10, alpha: float = 0.0, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> None:
        super().__init__()
        self.k = check_int("k", k)
        if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not 0 <= alpha < 1:
            raise ValueError(f"Expected argument `alpha` to be a number in [0, 1), got {alpha!r}.")
        self.alpha = float(alpha)
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.register_buffer("bank_", torch.empty(0, 0, 0))
        self.register_buffer("mean_", torch.empty(0))
        # derived from bank_ (not saved): (C, M_max) squared row norms, 0 on padding
        self.register_buffer("bank_sq_norms_", torch.empty(0, 0), persistent=False)

    # -- state ---------------------------------------------------------------------------------

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        name = type(self).__name__
        y = check_labels(name, y, min_classes=2).long()
        if bool((y < 0).any()):
            raise ValueError(
                f"Expected argument `y` to hold class indices >= 0 (the classes the model "
                f"predicts), got {int(y.min())}."
            )
        if self.alpha > 0:
            counts = torch.bincount(y)
            present = counts > 0
            small = (present & (counts < self.k + 1)).nonzero().flatten().tolist()
            if small:
                raise ValueError(
                    f"{name}(alpha={self.alpha}) needs at least k + 1 = {self.k + 1} reference "
                    f"rows in every class for the density radius, got {int(counts[small[0]])} "
                    f"in class {small[0]}. Lower k or give more rows of that class."
                )
            keep = density_filter(X, y, self.k, self.alpha)
            X, y = X[keep], y[keep]
        self._set_buffer("mean_", X.mean(dim=0))
        self.bank_ = class_banks(X - self.mean_, y, int(y.max()) + 1)

    def _refresh_derived(self) -> None:
        work = torch.promote_types(self.bank_.dtype, torch.float32)
        norms = row_sq_norms(self.bank_.flatten(0, 1), work).view(self.bank_.shape[:2])
        self.bank_sq_norms_ = torch.where(torch.isfinite(self.bank_[..., 0]), norms, 0)

    # -- scoring -------------------------------------------------------------------------------

    def _score_classes(self, X: torch.Tensor, preds: torch.Tensor | None) -> torch.Tensor:
        """Raw scores of checked ``X`` (compile-clean); ``preds=None`` = the nearest row's class."""
        query = X.to(self.mean_.dtype) - self.mean_
        return trust_score(
            query, self.bank_, preds, bank_sq_norms=self.bank_sq_norms_, chunk_size=self.chunk_size
        )

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return self._score_classes(X, None)

    def predicted_classes(self, X: torch.Tensor) -> torch.Tensor:
        """``(N,)`` class of the nearest kept reference row (used when no ``preds``)."""
        self._check_fitted()
        X = self._check_input(X)
        query = X.to(self.mean_.dtype) - self.mean_
        d, _ = class_nearest_search(
            query, self.bank_, bank_sq_norms=self.bank_sq_norms_, chunk_size=self.chunk_size
        )
        return d.argmin(dim=1)

    def extra_repr(self) -> str:
        chunk = "" if self.chunk_size == DEFAULT_CHUNK_SIZE else f", chunk_size={self.chunk_size}"
        return f"k={self.k}, alpha={self.alpha}{chunk}"
