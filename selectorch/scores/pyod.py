"""PyODScore: any PyOD outlier detector as a selectorch score (CPU, numpy, not compile-clean)."""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch

from selectorch.functional.finite import finite_rows
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score

__all__ = ["PyODScore", "import_pyod"]

_INSTALL = "pip install 'selectorch[pyod]'"


def import_pyod(module: str = "pyod") -> Any:
    """Import ``module`` of PyOD, or raise an ImportError that says how to install it.

    Args:
        module: A PyOD module, e.g. ``"pyod.models.knn"``.

    Returns:
        The imported module.

    Raises:
        ImportError: PyOD is not installed; the message names ``pip install selectorch[pyod]``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"PyODScore needs the optional dependency PyOD ({module} could not be imported: "
            f"{err}). Install it with: {_INSTALL}"
        ) from err


def _is_fitted_detector(detector: Any) -> bool:
    """PyOD's own test: every fitted detector has ``decision_scores_`` (its training scores)."""
    return getattr(detector, "decision_scores_", None) is not None


def _numpy_rows(X: torch.Tensor) -> Any:
    """``(N, D)`` float64 numpy copy of ``X`` on the CPU, non-finite rows set to zero."""
    X = X.detach()
    X = torch.where(finite_rows(X).unsqueeze(1), X, torch.zeros_like(X))
    return X.to(device="cpu", dtype=torch.float64).numpy()


@register_score("pyod")
class PyODScore(Score):
    """Any PyOD outlier detector, fitted and run on the CPU on numpy copies of the embeddings.

    PyOD's ``decision_function`` is an outlier score (higher = more abnormal), which is
    already selectorch's direction, so it is used as it is. ``fit(X)`` calls
    ``detector.fit`` on a float64 numpy copy of ``X``; scoring calls
    ``detector.decision_function`` on a float64 numpy copy of the batch and returns the scores
    on the batch's device and dtype. Rows with NaN or Inf are replaced by zeros for the
    detector and then scored ``+inf`` (fail closed).

    Cost and limits, marked by the class attributes:

    * ``compile_clean = False``: the detector runs outside the graph (the scoring is wrapped
      in ``torch.compiler.disable``), so ``torch.compile(sel)`` works with a graph break and
      ``fullgraph=True`` does not. Every batch is copied to the CPU and back.
    * Its fitted state is the detector, a Python object, not buffers: ``state_dict`` carries
      the threshold only, and :meth:`save` refuses (pickle the detector yourself, or refit it).

    ``is_fitted`` is the detector's own state: a detector given already fitted (it has
    ``decision_scores_``) is used at once, without ``fit``.

    Args:
        detector: A PyOD detector (``pyod.models.base.BaseDetector``: ``fit(X)`` and
            ``decision_function(X)`` on ``(N, D)`` numpy arrays), fitted or not. ``None``
            builds ``pyod.models.knn.KNN()`` (distance to the 5th nearest neighbour).
            PyOD is imported only here, when ``None`` is given.

    Attributes:
        detector: The wrapped detector (its fitted state lives in it).
        dim_: ``(1,)`` feature width seen by :meth:`fit` (empty for a detector given fitted,
            whose width is then not checked).

    Raises:
        ImportError: ``detector=None`` and PyOD is not installed
            (``pip install 'selectorch[pyod]'``).
        TypeError: ``detector`` lacks ``fit`` or ``decision_function``.

    Example:
        >>> from pyod.models.iforest import IForest
        >>> score = PyODScore(IForest(n_estimators=20, random_state=0))
        >>> score = score.fit(torch.randn(200, 4))
        >>> s = score.score(torch.cat([torch.zeros(1, 4), torch.full((1, 4), 9.0)]))
        >>> bool(s[1] > s[0])
        True
    """

    #: ``dim_`` is the width fitted on; the detector itself is the real fitted state.
    fitted_buffers: ClassVar[tuple[str, ...]] = ("dim_",)
    requires_grad: ClassVar[bool] = False
    passes: ClassVar[int] = 1
    compile_clean: ClassVar[bool] = False

    dim_: torch.Tensor

    def __init__(self, detector: Any = None) -> None:
        super().__init__()
        if detector is None:
            detector = import_pyod("pyod.models.knn").KNN()
        missing = [
            name for name in ("fit", "decision_function")
            if not callable(getattr(detector, name, None))
        ]
        if missing:
            raise TypeError(
                "Expected argument `detector` to be a PyOD detector with fit(X) and "
                f"decision_function(X), got {type(detector).__name__} without {missing}."
            )
        self.detector = detector
        self.register_buffer("dim_", torch.empty(0, dtype=torch.long))

    # -- state --------------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        """Whether the detector is fitted (PyOD sets ``decision_scores_`` in ``fit``)."""
        return _is_fitted_detector(self.detector)

    @torch.compiler.disable
    def _check_fitted(self) -> None:
        super()._check_fitted()

    def _expected_dim(self) -> int | None:
        return int(self.dim_[0]) if self.dim_.numel() and self.is_fitted else None

    # -- fit and score ------------------------------------------------------------------------

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        try:
            self.detector.fit(_numpy_rows(X))
        except ValueError as err:  # e.g. fewer rows than the detector's neighbours
            raise ValueError(
                f"{type(self.detector).__name__}.fit refused `X` with {X.shape[0]} rows of "
                f"{X.shape[1]} features: {err}"
            ) from err
        self._set_buffer("dim_", torch.tensor([X.shape[1]], device=X.device))

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        if X.shape[0] == 0:
            return X.new_empty(0)
        scores = self.detector.decision_function(_numpy_rows(X))
        return torch.as_tensor(scores).reshape(-1).to(device=X.device, dtype=X.dtype)

    @torch.compiler.disable
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Outlier scores of the detector, higher = more abnormal; non-finite rows ``+inf``.

        Runs eagerly on the CPU even inside ``torch.compile`` (a graph break).

        Args:
            X: ``(N, D)`` embeddings, on any device.

        Returns:
            ``(N,)`` scores on ``X``'s device, in ``X``'s dtype.
        """
        return super().forward(X)

    # -- persistence --------------------------------------------------------------------------

    @property
    def save_refusal(self) -> str:
        """Why :meth:`save` (and ``SelectiveModel.save``) cannot hold this score.

        selectorch saves tensors only and never unpickles, so a PyOD detector cannot be part
        of a save: :meth:`save` raises a ``PersistenceError`` with this text.
        """
        return (
            f"the fitted state of PyODScore is the PyOD detector "
            f"({type(self.detector).__name__}), a Python object that selectorch's tensor-only "
            "saves cannot hold. Refit the score after loading, or pickle score.detector "
            "yourself and build PyODScore(detector) from it."
        )

    def extra_repr(self) -> str:
        return f"detector={type(self.detector).__name__}"
