"""Deep k-nearest neighbours: how many neighbours in several layers disagree with the prediction."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from selectorch._checks import check_finite_rows, check_int, check_rows
from selectorch.functional.knn import DEFAULT_CHUNK_SIZE, row_sq_norms
from selectorch.functional.neighbours import dknn_score
from selectorch.scores.layers import LayerScore
from selectorch.scores.mahalanobis import check_labels
from selectorch.scores.registry import register_score


@register_score("dknn")
class DkNNScore(LayerScore):
    """Deep k-nearest neighbours nonconformity (Papernot & McDaniel 2018).

    ``fit(X, y)`` keeps the labelled reference rows of every layer of ``X``. A sample whose
    model predicts class ``c`` (the ``argmax`` of ``X["logits"]``) is searched in each of the
    ``L`` layers for its ``k`` nearest reference rows (Euclidean, exact chunked search); its
    score is the fraction of those ``L * k`` neighbours whose label is not ``c``: the paper's
    nonconformity ``alpha(x, c)`` divided by ``L * k``, in ``[0, 1]``, higher = less
    trustworthy (the layers disagree with the model).

    **Calibration is DkNN's conformal step.** The paper computes the nonconformity of held-out
    labelled rows, turns a new sample's nonconformity into an empirical p-value (the fraction
    of held-out values at least as large: its *credibility*) and trusts it when that is high.
    ``calibrate(X, y=labels, coverage=c)`` computes exactly those held-out values (for the true
    labels) and keeps a sample iff its nonconformity is at most their conformal quantile, i.e.
    iff its credibility is above about ``1 - c``. Without ``y``, the held-out rows are scored
    for the model's predictions, as in deployment, which gives the usual coverage promise
    (the same rows where the model is right).

    In a :class:`~selectorch.SelectiveModel`, name the layers with ``layer=[...]``; the score
    reads every recorded layer plus the model's logits (:attr:`keys` is ``None``).

    Args:
        k: Neighbours per layer (the paper uses 75), at most the number of reference rows.
        chunk_size: Bank rows searched at a time in each layer.

    Attributes:
        bank_: ``(M, D_1 + ... + D_L)`` reference features of all layers side by side, each
            layer centred on its mean (split by ``dims_``).
        mean_: ``(D_1 + ... + D_L,)`` the layers' means.
        labels_: ``(M,)`` int64 labels of the reference rows.

    Example:
        >>> X = {"a": torch.randn(200, 8), "b": torch.randn(200, 4), "logits": torch.randn(200, 3)}
        >>> score = DkNNScore(k=5).fit(X, torch.randint(3, (200,)))
        >>> query = {key: value[:6] for key, value in X.items()}
        >>> score(query).shape
        torch.Size([6])
    """

    fitted_buffers = ("dims_", "bank_", "labels_")
    requires_grad: ClassVar[bool] = False
    passes: ClassVar[int] = 1
    compile_clean: ClassVar[bool] = True
    calibrates_on_labels: ClassVar[bool] = True

    bank_: torch.Tensor
    mean_: torch.Tensor
    labels_: torch.Tensor
    bank_sq_norms_: torch.Tensor

    def __init__(self, *, k: int = 75, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        super().__init__()
        self.k = check_int("k", k)
        self.chunk_size = check_int("chunk_size", chunk_size)
        self.register_buffer("bank_", torch.empty(0, 0))
        self.register_buffer("mean_", torch.empty(0))
        self.register_buffer("labels_", torch.empty(0, dtype=torch.long))
        # derived from bank_ (not saved): (L, M) squared row norms of each layer's bank
        self.register_buffer("bank_sq_norms_", torch.empty(0, 0), persistent=False)

    def _fit_layers(
        self, features: list[torch.Tensor], logits: torch.Tensor, y: torch.Tensor | None
    ) -> None:
        y = check_labels(type(self).__name__, y)
        self._check_k(logits.shape[0])
        means = [f.mean(dim=0) for f in features]
        self._set_buffer("mean_", torch.cat(means))
        self.bank_ = torch.cat([f - m for f, m in zip(features, means, strict=True)], dim=1)
        self.labels_ = y.long().clone()

    def _check_k(self, bank_size: int) -> None:
        if self.k > bank_size:
            raise ValueError(
                f"Expected argument `k` to be at most the number of reference rows {bank_size}, "
                f"got k={self.k}."
            )

    def _refresh_derived(self) -> None:
        super()._refresh_derived()
        self._check_k(self.bank_.shape[0])
        work = torch.promote_types(self.bank_.dtype, torch.float32)
        self.bank_sq_norms_ = torch.stack(
            [row_sq_norms(b, work) for b in self.bank_.split(self._dims, 1)]
        )

    def _nonconformity(self, features: list[torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
        """``(N,)`` fraction of the neighbours whose label is not ``classes`` (compile-clean)."""
        means = self.mean_.split(self._dims)
        queries = [f.to(m.dtype) - m for f, m in zip(features, means, strict=True)]
        scores = dknn_score(
            queries,
            list(self.bank_.split(self._dims, dim=1)),
            self.labels_,
            classes,
            self.k,
            bank_sq_norms=list(self.bank_sq_norms_.unbind(0)),
            chunk_size=self.chunk_size,
        )
        return scores.to(self.threshold_.dtype)

    def _score_layers(self, features: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        return self._nonconformity(features, logits.argmax(dim=1))

    @torch.no_grad()
    def calibrate(
        self, X: Mapping[str, torch.Tensor], *, y: torch.Tensor | None = None, **kwargs: Any
    ) -> DkNNScore:
        """Set the threshold from held-out data: DkNN's conformal calibration.

        Args:
            X: ``{layer: (n, D_l), ..., "logits": (n, C)}`` held-out data.
            y: ``(n,)`` true labels of the held-out rows: their nonconformity is then measured
                for the true label, as in the paper's calibration set; ``None`` measures it for
                the model's prediction.
            **kwargs: The target and options of :meth:`Score.calibrate` (``coverage=...``).

        Returns:
            ``self``.
        """
        if y is None:
            return super().calibrate(X, **kwargs)
        self._check_fitted()
        features, logits = self._inputs(X)
        if logits.shape[0] == 0:
            raise ValueError("Expected argument `X` to hold calibration rows, got none.")
        for key, f in zip(self.layers_, features, strict=True):
            check_finite_rows(f"X[{key!r}]", f)
        check_finite_rows("X['logits']", logits)
        y = check_labels(type(self).__name__, check_rows("y", y, logits.shape[0], "X"))
        y, step = y.to(logits.device), 4096
        scores = [
            self._nonconformity([f[s : s + step] for f in features], y[s : s + step])
            for s in range(0, logits.shape[0], step)
        ]
        return self.calibrate_scores(torch.cat(scores), **kwargs)

    def extra_repr(self) -> str:
        chunk = "" if self.chunk_size == DEFAULT_CHUNK_SIZE else f", chunk_size={self.chunk_size}"
        return f"k={self.k}{chunk}"
