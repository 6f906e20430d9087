"""A certified bfloat16 pre-selection for the eager CPU kNN search: a faster product, exact results.

On CPUs that multiply bfloat16 natively (AVX512-BF16, AMX), oneDNN's bfloat16 product runs
about twice as fast as its float32 one (``benchmarks/RESULTS.md``). Its rounding is bounded for
every pair of a query and a bank row, so the rows it could have ranked wrongly are known: every
row that can still be among the ``k`` nearest is kept, and those few are ranked again by their
float32 distances. The result is the exact search's, not an approximation. Where the bound is
too loose to decide (many rows at nearly the same distance, a query with NaN), the query is
reported as undecided and the caller searches it in float32.

The bound. The search ranks rows by ``y = q.b - c`` (euclidean: ``c = |b|^2 / 2``, so that
``|q - b|^2 = |q|^2 - 2 y``; cosine: ``c = 0`` on unit rows); larger is nearer. With ``q~``, ``b~``
the bfloat16 roundings and ``r_q = q - q~``, ``r_b = b - b~`` (both exact in float32), the
computed value ``y~`` (exact products of bfloat16 values summed in float32 with the float32
bias, then rounded to bfloat16) differs from ``y`` by at most::

    e(y~) = |q~| |r_b| + |r_q| |b~| + |r_q| |r_b|     input rounding (Cauchy-Schwarz)
          + g (|q~| |b~| + 2 |c|) + t                  float32 sums and the float32 bias:
                                                       g = (D + 2) 2^-24 / (1 - ...), t for the
                                                       denormals flushed to zero
          + u |y~|                                     output rounding, u = 2^-7

with the norms of a bank chunk replaced by their maxima over the chunk (``u = 2^-7`` is twice
round-to-nearest's bound, so any faithful rounding is covered; the whole bound is inflated by a
relative ``2^-10`` for the rounding of its own terms). Per query, the search keeps the
``keep`` rows with the largest upper bounds ``y~ + e(y~)`` and the largest upper bound ``U`` of
every row it let go. ``T``, the ``k``-th largest lower bound ``y~ - e(y~)`` of the kept rows,
is at most the true ``k``-th largest ``y`` (those are ``k`` distinct rows), so a row whose
upper bound is below ``T`` cannot be among the ``k`` nearest. When ``U < T``, every row left out
is such a row, and the kept rows whose upper bound is at least ``T`` hold the exact answer.

Euclidean searches of a bank far from the origin first subtract a common vector from queries and
bank (distances do not change; the bound, which grows with the norms, tightens); the float32
rounding of that shift adds ``2^-22 (|q~| + |r_q| + |b~| + |r_b|)^2`` to the bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from selectorch.functional.distances import (
    chunk_sq_norms,
    pass_rows,
    prepare_bank,
    sorted_euclidean,
    stored_norms_usable,
)

#: Relative bound on the rounding of a bfloat16 output (round-to-nearest gives ``2**-8``).
OUTPUT_ROUNDING = 2.0**-7
#: Relative margin on the bound for the rounding of its own terms.
BOUND_MARGIN = 1.0 + 2.0**-10


#: Rows kept per query beyond ``k`` (at least this many, and ``k // 2``): room for the rows
#: near the ``k``-th. On 512-d embeddings, k = 5, ``k + 4`` left 16% of the queries undecided
#: (searched again in float32), ``k + 8`` 1.1% and ``k + 13`` 0.03%.
KEPT_EXTRA = 10
#: Columns per group of the grouped selection (:func:`strided_topk`).
GROUP = 16


def kept_width(k: int) -> int:
    """Rows kept per query by the pre-selection: ``k`` plus room for the rows near the ``k``-th."""
    return k + max(KEPT_EXTRA, k // 2)


def strided_topk(y: torch.Tensor, take: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``take`` largest values of each row (float32, decreasing) and their columns.

    Column ``c`` belongs to group ``c mod G`` (``G = width // GROUP``), so the group maxima are
    one vectorised pass over ``GROUP`` slices of the row; the ``take`` groups with the largest
    maxima hold ``take`` largest values (a value outside them has ``take`` group maxima at or
    above it), and a ``topk`` over their ``take * GROUP`` columns is exact. Columns past the
    last whole group are searched apart.

    Args:
        y: ``(R, W)`` values, any float dtype.
        take: Number kept, ``1 <= take <= W``.

    Returns:
        ``(values, columns)``, both ``(R, take)``.
    """
    rows, width = y.shape
    groups = width // GROUP
    if groups < 2 * take:
        return y.float().topk(take, dim=1)
    whole = groups * GROUP
    view = y[:, :whole].view(rows, GROUP, groups)
    chosen = view.amax(dim=1).float().topk(take, dim=1).indices
    picked = view.gather(2, chosen.unsqueeze(1).expand(rows, GROUP, take))
    values, pos = picked.float().view(rows, GROUP * take).topk(take, dim=1)
    columns = chosen.gather(1, pos.remainder(take)) + pos.div(take, rounding_mode="floor") * groups
    if whole < width:
        tail_v, tail_c = y[:, whole:].float().topk(min(take, width - whole), dim=1)
        values = torch.cat([values, tail_v], dim=1)
        columns = torch.cat([columns, tail_c + whole], dim=1)
        values, pos = values.topk(take, dim=1)
        columns = columns.gather(1, pos)
    return values, columns


def _shift(bank: torch.Tensor) -> torch.Tensor | None:
    """A vector to subtract from queries and bank for euclidean search, or ``None``.

    Distances do not change under a common shift, but bfloat16's error grows with the norms:
    a bank far from the origin leaves every query undecided. The mean of at most 4,096 evenly
    spaced rows is used when it is large next to the rows' spread around it.
    """
    sample = bank[:: max(1, bank.shape[0] // 4096)].to(torch.float32)
    mean = sample.mean(dim=0)
    spread = (sample - mean).pow(2).sum(dim=1).mean()
    return mean if bool(mean.pow(2).sum() > spread / 16) else None


def _rounding_norms(x: torch.Tensor, x16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms of the bfloat16 rows ``|x~|`` and of their rounding errors ``|x - x~|``.

    Args:
        x: ``(N, D)`` float32 rows.
        x16: ``(N, D)`` their bfloat16 rounding.

    Returns:
        ``(|x~|, |x - x~|)``, both ``(N,)``.
    """
    step = pass_rows(x)
    rounded = torch.empty(x.shape[0], dtype=torch.float32)
    error = torch.empty(x.shape[0], dtype=torch.float32)
    for s in range(0, x.shape[0], step):
        part = x16[s : s + step].float()
        rounded[s : s + step] = part.pow(2).sum(dim=1).sqrt_()
        error[s : s + step] = part.sub_(x[s : s + step]).pow_(2).sum(dim=1).sqrt_()
    # a value below 2^-63 squares into float32's subnormals or to 0 (a rounding error of 2^-80
    # would vanish and drop |q~| |r_b| from the bound): those lose at most sqrt(D) 2^-63
    tiny = math.sqrt(max(1, x.shape[1])) * 2.0**-62
    return rounded.add_(tiny), error.add_(tiny)


def product_error(
    q_norm: torch.Tensor,
    q_err: torch.Tensor,
    b_norm: torch.Tensor,
    b_err: torch.Tensor,
    c_max: torch.Tensor,
    dim: int,
    shifted: bool = False,
) -> torch.Tensor:
    """Bound on ``|y~ - y|`` before the output rounding, for every query against a bank chunk.

    Args:
        q_norm: ``(B,)`` norms of the bfloat16 queries ``|q~|``.
        q_err: ``(B,)`` norms of their rounding errors ``|q - q~|``.
        b_norm: Largest ``|b~|`` of the chunk (0-d).
        b_err: Largest ``|b - b~|`` of the chunk (0-d).
        c_max: Largest ``|c|`` of the chunk's bias (0-d; 0 without one).
        dim: Number of features ``D``.
        shifted: Whether queries and bank were shifted by a common vector in float32 (the
            shift's rounding moves each distance by a relative ``2^-24`` at most).

    Returns:
        ``(B,)`` bounds: the output's rounding, ``OUTPUT_ROUNDING * |y~|``, comes on top.

    Example:
        >>> q = torch.tensor([1.0])
        >>> float(product_error(q, q * 0, q[0], q[0] * 0, q[0] * 0, 2)) < 1e-5
        True
    """
    sums = (dim + 2) * 2.0**-24
    sums = sums / (1.0 - sums)
    inputs = q_norm * b_err + q_err * b_norm + q_err * b_err
    flushed = (dim + 2) * 2.0**-126 * (b_norm + q_norm + 1.0)
    # the float32 sums, and the float32 bias's own error against the exact |b|^2 / 2
    bound = inputs + sums * (q_norm * b_norm + 2.0 * c_max) + flushed
    if shifted:
        bound = bound + 2.0**-22 * (q_norm + q_err + b_norm + b_err) ** 2
    return bound.mul_(BOUND_MARGIN)


#: Largest bfloat16 copy of a bank that :class:`BankChunks` keeps between two searches.
CACHE_BYTES = 1 << 28


class BankChunks:
    """The bank as the pre-selection reads it, chunk by chunk: shifted, in bfloat16, with bounds.

    Iterating yields ``(start, part16, bias, (b_norm, b_err, c_max))`` per chunk of ``chunk``
    rows: the chunk in bfloat16 (shifted by :attr:`shift` for euclidean search), its float32
    bias ``-|b|^2 / 2`` (``None`` for cosine) and the largest ``|b~|``, ``|b - b~|`` and
    ``|c|`` of its rows. Prepared chunks are kept for the next iteration while the bfloat16
    bank stays within :data:`CACHE_BYTES`, so several searches of one bank (a probe, then the
    rest of the queries) convert it once.

    Args:
        bank: ``(M, D)`` finite bank rows, any float dtype.
        chunk: Bank rows per chunk.
        metric: ``"euclidean"`` or ``"cosine"``.
        bank_sq_norms: Optional ``(M,)`` stored squared norms of the bank rows.
        bank_normalized: For cosine, whether the bank rows already have unit norm.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        chunk: int,
        metric: str,
        bank_sq_norms: torch.Tensor | None,
        bank_normalized: bool,
    ) -> None:
        self.bank, self.chunk, self.metric = bank, chunk, metric
        self.bank_sq_norms, self.bank_normalized = bank_sq_norms, bank_normalized
        self.shift = _shift(bank) if metric == "euclidean" else None
        self._keep = 2 * bank.shape[0] * bank.shape[1] <= CACHE_BYTES
        self._prepared: list[tuple[Any, ...]] = []

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        if self._prepared:
            yield from self._prepared
            return
        for start in range(0, self.bank.shape[0], self.chunk):
            item = self._prepare(start)
            if self._keep:
                self._prepared.append(item)
            yield item

    def _prepare(self, start: int) -> tuple[Any, ...]:
        part = self.bank[start : start + self.chunk].to(torch.float32)
        bias = None
        if self.shift is not None:
            part = part - self.shift
            bias = part.pow(2).sum(dim=1).mul_(-0.5)
        elif self.metric == "euclidean":  # -|b|^2 / 2, out of place: the caller's norms
            bias = chunk_sq_norms(part, self.bank_sq_norms, start, torch.float32).mul(-0.5)
        elif not self.bank_normalized:
            part = prepare_bank(part, self.metric)
        part16 = part.to(torch.bfloat16)
        b_norm, b_err = (v.max() for v in _rounding_norms(part, part16))
        c_max = bias.abs().max() if bias is not None else torch.zeros(())
        return start, part16, bias, (b_norm, b_err, c_max)


def certified_bf16_search(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    metric: str,
    bank_sq_norms: torch.Tensor | None,
    chunk: int,
    rows: int,
    bank_normalized: bool,
    linear: Callable[..., torch.Tensor],
    chunks: BankChunks | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours from a bfloat16 product and a float32 re-rank of a few rows.

    Args:
        query: ``(B, D)`` float32 queries (unit rows for cosine).
        bank: ``(M, D)`` finite bank rows, ``M >= k``, any float dtype.
        k: Number of neighbours.
        metric: ``"euclidean"`` or ``"cosine"``.
        bank_sq_norms: Optional ``(M,)`` stored squared norms of the bank rows.
        chunk: Bank rows per product.
        rows: Queries per product.
        bank_normalized: For cosine, whether the bank rows already have unit norm.
        linear: oneDNN's ``x @ w.T + b`` on bfloat16 inputs with a float32 bias.
        chunks: The bank prepared for these arguments (:class:`BankChunks`), to share it
            between calls; prepared here when ``None``.

    Returns:
        ``(distances, indices, decided)``: ``(B, k)`` float32 distances sorted increasing (as
        :func:`~selectorch.functional.knn.knn_search` returns them), ``(B, k)`` indices and a
        ``(B,)`` bool mask; rows where ``decided`` is ``False`` hold no result and must be
        searched in float32.
    """
    n_query, dim = query.shape
    n_bank = bank.shape[0]
    squared = metric == "euclidean"
    keep = min(kept_width(k), n_bank)
    chunks = (
        BankChunks(bank, chunk, metric, bank_sq_norms, bank_normalized)
        if chunks is None
        else chunks
    )
    shift = chunks.shift
    query_s = query if shift is None else query - shift
    q16 = query_s.to(torch.bfloat16)
    q_norm, q_err = _rounding_norms(query_s, q16)
    upper = torch.full((n_query, keep), -torch.inf)
    lower = torch.full((n_query, keep), -torch.inf)
    index = torch.zeros((n_query, keep), dtype=torch.int64)
    let_go = torch.full((n_query,), -torch.inf)
    for start, part16, bias, (b_norm, b_err, c_max) in chunks:
        width = part16.shape[0]
        error = product_error(q_norm, q_err, b_norm, b_err, c_max, dim, shift is not None)
        take = min(keep + 1, width)
        for first in range(0, n_query, rows):
            block = slice(first, first + rows)
            y = linear(q16[block], part16, bias, "none", [], "")
            values, columns = strided_topk(y, take)  # decreasing
            spread = values.abs().mul_(OUTPUT_ROUNDING * BOUND_MARGIN).add_(error[block, None])
            up, low = values + spread, values - spread
            if take > keep:  # the rest of the chunk is at or below its (keep+1)-th bound
                let_go[block] = torch.maximum(let_go[block], up[:, keep])
                up, low, columns = up[:, :keep], low[:, :keep], columns[:, :keep]
            up = torch.cat([upper[block], up], dim=1)
            low = torch.cat([lower[block], low], dim=1)
            columns = torch.cat([index[block], columns + start], dim=1)
            up, pos = up.topk(min(keep + 1, up.shape[1]), dim=1)
            if up.shape[1] > keep:
                let_go[block] = torch.maximum(let_go[block], up[:, keep])
                up, pos = up[:, :keep], pos[:, :keep]
            upper[block], lower[block] = up, low.gather(1, pos)
            index[block] = columns.gather(1, pos)
    bound = lower.topk(k, dim=1).values[:, k - 1]  # at most the true k-th largest y
    decided = let_go < bound  # False for NaN
    count = (upper >= bound[:, None]).sum(dim=1)  # the candidates: a prefix of `upper`
    distances = torch.empty(n_query, k, dtype=torch.float32)
    indices = torch.zeros(n_query, k, dtype=torch.int64)
    width = min(keep, max(k, int(count.max()) if n_query else k))
    step = max(1, (1 << 22) // (width * max(1, dim)))
    stored = stored_norms_usable(bank_sq_norms)
    for first in range(0, n_query, step):
        block = slice(first, first + step)
        q = query[block]
        cand = index[block, :width]
        rows_b = bank[cand].to(torch.float32)  # (r, width, D)
        if not squared and not bank_normalized:
            rows_b = F.normalize(rows_b, dim=-1)
        dot = torch.bmm(rows_b, q.unsqueeze(2)).squeeze(2)  # (r, width) q.b
        if squared:  # |b|^2 / 2 - q.b ranks as the distance does (as in the float32 search)
            sq = bank_sq_norms[cand].float() if stored else rows_b.pow(2).sum(dim=-1)
            key = sq.mul_(0.5).sub_(dot)
        else:
            key = dot.neg_()
        key = key.masked_fill_(torch.arange(width) >= count[block, None], torch.inf)
        key, pos = key.topk(k, dim=1, largest=False)
        chosen = cand.gather(1, pos)
        if squared:  # the k chosen distances recomputed directly, re-sorted
            picked = rows_b.gather(1, pos.unsqueeze(2).expand(-1, -1, dim))
            distances[block], indices[block] = sorted_euclidean(q, picked, chosen)
        else:  # 1 + (-q.b): the float32 search's cosine distance
            distances[block], indices[block] = key.add_(1.0), chosen
    return distances, indices, decided
