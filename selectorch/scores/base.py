"""The contract every score keeps: fit -> self, fitted state in buffers, higher = more uncertain."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from selectorch._checks import check_finite_rows, check_int, check_matrix, check_rows
from selectorch.exceptions import NotFittedError
from selectorch.functional.finite import finite_rows
from selectorch.scores.thresholds import ThresholdMixin

INPUTS = ("embedding", "logits")


def fail_closed(scores: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Give ``+inf`` to every row whose input or score is not finite.

    Args:
        scores: ``(N,)`` scores.
        inputs: ``(N, ...)`` what the scores were computed from.

    Returns:
        ``(N,)`` scores where bad rows are ``+inf``, so that no threshold keeps them.
    """
    ok = finite_rows(inputs) & torch.isfinite(scores)
    return torch.where(ok, scores, torch.full_like(scores, float("inf")))


class Score(ThresholdMixin, nn.Module, ABC):
    """Base class of uncertainty scores.

    A score maps ``(N, D)`` embeddings (or ``(N, C)`` logits) to ``(N,)`` uncertainties; higher
    means less trustworthy, and a sample is selected when ``score <= threshold_``. What ``fit``
    and ``calibrate`` learn lives in persistent buffers ending in ``_`` (registered empty and
    resized on load), so ``.to()``, ``.half()`` and ``state_dict`` round trips just work.

    Subclasses set :attr:`input`, :attr:`fitted_buffers` and implement :meth:`_fit` and
    :meth:`_score` (compile-clean: no ``.item()``, no branch on tensor values).
    """

    #: What the score consumes: ``"embedding"`` (a hooked layer) or ``"logits"``.
    input: ClassVar[str] = "embedding"
    #: Buffers that ``fit`` must fill before the score can be used.
    fitted_buffers: ClassVar[tuple[str, ...]] = ()
    #: Name in the score registry (set by :func:`register_score`).
    registry_name: ClassVar[str] = ""

    threshold_: torch.Tensor
    calibration_scores_: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold_", torch.empty(0))
        self.register_buffer("calibration_scores_", torch.empty(0))
        self._report: dict[str, Any] = {}

    # -- to implement -------------------------------------------------------------------------

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        """Fill the fitted buffers from checked, finite ``X``."""

    @abstractmethod
    def _score(self, X: torch.Tensor) -> torch.Tensor:
        """Return ``(N,)`` raw scores of checked ``X``; must be compile-clean."""

    def _expected_dim(self) -> int | None:
        """Feature dimension that inputs must have, once fitted (``None`` = any)."""
        return None

    def _refresh_derived(self) -> None:
        """Recompute non-persistent buffers after ``fit`` or ``load_state_dict``."""

    # -- state --------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        """Whether every fitted buffer is filled."""
        return all(getattr(self, name).numel() > 0 for name in self.fitted_buffers)

    @property
    def is_calibrated(self) -> bool:
        """Whether a threshold was set by :meth:`calibrate` or :meth:`set_threshold`."""
        return self.threshold_.numel() > 0

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet. Call fit(X) with reference "
                f"{self.input}s before scoring."
            )

    def _check_input(self, X: Any, name: str = "X") -> torch.Tensor:
        X = check_matrix(name, X, dim=self._expected_dim())
        if self.fitted_buffers:
            state = getattr(self, self.fitted_buffers[0])
            if X.device != state.device:
                raise ValueError(
                    f"Expected argument `{name}` on {state.device}, where the fitted state of "
                    f"{type(self).__name__} is, got a tensor on {X.device}; move one of them "
                    "with .to(...)."
                )
        return X

    def _set_buffer(self, name: str, value: torch.Tensor) -> None:
        """Write ``value`` into buffer ``name``, in place when the shape allows it."""
        current = getattr(self, name)
        if current.shape == value.shape:
            current.copy_(value)
        else:
            setattr(self, name, value.to(device=current.device, dtype=current.dtype))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, *args):  # type: ignore[override]
        # refuse another class or other hyperparameters before touching any buffer
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):
            self.check_compatible(extra)
        # buffers whose shape is only known after fitting are resized to what is loaded
        for name, buf in self._buffers.items():
            key = prefix + name
            if buf is not None and key in state_dict and state_dict[key].shape != buf.shape:
                self._buffers[name] = torch.empty(
                    state_dict[key].shape, dtype=buf.dtype, device=buf.device
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)
        if self.is_fitted:
            self._refresh_derived()

    # -- fit, score, calibrate, select ---------------------------------------------------------

    @torch.no_grad()
    def fit(self, X: torch.Tensor, y: torch.Tensor | None = None) -> Score:
        """Fit the score on reference data; fitting again replaces the old state.

        The score moves to the device of ``X`` (its state lives where the data is) and stores
        its state in its own floating dtype (float32 unless ``.double()``/``.half()`` was called).

        Args:
            X: ``(N, D)`` reference embeddings (or ``(N, C)`` logits for logit scores).
            y: Optional ``(N,)`` labels, for scores that use them.

        Returns:
            ``self``.

        Raises:
            ValueError: ``X`` is not ``(N, D)``, is empty, or has rows with NaN or Inf.
        """
        X = check_matrix("X", X)
        if X.shape[0] == 0:
            raise ValueError(
                "Expected argument `X` to hold at least one row, got an empty (0, D) tensor."
            )
        check_finite_rows("X", X)
        if y is not None:
            check_rows("y", y, X.shape[0], "X")
        # the fitted state lives where the data is, in the module's floating dtype
        self.to(X.device)
        X = X.to(self.threshold_.dtype)
        y = None if y is None else y.to(X.device)
        self._fit(X, y)
        self._refresh_derived()
        # a threshold belongs to the state it was calibrated on: drop it
        self.threshold_ = torch.empty(0, device=self.threshold_.device, dtype=self.threshold_.dtype)
        self.calibration_scores_ = torch.empty(
            0, device=self.calibration_scores_.device, dtype=self.calibration_scores_.dtype
        )
        self._report = {}
        return self

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Uncertainty scores, higher = less trustworthy; non-finite rows score ``+inf``.

        Args:
            X: ``(N, D)`` embeddings (or ``(N, C)`` logits).

        Returns:
            ``(N,)`` scores.

        Raises:
            NotFittedError: ``fit`` was not called.
            ValueError: ``X`` has the wrong shape.
        """
        self._check_fitted()
        X = self._check_input(X)
        return fail_closed(self._score(X), X)

    @torch.no_grad()
    def score(self, X: torch.Tensor, *, batch_size: int = 4096) -> torch.Tensor:
        """Scores of many rows, computed ``batch_size`` rows at a time (eagerly).

        Args:
            X: ``(N, D)`` embeddings (or ``(N, C)`` logits).
            batch_size: Rows per step, bounding memory.

        Returns:
            ``(N,)`` scores.
        """
        check_int("batch_size", batch_size)
        self._check_fitted()
        X = self._check_input(X)
        if X.shape[0] == 0:
            return self(X)
        return torch.cat([self(chunk) for chunk in X.split(batch_size)])
