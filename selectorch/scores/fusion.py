"""FusionScore: several scores, on different layers or on the logits, combined into one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from selectorch._checks import check_choice, check_finite_rows, check_fraction, check_matrix
from selectorch.calibration import check_target
from selectorch.exceptions import NotFittedError
from selectorch.functional.finite import finite_rows
from selectorch.functional.fusion import (
    COMBINE,
    STANDARDIZE,
    combine_standardized,
    empirical_pvalues,
    zscores,
)
from selectorch.scores.base import Score


class FusionScore(Score):
    """Combine several scores, each reading its own input, into one uncertainty.

    Each component is standardised on held-out data (conformal p-values or z-scores), then the
    standardised values are combined. In a :class:`~selectorch.SelectiveModel`, the keys name
    the recorded layers (``layer=[...]``) or ``"logits"`` for the model's output::

        fusion = FusionScore({"layer3": KNNScore(k=10), "avgpool": KNNScore(k=10),
                              "logits": EnergyScore()})
        sel = SelectiveModel(model, fusion, layer=["layer3", "avgpool"])

    Standalone, every call takes a dict ``{key: (N, D_key) tensor}``.

    :meth:`calibrate` splits its rows: the first ``standardize_fraction`` set the
    standardisation, the rest the threshold, so the threshold's coverage promise holds for the
    combined score exactly as for any other score.

    Args:
        scores: Mapping from input key to a fresh :class:`Score`.
        combine: ``"mean"``, ``"max"`` or ``"fisher"`` (p-values only); see
            :func:`selectorch.functional.fusion.combine_standardized`.
        standardize: ``"pvalue"`` (rank-based, robust to scale and outliers) or ``"zscore"``.
        standardize_fraction: Share of calibration rows used to standardise, in (0, 1).

    Attributes:
        reference_: ``(K, n)`` sorted component scores of the standardisation rows (p-values).
        mean_, std_: ``(K,)`` component means and standard deviations (z-scores).

    Example:
        >>> from selectorch.scores import EnergyScore, KNNScore
        >>> fusion = FusionScore({"emb": KNNScore(k=2), "logits": EnergyScore()})
        >>> data = {"emb": torch.randn(100, 4), "logits": torch.randn(100, 3)}
        >>> fusion = fusion.fit(data).calibrate(data, coverage=0.8)
        >>> fusion({"emb": torch.randn(5, 4), "logits": torch.randn(5, 3)}).shape
        torch.Size([5])
    """

    input = "multi"

    @property  # type: ignore[override]
    def passes(self) -> int:  # the components read one model pass
        """Forward passes of the model per batch: those of the most demanding component."""
        return max(score.passes for score in self.components)

    @property  # type: ignore[override]
    def compile_clean(self) -> bool:
        """Whether every component compiles with ``fullgraph=True``."""
        return all(score.compile_clean for score in self.components)

    reference_: torch.Tensor
    mean_: torch.Tensor
    std_: torch.Tensor

    def __init__(
        self,
        scores: Mapping[str, Score],
        *,
        combine: str = "mean",
        standardize: str = "pvalue",
        standardize_fraction: float = 0.5,
    ) -> None:
        super().__init__()
        if not isinstance(scores, Mapping) or not scores:
            raise ValueError(
                "Expected argument `scores` to be a non-empty dict {input key: Score}, got "
                f"{scores!r}."
            )
        for key, score in scores.items():
            if not isinstance(score, Score) or isinstance(score, FusionScore):
                raise TypeError(
                    f"Expected every value of `scores` to be a selectorch Score (not a "
                    f"FusionScore), got {type(score).__name__} for key {key!r}."
                )
            if score.requires_grad or score.input == "multi":
                raise TypeError(
                    f"Expected every value of `scores` to read one input in one pass, got "
                    f"{type(score).__name__} for key {key!r}, which "
                    + (
                        "needs input gradients and a pass of its own."
                        if score.requires_grad
                        else "reads several layers itself."
                    )
                )
        self.keys = [str(key) for key in scores]
        # ModuleDict names cannot hold dots ("layer4.1"): index the components by position
        self.components = nn.ModuleList(scores.values())
        self.combine = check_choice("combine", combine, COMBINE)
        self.standardize = check_choice("standardize", standardize, STANDARDIZE)
        if self.combine == "fisher" and self.standardize != "pvalue":
            raise ValueError("combine='fisher' combines p-values: use standardize='pvalue'.")
        self.standardize_fraction = check_fraction("standardize_fraction", standardize_fraction)
        if self.standardize_fraction >= 1:
            raise ValueError(
                "Expected argument `standardize_fraction` to be in (0, 1): some calibration rows "
                "must remain for the threshold."
            )
        self.register_buffer("reference_", torch.empty(0, 0))
        self.register_buffer("mean_", torch.empty(0))
        self.register_buffer("std_", torch.empty(0))

    # -- inputs -------------------------------------------------------------------------------

    def _inputs(self, X: Any, name: str = "X") -> dict[str, torch.Tensor]:
        if not isinstance(X, Mapping):
            raise TypeError(
                f"Expected argument `{name}` to be a dict with keys {self.keys}, got "
                f"{type(X).__name__}."
            )
        missing = [key for key in self.keys if key not in X]
        if missing:
            raise ValueError(f"Argument `{name}` lacks the keys {missing} (has {list(X)}).")
        rows = {key: X[key].shape[0] for key in self.keys}
        first = next(iter(rows.values()))
        if any(count != first for count in rows.values()):  # never hash symbolic sizes
            raise ValueError(f"The inputs of `{name}` disagree on the number of rows: {rows}.")
        return {key: X[key] for key in self.keys}

    def _component_scores(self, X: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(N, K)`` scores of every component on its own input (non-finite rows: +inf)."""
        return torch.stack(
            [score(X[key]) for key, score in zip(self.keys, self.components, strict=True)], dim=1
        )

    # -- fit, score ---------------------------------------------------------------------------

    @property
    def is_fitted(self) -> bool:
        return all(score.is_fitted for score in self.components)

    @torch.no_grad()
    def fit(self, X: Mapping[str, torch.Tensor], y: torch.Tensor | None = None) -> FusionScore:
        """Fit every component on its input; drops the standardisation and the threshold.

        Args:
            X: ``{key: (N, D_key)}`` reference inputs.
            y: Optional ``(N,)`` labels, passed to every component.

        Returns:
            ``self``.
        """
        X = self._inputs(X)
        for key, score in zip(self.keys, self.components, strict=True):
            score.fit(X[key], y)
        device = self.components[0].threshold_.device
        self.to(device)
        for name in ("reference_", "mean_", "std_", "threshold_", "calibration_scores_"):
            empty = torch.empty((0, 0) if name == "reference_" else (0,), device=device)
            setattr(self, name, empty)
        self._report = {}
        return self

    def _score(self, X: Any) -> torch.Tensor:
        values = self._component_scores(X)
        if self.standardize == "pvalue":
            values = empirical_pvalues(values, self.reference_.to(values.dtype))
        else:
            values = zscores(values, self.mean_, self.std_)
        return combine_standardized(values, self.standardize, self.combine)

    def _check_fitted(self) -> None:
        if not self.is_fitted:
            raise NotFittedError(
                "This FusionScore is not fitted yet. Call fit(X) with a dict of reference inputs "
                f"for the keys {self.keys}."
            )

    def _check_standardized(self) -> None:
        ready = self.reference_.numel() if self.standardize == "pvalue" else self.mean_.numel()
        if not ready:
            raise NotFittedError(
                "This FusionScore has not standardised its components yet. Call calibrate(X, "
                "coverage=...) after fit(X)."
            )

    def forward(self, X: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Combined scores; a row with a non-finite input or component score gets ``+inf``.

        Args:
            X: ``{key: (N, D_key)}`` inputs.

        Returns:
            ``(N,)`` scores.
        """
        self._check_fitted()
        self._check_standardized()
        X = self._inputs(X)
        scores = self._score(X)
        ok = torch.isfinite(scores)
        for value in X.values():
            ok = ok & finite_rows(value)
        return torch.where(ok, scores, torch.full_like(scores, float("inf")))

    @torch.no_grad()
    def score(self, X: Mapping[str, torch.Tensor], *, batch_size: int = 4096) -> torch.Tensor:
        """Scores of many rows, ``batch_size`` at a time."""
        X = self._inputs(X)
        n = X[self.keys[0]].shape[0]
        parts = [
            self({key: value[start : start + batch_size] for key, value in X.items()})
            for start in range(0, n, batch_size)
        ]
        return torch.cat(parts) if parts else self(X)

    # -- calibrate ----------------------------------------------------------------------------

    @torch.no_grad()
    def calibrate(self, X: Mapping[str, torch.Tensor], **kwargs: Any) -> FusionScore:
        """Standardise the components on the first rows of ``X`` and set the threshold on the rest.

        Args:
            X: ``{key: (n, D_key)}`` held-out inputs.
            **kwargs: The target and options of :meth:`Score.calibrate` (``coverage=``, or
                ``risk=`` with ``correct=``/``losses=``, ``preds=``, ...); per-row tensors are
                split like ``X``.

        Returns:
            ``self``.
        """
        check_target(
            kwargs.get("coverage"),
            kwargs.get("risk"),
            kwargs.get("delta", 0.1),
            kwargs.get("bound", "clopper-pearson"),
            kwargs.get("method", "sgr"),
        )
        self._check_fitted()
        X = self._inputs(X)
        for key, value in X.items():
            check_matrix(f"X[{key!r}]", value)
            check_finite_rows(f"X[{key!r}]", value)
        n = X[self.keys[0]].shape[0]
        n_std = int(n * self.standardize_fraction)
        if n_std < 1 or n - n_std < 1:
            raise ValueError(
                f"FusionScore.calibrate needs rows both to standardise and to set the threshold; "
                f"got n={n} with standardize_fraction={self.standardize_fraction}."
            )
        raw = self._component_scores({key: value[:n_std] for key, value in X.items()})
        if self.standardize == "pvalue":
            self._set_buffer("reference_", torch.sort(raw.T.contiguous(), dim=1).values)
        else:
            self._set_buffer("mean_", raw.mean(dim=0))
            self._set_buffer("std_", raw.std(dim=0).clamp_min(1e-12))
        rest = {key: value[n_std:] for key, value in X.items()}
        split = {
            key: (value[n_std:] if isinstance(value, torch.Tensor) and value.ndim else value)
            for key, value in kwargs.items()
        }
        return self.calibrate_scores(self.score(rest), **split)

    def extra_repr(self) -> str:
        return (
            f"keys={self.keys}, combine={self.combine!r}, standardize={self.standardize!r}, "
            f"standardize_fraction={self.standardize_fraction}"
        )
