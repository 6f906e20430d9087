"""Neighbour-based scores: local intrinsic dimensionality, trust score and DkNN nonconformity.

Every search is exact and chunked over the reference rows, so memory stays bounded by one block
of distances; the full queries x bank matrix is never built.
"""

from __future__ import annotations

import math

import torch

from selectorch._checks import check_int
from selectorch.functional.distances import stored_norms_usable
from selectorch.functional.knn import DEFAULT_CHUNK_SIZE, _work_dtype, knn_search
from selectorch.functional.outliers import inlier_rows, leave_one_out_knn_score


def lid_mle(distances: torch.Tensor) -> torch.Tensor:
    """Maximum-likelihood local intrinsic dimensionality from sorted neighbour distances.

    ``LID = -(mean_i log(r_i / r_k))^{-1}`` over the ``k`` distances ``r_1 <= ... <= r_k``
    (Ma et al. 2018, after Levina & Bickel 2005). Higher means the neighbourhood spreads out
    in more directions, as it does away from the data manifold.

    Zero distances are the estimator's limits, never NaN: a query that coincides with a
    reference row (``r_1 = 0``) gets ``log 0 = -inf`` in the mean, hence ``LID = 0``; if all
    ``k`` neighbours coincide with it (``r_k = 0``) the LID is also ``0``. If all ``k``
    distances are equal and positive the estimate is unbounded: ``+inf``.

    Args:
        distances: ``(N, k)`` distances sorted in increasing order, ``k >= 2``.

    Returns:
        ``(N,)`` LID estimates, in ``[0, +inf]``.

    Example:
        >>> lid_mle(torch.tensor([[1.0, 2.0, 4.0], [0.0, 1.0, 2.0]])).tolist()
        [1.4426950216293335, 0.0]
    """
    r_k = distances[:, -1:]
    ratio = torch.where(r_k > 0, distances / r_k.clamp_min(torch.finfo(distances.dtype).tiny), 1.0)
    mean_log = torch.log(ratio).mean(dim=1)  # <= 0; -inf where some r_i = 0 < r_k
    lid = -1.0 / mean_log.clamp_max(-torch.finfo(mean_log.dtype).tiny)
    lid = torch.where(mean_log < 0, lid, math.inf)
    # all k neighbours at distance 0: the query sits on a point mass, dimension 0
    return torch.where(r_k.squeeze(1) > 0, lid, 0.0)


def lid_score(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int = 20,
    *,
    bank_sq_norms: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """LID of each query from its ``k`` nearest (Euclidean) reference rows; see :func:`lid_mle`.

    Args:
        query: ``(B, D)`` query embeddings.
        bank: ``(M, D)`` reference embeddings, ``M >= k``.
        k: Number of neighbours, at least 2.
        bank_sq_norms: Optional ``(M,)`` squared norms of the bank rows.
        chunk_size: Bank rows per chunk of the search.

    Returns:
        ``(B,)`` LID estimates.

    Example:
        >>> bank = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-4.0, 0.0]])
        >>> lid_score(torch.zeros(1, 2), bank, k=3).tolist()
        [1.4426950216293335]
    """
    if check_int("k", k) < 2:
        raise ValueError(
            f"Expected argument `k` to be at least 2 (LID compares distances), got {k}."
        )
    d, _ = knn_search(query, bank, k, bank_sq_norms=bank_sq_norms, chunk_size=chunk_size)
    return lid_mle(d)


def density_filter(X: torch.Tensor, y: torch.Tensor, k: int, alpha: float) -> torch.Tensor:
    """Rows kept by the trust score's density filter (Jiang et al. 2018), class by class.

    Within each class, the radius of a row is its Euclidean distance to its ``k``-th nearest
    *other* row of the class; the ``floor(alpha * n_c)`` rows with the largest radius (lowest
    density) are dropped, ties dropping the later row. ``alpha = 0`` keeps every row.

    Args:
        X: ``(N, D)`` reference embeddings.
        y: ``(N,)`` integer classes; each class filtered needs at least ``k + 1`` rows.
        k: Neighbours of the radius.
        alpha: Fraction in ``[0, 1)`` dropped per class.

    Returns:
        ``(N',)`` increasing indices of the kept rows.

    Example:
        >>> X = torch.tensor([[0.0], [0.1], [0.2], [9.0], [5.0], [5.1], [5.2], [5.3]])
        >>> density_filter(X, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 1, 0.25).tolist()
        [0, 1, 2, 4, 5, 6]
    """
    if alpha == 0:
        return torch.arange(X.shape[0], device=X.device)
    kept = []
    for c in torch.unique(y).tolist():
        rows = (y == c).nonzero().flatten()
        radius = leave_one_out_knn_score(X[rows], k, stat="max")
        kept.append(rows[inlier_rows(radius, alpha)])
    return torch.cat(kept).sort().values


def class_nearest_search(
    query: torch.Tensor,
    banks: torch.Tensor,
    *,
    bank_sq_norms: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distance from each query to the nearest row of every class, chunked.

    Each step takes ``max(1, chunk_size // C)`` rows of every class bank, one matrix product
    gives a ``(B, C, rows)`` block of squared distances (``|q|^2 + |b|^2 - 2 q.b``), and its
    minimum over the rows is merged into the running ``(B, C)`` minimum. Memory is one such
    block; the number of steps depends on the banks alone, so the loop compiles into one graph.

    Args:
        query: ``(B, D)`` queries, in the space of the banks.
        banks: ``(C, M_max, D)`` class banks padded with ``+inf`` rows
            (:func:`~selectorch.functional.class_banks`).
        bank_sq_norms: Optional ``(C, M_max)`` squared row norms of ``banks``.
        chunk_size: About how many bank rows (over all classes) each step compares.

    Returns:
        ``(distances, positions)``, both ``(B, C)``: the distance to the nearest row of each
        class (from the expansion above, so within rounding of the exact one; ``+inf`` for a
        class without rows) and that row's position in ``banks[c]``.

    Example:
        >>> from selectorch.functional import class_banks
        >>> banks = class_banks(torch.tensor([[0.0], [3.0], [10.0]]), torch.tensor([0, 0, 1]))
        >>> d, i = class_nearest_search(torch.tensor([[4.0]]), banks)
        >>> d.tolist(), i.tolist()
        ([[1.0, 6.0]], [[1, 0]])
    """
    check_int("chunk_size", chunk_size)
    n_classes, m_max, dim = banks.shape
    dtype = _work_dtype(query, banks)
    with torch.autocast(query.device.type, enabled=False):
        q = query.to(dtype)
        q_sq = q.pow(2).sum(dim=1, keepdim=True)
        step = max(1, chunk_size // n_classes)
        best = torch.full((q.shape[0], n_classes), math.inf, dtype=dtype, device=q.device)
        position = torch.zeros(q.shape[0], n_classes, dtype=torch.long, device=q.device)
        recompute = not stored_norms_usable(bank_sq_norms)
        for start in range(0, m_max, step):
            stop = min(start + step, m_max)
            block = banks[:, start:stop].to(dtype)  # (C, c, D)
            valid = torch.isfinite(block[..., 0])  # padding rows are +inf
            block = torch.where(valid[..., None], block, 0.0)
            norms = block.pow(2).sum(dim=2) if recompute else bank_sq_norms[:, start:stop].to(dtype)
            sq = q_sq - 2.0 * (q @ block.reshape(-1, dim).T) + norms.reshape(1, -1)
            sq = sq.view(q.shape[0], n_classes, stop - start).clamp_min(0.0)
            sq = torch.where(valid, sq, math.inf)
            nearest, pos = sq.min(dim=2)
            better = nearest < best
            best = torch.where(better, nearest, best)
            position = torch.where(better, pos + start, position)
        return best.sqrt(), position


def trust_ratio(d_pred: torch.Tensor, d_other: torch.Tensor) -> torch.Tensor:
    """Inverse trust score ``d_pred / d_other``, with its limits where a distance is zero.

    ``d_other = 0 < d_pred`` gives ``+inf``; both zero (a query on rows of both classes)
    gives ``1``; ``d_pred = +inf`` (a class without reference rows) gives ``+inf``.

    Example:
        >>> trust_ratio(torch.tensor([1.0, 0.0, 0.0, 2.0]), torch.tensor([4.0, 3.0, 0.0, 0.0]))
        tensor([0.2500, 0.0000, 1.0000,    inf])
    """
    ratio = d_pred / d_other
    ratio = torch.where((d_pred == 0) & (d_other == 0), 1.0, ratio)
    return torch.where(torch.isnan(ratio), math.inf, ratio)


def trust_score(
    query: torch.Tensor,
    banks: torch.Tensor,
    preds: torch.Tensor | None = None,
    *,
    bank_sq_norms: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """Inverse trust score (Jiang et al. 2018): distance to the predicted class over the nearest
    other class.

    ``d(x, nearest row of class preds) / min_{c != preds} d(x, nearest row of class c)``; higher
    means less trustworthy (the paper's trust score is its reciprocal). The two distances used
    are recomputed directly from the chosen rows, so a query equal to a reference row has an
    exact 0. A class in ``preds`` outside ``[0, C)`` scores ``+inf``.

    Args:
        query: ``(B, D)`` queries, in the space of the banks.
        banks: ``(C, M_max, D)`` class banks padded with ``+inf`` rows, ``C >= 2``.
        preds: ``(B,)`` predicted classes; ``None`` uses the class of the nearest row (the
            score is then the nearest over the second-nearest class distance, in ``[0, 1]``).
        bank_sq_norms: Optional ``(C, M_max)`` squared row norms of ``banks``.
        chunk_size: About how many bank rows each step compares.

    Returns:
        ``(B,)`` scores; see :func:`trust_ratio` for zero distances.

    Example:
        >>> from selectorch.functional import class_banks
        >>> banks = class_banks(torch.tensor([[0.0], [3.0], [10.0]]), torch.tensor([0, 0, 1]))
        >>> trust_score(torch.tensor([[4.0], [4.0]]), banks, torch.tensor([0, 1])).tolist()
        [0.1666666716337204, 6.0]
    """
    n_classes = banks.shape[0]
    if n_classes < 2:
        raise ValueError(
            f"Expected argument `banks` to hold at least 2 classes (the trust score compares "
            f"classes), got {n_classes}."
        )
    d, pos = class_nearest_search(query, banks, bank_sq_norms=bank_sq_norms, chunk_size=chunk_size)
    if preds is None:
        pred = d.argmin(dim=1)
        known = torch.ones_like(pred, dtype=torch.bool)
    else:
        known = (preds >= 0) & (preds < n_classes)
        pred = preds.long().clamp(0, n_classes - 1)
    other = d.scatter(1, pred[:, None], math.inf).argmin(dim=1)
    q = query.to(d.dtype)

    def exact(cls: torch.Tensor) -> torch.Tensor:
        row = banks[cls, pos.gather(1, cls[:, None]).squeeze(1)].to(d.dtype)
        return (q - row).pow(2).sum(dim=1).sqrt()  # a padding row (+inf) gives +inf

    return torch.where(known, trust_ratio(exact(pred), exact(other)), math.inf)


def dknn_nonconformity(neighbour_labels: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Fraction of neighbours whose label differs from the class (Papernot & McDaniel 2018).

    Args:
        neighbour_labels: ``(B, n)`` labels of the neighbours found in all layers together
            (``n = L * k``).
        classes: ``(B,)`` class whose nonconformity is measured (the predicted one).

    Returns:
        ``(B,)`` values in ``[0, 1]``: the paper's count ``alpha`` divided by ``n``.

    Example:
        >>> dknn_nonconformity(torch.tensor([[1, 1, 2, 0]]), torch.tensor([1])).tolist()
        [0.5]
    """
    differ = neighbour_labels != classes.to(neighbour_labels.dtype)[:, None]
    return differ.float().mean(dim=1)


def dknn_score(
    queries: list[torch.Tensor],
    banks: list[torch.Tensor],
    labels: torch.Tensor,
    classes: torch.Tensor,
    k: int = 75,
    *,
    bank_sq_norms: list[torch.Tensor] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> torch.Tensor:
    """DkNN nonconformity of ``classes`` from the ``k`` nearest rows in each of ``L`` layers.

    Args:
        queries: ``L`` tensors ``(B, D_l)``, the queries' features in each layer.
        banks: ``L`` tensors ``(M, D_l)``, the same ``M`` reference rows in each layer.
        labels: ``(M,)`` integer labels of the reference rows.
        classes: ``(B,)`` class of each query (the model's prediction).
        k: Neighbours per layer, ``1 <= k <= M``.
        bank_sq_norms: Optional ``L`` tensors ``(M,)`` of squared bank row norms.
        chunk_size: Bank rows per chunk of each search.

    Returns:
        ``(B,)`` fraction of the ``L * k`` neighbours whose label differs from ``classes``.

    Example:
        >>> bank = torch.tensor([[0.0], [1.0], [9.0]])
        >>> labels = torch.tensor([0, 0, 1])
        >>> query = torch.tensor([[8.0]])
        >>> dknn_score([query, query], [bank, bank], labels, torch.tensor([1]), 2).tolist()
        [0.5]
    """
    if len(queries) != len(banks):
        raise ValueError(
            f"Expected as many banks as query layers, got {len(banks)} banks for "
            f"{len(queries)} layers."
        )
    found = []
    for layer, (query, bank) in enumerate(zip(queries, banks, strict=True)):
        norms = None if bank_sq_norms is None else bank_sq_norms[layer]
        _, index = knn_search(query, bank, k, bank_sq_norms=norms, chunk_size=chunk_size)
        found.append(labels[index])
    return dknn_nonconformity(torch.cat(found, dim=1), classes)
