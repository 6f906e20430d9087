"""Mixins of scores that judge each row against its predicted class, from padded class banks."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from selectorch._checks import check_int
from selectorch.scores.base import fail_closed


class PredictedClassMixin:
    """Score each row against its predicted class, given by the model or guessed by the score.

    Mix in before :class:`~selectorch.scores.Score`: ``class MyScore(PredictedClassMixin,
    Score)``. :meth:`score_with_preds` takes the predicted classes (the model's ``argmax``;
    :class:`~selectorch.SelectiveModel` passes them because :attr:`needs_preds` is set), and so
    do :meth:`score`, :meth:`calibrate` and :meth:`select` through ``preds=``. With
    ``preds=None`` the score's own guess, :meth:`predicted_classes`, is used. Per-class
    thresholds (``calibrate(..., per_class=True)``) use the same classes.

    Subclasses implement ``predicted_classes(X) -> (N,)``, ``_score_classes(X, classes) -> (N,)``
    (compile-clean) and the property ``num_classes``.
    """

    #: SelectiveModel passes the model's predicted classes to :meth:`score_with_preds`.
    needs_preds: ClassVar[bool] = True

    threshold_: torch.Tensor

    # provided by Score and the subclass
    _check_fitted: Any
    _check_input: Any
    _check_calibrated: Any
    selected: Any
    calibrate_scores: Any
    num_classes: int
    predicted_classes: Any
    _score_classes: Any

    def _check_preds(self, preds: Any, n: int, device: torch.device) -> torch.Tensor:
        if (
            not isinstance(preds, torch.Tensor)
            or preds.shape != (n,)
            or preds.is_floating_point()
            or preds.is_complex()
            or preds.dtype == torch.bool
        ):
            got = (
                f"shape {tuple(preds.shape)} and dtype {preds.dtype}"
                if isinstance(preds, torch.Tensor)
                else type(preds).__name__
            )
            raise ValueError(
                f"Expected argument `preds` to be an ({n},) integer tensor of predicted "
                f"classes (one per row of `X`), got {got}."
            )
        return preds.to(device)

    def _classes(self, X: torch.Tensor, preds: Any) -> torch.Tensor:
        if preds is None:
            return self.predicted_classes(X)
        return self._check_preds(preds, X.shape[0], X.device)

    def score_with_preds(self, X: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
        """Scores against the given predicted classes (compile-clean).

        Args:
            X: ``(B, D)`` embeddings.
            preds: ``(B,)`` integer predicted classes (the model's ``argmax``); a class outside
                ``[0, C)`` scores ``+inf``.

        Returns:
            ``(B,)`` scores; rows with NaN or Inf score ``+inf``.

        Raises:
            NotFittedError: ``fit`` was not called.
            ValueError: ``X`` or ``preds`` has the wrong shape, dtype or device.
        """
        self._check_fitted()
        X = self._check_input(X)
        preds = self._check_preds(preds, X.shape[0], X.device)
        return fail_closed(self._score_classes(X, preds), X)

    @torch.no_grad()
    def score(
        self, X: torch.Tensor, *, batch_size: int = 4096, preds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scores of many rows, ``batch_size`` at a time, against their predicted classes.

        Args:
            X: ``(N, D)`` embeddings.
            batch_size: Rows per step, bounding memory.
            preds: ``(N,)`` predicted classes; :meth:`predicted_classes` if ``None``.

        Returns:
            ``(N,)`` scores.
        """
        check_int("batch_size", batch_size)
        self._check_fitted()
        X = self._check_input(X)
        if preds is None:
            return super().score(X, batch_size=batch_size)  # type: ignore[misc]
        preds = self._check_preds(preds, X.shape[0], X.device)
        if X.shape[0] == 0:
            return self.score_with_preds(X, preds)
        parts = zip(X.split(batch_size), preds.split(batch_size), strict=True)
        return torch.cat([self.score_with_preds(x, c) for x, c in parts])

    def select(self, X: torch.Tensor, preds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Score ``X`` against its predicted classes and decide which rows to keep.

        Args:
            X: ``(N, D)`` embeddings.
            preds: ``(N,)`` predicted classes, used for the score and for per-class thresholds;
                :meth:`predicted_classes` if ``None``.

        Returns:
            ``{"score": (N,) float, "selected": (N,) bool}``.

        Raises:
            ValueError: With per-class thresholds, a class outside the calibrated ones.
        """
        self._check_calibrated()
        self._check_fitted()
        X = self._check_input(X)
        classes = None
        if preds is not None or self.threshold_.ndim == 1:
            classes = self._classes(X, preds)
        if self.threshold_.ndim == 1 and classes is not None and classes.numel():
            n = self.threshold_.shape[0]
            if not bool(((classes >= 0) & (classes < n)).all()):
                raise ValueError(
                    f"Expected argument `preds` to hold classes in [0, {n}) (one threshold per "
                    f"class was calibrated), got values from {int(classes.min())} to "
                    f"{int(classes.max())}."
                )
        scores = self.score(X, preds=classes)
        return {"score": scores, "selected": self.selected(scores, classes)}

    def _calibration_scores(
        self,
        X: torch.Tensor,
        preds: torch.Tensor | None,
        per_class: bool,
        num_classes: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Held-out rows scored against their predicted classes (for ``calibrate``).

        ``preds`` chooses the class each row is scored against (:meth:`predicted_classes` if
        ``None``, for scoring and for ``per_class``); with ``per_class``, ``num_classes``
        defaults to the number of fitted classes.
        """
        classes = self._classes(X, preds)
        if per_class and num_classes is None:
            num_classes = max(self.num_classes, int(classes.max()) + 1)
        return self.score(X, preds=classes), classes, num_classes


class ClassBanksMixin:
    """Accessors of a score that keeps one bank per class, padded in ``bank_`` ``(C, M_max, D)``.

    Padding rows are ``+inf``, so a class's size is its number of finite rows.
    """

    bank_: torch.Tensor
    is_fitted: bool
    _check_fitted: Any

    @property
    def num_classes(self) -> int:
        """Number of class banks ``C`` (0 before fit)."""
        return self.bank_.shape[0] if self.is_fitted else 0

    def class_sizes(self) -> torch.Tensor:
        """``(C,)`` number of reference rows kept per class (eager)."""
        self._check_fitted()
        return torch.isfinite(self.bank_[:, :, 0]).sum(dim=1)

    def _expected_dim(self) -> int | None:
        return self.bank_.shape[2] if self.is_fitted else None
