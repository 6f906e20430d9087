"""Thresholds of a score: calibrate for a coverage or a risk, select, report."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from selectorch._checks import check_finite_rows, check_fraction
from selectorch.calibration import calibrate_thresholds, check_target
from selectorch.exceptions import NotFittedError
from selectorch.functional.thresholds import interpolated_quantile


def losses_from(correct: torch.Tensor | None, losses: torch.Tensor | None) -> torch.Tensor | None:
    """Per-sample losses from a correctness flag or given losses (not both).

    Raises:
        ValueError: Both are given.
    """
    if correct is not None and losses is not None:
        raise ValueError("Expected either `correct` or `losses`, got both.")
    if correct is not None:
        return 1.0 - correct.to(torch.float64)
    return losses


class ThresholdMixin:
    """Calibration and selection for :class:`~selectorch.scores.Score`.

    The threshold lives in the buffer ``threshold_``: empty until calibrated, 0-dim for one
    threshold, ``(C,)`` for one per predicted class. The sorted calibration scores are kept in
    ``calibration_scores_`` for :meth:`set_threshold`; :meth:`calibration_report` says what was
    promised and what was achieved on the calibration set (it travels in ``state_dict``).
    """

    threshold_: torch.Tensor
    calibration_scores_: torch.Tensor
    _report: dict[str, Any]

    def _check_calibrated(self) -> None:
        if self.threshold_.numel() == 0:
            raise NotFittedError(
                f"This {type(self).__name__} has no threshold yet. Call calibrate(X, "
                "coverage=...) (or set_threshold(q) after calibrate) before selecting."
            )

    def selected(self, scores: torch.Tensor, preds: torch.Tensor | None = None) -> torch.Tensor:
        """``(N,)`` bool: ``scores <= threshold`` (``+inf`` scores are never kept).

        Args:
            scores: ``(N,)`` scores.
            preds: ``(N,)`` predicted classes; required when thresholds are per class.
        """
        self._check_calibrated()
        threshold = self.threshold_.to(scores.device)
        if threshold.ndim == 1:
            if preds is None:
                raise ValueError(
                    f"{type(self).__name__} was calibrated with per_class=True: pass `preds`, "
                    "the predicted class of each sample."
                )
            threshold = threshold[preds.to(scores.device).long()]
        return (scores <= threshold) & torch.isfinite(scores)

    def select(self, X: torch.Tensor, preds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Score ``X`` and decide which rows to keep.

        Args:
            X: ``(N, D)`` embeddings (or logits).
            preds: ``(N,)`` predicted classes, for per-class thresholds.

        Returns:
            ``{"score": (N,) float, "selected": (N,) bool}``; ``selected`` is ``True`` where the
            prediction is kept.
        """
        self._check_calibrated()
        scores = self.score(X)
        if preds is not None and self.threshold_.ndim == 1:
            n_classes = self.threshold_.shape[0]
            if preds.numel() and not bool(((preds >= 0) & (preds < n_classes)).all()):
                raise ValueError(
                    f"Expected argument `preds` to hold classes in [0, {n_classes}) (one threshold "
                    f"per class was calibrated), got values from {int(preds.min())} to "
                    f"{int(preds.max())}. Pass num_classes= to calibrate for unseen classes."
                )
        return {"score": scores, "selected": self.selected(scores, preds)}

    @torch.no_grad()
    def calibrate(
        self,
        X: torch.Tensor,
        *,
        coverage: float | None = None,
        risk: float | None = None,
        delta: float = 0.1,
        correct: torch.Tensor | None = None,
        losses: torch.Tensor | None = None,
        preds: torch.Tensor | None = None,
        per_class: bool = False,
        num_classes: int | None = None,
        bound: str = "clopper-pearson",
        method: str = "sgr",
    ) -> Any:
        """Set the threshold from held-out data, for a coverage or a risk target.

        * ``coverage=c``: the threshold is the ``ceil((n + 1) * c)``-th smallest of the ``n``
          calibration scores, so that for exchangeable data at least ``c`` of new samples are
          kept in expectation (a finite-sample guarantee, not a plain quantile).
        * ``risk=r, delta=d``: the largest coverage whose selective risk (mean loss among kept
          samples) is at most ``r`` with probability at least ``1 - d`` over the calibration draw;
          needs ``correct`` or ``losses``. If no threshold is certified, nothing is kept (and a
          warning says so).

        Args:
            X: ``(n, D)`` held-out embeddings (or logits) from the deployment distribution.
            coverage: Target fraction of kept samples, in (0, 1].
            risk: Target selective risk, in (0, 1).
            delta: Allowed failure probability of the risk promise, in (0, 1).
            correct: ``(n,)`` bool, whether each prediction was right.
            losses: ``(n,)`` losses in [0, 1] (instead of ``correct``).
            preds: ``(n,)`` predicted classes, needed with ``per_class``.
            per_class: One threshold per predicted class.
            num_classes: Number of classes with ``per_class`` (default ``preds.max() + 1``).
            bound: ``"clopper-pearson"`` (0/1 losses) or ``"hoeffding-bentkus"``.
            method: ``"sgr"`` or ``"fixed-sequence"`` (see
                :func:`~selectorch.calibration.risk_threshold`).

        Returns:
            ``self``.

        Raises:
            ValueError: Bad targets, rows with NaN/Inf, or too few samples for the coverage rank.
        """
        check_target(coverage, risk, delta, bound, method)
        self._check_fitted()
        X = self._check_input(X)
        if X.shape[0] == 0:
            raise ValueError("Expected argument `X` to hold calibration rows, got an empty tensor.")
        check_finite_rows("X", X)
        scores, preds, num_classes = self._calibration_scores(X, preds, per_class, num_classes)
        return self.calibrate_scores(
            scores,
            coverage=coverage,
            risk=risk,
            delta=delta,
            correct=correct,
            losses=losses,
            preds=preds,
            per_class=per_class,
            num_classes=num_classes,
            bound=bound,
            method=method,
        )

    def _calibration_scores(
        self,
        X: torch.Tensor,
        preds: torch.Tensor | None,
        per_class: bool,
        num_classes: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
        """The checked calibration rows' scores, and the ``preds`` and ``num_classes`` that
        :meth:`calibrate` passes on (a score that scores rows against a class chooses them)."""
        return self.score(X), preds, num_classes

    @torch.no_grad()
    def calibrate_scores(
        self,
        scores: torch.Tensor,
        *,
        coverage: float | None = None,
        risk: float | None = None,
        delta: float = 0.1,
        correct: torch.Tensor | None = None,
        losses: torch.Tensor | None = None,
        preds: torch.Tensor | None = None,
        per_class: bool = False,
        num_classes: int | None = None,
        bound: str = "clopper-pearson",
        method: str = "sgr",
    ) -> Any:
        """Like :meth:`calibrate`, from ``(n,)`` calibration scores already computed."""
        if not isinstance(scores, torch.Tensor) or scores.ndim != 1 or scores.numel() == 0:
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise ValueError(
                f"Expected argument `scores` to be a non-empty (n,) tensor, got {got}."
            )
        if per_class and preds is None:
            raise ValueError("per_class=True needs `preds`, the predicted class of each sample.")
        threshold, report = calibrate_thresholds(
            scores,
            coverage=coverage,
            risk=risk,
            delta=delta,
            losses=losses_from(correct, losses),
            preds=preds if per_class else None,
            num_classes=num_classes,
            bound=bound,
            method=method,
        )
        self._set_buffer("calibration_scores_", torch.sort(scores.detach()).values)
        self._set_buffer("threshold_", threshold)
        self._report = report
        return self

    @torch.no_grad()
    def set_threshold(self, q: float = 0.99) -> Any:
        """Set one threshold at the ``q``-quantile (linear interpolation) of the calibration scores.

        This is seapig's rule: about ``q`` of the calibration samples are kept, without the
        finite-sample correction of :meth:`calibrate`.

        Args:
            q: Quantile in (0, 1].

        Returns:
            ``self``.

        Raises:
            NotFittedError: No calibration scores are stored (call :meth:`calibrate` first).
        """
        q = check_fraction("q", q)
        if self.calibration_scores_.numel() == 0:
            raise NotFittedError(
                f"This {type(self).__name__} has no calibration scores. Call calibrate(X, "
                "coverage=...) first; set_threshold(q) then picks a quantile of those scores."
            )
        threshold = interpolated_quantile(self.calibration_scores_, q)
        self._set_buffer("threshold_", threshold)
        kept = (self.calibration_scores_ <= threshold).double().mean().item()
        self._report = {
            "n": self.calibration_scores_.numel(),
            "quantile": q,
            "threshold": threshold.item(),
            "coverage": kept,
        }
        return self

    def get_threshold(self) -> float:
        """The current (single) threshold as a Python float.

        Raises:
            NotFittedError: No threshold was set.
            ValueError: Thresholds are per class (read ``threshold_`` instead).
        """
        self._check_calibrated()
        if self.threshold_.ndim:
            raise ValueError("Thresholds are per class; read the (C,) buffer `threshold_`.")
        return float(self.threshold_)

    def calibration_report(self) -> dict[str, Any]:
        """What the last calibration promised and achieved on the calibration set.

        Returns:
            A dict of plain values: ``n``, the target (``target_coverage`` or ``target_risk``,
            ``delta``, ``bound``, ``method``), ``threshold``, the achieved ``coverage`` (and
            ``risk`` when correctness was given), ``risk_upper_bound`` and ``feasible`` for risk
            targets, and ``classes`` (one such dict per class) with ``per_class``.

        Raises:
            NotFittedError: Not calibrated.
        """
        self._check_calibrated()
        return dict(self._report)

    def hparams(self) -> dict[str, Any]:
        """The constructor's keyword arguments as stored on the score (plain values only)."""
        names = inspect.signature(type(self).__init__).parameters
        plain = (bool, int, float, str, type(None))
        return {
            name: getattr(self, name)
            for name in names
            if name != "self" and isinstance(getattr(self, name, ...), plain)
        }

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "hparams": self.hparams(),
            "calibration_report": dict(getattr(self, "_report", {})),
        }

    def check_compatible(self, state: dict[str, Any]) -> None:
        """Refuse extra state saved from another score class or other hyperparameters.

        Raises:
            ValueError: The class or a hyperparameter differs; the message names both values.
        """
        name = state.get("class", type(self).__name__)
        if name != type(self).__name__:
            raise ValueError(
                f"This state was saved from a {name}; it cannot load into a {type(self).__name__}."
            )
        mine = self.hparams()
        for key, value in state.get("hparams", {}).items():
            if key in mine and mine[key] != value:
                raise ValueError(
                    f"This state was saved from {name}({key}={value!r}); it cannot load into "
                    f"{name}({key}={mine[key]!r}): build the score with the same "
                    "hyperparameters."
                )

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.check_compatible(state)
        self._report = dict(state.get("calibration_report", {}))
