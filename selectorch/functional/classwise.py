"""Class-wise kNN: each query is searched against the reference rows of its own class only."""

from __future__ import annotations

import torch

from selectorch._checks import check_choice, check_int
from selectorch.functional.distances import (
    METRICS,
    normalize_rows,
    pairwise_distance,
    sorted_euclidean,
    stored_norms_usable,
)
from selectorch.functional.knn import _work_dtype, knn_statistic, merge_topk

#: Rows of a class bank searched per step: memory is one gathered ``(B, chunk, D)`` block.
DEFAULT_CLASS_CHUNK_SIZE = 256


def class_banks(X: torch.Tensor, y: torch.Tensor, num_classes: int | None = None) -> torch.Tensor:
    """Pad the rows of each class into one ``(C, M_max, D)`` tensor; padding rows are ``+inf``.

    Args:
        X: ``(N, D)`` reference embeddings.
        y: ``(N,)`` integer classes in ``[0, C)``.
        num_classes: ``C``; ``y.max() + 1`` if ``None``.

    Returns:
        ``(C, M_max, D)``: class ``c``'s rows, in their order in ``X``, fill ``[c, :n_c]``;
        ``M_max`` is the size of the largest class.

    Example:
        >>> banks = class_banks(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1, 0, 1]))
        >>> banks[:, :, 0].tolist()
        [[2.0, inf], [1.0, 3.0]]
    """
    y = y.long()
    n_classes = int(y.max()) + 1 if num_classes is None else num_classes
    counts = torch.bincount(y, minlength=n_classes)
    m_max = max(int(counts.max()), 1)
    order = torch.sort(y, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(y.shape[0], device=y.device) - starts[y[order]]
    banks = torch.full((n_classes, m_max, X.shape[1]), float("inf"), dtype=X.dtype, device=X.device)
    banks[y[order], position] = X[order]
    return banks


def nearest_class(
    query: torch.Tensor, means: torch.Tensor, metric: str = "euclidean"
) -> torch.Tensor:
    """``(B,)`` index of the class mean nearest to each query (``O(B C D)``, no bank search).

    Example:
        >>> nearest_class(torch.tensor([[0.9]]), torch.tensor([[0.0], [1.0]])).tolist()
        [1]
    """
    return pairwise_distance(query, means.to(query.dtype), metric).argmin(dim=1)


def classwise_knn_search(
    query: torch.Tensor,
    banks: torch.Tensor,
    classes: torch.Tensor,
    k: int,
    *,
    metric: str = "euclidean",
    bank_sq_norms: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CLASS_CHUNK_SIZE,
    bank_normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours of each query among the rows of its own class.

    Query ``b`` is compared with ``banks[classes[b]]`` only: each step gathers a
    ``(B, chunk, D)`` block of the queries' own class banks and takes one batched matrix
    product, keeping a running top-k. Work is ``O(B M_max D)``, not ``O(B C M_max D)`` as a
    search of the whole bank (masked or not) would be; memory is the gathered block (plus
    ``(B, chunk)`` distances), so ``chunk_size`` trades memory for the number of steps. Padding
    rows (``+inf``, see :func:`class_banks`) are never chosen while a class holds ``k`` rows.
    A class outside ``[0, C)`` gets distances ``+inf`` (fail closed; its positions mean nothing).

    Everything runs with static shapes and no branch on values, so it compiles into one graph.
    Search dtype and autocast handling are those of :func:`~selectorch.functional.knn_search`;
    Euclidean candidates come from ``|q|^2 + |b|^2 - 2 q.b`` and the chosen ``k`` distances are
    recomputed directly.

    Args:
        query: ``(B, D)`` query embeddings.
        banks: ``(C, M_max, D)`` class banks from :func:`class_banks`.
        classes: ``(B,)`` integer class of each query (e.g. the model's prediction).
        k: Number of neighbours, ``1 <= k <= M_max``.
        metric: ``"euclidean"`` or ``"cosine"``.
        bank_sq_norms: Optional ``(C, M_max)`` squared row norms of ``banks`` (euclidean).
        chunk_size: Class-bank rows per step (at least ``k`` are used).
        bank_normalized: For cosine, whether bank rows already have unit norm.

    Returns:
        ``(distances, positions)``, both ``(B, k)``, sorted by increasing distance;
        ``positions`` index the rows of ``banks[classes[b]]``.

    Example:
        >>> banks = class_banks(torch.tensor([[0.0], [10.0], [1.0]]), torch.tensor([0, 1, 0]))
        >>> query, classes = torch.tensor([[9.0], [9.0]]), torch.tensor([0, 1])
        >>> d, i = classwise_knn_search(query, banks, classes, 1)
        >>> d.tolist(), i.tolist()
        ([[8.0], [1.0]], [[1], [0]])
    """
    check_choice("metric", metric, METRICS)
    check_int("chunk_size", chunk_size)
    n_classes, m_max, _ = banks.shape
    if not 1 <= k <= m_max:
        raise ValueError(
            f"Expected argument `k` to be in [1, {m_max}] (the largest class bank), got {k}."
        )
    if classes.ndim != 1 or classes.shape[0] != query.shape[0]:
        raise ValueError(
            f"Expected argument `classes` to have shape ({query.shape[0]},) like the queries, "
            f"got {tuple(classes.shape)}."
        )
    dtype = _work_dtype(query, banks)
    with torch.autocast(query.device.type, enabled=False):
        return _search(
            query.to(dtype),
            banks,
            classes,
            k,
            metric,
            bank_sq_norms,
            chunk_size,
            bank_normalized,
            dtype,
        )


def _search(
    query: torch.Tensor,
    banks: torch.Tensor,
    classes: torch.Tensor,
    k: int,
    metric: str,
    bank_sq_norms: torch.Tensor | None,
    chunk_size: int,
    bank_normalized: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    n_classes, m_max, _ = banks.shape
    known = (classes >= 0) & (classes < n_classes)
    cls = classes.long().clamp(0, n_classes - 1)
    euclidean = metric == "euclidean"
    q = query if euclidean else normalize_rows(query)
    q_sq = q.pow(2).sum(dim=1, keepdim=True)
    inf = float("inf")
    chunk = min(m_max, max(k, chunk_size))
    best_d: torch.Tensor | None = None
    best_i: torch.Tensor | None = None
    for start in range(0, m_max, chunk):
        stop = min(start + chunk, m_max)
        block = banks[cls, start:stop].to(dtype)  # (B, c, D): the queries' own class rows
        valid = torch.isfinite(block[..., 0])  # padding rows are +inf
        if not euclidean and not bank_normalized:
            block = normalize_rows(block)
        dot = torch.bmm(block, q.unsqueeze(2)).squeeze(2)  # (B, c)
        if euclidean:
            norms = (
                bank_sq_norms[cls, start:stop].to(dtype)
                if stored_norms_usable(bank_sq_norms)
                else block.pow(2).sum(dim=2)
            )
            d = (q_sq + norms - 2.0 * dot).clamp_min(0.0)
        else:
            d = 1.0 - dot
        d = torch.where(valid, d, inf)
        d, i = d.topk(min(k, stop - start), dim=1, largest=False)
        best_d, best_i = merge_topk(best_d, best_i, d, i + start, k)
    assert best_d is not None and best_i is not None  # m_max >= 1: the loop ran
    if euclidean:
        # recompute the k chosen distances directly (exact) and re-sort them
        best_d, best_i = sorted_euclidean(q, banks[cls[:, None], best_i].to(dtype), best_i)
    best_d = torch.where(known[:, None], best_d, inf)
    return best_d, best_i


def classwise_knn_score(
    query: torch.Tensor,
    banks: torch.Tensor,
    classes: torch.Tensor,
    k: int = 1,
    *,
    metric: str = "euclidean",
    stat: str = "max",
    bank_sq_norms: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CLASS_CHUNK_SIZE,
    bank_normalized: bool = False,
) -> torch.Tensor:
    """Class-wise kNN score: distance of each query to its own class's reference rows.

    Args:
        query: ``(B, D)`` query embeddings.
        banks: ``(C, M_max, D)`` class banks from :func:`class_banks`.
        classes: ``(B,)`` class of each query; outside ``[0, C)`` the score is ``+inf``.
        k: Number of neighbours.
        metric: ``"euclidean"`` or ``"cosine"``.
        stat: How the ``k`` distances are aggregated; see
            :func:`~selectorch.functional.knn_statistic`.
        bank_sq_norms: Optional ``(C, M_max)`` squared row norms of ``banks``.
        chunk_size: Class-bank rows per step.
        bank_normalized: For cosine, whether bank rows already have unit norm.

    Returns:
        ``(B,)`` scores.

    Example:
        >>> banks = class_banks(torch.tensor([[0.0], [10.0]]), torch.tensor([0, 1]))
        >>> classwise_knn_score(torch.tensor([[9.0]]), banks, torch.tensor([0])).tolist()
        [9.0]
    """
    d, _ = classwise_knn_search(
        query,
        banks,
        classes,
        k,
        metric=metric,
        bank_sq_norms=bank_sq_norms,
        chunk_size=chunk_size,
        bank_normalized=bank_normalized,
    )
    return knn_statistic(d, stat)
