"""The eager CPU kNN search: blocked products, grouped selection, exact results."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from selectorch.functional.distances import (
    chunk_sq_norms,
    normalize_rows,
    prepare_bank,
    sorted_euclidean,
)
from selectorch.functional.knn_bf16 import BankChunks, certified_bf16_search
from selectorch.functional.topk import chunk_topk, merge_topk

#: Values of one block of the blocked CPU path, ``rows x chunk`` (float32: 16 MiB, so a
#: block stays in a server's L3 cache and below glibc's mmap threshold: a new block reuses the
#: last one's pages instead of faulting in fresh ones).
CPU_BLOCK_ELEMENTS = 1 << 22

#: Searches of at least this many queries use the bfloat16 pre-selection
#: (:func:`~selectorch.functional.knn_bf16.certified_bf16_search`) where the CPU has it. Each
#: search converts the bank once (~45 ms for 50,000 x 512 on 2 cores), which the faster
#: product repays from about 700 queries on (``benchmarks/RESULTS.md``).
BF16_MIN_QUERIES = 1024
#: The first :data:`BF16_MIN_QUERIES` queries of a search are a probe: unless the bound decides
#: at least this fraction of them, the rest are searched in float32 directly.
BF16_MIN_DECIDED = 0.5


@functools.cache
def onednn_linear() -> Callable[..., torch.Tensor] | None:
    """oneDNN's float32 ``x @ w.T + b`` (``torch.ops.mkldnn._linear_pointwise``), if it works.

    On the CPU, ``torch.mm`` calls MKL, whose float32 GEMM runs ~20-30% slower than oneDNN's on
    AMD processors (measured on a 2-core AMD EPYC: ``benchmarks/RESULTS.md``). The op is
    internal to torch (Inductor's CPU linear), so it is probed once on a tiny input and the
    blocked search keeps ``torch.addmm`` wherever it is missing or fails.
    """
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        x, w, b = torch.ones(2, 3), torch.ones(4, 3), torch.full((4,), 0.5)
        probe = op(x, w, b, "none", [], "")
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    if probe.shape != (2, 4) or not bool((probe == 3.5).all()):
        return None
    return op


@functools.cache
def bf16_linear() -> Callable[..., torch.Tensor] | None:
    """oneDNN's ``x @ w.T + b`` on bfloat16 ``x`` and ``w`` with a float32 ``b``, if native.

    Only where the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): elsewhere oneDNN
    emulates it, slower than float32. Probed once on a tiny input, like :func:`onednn_linear`,
    which also checks that the bias is added in float32 (the error bound of
    :mod:`~selectorch.functional.knn_bf16` counts on it).
    """
    op = onednn_linear()
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    if op is None or not native:
        return None
    x = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    w = torch.ones(4, 3, dtype=torch.bfloat16)
    bias = torch.full((4,), -6.0 + 2.0**-12)  # not a bfloat16 value: must be added in float32
    try:
        probe = op(x, w, bias, "none", [], "")
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    exact = probe.shape == (1, 4) and probe.dtype == torch.bfloat16
    if not exact or not bool((probe.float() == 2.0**-12).all()):
        return None
    return op


def search_cpu(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    metric: str,
    bank_sq_norms: torch.Tensor | None,
    chunk_size: int,
    bank_normalized: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager CPU search of a large finite bank; the same neighbours as the plain chunk loop.

    In float32, with at least :data:`BF16_MIN_QUERIES` queries and a CPU that multiplies
    bfloat16 natively, a certified bfloat16 pre-selection finds every row that can be among
    the ``k`` nearest and ranks those in float32
    (:func:`~selectorch.functional.knn_bf16.certified_bf16_search`); the queries it cannot
    decide, and every other case, take the float32 blocked search (:func:`_search_float`).

    Args and returns: as :func:`~selectorch.functional.knn.knn_search`'s inner searches, with
    ``query`` already in ``dtype``; ``query`` and ``bank`` on the CPU, ``bank`` finite with at
    least ``k`` rows.
    """
    if metric != "euclidean":
        query = normalize_rows(query)
    args = (k, metric, bank_sq_norms, chunk_size, bank_normalized, dtype)
    linear = bf16_linear() if dtype == torch.float32 else None
    if linear is None or query.shape[0] < BF16_MIN_QUERIES:
        return _search_float(query, bank, *args)
    chunk = min(bank.shape[0], max(k, chunk_size))
    # bfloat16 values: twice the rows for the bytes of a float32 block
    rows = max(1, min(query.shape[0], 2 * CPU_BLOCK_ELEMENTS // chunk))
    chunks = BankChunks(bank, chunk, metric, bank_sq_norms, bank_normalized)  # converted once
    search = functools.partial(
        certified_bf16_search,
        bank=bank, k=k, metric=metric, bank_sq_norms=bank_sq_norms, chunk=chunk, rows=rows,
        bank_normalized=bank_normalized, linear=linear, chunks=chunks,
    )  # fmt: skip
    parts = [search(query[:BF16_MIN_QUERIES])]
    rest = query[BF16_MIN_QUERIES:]
    if rest.shape[0] and bool(parts[0][2].float().mean() >= BF16_MIN_DECIDED):
        parts.append(search(rest))
    elif rest.shape[0]:  # the bound decides too few of these data (e.g. cosine far from 0)
        parts.append((*_search_float(rest, bank, *args), torch.ones(len(rest), dtype=torch.bool)))
    d, i, decided = (torch.cat(values) for values in zip(*parts, strict=True))
    if not bool(decided.all()):
        undecided = (~decided).nonzero().squeeze(1)
        d[undecided], i[undecided] = _search_float(query[undecided], bank, *args)
    return d, i


def _search_float(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    metric: str,
    bank_sq_norms: torch.Tensor | None,
    chunk_size: int,
    bank_normalized: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager CPU search of a large finite bank; the same neighbours as :func:`_search`.

    Per bank chunk and block of queries (at most :data:`CPU_BLOCK_ELEMENTS` values), one
    product gives ``q.b - |b|^2 / 2`` (euclidean: ``|q - b|^2`` is ``|q|^2`` minus twice it)
    or ``q.b`` (cosine), and :func:`~selectorch.functional.topk.chunk_topk` keeps each row's
    ``k`` largest: no elementwise passes, no full-row ``topk``. In float32 the product is oneDNN's
    (:func:`onednn_linear`), else ``addmm`` into one reused buffer. Euclidean distances of
    the chosen rows are then recomputed directly, as in :func:`_search`; cosine distances are
    ``1 + (-q.b)``, the same float as ``1 - q.b``.

    Args and returns: as :func:`_search`, with ``query`` already in ``dtype``; ``query`` and
    ``bank`` on the CPU, ``bank`` finite with at least ``k`` rows.
    """
    n_query, n_bank = query.shape[0], bank.shape[0]
    squared = metric == "euclidean"
    chunk = min(n_bank, max(k, chunk_size))
    rows = max(1, min(n_query, CPU_BLOCK_ELEMENTS // chunk))
    linear = onednn_linear() if dtype == torch.float32 else None
    buffer = torch.empty(0 if linear else rows * chunk, dtype=dtype)
    best_d = torch.empty(n_query, k, dtype=dtype)
    best_i = torch.empty(n_query, k, dtype=torch.int64)
    for start in range(0, n_bank, chunk):
        part = bank[start : start + chunk].to(dtype)
        width = part.shape[0]
        # -|b|^2 / 2 (exact halving): the product then ranks as the distance does
        # (out of place: the norms may be a view of the caller's bank_sq_norms)
        bias = chunk_sq_norms(part, bank_sq_norms, start, dtype).mul(-0.5) if squared else None
        if not squared and not bank_normalized:
            part = prepare_bank(part, metric)
        for first in range(0, n_query, rows):
            block = slice(first, first + rows)
            q = query[block]
            if linear is not None:
                y = linear(q, part, bias, "none", [], "")
            else:
                y = buffer[: q.shape[0] * width].view(q.shape[0], width)
                if bias is None:  # beta=0: the buffer is not read
                    y.addmm_(q, part.T, beta=0.0)
                else:
                    torch.addmm(bias, q, part.T, out=y)
            d, i = chunk_topk(y, min(k, width), largest=True)
            d = d.neg_()  # |b|^2 / 2 - q.b or -q.b: smaller is nearer
            if start == 0:
                best_d[block], best_i[block] = d, i
            else:
                best_d[block], best_i[block] = merge_topk(
                    best_d[block], best_i[block], d, i + start, k
                )
    if not squared:
        return best_d.add_(1.0), best_i
    for first in range(0, n_query, rows):  # exact distances of the k chosen rows, re-sorted
        block = slice(first, first + rows)
        chosen = best_i[block]
        best_d[block], best_i[block] = sorted_euclidean(
            query[block], bank[chosen].to(dtype), chosen
        )
    return best_d, best_i
