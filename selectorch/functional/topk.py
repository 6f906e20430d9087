"""Top-k selection helpers of the exact kNN searches: merging running results, grouped selection."""

from __future__ import annotations

import torch


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


def group_width(width: int, k: int) -> int:
    """Columns per group for :func:`chunk_topk`, or 0 where plain ``topk`` is as cheap.

    A power of two near ``sqrt(width / k)`` balances the two selections (over ``width / g``
    group minima, then over ``k * g`` candidates); at least ``4 * k`` groups are required.
    """
    g = 8
    while g < 256 and 4 * g * g * k < width:  # stop near g = sqrt(width / k)
        g *= 2
    return g if width // g >= 4 * k else 0


def chunk_topk(d: torch.Tensor, k: int, largest: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest (or largest) values of each row of a block, read in two cheap passes.

    The columns are cut into groups of ``g``; the ``k`` groups with the smallest minima hold
    ``k`` smallest values of the row (a value outside them has ``k`` group minima at or below
    it), so a ``topk`` over those ``k * g`` candidates is exact. Only the order among equal
    values can differ from ``d.topk``. Columns past the last whole group are searched apart.

    Args:
        d: ``(B, c)`` finite values (or NaN rows, which stay NaN).
        k: Number kept, ``1 <= k <= c``.
        largest: Keep the largest values (group maxima) instead.

    Returns:
        ``(values, columns)``, both ``(B, k)``, values sorted increasing (decreasing if
        ``largest``).
    """
    rows, width = d.shape
    g = group_width(width, k)
    if not g:
        return d.topk(k, dim=1, largest=largest)
    whole = width - width % g
    groups = d[:, :whole].view(rows, whole // g, g)
    best = groups.amax(dim=2) if largest else groups.amin(dim=2)
    # groups in column order, so the candidates keep the order of the row
    chosen = best.topk(k, dim=1, largest=largest).indices.sort(dim=1).values
    candidates = groups.gather(1, chosen.unsqueeze(2).expand(rows, k, g)).view(rows, k * g)
    values, pos = candidates.topk(k, dim=1, largest=largest)
    columns = chosen.gather(1, pos.div(g, rounding_mode="floor")) * g + pos.remainder(g)
    if whole < width:
        tail_d, tail_i = d[:, whole:].topk(min(k, width - whole), dim=1, largest=largest)
        if largest:  # merge_topk keeps the smallest
            values, columns = merge_topk(-values, columns, -tail_d, tail_i + whole, k)
            return -values, columns
        values, columns = merge_topk(values, columns, tail_d, tail_i + whole, k)
    return values, columns
