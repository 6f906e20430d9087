"""Reference outliers: leave-one-out kNN scores of a bank's own rows, and which rows to keep."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from selectorch.functional.knn import DEFAULT_CHUNK_SIZE, knn_search, knn_statistic


def check_outlier_q(value: Any) -> float:
    """Return ``value`` as a float if it lies in ``[0, 1)``, else raise ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < 1:
        raise ValueError(f"Expected argument `outlier_q` to be a number in [0, 1), got {value!r}.")
    return float(value)


def drop_self_matches(
    distances: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove each row's own match from a ``k + 1`` neighbour search of a bank against itself.

    The match removed is the one whose index is the row itself, wherever it sits in the sorted
    list: with exact duplicates, a duplicate may come before the row at distance 0, and it is a
    true neighbour that stays. If the row is absent (more than ``k`` duplicates tie at distance
    0 and pushed it out), the last match is removed; every kept distance is then 0 either way.

    Args:
        distances: ``(N, k + 1)`` distances sorted in increasing order.
        indices: ``(N, k + 1)`` bank rows of those neighbours.
        rows: ``(N,)`` bank row of each query; ``arange(N)`` (the queries are the bank) if ``None``.

    Returns:
        ``(distances, indices)``, both ``(N, k)``, still sorted.

    Example:
        >>> d = torch.tensor([[0.0, 0.0, 2.0]])
        >>> i = torch.tensor([[4, 0, 1]])  # row 0 has a duplicate, row 4, listed first
        >>> drop_self_matches(d, i)[1].tolist()
        [[4, 1]]
    """
    n, width = indices.shape
    if rows is None:
        rows = torch.arange(n, device=indices.device)
    is_self = indices == rows.to(indices.device)[:, None]
    position = torch.where(
        is_self.any(dim=1),
        is_self.int().argmax(dim=1),
        torch.full((n,), width - 1, device=indices.device),
    )
    keep = torch.arange(width, device=indices.device)[None, :] != position[:, None]
    return distances[keep].view(n, width - 1), indices[keep].view(n, width - 1)


def leave_one_out_knn_score(
    bank: torch.Tensor,
    k: int = 1,
    *,
    metric: str = "euclidean",
    stat: str = "max",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """kNN score of every bank row against the bank without that row.

    Args:
        bank: ``(M, D)`` reference embeddings, ``M >= k + 1``.
        k: Number of neighbours.
        metric: ``"euclidean"`` or ``"cosine"``.
        stat: How the ``k`` distances are aggregated; see
            :func:`~selectorch.functional.knn_statistic`.
        chunk_size: Bank rows per chunk of the search.

    Returns:
        ``(M,)`` scores.

    Raises:
        ValueError: ``M < k + 1``.

    Example:
        >>> leave_one_out_knn_score(torch.tensor([[0.0], [1.0], [5.0]])).tolist()
        [1.0, 1.0, 4.0]
    """
    if bank.shape[0] < k + 1:
        raise ValueError(
            f"Expected at least k + 1 = {k + 1} bank rows for a leave-one-out search, got "
            f"{bank.shape[0]}."
        )
    d, i = knn_search(bank, bank, k + 1, metric=metric, chunk_size=chunk_size)
    return knn_statistic(drop_self_matches(d, i)[0], stat)


def inlier_rows(scores: torch.Tensor, q: float) -> torch.Tensor:
    """Rows kept after dropping the ``floor(q * N)`` highest-scoring ones.

    Ties are broken by row order (the later row is dropped first), so the result is
    deterministic.

    Args:
        scores: ``(N,)`` outlier scores, higher = more atypical.
        q: Fraction to drop, in ``[0, 1)``.

    Returns:
        ``(N - floor(q * N),)`` increasing row indices.

    Example:
        >>> inlier_rows(torch.tensor([0.1, 9.0, 0.3, 0.2]), 0.25).tolist()
        [0, 2, 3]
    """
    n = scores.shape[0]
    n_drop = math.floor(q * n)
    order = torch.sort(scores, stable=True).indices
    return order[: n - n_drop].sort().values
