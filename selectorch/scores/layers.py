"""LayerScore: the base of scores that read several recorded layers and the model's logits."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from selectorch._checks import check_finite_rows, check_int, check_matrix, check_rows
from selectorch.exceptions import NotFittedError
from selectorch.functional.finite import finite_rows
from selectorch.scores.base import Score

#: The key under which a multi-layer score finds the model's logits.
LOGITS = "logits"


class LayerScore(Score):
    """Base of scores that read several layers at once (Gram, DkNN) and the model's logits.

    Every call takes a dict ``{layer name: (N, D_l) features, ..., "logits": (N, C)}``. In a
    :class:`~selectorch.SelectiveModel` the layers are the ones named by ``layer=[...]`` and
    ``"logits"`` is the model's output, so the score needs no layer names of its own
    (:attr:`keys` is ``None``: any recorded layers). ``fit`` remembers the layer names and
    widths; later calls must give the same layers (in any order) with the same widths.

    Subclasses implement :meth:`_fit_layers` and :meth:`_score_layers`, which receive the
    layers' features as a list in the fitted order and the logits.

    Attributes:
        dims_: ``(L,)`` feature width of each fitted layer.
        layers_: Names of the fitted layers, in the order the subclass receives them.
    """

    input = "multi"
    #: The keys the score reads; ``None`` = every recorded layer, plus ``"logits"``.
    keys: ClassVar[tuple[str, ...] | None] = None
    fitted_buffers: ClassVar[tuple[str, ...]] = ("dims_",)

    dims_: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("dims_", torch.empty(0, dtype=torch.long))
        self.layers_: list[str] = []
        self._dims: list[int] = []

    # -- to implement -------------------------------------------------------------------------

    @abstractmethod
    def _fit_layers(
        self, features: list[torch.Tensor], logits: torch.Tensor, y: torch.Tensor | None
    ) -> None:
        """Fill the fitted buffers from checked, finite ``(N, D_l)`` features and logits."""

    @abstractmethod
    def _score_layers(self, features: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """``(N,)`` raw scores; compile-clean (no ``.item()``, no branch on values)."""

    def _score(self, X: Any) -> torch.Tensor:
        features, logits = self._inputs(X)
        return self._score_layers(features, logits)

    # -- inputs -------------------------------------------------------------------------------

    def _refresh_derived(self) -> None:
        self._dims = [int(d) for d in self.dims_.tolist()]

    def _inputs(
        self, X: Any, name: str = "X", *, fitting: bool = False
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Check ``X`` and return its layers' ``(N, D_l)`` features (fitted order) and logits."""
        if not isinstance(X, Mapping):
            raise TypeError(
                f"Expected argument `{name}` to be a dict {{layer name: (N, D) features, ..., "
                f"'logits': (N, C)}}, got {type(X).__name__}."
            )
        if LOGITS not in X:
            raise ValueError(
                f"Argument `{name}` lacks the key 'logits' (has {list(X)}): "
                f"{type(self).__name__} reads the model's logits for its predicted class."
            )
        layers = [str(key) for key in X if key != LOGITS]
        if not layers:
            raise ValueError(
                f"Expected argument `{name}` to hold at least one layer besides 'logits', got "
                f"only {list(X)}."
            )
        if not fitting and sorted(layers) != sorted(self.layers_):
            raise ValueError(
                f"{type(self).__name__} was fitted on the layers {self.layers_}, but argument "
                f"`{name}` holds {layers}."
            )
        order = layers if fitting else self.layers_
        features = [check_matrix(f"{name}[{key!r}]", X[key]) for key in order]
        logits = check_matrix(f"{name}['logits']", X[LOGITS])
        rows = {key: f.shape[0] for key, f in zip(order, features, strict=True)}
        rows[LOGITS] = logits.shape[0]
        # compare, never hash: a set of symbolic batch sizes would specialise the compiled graph
        if any(r != logits.shape[0] for r in rows.values()):
            raise ValueError(f"The inputs of `{name}` disagree on the number of rows: {rows}.")
        if not fitting:
            state = self.dims_
            for key, f, dim in zip(order, features, self._dims, strict=True):
                if f.shape[1] != dim:
                    raise ValueError(
                        f"Expected `{name}[{key!r}]` to have {dim} features per row, as when "
                        f"{type(self).__name__} was fitted, got {f.shape[1]}."
                    )
            for key, t in zip([*order, LOGITS], [*features, logits], strict=True):
                if t.device != state.device:
                    raise ValueError(
                        f"Expected argument `{name}[{key!r}]` on {state.device}, where the "
                        f"fitted state of {type(self).__name__} is, got a tensor on {t.device}."
                    )
        return features, logits

    @staticmethod
    def _finite(features: list[torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        """``(N,)`` bool: rows whose features in every layer and whose logits are finite."""
        ok = finite_rows(logits)
        for f in features:
            ok = ok & finite_rows(f)
        return ok

    # -- fit, score, calibrate ----------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                f"This {type(self).__name__} is not fitted yet. Call fit(X, y) with a dict of "
                "reference features per layer and the 'logits'."
            )

    @torch.no_grad()
    def fit(self, X: Mapping[str, torch.Tensor], y: torch.Tensor | None = None) -> LayerScore:
        """Fit on reference features of several layers; fitting again replaces the old state.

        Args:
            X: ``{layer: (N, D_l), ..., "logits": (N, C)}`` reference data.
            y: Optional ``(N,)`` labels, for scores that use them.

        Returns:
            ``self``.

        Raises:
            ValueError: A missing ``"logits"`` key, no layer, rows that disagree, an empty
                input or rows with NaN or Inf.
        """
        features, logits = self._inputs(X, fitting=True)
        if logits.shape[0] == 0:
            raise ValueError("Expected argument `X` to hold at least one row, got none.")
        # `features` follow the layer keys of X (the logits' key, wherever it is, excluded)
        names = [str(key) for key in X if key != LOGITS]
        for key, f in zip(names, features, strict=True):
            check_finite_rows(f"X[{key!r}]", f)
        check_finite_rows("X['logits']", logits)
        if y is not None:
            y = check_rows("y", y, logits.shape[0], "X")
        device = logits.device
        self.to(device)
        dtype = self.threshold_.dtype
        features = [f.to(device=device, dtype=dtype) for f in features]
        logits = logits.to(dtype)
        self.layers_ = names
        self._set_buffer("dims_", torch.tensor([f.shape[1] for f in features], device=device))
        self._fit_layers(features, logits, None if y is None else y.to(device))
        self._refresh_derived()
        self.threshold_ = torch.empty(0, device=device, dtype=dtype)
        self.calibration_scores_ = torch.empty(0, device=device, dtype=dtype)
        self._report = {}
        return self

    def forward(self, X: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Uncertainty scores; a row with NaN or Inf in any layer or its logits gets ``+inf``.

        Args:
            X: ``{layer: (N, D_l), ..., "logits": (N, C)}``.

        Returns:
            ``(N,)`` scores, higher = less trustworthy.
        """
        self._check_fitted()
        features, logits = self._inputs(X)
        scores = self._score_layers(features, logits)
        ok = self._finite(features, logits) & torch.isfinite(scores)
        return torch.where(ok, scores, torch.full_like(scores, float("inf")))

    @torch.no_grad()
    def score(self, X: Mapping[str, torch.Tensor], *, batch_size: int = 4096) -> torch.Tensor:
        """Scores of many rows, ``batch_size`` rows at a time (eagerly).

        Args:
            X: ``{layer: (N, D_l), ..., "logits": (N, C)}``.
            batch_size: Rows per step.

        Returns:
            ``(N,)`` scores.
        """
        check_int("batch_size", batch_size)
        self._check_fitted()
        self._inputs(X)
        n = X[LOGITS].shape[0]
        parts = [
            self({key: value[start : start + batch_size] for key, value in X.items()})
            for start in range(0, n, batch_size)
        ]
        return torch.cat(parts) if parts else self(X)

    @torch.no_grad()
    def calibrate(self, X: Mapping[str, torch.Tensor], **kwargs: Any) -> LayerScore:
        """Set the threshold from held-out data, as :meth:`Score.calibrate` does.

        Args:
            X: ``{layer: (n, D_l), ..., "logits": (n, C)}`` held-out data.
            **kwargs: The target and options of :meth:`Score.calibrate`.

        Returns:
            ``self``.
        """
        self._check_fitted()
        features, logits = self._inputs(X)
        if logits.shape[0] == 0:
            raise ValueError("Expected argument `X` to hold calibration rows, got none.")
        for key, f in zip(self.layers_, features, strict=True):
            check_finite_rows(f"X[{key!r}]", f)
        check_finite_rows("X['logits']", logits)
        return self.calibrate_scores(self.score(X), **kwargs)

    # -- state --------------------------------------------------------------------------------

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "layers": list(self.layers_)}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.layers_ = [str(name) for name in state.get("layers", [])]
