"""Exact k-nearest-neighbour search on the bank's device, and kNN scores."""

from __future__ import annotations

import torch

from selectorch._checks import check_choice, check_int
from selectorch.functional.distances import (
    METRICS,
    chunk_sq_norms,
    pairwise_distance,
    pass_rows,
    prepare_bank,
    sorted_euclidean,
    stored_norms_usable,
)
from selectorch.functional.knn_cpu import search_cpu as _search_cpu
from selectorch.functional.topk import merge_topk

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "STATS",
    "knn_score",
    "knn_search",
    "knn_statistic",
    "merge_topk",
    "row_sq_norms",
]

STATS = ("max", "mean", "median", "min")

#: Bank rows per chunk: one ``(B, chunk)`` block of distances at a time. It depends on the bank
#: alone, never on the batch size, so a compiled graph serves every batch size.
DEFAULT_CHUNK_SIZE = 16384
#: Banks with at least this many rows are searched by the blocked CPU path in eager mode
#: (:func:`_search_cpu`); smaller ones, compiled code and other devices take :func:`_search`.
CPU_BLOCKED_MIN_ROWS = 4096


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64: half precision loses the neighbours."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


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
        bank_sq_norms: Optional ``(M,)`` squared norms of the bank rows: euclidean distances
            use them; for any metric, float32/64 norms spare the CPU path a finiteness pass
            over the whole bank.
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
    args = (query.to(dtype), bank, k, metric, bank_sq_norms, chunk_size, bank_normalized, dtype)
    with torch.autocast(query.device.type, enabled=False):
        if _use_cpu_blocked(query, bank, bank_sq_norms):
            return _search_cpu(*args)
        return _search(*args)


def _use_cpu_blocked(
    query: torch.Tensor, bank: torch.Tensor, bank_sq_norms: torch.Tensor | None
) -> bool:
    """Whether the blocked CPU path serves this search: eager mode, CPU, a large finite bank.

    Under ``torch.compile`` the plain loop is traced (one graph for every batch size). A bank
    row holding NaN or Inf would hide its group's other rows from the group minima of
    :func:`~selectorch.functional.topk.chunk_topk`, so such banks take the plain path (where
    those rows rank last). A row that is not finite has a norm that is not finite (whatever
    the metric), so stored float norms are checked instead of the whole bank when there are
    some.
    """
    if torch.compiler.is_compiling() or query.device.type != "cpu" or bank.device.type != "cpu":
        return False
    if bank.shape[0] < CPU_BLOCKED_MIN_ROWS or query.shape[0] == 0:
        return False
    if stored_norms_usable(bank_sq_norms):
        return bool(torch.isfinite(bank_sq_norms).all())
    # step by step: torch.isfinite of a whole bank allocates more than the bank again
    step = pass_rows(bank)
    return all(
        bool(torch.isfinite(bank[start : start + step]).all())
        for start in range(0, bank.shape[0], step)
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
        norms = chunk_sq_norms(part, bank_sq_norms, start, dtype) if squared else None
        d = pairwise_distance(
            query, part, metric, squared=squared, bank_sq_norms=norms, bank_normalized=True
        )
        d, i = d.topk(min(k, stop - start), dim=1, largest=False)
        best_d, best_i = merge_topk(best_d, best_i, d, i + start, k)
    if squared:
        # recompute the k chosen distances directly (exact) and re-sort them
        best_d, best_i = sorted_euclidean(query, bank[best_i].to(dtype), best_i)
    return best_d, best_i


def row_sq_norms(
    x: torch.Tensor, dtype: torch.dtype | None = None, rows: int | None = None
) -> torch.Tensor:
    """Squared L2 norm of every row, ``rows`` rows at a time.

    The same values as ``x.to(dtype).pow(2).sum(dim=1)``, without its ``(M, D)`` temporary: at
    most ``rows x D`` extra values exist at once (a bank's norms at fit cost no second bank).

    Args:
        x: ``(M, D)`` rows.
        dtype: Dtype of the computation and of the result; ``x``'s own when ``None``.
        rows: Rows per step; ``None`` keeps each step near
            :data:`~selectorch.functional.distances.ROW_PASS_ELEMENTS` values.

    Returns:
        Tensor of shape ``(M,)``.

    Example:
        >>> row_sq_norms(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), rows=1).tolist()
        [25.0, 1.0]
    """
    dtype = x.dtype if dtype is None else dtype
    rows = pass_rows(x) if rows is None else rows
    out = torch.empty(x.shape[0], dtype=dtype, device=x.device)
    for start in range(0, x.shape[0], rows):
        out[start : start + rows] = x[start : start + rows].to(dtype).pow(2).sum(dim=1)
    return out


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
