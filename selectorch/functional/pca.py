"""Principal subspaces from a covariance, and the reconstruction error outside them."""

from __future__ import annotations

import torch


def n_components_for(explained: torch.Tensor, n_components: int | float) -> int:
    """How many leading components to keep.

    Args:
        explained: ``(D,)`` variances of the principal components, in decreasing order.
        n_components: An ``int`` is a count; a ``float`` in (0, 1) is the fraction of the total
            variance to explain: the smallest count whose cumulative fraction exceeds it (the
            rule of scikit-learn's ``PCA``).

    Returns:
        The count ``K``, ``1 <= K <= D``.

    Raises:
        ValueError: An ``int`` ``n_components`` larger than ``D``.
    """
    dim = explained.shape[0]
    if isinstance(n_components, int):
        if n_components > dim:
            raise ValueError(
                f"Expected argument `n_components` to be at most the feature dimension {dim}, "
                f"got {n_components}."
            )
        return n_components
    ratio = (explained.clamp_min(0.0) / explained.clamp_min(0.0).sum()).cumsum(dim=0)
    target = torch.tensor([n_components], dtype=ratio.dtype, device=ratio.device)
    return min(int(torch.searchsorted(ratio, target, right=True)) + 1, dim)


def principal_components(
    cov: torch.Tensor, n_components: int | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Leading eigenvectors of a covariance.

    Args:
        cov: ``(D, D)`` covariance (float64 recommended).
        n_components: Count or explained-variance fraction; see :func:`n_components_for`.

    Returns:
        ``(components, explained)``: ``(D, K)`` orthonormal columns (largest variance first)
        and the ``(D,)`` variances of all components, in decreasing order.

    Raises:
        ValueError: The covariance is zero, or ``n_components`` exceeds ``D``.

    Example:
        >>> V, var = principal_components(torch.diag(torch.tensor([1.0, 4.0])), 1)
        >>> V.abs().flatten().tolist(), var.tolist()
        ([0.0, 1.0], [4.0, 1.0])
    """
    values, vectors = torch.linalg.eigh(0.5 * (cov + cov.T))
    values, vectors = values.flip(0), vectors.flip(1)
    if not values[0] > 0:
        raise ValueError(
            "The reference covariance is zero (every reference row is the same), so no "
            "principal subspace is defined. Fit on rows that vary."
        )
    k = n_components_for(values, n_components)
    return vectors[:, :k].contiguous(), values


def pca_reconstruction_error(
    X: torch.Tensor, mean: torch.Tensor, components: torch.Tensor
) -> torch.Tensor:
    """Squared norm of what the principal subspace leaves out of each centred row.

    ``| (x - mu) - V V^T (x - mu) |^2``, computed from the residual itself (not as
    ``|x - mu|^2 - |V^T (x - mu)|^2``, which cancels badly), at cost ``O(B D K)``. Half and
    bfloat16 inputs are computed in float32.

    Args:
        X: ``(B, D)`` rows.
        mean: ``(D,)`` centre of the reference rows.
        components: ``(D, K)`` orthonormal principal directions.

    Returns:
        ``(B,)`` errors; zero for a row in the affine subspace ``mu + span(V)``.

    Example:
        >>> V = torch.tensor([[1.0], [0.0]])
        >>> pca_reconstruction_error(torch.tensor([[5.0, 2.0]]), torch.zeros(2), V)
        tensor([4.])
    """
    dtype = torch.promote_types(torch.promote_types(X.dtype, components.dtype), torch.float32)
    components = components.to(dtype)
    Xc = X.to(dtype) - mean.to(dtype)
    residual = Xc - (Xc @ components) @ components.T
    return residual.pow(2).sum(dim=1)
