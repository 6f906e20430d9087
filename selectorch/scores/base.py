"""The contract every score keeps: fit -> self, fitted state in buffers, higher = more uncertain."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from selectorch._checks import check_finite_rows, check_int, check_matrix, check_rows
from selectorch.exceptions import NotFittedError
from selectorch.functional.finite import finite_rows
from selectorch.memory import check_fits
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


def round_down(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in ``dtype``, rounded towards ``-inf`` rather than to the nearest.

    A threshold stored in a coarser dtype than it was computed in (``.half()``, float64 scores
    into a float32 score) must never grow by rounding: that would keep samples above the
    calibrated threshold. Rounding down rejects instead, at most the samples within one unit
    of the last place of the threshold.

    Example:
        >>> round_down(torch.tensor(1.0001, dtype=torch.float64), torch.float16).item()
        1.0
    """
    out = value.to(dtype)
    if not out.is_floating_point():
        return out
    above = out.to(torch.float64) > value.to(torch.float64)
    lower = torch.nextafter(out, torch.full_like(out, -float("inf")))
    return torch.where(above, lower, out)


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` share memory (one may be a view of the other)."""
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class Score(ThresholdMixin, nn.Module, ABC):
    """Base class of uncertainty scores.

    A score maps ``(N, D)`` embeddings (or ``(N, C)`` logits) to ``(N,)`` uncertainties; higher
    means less trustworthy, and a sample is selected when ``score <= threshold_``. What ``fit``
    and ``calibrate`` learn lives in persistent buffers ending in ``_`` (registered empty and
    resized on load), so ``.to()``, ``.half()`` and ``state_dict`` round trips just work.

    Subclasses set :attr:`input`, :attr:`fitted_buffers` and implement :meth:`_fit` and
    :meth:`_score` (compile-clean: no ``.item()``, no branch on tensor values).

    Three class attributes say what the score costs inside a
    :class:`~selectorch.SelectiveModel` (``selectorch.list_scores(details=True)`` shows them):

    * :attr:`requires_grad`: the score needs gradients with respect to the model's input.
      Such a score implements ``perturb(x, logits) -> x'``; the model runs on ``x`` under
      ``torch.enable_grad()`` (even inside ``torch.no_grad()``), then again on ``x'``, and the
      score reads the second pass. It cannot run under ``torch.inference_mode()`` nor from a
      recording.
    * :attr:`passes`: forward passes of the model per batch.
    * :attr:`compile_clean`: ``torch.compile(sel, fullgraph=True)`` gives one graph.

    A score may also prefer a pooling of the layers it reads (:attr:`pool`): with
    ``SelectiveModel(..., pool="auto")`` it is used for every hooked layer.
    """

    #: What the score consumes: ``"embedding"`` (a hooked layer), ``"logits"`` or ``"multi"``
    #: (a dict of several layers and the logits).
    input: ClassVar[str] = "embedding"
    #: Whether the score needs gradients with respect to the model's input (see above).
    requires_grad: ClassVar[bool] = False
    #: Forward passes of the model per batch inside a SelectiveModel.
    passes: ClassVar[int] = 1
    #: Whether a SelectiveModel with this score compiles with ``fullgraph=True``.
    compile_clean: ClassVar[bool] = True
    #: Whether ``calibrate`` takes the held-out rows' true labels as ``y`` (DkNN's conformal
    #: calibration); a SelectiveModel then passes the labels of its calibration data.
    calibrates_on_labels: ClassVar[bool] = False
    #: Preferred pooling of the hooked layers (a name of ``selectorch.recorder.pooling.POOLS``
    #: or a picklable callable ``(B, ...) -> (B, D)``); ``None``: the SelectiveModel's ``pool``.
    pool: Any = None
    #: Buffers that ``fit`` must fill before the score can be used.
    fitted_buffers: ClassVar[tuple[str, ...]] = ()
    #: Name in the score registry (set by :func:`register_score`).
    registry_name: ClassVar[str] = ""
    #: True only while :meth:`fit` runs :meth:`_fit` on an ``X`` that it may overwrite in place
    #: (``fit(..., copy=False)``, or ``X`` converted to the module's dtype, a copy already).
    _fit_may_overwrite: bool = False

    threshold_: torch.Tensor
    calibration_scores_: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("threshold_", torch.empty(0))
        self.register_buffer("calibration_scores_", torch.empty(0))
        self._report: dict[str, Any] = {}

    # -- to implement -------------------------------------------------------------------------

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        """Fill the fitted buffers from checked, finite ``X``.

        ``X`` is the caller's tensor: overwrite it only when ``self._fit_may_overwrite``.
        """

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
        if name == "threshold_":  # never rounded up into a coarser dtype: fail closed
            value = round_down(value.to(current.device), current.dtype)
        if current.shape == value.shape:
            current.copy_(value)
        else:
            setattr(self, name, value.to(device=current.device, dtype=current.dtype))

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # type: ignore[override]
        # .half() / .to(dtype) round the threshold down, never up (see round_down)
        before = self._buffers.get("threshold_")
        out = super()._apply(fn, recurse)
        after = self._buffers.get("threshold_")
        if (
            before is not None
            and after is not None
            and before.numel()
            and after.dtype != before.dtype
            and after.is_floating_point()
            and after.device.type != "meta"
        ):
            self._buffers["threshold_"] = round_down(before.to(after.device), after.dtype)
        return out

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

    def _check_fit_memory(self, X: torch.Tensor) -> None:
        """Refuse, before allocating, a fit whose copies of ``X`` would not fit on its device.

        A score whose state keeps the rows (``bank_``) holds one copy of ``X``; converting ``X``
        to the module's dtype makes another.
        """
        copies = int("bank_" in self.fitted_buffers) + int(X.dtype != self.threshold_.dtype)
        if copies:
            itemsize = self.threshold_.element_size()
            check_fits(
                copies * X.numel() * itemsize,
                X.device,
                f"Fitting {type(self).__name__} on {X.shape[0]} rows of {X.shape[1]} features "
                f"({copies} {'copy' if copies == 1 else 'copies'} in {self.threshold_.dtype})",
                hint="Fit on fewer rows, cast X to the module's dtype first, or use another "
                "device.",
            )

    # -- persistence --------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save this score (fitted or not) in the directory ``path``.

        The directory holds the tensors of :meth:`state_dict` (``state.pt``) and a JSON header
        with the selectorch version, the registered class name and hyperparameters, the
        calibration report, each tensor's shape and dtype and a SHA-256 of each file; for
        ``KNNScore(backend="hnsw")`` also the hnswlib index with its fingerprint. See
        :mod:`selectorch.persistence`.

        Args:
            path: Directory to write; a previous save there is replaced.

        Returns:
            The directory's path.

        Raises:
            selectorch.persistence.PersistenceError: The score is not registered, or a
                hyperparameter is not a plain value.
            FileExistsError: ``path`` exists and is not a selectorch save.
        """
        from selectorch.persistence import save_score

        return save_score(self, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, map_location: torch.device | str | None = None
    ) -> Any:
        """Load a score saved by :meth:`save`, checking it before any tensor is read.

        The class is looked up in the score registry by the name in the header (never imported
        by name) and built with the saved hyperparameters; the tensors are read with
        ``torch.load(..., weights_only=True)`` after their size and SHA-256 were checked.
        Called on a subclass (``KNNScore.load``), it refuses a save of another class.

        Args:
            path: Directory written by :meth:`save`.
            map_location: Device of the loaded state (CPU by default).

        Returns:
            The score, fitted and calibrated as it was saved, in the dtype it was saved in.

        Raises:
            selectorch.persistence.PersistenceError: The save is refused (not a save
                directory, truncated or altered, incompatible version, not tensors only,
                unknown or other class); the message says why.

        Example:
            >>> import tempfile
            >>> score = scores.create_score("knn", k=2).fit(torch.randn(20, 4))
            >>> with tempfile.TemporaryDirectory() as tmp:
            ...     _ = score.save(f"{tmp}/knn")
            ...     again = Score.load(f"{tmp}/knn")
            >>> type(again).__name__, again.bank_.shape
            ('KNNScore', torch.Size([20, 4]))
        """
        from selectorch.persistence import load_score

        return load_score(path, map_location=map_location, expected=cls)

    # -- fit, score, calibrate, select ---------------------------------------------------------

    @torch.no_grad()
    def fit(self, X: torch.Tensor, y: torch.Tensor | None = None, *, copy: bool = True) -> Score:
        """Fit the score on reference data; fitting again replaces the old state.

        The score moves to the device of ``X`` (its state lives where the data is) and stores
        its state in its own floating dtype (float32 unless ``.double()``/``.half()`` was called).

        Args:
            X: ``(N, D)`` reference embeddings (or ``(N, C)`` logits for logit scores).
            y: Optional ``(N,)`` labels, for scores that use them.
            copy: If False, fit may overwrite X in place (saves one copy of the bank); X must
                not be used afterwards.

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
        self._check_fit_memory(X)  # before anything is allocated
        check_finite_rows("X", X)
        if y is not None:
            check_rows("y", y, X.shape[0], "X")
        # the fitted state lives where the data is, in the module's floating dtype
        self.to(X.device)
        given = X
        X = X.to(self.threshold_.dtype)
        y = None if y is None else y.to(X.device)
        # _fit may overwrite X when allowed, or when X is already a converted copy
        self._fit_may_overwrite = not copy or not _same_storage(X, given)
        try:
            self._fit(X, y)
        finally:
            del self._fit_may_overwrite  # back to the class default, False
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
