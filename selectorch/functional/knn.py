"""Exact k-nearest-neighbour search on the bank's device, and kNN scores."""

from __future__ import annotations

import torch

from selectorch._checks import check_choice, check_int
from selectorch.functional.distances import METRICS, pairwise_distance, prepare_bank

STATS = ("max", "mean", "median", "min")

#: Bank rows per chunk: one ``(B, chunk)`` block of distances at a time. It depends on the bank
#: alone, never on the batch size, so a compiled graph serves every batch size.
DEFAULT_CHUNK_SIZE = 16384


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64: half precision loses the neighbours."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def merge_topk(
    best_d: torch.Tensor | None,
    best_i: torch.Tensor | None,
    d: torch.Tensor,
    i: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one chunk's candidates into a running top-k (smallest distances first).

    Args:
        best_d: ``(B, k)`` running distances, or ``None`` before the first chunk.
        best_i: ``(B, k)`` their indices, or ``None``.
        d: ``(B, c)`` the chunk's candidate distances.
        i: ``(B, c)`` their indices.
        k: Number of neighbours kept.

    Returns:
        ``(distances, indices)``, both ``(B, min(k, ...))``.
    """
    if best_d is None or best_i is None:
        return d, i
    d = torch.cat([best_d, d], dim=1)
    i = torch.cat([best_i, i], dim=1)
    best_d, pos = d.topk(k, dim=1, largest=False)
    return best_d, i.gather(1, pos)


def knn_search(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    metric: str = "euclidean",
    bank_sq_norms: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bank_normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours, streaming the bank in chunks.

    Memory is bounded by one ``(B, chunk_size)`` block of distances; a running top-k is merged
    chunk by chunk, so the full ``(B, M)`` matrix is never built. The number of chunks depends
    on the bank alone, so the loop compiles into one graph that serves every batch size.

    The search runs in float32 (float64 if an input is float64) with autocast disabled: half
    precision overflows or confuses neighbours. Euclidean candidates come from one matrix product
    per chunk (``|q|^2 + |b|^2 - 2 q.b``); the k chosen distances are then recomputed directly.
    That expansion loses precision when the norms dwarf the distances: centre the data first
    (:class:`~selectorch.scores.KNNScore` stores its bank centred on its mean).

    Args:
        query: Query embeddings, shape ``(B, D)``.
        bank: Reference embeddings, shape ``(M, D)`` with ``M >= k``.
        k: Number of neighbours.
        metric: ``"euclidean"`` or ``"cosine"``.
        bank_sq_norms: Optional ``(M,)`` squared norms of the bank rows (euclidean only).
        chunk_size: Bank rows per chunk (at least ``k`` are used).
        bank_normalized: For cosine, whether ``bank`` rows already have unit norm
            (:func:`~selectorch.functional.distances.prepare_bank`); otherwise each chunk is
            normalised on the fly.

    Returns:
        ``(distances, indices)``, both ``(B, k)``, sorted by increasing distance; distances in
        the search dtype.

    Example:
        >>> bank = torch.tensor([[0.0], [1.0], [5.0]])
        >>> d, i = knn_search(torch.tensor([[0.9]]), bank, 2)
        >>> i.tolist()
        [[1, 0]]
    """
    check_choice("metric", metric, METRICS)
    n_bank = bank.shape[0]
    if not 1 <= k <= n_bank:
        raise ValueError(f"Expected argument `k` to be in [1, {n_bank}] (the bank size), got {k}.")
    check_int("chunk_size", chunk_size)
    dtype = _work_dtype(query, bank)
    with torch.autocast(query.device.type, enabled=False):
        return _search(
            query.to(dtype), bank, k, metric, bank_sq_norms, chunk_size, bank_normalized, dtype
        )


def _search(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    metric: str,
    bank_sq_norms: torch.Tensor | None,
    chunk_size: int,
    bank_normalized: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_bank = bank.shape[0]
    squared = metric == "euclidean"
    chunk = min(n_bank, max(k, chunk_size))
    best_d: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, n_bank, chunk):
        stop = min(start + chunk, n_bank)
        part = bank[start:stop].to(dtype)
        if metric == "cosine" and not bank_normalized:
            part = prepare_bank(part, metric)
        norms = None
        if squared:
            # stored norms in half precision lose too much (or overflow): recompute them
            low = bank_sq_norms is None or bank_sq_norms.dtype in (torch.float16, torch.bfloat16)
            norms = part.pow(2).sum(dim=1) if low else bank_sq_norms[start:stop]
            norms = norms.to(dtype)
        d = pairwise_distance(
            query, part, metric, squared=squared, bank_sq_norms=norms, bank_normalized=True
        )
        d, i = d.topk(min(k, stop - start), dim=1, largest=False)
        best_d, best_i = merge_topk(best_d, best_i, d, i + start, k)
    if squared:
        # recompute the k chosen distances directly (exact) and re-sort them
        diff = query.unsqueeze(1) - bank[best_i].to(dtype)
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

    Example:
        >>> knn_statistic(torch.tensor([[1.0, 2.0, 4.0, 9.0]]), "median").tolist()
        [3.0]
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
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    bank_normalized: bool = False,
) -> torch.Tensor:
    """kNN distance score: higher means farther from the reference bank.

    Args:
        query: ``(B, D)`` query embeddings.
        bank: ``(M, D)`` reference embeddings.
        k: Number of neighbours.
        metric: ``"euclidean"`` or ``"cosine"``.
        stat: How the ``k`` distances are aggregated; see :func:`knn_statistic`.
        bank_sq_norms: Optional ``(M,)`` squared norms of the bank rows.
        chunk_size: Bank rows per chunk.
        bank_normalized: For cosine, whether the bank rows already have unit norm.

    Returns:
        Tensor of shape ``(B,)``.

    Example:
        >>> knn_score(torch.zeros(1, 2), torch.tensor([[3.0, 4.0], [6.0, 8.0]]), 2).tolist()
        [10.0]
    """
    d, _ = knn_search(
        query,
        bank,
        k,
        metric=metric,
        bank_sq_norms=bank_sq_norms,
        chunk_size=chunk_size,
        bank_normalized=bank_normalized,
    )
    return knn_statistic(d, stat)
