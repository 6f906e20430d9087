"""Distances between query rows and reference rows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from selectorch._checks import check_choice

METRICS = ("euclidean", "cosine")


#: Values per step of the row-wise passes over a whole bank (the norms of
#: :func:`~selectorch.functional.knn.row_sq_norms`, finiteness checks, bfloat16 rounding
#: norms): their temporaries stay a few MiB, whatever the bank's size.
ROW_PASS_ELEMENTS = 1 << 20


def pass_rows(x: torch.Tensor) -> int:
    """Rows of ``x`` per step of a row-wise pass (:data:`ROW_PASS_ELEMENTS` values)."""
    return max(1, ROW_PASS_ELEMENTS // max(1, math.prod(x.shape[1:])))


def normalize_rows(x: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``F.normalize`` along the last dimension, with a floor the dtype can hold.

    ``F.normalize``'s default floor ``1e-12`` underflows to zero in float16, so an all-zero
    row became ``0 / 0 = NaN`` there (a zero vector in every other dtype). The floor here is
    the larger of ``1e-12`` and the dtype's smallest positive (subnormal) number: the same
    result in float32, bfloat16 and float64; in float16 a zero row stays zero and every other
    row, whose norm is at least that number, still gets unit norm.

    Args:
        x: Rows to normalise, shape ``(..., D)``.
        out: Optional output tensor (``x`` itself to normalise in place).

    Returns:
        Tensor of ``x``'s shape and dtype with unit-norm (or zero) rows.
    """
    info = torch.finfo(x.dtype)
    eps = max(1e-12, info.tiny * info.eps)  # float16: 2**-24
    return F.normalize(x, dim=-1, eps=eps, out=out)


def prepare_bank(bank: torch.Tensor, metric: str, *, inplace: bool = False) -> torch.Tensor:
    """Return the form in which a reference bank is stored for ``metric``.

    Cosine banks are stored L2-normalised so that a query needs one matrix product.

    Args:
        bank: Reference embeddings, shape ``(M, D)``.
        metric: ``"euclidean"`` or ``"cosine"``.
        inplace: Normalise ``bank`` itself (no second bank in memory).

    Returns:
        Tensor of shape ``(M, D)``.
    """
    if metric != "cosine":
        return bank
    return normalize_rows(bank, out=bank if inplace else None)


def pairwise_distance(
    query: torch.Tensor,
    bank: torch.Tensor,
    metric: str = "euclidean",
    *,
    squared: bool = False,
    bank_sq_norms: torch.Tensor | None = None,
    bank_normalized: bool = False,
) -> torch.Tensor:
    """Distances between every query row and every bank row.

    Euclidean distances use ``|q|^2 + |b|^2 - 2 q.b`` (one matrix product), clamped at zero.
    Cosine distance is ``1 - cos(q, b)``.

    Args:
        query: Query embeddings, shape ``(B, D)``.
        bank: Reference embeddings, shape ``(M, D)``.
        metric: ``"euclidean"`` or ``"cosine"``.
        squared: For euclidean, return squared distances (cheaper, same order).
        bank_sq_norms: Optional precomputed ``(M,)`` squared norms of ``bank`` (euclidean only;
            used when float32 or float64, see :func:`stored_norms_usable`).
        bank_normalized: For cosine, whether ``bank`` rows already have unit norm (as
            :func:`prepare_bank` leaves them); otherwise they are normalised here.

    Returns:
        Tensor of shape ``(B, M)``.

    Example:
        >>> d = pairwise_distance(torch.zeros(1, 2), torch.tensor([[3.0, 4.0]]))
        >>> d.item()
        5.0
    """
    check_choice("metric", metric, METRICS)
    if metric == "cosine":
        bank = bank if bank_normalized else normalize_rows(bank)
        return 1.0 - normalize_rows(query) @ bank.T
    if not stored_norms_usable(bank_sq_norms):
        bank_sq_norms = bank.pow(2).sum(dim=1)
    sq = (query.pow(2).sum(dim=1, keepdim=True) + bank_sq_norms) - 2.0 * (query @ bank.T)
    sq = sq.clamp_min(0.0)
    return sq if squared else sq.sqrt()


def stored_norms_usable(bank_sq_norms: torch.Tensor | None) -> bool:
    """Whether stored squared row norms can stand in for recomputed ones.

    Only float32 or float64 norms are used: half-precision norms lose too much (or overflow),
    so the searches recompute those from the rows.
    """
    return bank_sq_norms is not None and bank_sq_norms.dtype in (torch.float32, torch.float64)


def chunk_sq_norms(
    part: torch.Tensor, bank_sq_norms: torch.Tensor | None, start: int, dtype: torch.dtype
) -> torch.Tensor:
    """Squared norms of one bank chunk in the search dtype.

    Stored norms in half precision lose too much (or overflow): they are recomputed.

    Args:
        part: ``(c, D)`` the chunk's rows, already in ``dtype``.
        bank_sq_norms: ``(M,)`` stored squared norms of the whole bank, or ``None``.
        start: Index of the chunk's first row in the bank.
        dtype: The search dtype.

    Returns:
        Tensor of shape ``(c,)``.

    Example:
        >>> chunk_sq_norms(torch.tensor([[3.0, 4.0]]), None, 0, torch.float32).tolist()
        [25.0]
    """
    if not stored_norms_usable(bank_sq_norms):
        return part.pow(2).sum(dim=1)
    return bank_sq_norms[start : start + part.shape[0]].to(dtype)


def sorted_euclidean(
    query: torch.Tensor, rows: torch.Tensor, indices: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Euclidean distances of each query to its chosen rows, sorted increasing.

    The last step of every exact search: candidates chosen from expanded products get their
    distances recomputed directly, so the result does not depend on how they were found.

    Args:
        query: ``(B, D)`` queries.
        rows: ``(B, k, D)`` each query's chosen rows.
        indices: ``(B, k)`` their indices, in the same order.

    Returns:
        ``(distances, indices)``, both ``(B, k)``, sorted by increasing distance.

    Example:
        >>> rows = torch.tensor([[[3.0, 4.0], [1.0, 0.0]]])
        >>> sorted_euclidean(torch.zeros(1, 2), rows, torch.tensor([[7, 9]]))[1].tolist()
        [[9, 7]]
    """
    distances, order = (query.unsqueeze(1) - rows).pow(2).sum(dim=-1).sqrt().sort(dim=1)
    return distances, indices.gather(1, order)
