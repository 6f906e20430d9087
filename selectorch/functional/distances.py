"""Distances between query rows and reference rows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selectorch._checks import check_choice

METRICS = ("euclidean", "cosine")


def prepare_bank(bank: torch.Tensor, metric: str) -> torch.Tensor:
    """Return the form in which a reference bank is stored for ``metric``.

    Cosine banks are stored L2-normalised so that a query needs one matrix product.

    Args:
        bank: Reference embeddings, shape ``(M, D)``.
        metric: ``"euclidean"`` or ``"cosine"``.

    Returns:
        Tensor of shape ``(M, D)``.
    """
    return F.normalize(bank, dim=1) if metric == "cosine" else bank


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
        bank_sq_norms: Optional precomputed ``(M,)`` squared norms of ``bank`` (euclidean only).
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
        bank = bank if bank_normalized else F.normalize(bank, dim=1)
        return 1.0 - F.normalize(query, dim=1) @ bank.T
    if bank_sq_norms is None:
        bank_sq_norms = bank.pow(2).sum(dim=1)
    sq = (query.pow(2).sum(dim=1, keepdim=True) + bank_sq_norms) - 2.0 * (query @ bank.T)
    sq = sq.clamp_min(0.0)
    return sq if squared else sq.sqrt()


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
    low = bank_sq_norms is None or bank_sq_norms.dtype in (torch.float16, torch.bfloat16)
    if low:
        return part.pow(2).sum(dim=1)
    return bank_sq_norms[start : start + part.shape[0]].to(dtype)
