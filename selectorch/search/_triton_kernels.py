"""Triton kernels of the fused exact kNN search, registered as ``torch.library.triton_op`` ops.

This module imports Triton at the top: import it only through
:func:`selectorch.search.triton_knn._kernels`, which does so lazily.

Kernel 1, ``knn_candidates``: a program owns a tile of ``BLOCK_Q`` queries and one split (a
contiguous slice) of the bank. It streams the split in tiles of ``BLOCK_N`` rows (the inner
loop over ``D`` is software-pipelined), computes the ``(BLOCK_Q, BLOCK_N)`` scores
``bias + scale * q.b`` on the tensor cores (``tl.dot``, fp32 accumulation) and appends every
score below the row's threshold ``tau`` to that row's buffer of ``C`` slots in global memory,
each candidate taking its slot from an atomic counter per (row, split). ``tau`` starts at an
upper bound from a bank sample (or ``+inf``). When a buffer would overflow, the program
*compacts* it: it finds the ``K``-th smallest buffered score of each row (a 32-step bitwise
search on the order-preserving integer key of the floats), keeps exactly the ``K`` smallest and
lowers ``tau`` to that value. So each split's buffer always holds its exact top-``K`` among what
it has seen (ties broken by position), the ``(B, M)`` score matrix is never written, and the
bank is read once. Unused slots are filled with ``+inf``; a ``torch.topk`` over
``(B, splits * C)`` merges the splits.

Kernel 2, ``knn_gather_distances``: exact fp32 distances of the chosen neighbours, recomputed
from the stored rows (``sqrt(sum((q - b)^2))``, or ``1 - q.b`` for cosine).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

_SIGN = tl.constexpr(-2147483648)  # 0x80000000 as a signed 32-bit integer


@triton.jit
def _ordered_key(v):
    """Map fp32 to uint32 so that the unsigned order equals the float order (no NaN)."""
    bits = v.to(tl.int32, bitcast=True)
    flip = (bits >> 31) | _SIGN  # negative: all ones, else only the sign bit
    return (bits ^ flip).to(tl.uint32, bitcast=True)


@triton.jit
def _key_to_float(key):
    bits = key.to(tl.int32, bitcast=True)
    # inverse of _ordered_key: keys with the top bit set were non-negative floats
    flip = ((~bits) >> 31) | _SIGN
    return (bits ^ flip).to(tl.float32, bitcast=True)


@triton.jit
def _compact(val_ptr, idx_ptr, cnt_ptrs, rows_ok, slot0, count, tau, K: tl.constexpr,
             C: tl.constexpr, CH: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Keep the K smallest buffered scores of every row whose buffer holds more than K.

    Rare (the threshold from the bank sample keeps buffers short), so it favours few registers
    over speed: the buffer is re-read in chunks of CH slots (from L1/L2) at each of the 32
    steps of the bitwise search, and rewritten chunk by chunk in place. Called right after a
    CTA-wide reduction, so every earlier append is visible. Where all threads must have read
    a chunk before any overwrites it, the stores wait on a CTA-wide reduction of the loaded
    data (its barrier orders them); ``tl.debug_barrier`` is not used.
    """
    active = count > K
    # t = the K-th smallest key: the largest t with #(key < t) < K, built from the top bit down
    t = tl.zeros([BLOCK_Q], dtype=tl.uint32)
    bit = tl.full([BLOCK_Q], _SIGN, dtype=tl.int32).to(tl.uint32, bitcast=True)
    for _ in range(32):
        trial = t | bit
        below = tl.zeros([BLOCK_Q], dtype=tl.int32)
        for c0 in tl.static_range(0, C, CH):
            cols = c0 + tl.arange(0, CH)
            filled = cols[None, :] < count[:, None]
            v = tl.load(val_ptr + slot0[:, None] + cols[None, :], mask=filled,
                        other=float("inf"))
            below += tl.sum(((_ordered_key(v) < trial[:, None]) & filled).to(tl.int32), axis=1)
        t = tl.where(below < K, trial, t)
        bit = bit >> 1
    n_less = tl.zeros([BLOCK_Q], dtype=tl.int32)
    for c0 in tl.static_range(0, C, CH):
        cols = c0 + tl.arange(0, CH)
        filled = cols[None, :] < count[:, None]
        v = tl.load(val_ptr + slot0[:, None] + cols[None, :], mask=filled, other=float("inf"))
        n_less += tl.sum(((_ordered_key(v) < t[:, None]) & filled).to(tl.int32), axis=1)
    # keep key < t, and the first (K - n_less) of the keys equal to t; rows not active keep all
    new_count = tl.zeros([BLOCK_Q], dtype=tl.int32)
    ties = tl.zeros([BLOCK_Q], dtype=tl.int32)
    for c0 in tl.static_range(0, C, CH):
        cols = c0 + tl.arange(0, CH)
        filled = cols[None, :] < count[:, None]
        off = slot0[:, None] + cols[None, :]
        v = tl.load(val_ptr + off, mask=filled, other=float("inf"))
        i = tl.load(idx_ptr + off, mask=filled, other=0)
        key = _ordered_key(v)
        eq = (key == t[:, None]) & filled
        eq_rank = ties[:, None] + tl.cumsum(eq.to(tl.int32), axis=1)  # 1-based among ties
        keep = ((key < t[:, None]) & filled) | (eq & (eq_rank <= (K - n_less)[:, None]))
        keep = tl.where(active[:, None], keep, filled)
        pos = new_count[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
        new_count += tl.sum(keep.to(tl.int32), axis=1)
        ties += tl.sum(eq.to(tl.int32), axis=1)
        top = tl.max(tl.where(keep, i, -1), axis=1)
        loaded = (tl.sum(new_count, axis=0) >= 0) & (tl.max(top, axis=0) >= -1)
        tl.store(val_ptr + slot0[:, None] + pos, v, mask=keep & loaded)
        tl.store(idx_ptr + slot0[:, None] + pos, i, mask=keep & loaded)
    tl.store(cnt_ptrs, new_count, mask=rows_ok)
    new_tau = tl.where(active, _key_to_float(t), tau)
    return new_count, new_tau


@triton.jit
def _append_tile(acc, offs_n, n_ok, bias_ptr, scale, val_ptr, idx_ptr, cnt_ptrs, rows_ok, slot0,
                 count, tau, K: tl.constexpr, C: tl.constexpr, CH: tl.constexpr,
                 BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Append the tile's scores below each row's threshold to the row's buffer.

    Everything stays in the tensor-core accumulator's layout (no shared-memory round trip):
    each candidate takes its slot from an atomic counter per (row, split).
    """
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_ok, other=float("inf"))
    else:
        bias = tl.where(n_ok, 0.0, float("inf"))
    s = bias[None, :] + scale * acc
    cand = s < tau[:, None]  # NaN never passes; +inf (past the end) never passes
    n_cand = tl.sum(cand.to(tl.int32), axis=1)
    # CTA-wide reduction: its barrier also makes every earlier append visible to all threads
    if tl.max(n_cand, axis=0) > 0:
        if tl.max(count + n_cand, axis=0) > C:
            count, tau = _compact(val_ptr, idx_ptr, cnt_ptrs, rows_ok, slot0, count, tau, K, C,
                                  CH, BLOCK_Q)
            cand = s < tau[:, None]
            n_cand = tl.sum(cand.to(tl.int32), axis=1)
            # barrier between the counters' reset and the atomics below
            cand = cand & (tl.max(n_cand, axis=0) >= 0)
        counters = cnt_ptrs[:, None] + tl.zeros([BLOCK_N], dtype=tl.int32)[None, :]
        slot = tl.atomic_add(counters, 1, mask=cand, sem="relaxed", scope="cta")
        ptr_off = slot0[:, None] + slot
        tl.store(val_ptr + ptr_off, s, mask=cand)
        tl.store(idx_ptr + ptr_off, tl.broadcast_to(offs_n[None, :], s.shape), mask=cand)
        count += n_cand
    return count, tau


@triton.jit
def _knn_candidates_kernel(
    q_ptr, b_ptr, bias_ptr, tau_ptr, val_ptr, idx_ptr, cnt_ptr,
    B, M, rows_per_split, n_splits, stride_q, stride_b, scale,
    D: tl.constexpr, K: tl.constexpr, C: tl.constexpr, CH: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < B
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_N)
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    n_tiles = tl.cdiv(stop - start, BLOCK_N)
    # rows past B never accept a candidate
    tau = tl.load(tau_ptr + offs_q, mask=q_ok, other=float("-inf"))
    count = tl.zeros([BLOCK_Q], dtype=tl.int32)
    slot0 = (offs_q.to(tl.int64) * n_splits + pid_s) * C
    cnt_ptrs = cnt_ptr + offs_q * n_splits + pid_s
    tl.store(cnt_ptrs, count, mask=q_ok)
    # 32-bit offsets from scalar bases (not 64-bit pointer tensors): fewer live registers
    q_off = offs_q[:, None] * stride_q + offs_d[None, :]
    b_off = offs_t[:, None] * stride_b + offs_d[None, :]
    for tile in range(0, n_tiles):
        n0 = start + tile * BLOCK_N
        offs_n = n0 + offs_t
        n_ok = offs_n < stop
        b_tile = b_ptr + n0.to(tl.int64) * stride_b
        acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
        # the software-pipelined loop: its loads run num_stages - 1 steps ahead
        for kd in range(0, D // BLOCK_D):
            a = tl.load(q_ptr + (q_off + kd * BLOCK_D), mask=q_ok[:, None], other=0.0)
            b = tl.load(b_tile + (b_off + kd * BLOCK_D), mask=n_ok[:, None], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        count, tau = _append_tile(acc, offs_n, n_ok, bias_ptr, scale, val_ptr, idx_ptr,
                                  cnt_ptrs, q_ok, slot0, count, tau, K, C, CH, BLOCK_Q,
                                  BLOCK_N, HAS_BIAS)
    # unused slots hold +inf so that the merge never picks them before a real candidate
    for c0 in tl.static_range(0, C, CH):
        cols = c0 + tl.arange(0, CH)
        empty = (cols[None, :] >= count[:, None]) & q_ok[:, None]
        ptr_off = slot0[:, None] + cols[None, :]
        tl.store(val_ptr + ptr_off, tl.full([BLOCK_Q, CH], float("inf"), tl.float32), mask=empty)
        tl.store(idx_ptr + ptr_off, tl.zeros([BLOCK_Q, CH], dtype=tl.int32), mask=empty)


@triton.jit
def _gather_distances_kernel(
    q_ptr, b_ptr, idx_ptr, out_ptr, n_sel, stride_q, stride_b,
    D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, COSINE: tl.constexpr,
):
    row = tl.program_id(0)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = offs_k < n_sel
    idx = tl.load(idx_ptr + row * n_sel + offs_k, mask=k_ok, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(q_ptr + row.to(tl.int64) * stride_q + offs_d, mask=d_ok, other=0.0)
        b = tl.load(b_ptr + idx[:, None] * stride_b + offs_d[None, :],
                    mask=k_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if COSINE:
            acc += tl.sum(b * q[None, :], axis=1)
        else:
            diff = q[None, :] - b
            acc += tl.sum(diff * diff, axis=1)
    if COSINE:
        out = 1.0 - acc
    else:
        out = tl.sqrt(acc)
    tl.store(out_ptr + row * n_sel + offs_k, out, mask=k_ok)


def candidate_layout(n_query: int, n_bank: int, keep: int, block_q: int, block_n: int,
                     splits_per_sm: int, n_sm: int) -> tuple[int, int, int]:
    """``(capacity, n_splits, rows_per_split)`` of the candidate buffer for these shapes."""
    capacity = triton.next_power_of_2(keep + block_n)
    n_tiles = triton.cdiv(n_bank, block_n)
    n_qtiles = triton.cdiv(n_query, block_q)
    # about splits_per_sm programs per multiprocessor in one wave; the bank is split only as
    # far as that needs (B = 1 still fills the GPU), each split a whole number of tiles
    wanted = max(1, (splits_per_sm * n_sm) // n_qtiles)
    tiles_per_split = triton.cdiv(n_tiles, min(wanted, n_tiles))
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    return capacity, n_splits, tiles_per_split * block_n


@triton_op("selectorch::knn_candidates", mutates_args=())
def knn_candidates(
    query: torch.Tensor,
    bank: torch.Tensor,
    bias: torch.Tensor,
    tau: torch.Tensor,
    scale: float,
    has_bias: bool,
    keep: int,
    block_q: int,
    block_n: int,
    block_d: int,
    num_warps: int,
    num_stages: int,
    splits_per_sm: int,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split top-``keep`` candidates of every query; see the module docstring.

    Returns ``(values, indices)`` of shape ``(B, n_splits * capacity)`` (fp32, int32): the
    scores ``bias + scale * q.b`` of the candidates, ``+inf`` (index 0) in unused slots.
    """
    n_query, dim = query.shape
    n_bank = bank.shape[0]
    n_sm = torch.cuda.get_device_properties(query.device).multi_processor_count
    capacity, n_splits, rows_per_split = candidate_layout(
        n_query, n_bank, keep, block_q, block_n, splits_per_sm, n_sm
    )
    width = n_splits * capacity
    values = torch.empty((n_query, width), dtype=torch.float32, device=query.device)
    indices = torch.empty((n_query, width), dtype=torch.int32, device=query.device)
    counters = torch.empty((n_query, n_splits), dtype=torch.int32, device=query.device)
    grid = (triton.cdiv(n_query, block_q), n_splits)
    wrap_triton(_knn_candidates_kernel)[grid](
        query, bank, bias, tau, values, indices, counters,
        n_query, n_bank, rows_per_split, n_splits, query.stride(0), bank.stride(0), scale,
        D=dim, K=keep, C=capacity, CH=min(capacity, 64), BLOCK_Q=block_q, BLOCK_N=block_n,
        BLOCK_D=block_d, HAS_BIAS=has_bias, PRECISION=precision,
        num_warps=num_warps, num_stages=num_stages,
    )
    return values, indices


@triton_op("selectorch::knn_gather_distances", mutates_args=())
def knn_gather_distances(
    query: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, cosine: bool
) -> torch.Tensor:
    """Exact fp32 distances between ``query`` (B, D) fp32 and ``bank[indices]`` (B, k)."""
    n_query, n_sel = indices.shape
    dim = query.shape[1]
    out = torch.empty((n_query, n_sel), dtype=torch.float32, device=query.device)
    block_k = 16
    block_d = min(256, triton.next_power_of_2(dim))
    grid = (n_query, triton.cdiv(n_sel, block_k))
    wrap_triton(_gather_distances_kernel)[grid](
        query, bank, indices, out, n_sel, query.stride(0), bank.stride(0),
        D=dim, BLOCK_K=block_k, BLOCK_D=block_d, COSINE=cosine, num_warps=4,
    )
    return out
