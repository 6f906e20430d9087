"""Gaussian statistics fitted from a stream, shrunk covariances and Mahalanobis distances.

Fitting keeps running sums in float64: per class a count and a mean, and one pooled
within-class scatter matrix, merged batch by batch with Chan et al.'s parallel update (each batch
is centred on its own class means first, so no sum of squares of raw values is ever formed).
Nothing keeps the rows themselves. Scoring is row-wise: a query's squared distance to every class
mean is a ``(B, C)`` matrix; no ``(B, B)`` matrix is ever built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Rows per step when :func:`fit_gaussian_stats` walks over a tensor.
FIT_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class GaussianStats:
    """Running per-class statistics, all float64 (sorted by class label).

    Attributes:
        classes: ``(C,)`` int64 class labels, sorted.
        counts: ``(C,)`` rows seen per class.
        means: ``(C, D)`` class means.
        scatter: ``(D, D)`` pooled within-class scatter
            ``sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T``.
    """

    classes: torch.Tensor
    counts: torch.Tensor
    means: torch.Tensor
    scatter: torch.Tensor

    @property
    def n_rows(self) -> int:
        """Total number of rows seen."""
        return int(self.counts.sum())


def _batch_stats(X: torch.Tensor, y: torch.Tensor) -> GaussianStats:
    classes, inverse = torch.unique(y, sorted=True, return_inverse=True)
    counts = torch.bincount(inverse, minlength=classes.shape[0]).to(X.dtype)
    sums = X.new_zeros(classes.shape[0], X.shape[1]).index_add_(0, inverse, X)
    means = sums / counts[:, None]
    centred = X - means[inverse]
    return GaussianStats(classes, counts, means, centred.T @ centred)


def _spread(values: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    out = values.new_zeros((size, *values.shape[1:]))
    return out.index_copy_(0, index, values)


def update_gaussian_stats(
    stats: GaussianStats | None, X: torch.Tensor, y: torch.Tensor | None = None
) -> GaussianStats:
    """Merge one batch into running class statistics (Chan et al.'s parallel update).

    For a class seen ``n_a`` times with mean ``m_a`` and a batch holding ``n_b`` rows of it with
    mean ``m_b``: ``n = n_a + n_b``, ``m = m_a + (m_b - m_a) n_b / n``, and the scatter grows by
    the batch's own centred scatter plus ``(m_b - m_a)(m_b - m_a)^T n_a n_b / n``. Classes
    first seen in a later batch are added; the result is the same, up to rounding, however the
    rows are split into batches.

    Args:
        stats: Statistics so far, or ``None`` to start.
        X: ``(B, D)`` rows (any floating dtype; summed in float64).
        y: ``(B,)`` integer class labels (any values), or ``None`` for one class ``0``.

    Returns:
        The merged :class:`GaussianStats` (``stats`` is not modified).

    Example:
        >>> s = update_gaussian_stats(None, torch.tensor([[0.0], [2.0]]))
        >>> s = update_gaussian_stats(s, torch.tensor([[4.0]]))
        >>> s.means.tolist(), s.scatter.tolist()
        ([[2.0]], [[8.0]])
    """
    X = X.detach().to(torch.float64)
    y = torch.zeros(X.shape[0], dtype=torch.int64, device=X.device) if y is None else y
    if y.shape != (X.shape[0],):
        raise ValueError(
            f"Expected argument `y` to have shape ({X.shape[0]},) like the rows of `X`, got "
            f"{tuple(y.shape)}."
        )
    y = y.to(device=X.device, dtype=torch.int64)
    if X.shape[0] == 0:
        if stats is None:
            raise ValueError("Expected argument `X` to hold at least one row, got 0 rows.")
        return stats
    batch = _batch_stats(X, y)
    if stats is None:
        return batch
    if stats.means.shape[1] != X.shape[1]:
        raise ValueError(
            f"Expected argument `X` to have feature dimension {stats.means.shape[1]} like the "
            f"rows seen before, got {X.shape[1]}."
        )
    classes = torch.unique(torch.cat([stats.classes, batch.classes]), sorted=True)
    size = classes.shape[0]
    at_old = torch.searchsorted(classes, stats.classes)
    at_new = torch.searchsorted(classes, batch.classes)
    n_a, m_a = _spread(stats.counts, at_old, size), _spread(stats.means, at_old, size)
    n_b, m_b = _spread(batch.counts, at_new, size), _spread(batch.means, at_new, size)
    n = n_a + n_b
    delta = m_b - m_a
    means = m_a + delta * (n_b / n)[:, None]
    scatter = stats.scatter + batch.scatter + (delta * (n_a * n_b / n)[:, None]).T @ delta
    return GaussianStats(classes, n, means, scatter)


def fit_gaussian_stats(
    X: torch.Tensor, y: torch.Tensor | None = None, *, chunk_rows: int = FIT_CHUNK_ROWS
) -> GaussianStats:
    """Class statistics of ``X``, accumulated ``chunk_rows`` rows at a time.

    This is the loop a streamed fit runs over its batches; memory is bounded by one chunk in
    float64 plus the ``(D, D)`` scatter.

    Args:
        X: ``(N, D)`` rows, ``N >= 1``.
        y: ``(N,)`` integer labels or ``None`` (one class).
        chunk_rows: Rows per update.

    Returns:
        The :class:`GaussianStats` of all rows.
    """
    stats = None
    for start in range(0, max(X.shape[0], 1), chunk_rows):
        rows = slice(start, start + chunk_rows)
        stats = update_gaussian_stats(stats, X[rows], None if y is None else y[rows])
    assert stats is not None  # the loop runs at least once
    return stats


def pooled_covariance(stats: GaussianStats) -> torch.Tensor:
    """``(D, D)`` shared within-class covariance ``scatter / N`` (maximum likelihood).

    This is the tied covariance of Lee et al. (2018); with one class it is the plain covariance.
    """
    return stats.scatter / stats.counts.sum()


def total_gaussian(stats: GaussianStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of all rows together, ignoring the labels.

    Uses the exact decomposition total scatter = within-class scatter + between-class scatter
    ``sum_c n_c (mu_c - mu)(mu_c - mu)^T``.

    Returns:
        ``(mean, covariance)`` of shapes ``(D,)`` and ``(D, D)``.
    """
    n = stats.counts.sum()
    mean = (stats.counts[:, None] * stats.means).sum(dim=0) / n
    offsets = stats.means - mean
    between = (offsets * stats.counts[:, None]).T @ offsets
    return mean, (stats.scatter + between) / n


def _shrunk_eigh(cov: torch.Tensor, shrinkage: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the shrunk covariance; raise if it is not safely invertible."""
    cov = cov.to(torch.float64)
    dim = cov.shape[0]
    scale = torch.trace(cov) / dim
    if not scale > 0:
        raise ValueError(
            "The reference covariance is zero: every reference row equals its class mean, so "
            "no Mahalanobis distance is defined. Fit on rows that vary."
        )
    shrunk = shrunk_covariance(cov, shrinkage)
    values, vectors = torch.linalg.eigh(0.5 * (shrunk + shrunk.T))
    floor = dim * torch.finfo(torch.float64).eps * values[-1]
    if not values[0] > floor:
        rank = int((values > floor).sum())
        raise ValueError(
            f"The reference covariance is singular (rank {rank} of {dim}) and "
            f"shrinkage={shrinkage} does not make it invertible. Expected argument `shrinkage` "
            "to be > 0 and not negligible (for example 1e-3) when rows are fewer than features "
            "or features are collinear or constant."
        )
    return values, vectors


def shrunk_covariance(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """Convex combination ``(1 - a) * cov + a * (trace(cov) / D) * I`` (Ledoit-Wolf's target).

    The identity is scaled by the mean variance, so ``shrinkage`` is scale-free: ``0`` keeps the
    covariance, ``1`` gives a multiple of the identity (a scaled Euclidean distance). Any
    ``shrinkage > 0`` makes a singular covariance invertible.

    Args:
        cov: ``(D, D)`` covariance.
        shrinkage: ``a`` in ``[0, 1]``.

    Returns:
        ``(D, D)`` covariance in ``cov``'s dtype.
    """
    scale = torch.trace(cov) / cov.shape[0]
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return (1.0 - shrinkage) * cov + shrinkage * scale * eye


def gaussian_precision(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(D, D)`` float64 inverse of :func:`shrunk_covariance`.

    Raises:
        ValueError: The shrunk covariance is zero or numerically singular (no silent
            pseudo-inverse: raise ``shrinkage`` instead).
    """
    values, vectors = _shrunk_eigh(cov, shrinkage)
    precision = (vectors / values) @ vectors.T
    return 0.5 * (precision + precision.T)


def whitening_matrix(cov: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(D, D)`` float64 symmetric inverse square root ``W`` of :func:`shrunk_covariance`.

    ``|(x - y) @ W|`` is the Mahalanobis distance between rows ``x`` and ``y``.

    Raises:
        ValueError: The shrunk covariance is zero or numerically singular.
    """
    values, vectors = _shrunk_eigh(cov, shrinkage)
    whitener = (vectors * values.rsqrt()) @ vectors.T
    return 0.5 * (whitener + whitener.T)


def whiten(X: torch.Tensor, mean: torch.Tensor, whitener: torch.Tensor) -> torch.Tensor:
    """``(X - mean) @ whitener``: rows in which Euclidean distance is Mahalanobis distance.

    Args:
        X: ``(B, D)`` rows.
        mean: ``(D,)`` centre (distances do not depend on it; it keeps norms small).
        whitener: ``(D, D)`` from :func:`whitening_matrix`.

    Returns:
        ``(B, D)`` tensor.
    """
    return (X - mean) @ whitener


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def means_sq_norms(means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """``(C,)`` squared precision norms of the class means, centred on their average.

    What :func:`class_sq_mahalanobis` needs per class; compute it once after fitting.
    """
    dtype = _compute_dtype(means, precision)
    means, precision = means.to(dtype), precision.to(dtype)
    centred = means - means.mean(dim=0)
    return ((centred @ precision) * centred).sum(dim=1)


def class_sq_mahalanobis(
    X: torch.Tensor,
    means: torch.Tensor,
    precision: torch.Tensor,
    *,
    mean_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Squared Mahalanobis distance of every row to every class mean, with a shared precision.

    ``(x - mu_c)^T P (x - mu_c) = x'^T P x' - 2 x'^T P mu_c' + mu_c'^T P mu_c'`` with rows and
    means centred on the average class mean (primes), so a ``(B, C)`` matrix is all that is
    built. Half and bfloat16 inputs are computed in float32.

    Args:
        X: ``(B, D)`` query rows.
        means: ``(C, D)`` class means.
        precision: ``(D, D)`` shared precision (inverse covariance), symmetric.
        mean_norms: Optional ``(C,)`` from :func:`means_sq_norms`.

    Returns:
        ``(B, C)`` non-negative squared distances.

    Example:
        >>> class_sq_mahalanobis(torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2), torch.eye(2) / 4)
        tensor([[1.]])
    """
    dtype = _compute_dtype(X, means, precision)
    X, means, precision = X.to(dtype), means.to(dtype), precision.to(dtype)
    if mean_norms is None:
        mean_norms = means_sq_norms(means, precision)
    centre = means.mean(dim=0)
    Xc = X - centre
    XP = Xc @ precision
    sq = (XP * Xc).sum(dim=1, keepdim=True) - 2.0 * (XP @ (means - centre).T)
    return (sq + mean_norms.to(dtype)).clamp_min(0.0)


def mahalanobis_score(
    X: torch.Tensor,
    means: torch.Tensor,
    precision: torch.Tensor,
    *,
    mean_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """Minimum over classes of the squared Mahalanobis distance (Lee et al. 2018).

    Args:
        X: ``(B, D)`` query rows.
        means: ``(C, D)`` class means.
        precision: ``(D, D)`` shared precision.
        mean_norms: Optional ``(C,)`` from :func:`means_sq_norms`.

    Returns:
        ``(B,)`` scores, higher = farther from every class.
    """
    d = class_sq_mahalanobis(X, means, precision, mean_norms=mean_norms)
    return d.min(dim=1).values


def relative_mahalanobis_score(
    X: torch.Tensor,
    means: torch.Tensor,
    precision: torch.Tensor,
    background_mean: torch.Tensor,
    background_precision: torch.Tensor,
    *,
    mean_norms: torch.Tensor | None = None,
) -> torch.Tensor:
    """``min_c MD_c(x) - MD_0(x)``: class distance minus distance to one background Gaussian.

    Ren et al. (2021), "A simple fix to Mahalanobis distance for improving near-OOD detection":
    ``MD_0`` uses the mean and covariance of all reference rows, labels ignored, so directions
    in which everything varies (and that say little about the classes) count less.

    Args:
        X: ``(B, D)`` query rows.
        means: ``(C, D)`` class means.
        precision: ``(D, D)`` shared within-class precision.
        background_mean: ``(D,)`` mean of all rows.
        background_precision: ``(D, D)`` precision of all rows.
        mean_norms: Optional ``(C,)`` from :func:`means_sq_norms`.

    Returns:
        ``(B,)`` scores (may be negative), higher = more unusual for the classes.
    """
    classes = mahalanobis_score(X, means, precision, mean_norms=mean_norms)
    dtype = _compute_dtype(X, background_mean, background_precision)
    Xc = X.to(dtype) - background_mean.to(dtype)
    background = ((Xc @ background_precision.to(dtype)) * Xc).sum(dim=1)
    return classes - background
