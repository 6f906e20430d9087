"""Merging the sufficient statistics of Gaussian fits across ranks, without moving rows."""

from __future__ import annotations

import torch
import torch.distributed as dist

from selectorch.distributed.collectives import gather_parts, is_distributed
from selectorch.functional.gaussian import GaussianStats


def _merge_stats(a: GaussianStats, b: GaussianStats) -> GaussianStats:
    """Chan et al.'s merge of two sets of class statistics (as ``update_gaussian_stats``)."""
    classes = torch.unique(torch.cat([a.classes, b.classes]), sorted=True)
    size = classes.shape[0]

    def spread(values: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return values.new_zeros((size, *values.shape[1:])).index_copy_(0, at, values)

    at_a, at_b = torch.searchsorted(classes, a.classes), torch.searchsorted(classes, b.classes)
    n_a, m_a = spread(a.counts, at_a), spread(a.means, at_a)
    n_b, m_b = spread(b.counts, at_b), spread(b.means, at_b)
    n = n_a + n_b
    delta = m_b - m_a
    means = m_a + delta * (n_b / n)[:, None]
    scatter = a.scatter + b.scatter + (delta * (n_a * n_b / n)[:, None]).T @ delta
    return GaussianStats(classes, n, means, scatter)


def all_reduce_gaussian_stats(
    stats: GaussianStats, group: dist.ProcessGroup | None = None
) -> GaussianStats:
    """Merge every rank's class statistics into those of all the rows, the same on every rank.

    The sufficient statistics of a Gaussian fit (counts, means, pooled scatter; see
    :mod:`selectorch.functional.gaussian`) are gathered, ``O(C D + D^2)`` per rank, and merged in
    rank order with Chan et al.'s update, so no row travels. The result equals
    :func:`~selectorch.functional.gaussian.fit_gaussian_stats` over all the rows up to float64
    rounding (not bitwise: the sums are taken in another order). Ranks may hold different classes.

    Args:
        stats: This rank's statistics (float64, as the functional API makes them).
        group: Process group (the default group when ``None``).

    Returns:
        The merged :class:`~selectorch.functional.gaussian.GaussianStats`.
    """
    if not is_distributed(group):
        return stats
    classes = gather_parts(stats.classes, group)
    counts = gather_parts(stats.counts, group)
    means = gather_parts(stats.means, group)
    scatters = gather_parts(stats.scatter, group)
    merged = GaussianStats(classes[0], counts[0], means[0], scatters[0])
    for parts in zip(classes[1:], counts[1:], means[1:], scatters[1:], strict=True):
        merged = _merge_stats(merged, GaussianStats(*parts))
    return merged
