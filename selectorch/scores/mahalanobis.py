"""Class-conditional Gaussian scores: Mahalanobis distance and its relative variant."""

from __future__ import annotations

import torch

from selectorch.functional.gaussian import (
    GaussianStats,
    fit_gaussian_stats,
    gaussian_precision,
    mahalanobis_score,
    means_sq_norms,
    pooled_covariance,
    relative_mahalanobis_score,
    total_gaussian,
)
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score

#: Default shrinkage of the covariance towards a scaled identity.
DEFAULT_SHRINKAGE = 1e-3


def check_shrinkage(value: object) -> float:
    """Return ``value`` as a float if it lies in ``[0, 1]``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"Expected argument `shrinkage` to be a number in [0, 1], got {value!r}.")
    return float(value)


def check_labels(owner: str, y: torch.Tensor | None, *, min_classes: int = 1) -> torch.Tensor:
    """Check that ``y`` holds ``(N,)`` integer class labels, with ``min_classes`` distinct ones.

    ``fit`` of the base class has already checked that ``y`` is a tensor with ``N`` rows.
    """
    if y is None:
        raise ValueError(
            f"{owner} needs class labels: expected argument `y` to be an (N,) integer tensor "
            "of the reference rows' classes, got None. Call fit(X, y)."
        )
    if y.ndim != 1 or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(
            f"Expected argument `y` to be an (N,) integer tensor of class labels, got shape "
            f"{tuple(y.shape)} and dtype {y.dtype}."
        )
    n_classes = torch.unique(y).numel()
    if n_classes < min_classes:
        raise ValueError(
            f"{owner} needs at least {min_classes} classes in `y`, got {n_classes}: with a "
            "single class the score is the same for every row."
        )
    return y


@register_score("mahalanobis")
class MahalanobisScore(Score):
    """Squared Mahalanobis distance to the nearest class (Lee et al. 2018; OpenOOD's MDS).

    One Gaussian per class, all sharing one covariance; the score of a row is
    ``min_c (x - mu_c)^T P (x - mu_c)`` with ``P`` the inverse of the shared covariance, shrunk
    towards a scaled identity so that it exists even when rows are fewer than features or
    features are collinear. Fitting runs over the rows in chunks with running float64 sums
    (see :func:`~selectorch.functional.gaussian.update_gaussian_stats`) and keeps no row;
    scoring costs ``O(B D^2 + B C D)`` and builds a ``(B, C)`` matrix, never ``(B, B)``.

    Labels may be any integers (``[3, 7, 7]`` is two classes); only which rows share a label
    matters, since the score takes the nearest class.

    Args:
        shrinkage: ``a`` in ``[0, 1]``: the covariance used is
            ``(1 - a) * S + a * (trace(S) / D) * I``. ``0`` uses ``S`` itself and raises at
            ``fit`` if it is singular (there is no silent pseudo-inverse).

    Attributes:
        means_: ``(C, D)`` class means, in increasing label order.
        precision_: ``(D, D)`` inverse of the shrunk shared covariance.

    Example:
        >>> X, y = torch.randn(300, 16), torch.randint(3, (300,))
        >>> score = MahalanobisScore().fit(X, y)
        >>> score(torch.randn(4, 16)).shape
        torch.Size([4])
    """

    input = "embedding"
    fitted_buffers = ("means_", "precision_")

    means_: torch.Tensor
    precision_: torch.Tensor
    mean_norms_: torch.Tensor

    def __init__(self, *, shrinkage: float = DEFAULT_SHRINKAGE) -> None:
        super().__init__()
        self.shrinkage = check_shrinkage(shrinkage)
        self.register_buffer("means_", torch.empty(0, 0))
        self.register_buffer("precision_", torch.empty(0, 0))
        # derived from means_ and precision_ (not saved): see means_sq_norms
        self.register_buffer("mean_norms_", torch.empty(0), persistent=False)

    def _expected_dim(self) -> int | None:
        return self.means_.shape[1] if self.is_fitted else None

    def _class_gaussians(
        self, X: torch.Tensor, y: torch.Tensor | None, *, min_classes: int = 1
    ) -> tuple[GaussianStats, torch.Tensor]:
        y = check_labels(type(self).__name__, y, min_classes=min_classes)
        stats = fit_gaussian_stats(X, y)
        return stats, gaussian_precision(pooled_covariance(stats), self.shrinkage)

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        stats, precision = self._class_gaussians(X, y)
        self._set_buffer("means_", stats.means)
        self._set_buffer("precision_", precision)

    def _refresh_derived(self) -> None:
        self.mean_norms_ = means_sq_norms(self.means_, self.precision_).to(self.means_.dtype)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return mahalanobis_score(X, self.means_, self.precision_, mean_norms=self.mean_norms_)

    def extra_repr(self) -> str:
        return f"shrinkage={self.shrinkage}"


@register_score("relative_mahalanobis")
class RelativeMahalanobisScore(MahalanobisScore):
    """Class Mahalanobis distance minus the distance to one background Gaussian (Ren et al. 2021).

    ``min_c MD_c(x) - MD_0(x)``, where ``MD_0`` uses the mean and covariance of all reference
    rows with labels ignored. Directions along which all the data varies, and that do not
    separate the classes, count less; this mostly helps near-OOD detection. Scores may be
    negative. Needs labels of at least two classes; both covariances get the same shrinkage.

    Args:
        shrinkage: ``a`` in ``[0, 1]``, as for :class:`MahalanobisScore`.

    Attributes:
        means_: ``(C, D)`` class means.
        precision_: ``(D, D)`` shared within-class precision.
        background_mean_: ``(D,)`` mean of all reference rows.
        background_precision_: ``(D, D)`` precision of all reference rows.
    """

    fitted_buffers = ("means_", "precision_", "background_mean_", "background_precision_")

    background_mean_: torch.Tensor
    background_precision_: torch.Tensor

    def __init__(self, *, shrinkage: float = DEFAULT_SHRINKAGE) -> None:
        super().__init__(shrinkage=shrinkage)
        self.register_buffer("background_mean_", torch.empty(0))
        self.register_buffer("background_precision_", torch.empty(0, 0))

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        stats, precision = self._class_gaussians(X, y, min_classes=2)
        mean, cov = total_gaussian(stats)
        background_precision = gaussian_precision(cov, self.shrinkage)
        self._set_buffer("means_", stats.means)
        self._set_buffer("precision_", precision)
        self._set_buffer("background_mean_", mean)
        self._set_buffer("background_precision_", background_precision)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return relative_mahalanobis_score(
            X,
            self.means_,
            self.precision_,
            self.background_mean_,
            self.background_precision_,
            mean_norms=self.mean_norms_,
        )
