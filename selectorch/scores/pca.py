"""PCA reconstruction error: how much of an embedding lies outside the reference subspace."""

from __future__ import annotations

import torch

from selectorch.functional.gaussian import fit_gaussian_stats, pooled_covariance
from selectorch.functional.pca import pca_reconstruction_error, principal_components
from selectorch.scores.base import Score
from selectorch.scores.registry import register_score


def check_n_components(value: object) -> int | float:
    """Return ``value`` if it is an ``int >= 1`` or a ``float`` in (0, 1), else raise."""
    if isinstance(value, bool) or not (
        (isinstance(value, int) and value >= 1) or (isinstance(value, float) and 0 < value < 1)
    ):
        raise ValueError(
            "Expected argument `n_components` to be an integer >= 1 (a number of components) "
            f"or a float in (0, 1) (a fraction of explained variance), got {value!r}."
        )
    return value


@register_score("pca")
class PCAScore(Score):
    """Squared reconstruction error outside the top principal subspace of the reference rows.

    ``| (x - mu) - V V^T (x - mu) |^2`` with ``V`` the ``(D, K)`` leading principal directions:
    the part of an embedding that the reference data never varies along. It works where
    in-distribution embeddings lie near a low-dimensional subspace (the residual part of ViM,
    Wang et al. 2022); it ignores how far a row lies *inside* the subspace. Fitting accumulates
    the mean and covariance in float64 over chunks of rows (no row is kept) and takes one
    ``D x D`` eigen-decomposition; scoring costs ``O(B D K)``.

    Args:
        n_components: An ``int`` keeps that many components (at most ``D``); a ``float`` in
            (0, 1) keeps the fewest components whose explained variance exceeds that fraction
            (scikit-learn's rule).

    Attributes:
        mean_: ``(D,)`` mean of the reference rows.
        components_: ``(D, K)`` orthonormal principal directions, largest variance first.

    Example:
        >>> score = PCAScore(n_components=4).fit(torch.randn(200, 16))
        >>> score.components_.shape, score(torch.randn(3, 16)).shape
        (torch.Size([16, 4]), torch.Size([3]))
    """

    input = "embedding"
    fitted_buffers = ("mean_", "components_")

    mean_: torch.Tensor
    components_: torch.Tensor

    def __init__(self, *, n_components: int | float = 0.9) -> None:
        super().__init__()
        self.n_components = check_n_components(n_components)
        self.register_buffer("mean_", torch.empty(0))
        self.register_buffer("components_", torch.empty(0, 0))

    def _expected_dim(self) -> int | None:
        return self.mean_.shape[0] if self.is_fitted else None

    def _fit(self, X: torch.Tensor, y: torch.Tensor | None) -> None:
        stats = fit_gaussian_stats(X)
        components, _ = principal_components(pooled_covariance(stats), self.n_components)
        self._set_buffer("mean_", stats.means[0])
        self._set_buffer("components_", components)

    def _score(self, X: torch.Tensor) -> torch.Tensor:
        return pca_reconstruction_error(X, self.mean_, self.components_)

    def extra_repr(self) -> str:
        return f"n_components={self.n_components}"
