"""Exact k-nearest-neighbour search on the bank's device, and kNN scores."""

from __future__ import annotations

import torch

from selectorch.functional.distances import METRICS, pairwise_distance

STATS = ("max", "mean", "median", "min")

#: Upper bound on the number of entries of one ``(B, chunk)`` block of distances.
DEFAULT_BLOCK_ELEMENTS = 1 << 24


def _chunk_size(n_query: int, n_bank: int, k: int, block_elements: int) -> int:
    return min(n_bank, max(k, block_elements // max(n_query, 1)))


def knn_search(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    metric: str = "euclidean",
    bank_sq_norms: torch.Tensor | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours, streaming the bank in chunks.

    Memory is bounded by one ``(B, chunk)`` block of distances (at most ``block_elements``
    entries, and never fewer columns than ``k``); a running top-k is merged chunk by chunk, so
    the full ``(B, M)`` matrix is never built. The loop runs over a number of chunks fixed by the
    shapes, so it compiles into one graph. Euclidean candidates are found with one matrix product
    per chunk; the distances of the k chosen neighbours are then recomputed directly, so they are
    exact even when the embeddings' norms are large.

    Args:
        query: Query embeddings, shape ``(B, D)``.
        bank: Reference embeddings, shape ``(M, D)`` with ``M >= k`` (normalised for cosine).
        k: Number of neighbours.
        metric: ``"euclidean"`` or ``"cosine"``.
        bank_sq_norms: Optional ``(M,)`` squared norms of the bank rows (euclidean only).
        block_elements: Bound on the entries of one block of distances.

    Returns:
        ``(distances, indices)``, both ``(B, k)``, sorted by increasing distance.

    Example:
        >>> bank = torch.tensor([[0.0], [1.0], [5.0]])
        >>> d, i = knn_search(torch.tensor([[0.9]]), bank, 2)
        >>> i.tolist()
        [[1, 0]]
    """
    if metric not in METRICS:
        raise ValueError(f"Expected argument `metric` to be one of {METRICS}, got {metric!r}.")
    n_bank = bank.shape[0]
    if not 1 <= k <= n_bank:
        raise ValueError(f"Expected argument `k` to be in [1, {n_bank}] (the bank size), got {k}.")
    squared = metric == "euclidean"
    if squared and bank_sq_norms is None:
        bank_sq_norms = bank.pow(2).sum(dim=1)
    chunk = _chunk_size(query.shape[0], n_bank, k, block_elements)
    best_d: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, n_bank, chunk):
        stop = min(start + chunk, n_bank)
        norms = bank_sq_norms[start:stop] if squared else None
        d = pairwise_distance(query, bank[start:stop], metric, squared=squared, bank_sq_norms=norms)
        d, i = d.topk(min(k, stop - start), dim=1, largest=False)
        i = i + start
        if best_d is None:
            best_d, best_i = d, i
        else:
            d = torch.cat([best_d, d], dim=1)
            i = torch.cat([best_i, i], dim=1)
            best_d, pos = d.topk(k, dim=1, largest=False)
            best_i = i.gather(1, pos)
    if squared:
        # |q|^2 + |b|^2 - 2 q.b loses precision when norms are large next to the distances:
        # recompute the k chosen distances directly and re-sort them
        diff = query.unsqueeze(1) - bank[best_i]
        best_d, order = diff.pow(2).sum(dim=-1).sqrt().sort(dim=1)
        best_i = best_i.gather(1, order)
    return best_d, best_i


def knn_statistic(distances: torch.Tensor, stat: str = "max") -> torch.Tensor:
    """Aggregate sorted neighbour distances into one score per row.

    Args:
        distances: ``(B, k)`` distances sorted in increasing order.
        stat: ``"max"`` (distance to the k-th neighbour), ``"mean"``, ``"median"`` (mean of the
            two middle values when k is even) or ``"min"`` (distance to the nearest).

    Returns:
        Tensor of shape ``(B,)``.
    """
    k = distances.shape[1]
    if stat == "max":
        return distances[:, k - 1]
    if stat == "min":
        return distances[:, 0]
    if stat == "mean":
        return distances.mean(dim=1)
    if stat == "median":
        return 0.5 * (distances[:, (k - 1) // 2] + distances[:, k // 2])
    raise ValueError(f"Expected argument `stat` to be one of {STATS}, got {stat!r}.")


def knn_score(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int = 1,
    *,
    metric: str = "euclidean",
    stat: str = "max",
    bank_sq_norms: torch.Tensor | None = None,
    block_elements: int = DEFAULT_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """kNN distance score: higher means farther from the reference bank.

    Args:
        query: ``(B, D)`` query embeddings.
        bank: ``(M, D)`` reference embeddings (normalised for cosine).
        k: Number of neighbours.
        metric: ``"euclidean"`` or ``"cosine"``.
        stat: How the ``k`` distances are aggregated; see :func:`knn_statistic`.
        bank_sq_norms: Optional ``(M,)`` squared norms of the bank rows.
        block_elements: Bound on the entries of one block of distances.

    Returns:
        Tensor of shape ``(B,)``.
    """
    d, _ = knn_search(
        query, bank, k, metric=metric, bank_sq_norms=bank_sq_norms, block_elements=block_elements
    )
    return knn_statistic(d, stat)
