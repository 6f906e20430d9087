"""Triton kernels of the fused exact kNN search, registered as ``torch.library`` custom ops.

This module imports Triton at the top: import it only through
:func:`selectorch.search.triton_knn._kernels`, which does so lazily.

Kernel 1, ``knn_candidates``: a program owns a tile of ``BLOCK_Q`` queries and one split (a
contiguous slice) of the bank. It streams the split in tiles of ``BLOCK_N`` rows, computes the
``(BLOCK_Q, BLOCK_N)`` scores ``bias + scale * q.b`` on the tensor cores (``tl.dot``, fp32
accumulation) and appends every score below the row's threshold ``tau`` to that row's buffer
in global memory. ``tau`` starts at an upper bound on the ``K``-th smallest score from a bank
sample (or ``+inf``), so few scores pass. The loop over ``T`` tiles x ``D`` is one flat,
software-pipelined loop: the next tile's loads are in flight while a tile's epilogue runs. With
``TMA`` the tiles are loaded through tensor descriptors (the copy engine, no address registers;
pointer loads otherwise). The epilogue stays in the accumulator's layout: it takes a row's
smallest passing score and its column (one argmin reduction with ``EPI = 1``, two in-warp
reductions with ``EPI = 0``), stores it at the row's fill (kept in registers; no atomics, no
shared-memory round trip of the tile) and masks it out, ``E`` times, plus more rounds only in
the rare tile where some row has more than ``E`` candidates. Between chunks of ``T`` tiles,
outside the pipelined loop, a row whose buffer could overflow in the next chunk is *compacted*:
the program finds its ``K``-th smallest buffered score (a 32-step bitwise search on the
order-preserving integer key of the floats), keeps exactly the ``K`` smallest and lowers
``tau`` to that value. The buffer (``C = KP + 2 T BLOCK_N`` slots) can therefore never
overflow, whatever the data. At the end each split's exact top-``K`` among its rows (ties
broken by position) goes to a dense ``(B, splits * KP)`` output, ``+inf`` in unused slots; the
``(B, M)`` score matrix is never written and the bank is read once. Kernel 3 merges the
splits. With ``sample_step`` the same kernel searches a strided bank sample (the threshold's
second sample).

``_merge_halves_kernel``: the merge of the two half buffers that the warp-specialised Gluon
kernel (:mod:`._gluon_kernels`) leaves per (query, split), into the same dense output; with
``REDO`` the candidates kernel runs only the (query tile, split) programs flagged there.

Kernel 2, ``knn_finish``: exact fp32 distances of the chosen neighbours, recomputed from the
stored rows (``sqrt(sum((q - b)^2))``, or ``1 - q.b`` for cosine), sorted, the ``k`` smallest
kept (one kernel for the gather, the re-rank and the output casts).

Kernel 3, ``knn_select`` / ``knn_threshold``: per row of a small ``(B, N)`` score matrix, the
``K``-th smallest score by a bitwise search on the integer keys (no sort; rows of up to
:data:`SELECT_RESIDENT_MAX` scores stay in registers for all 32 steps): either the indices
of the ``K`` smallest (the merge of the splits, instead of ``topk`` and ``gather``) or a
threshold bound from a bank sample's scores (instead of ``topk``, ``amax`` and the margin's
element-wise ops). ``knn_group_minima`` first reduces a large sample's scores to the minima of
groups of rows (a bound from the minima still bounds the scores, from fewer keys).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton.tools.tensor_descriptor import TensorDescriptor

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
def _compact(val_ptr, idx_ptr, slot0, count, tau, K: tl.constexpr, CH: tl.constexpr,
             BLOCK_Q: tl.constexpr):
    """Keep the ``K`` smallest buffered scores of every row whose buffer holds more than ``K``.

    Runs between chunks of bank tiles, outside the pipelined loop, so it favours few registers
    over speed: the filled part of the buffer is re-read in chunks of ``CH`` slots (from L1/L2)
    at each of the 32 steps of a bitwise search for the ``K``-th smallest key, and rewritten
    chunk by chunk in place. Called right after a CTA-wide reduction, whose barrier makes every
    earlier append visible. Where all threads must have read a chunk before any overwrites it,
    the stores wait on a CTA-wide reduction of the loaded data (its barrier orders them).

    Returns:
        ``(count, tau)``: the new fill (``min(count, K)``) and, for compacted rows, the new
        threshold (the ``K``-th smallest score; rows not compacted keep theirs).
    """
    active = count > K
    filled_max = tl.max(count, axis=0)
    # t = the K-th smallest key: the largest t with #(key < t) < K, built from the top bit down
    t = tl.zeros([BLOCK_Q], dtype=tl.uint32)
    bit = tl.full([BLOCK_Q], _SIGN, dtype=tl.int32).to(tl.uint32, bitcast=True)
    for _ in range(32):
        trial = t | bit
        below = tl.zeros([BLOCK_Q], dtype=tl.int32)
        for c0 in range(0, filled_max, CH):
            cols = c0 + tl.arange(0, CH)
            filled = cols[None, :] < count[:, None]
            v = tl.load(val_ptr + slot0[:, None] + cols[None, :], mask=filled,
                        other=float("inf"))
            below += tl.sum(((_ordered_key(v) < trial[:, None]) & filled).to(tl.int32), axis=1)
        t = tl.where(below < K, trial, t)
        bit = bit >> 1
    n_less = tl.zeros([BLOCK_Q], dtype=tl.int32)
    for c0 in range(0, filled_max, CH):
        cols = c0 + tl.arange(0, CH)
        filled = cols[None, :] < count[:, None]
        v = tl.load(val_ptr + slot0[:, None] + cols[None, :], mask=filled, other=float("inf"))
        n_less += tl.sum(((_ordered_key(v) < t[:, None]) & filled).to(tl.int32), axis=1)
    # keep key < t, and the first (K - n_less) of the keys equal to t; rows not active keep all
    new_count = tl.zeros([BLOCK_Q], dtype=tl.int32)
    ties = tl.zeros([BLOCK_Q], dtype=tl.int32)
    for c0 in range(0, filled_max, CH):
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
    new_tau = tl.where(active, _key_to_float(t), tau)
    return new_count, new_tau


@triton.jit
def _append_tile(acc, n0, stop, offs_t, bias_ptr, stride_bias, scale, val_ptr, idx_ptr, slot0,
                 count, tau, E: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 EPI: tl.constexpr):
    """Append the tile's scores below each row's threshold to the row's buffer.

    Works in the tensor-core accumulator's layout, one candidate per row at a time: a row
    minimum and the smallest column holding it (two in-warp reductions), stored at the row's
    fill ``count`` (kept in registers), then masked out. ``E`` such rounds always run (no
    CTA-wide decision); a tile where some row has more candidates runs more rounds, as many
    as its fullest row needs.
    """
    offs_n = n0 + offs_t
    n_ok = offs_n < stop
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=n_ok, other=float("inf"))
    else:
        bias = tl.where(n_ok, 0.0, float("inf"))
    s = bias[None, :] + scale * acc
    # scores at or above the threshold (and NaN, and +inf past the end) become +inf: no candidate
    s = tl.where(s < tau[:, None], s, float("inf"))
    if EPI == 1:
        # the row minimum and its (first) column in one reduction; a row with a finite minimum
        # has a candidate left; more rounds while any row has one (a CTA-wide check per round)
        m, j = tl.min(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        for _ in tl.static_range(E):
            has = m < float("inf")
            tl.store(val_ptr + slot0 + count, m, mask=has)
            tl.store(idx_ptr + slot0 + count, n0 + j, mask=has)
            count += has.to(tl.int32)
            s = tl.where(offs_t[None, :] == j[:, None], float("inf"), s)
            m, j = tl.min(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        while tl.min(m, axis=0) < float("inf"):  # rare: a row with more than E candidates
            has = m < float("inf")
            tl.store(val_ptr + slot0 + count, m, mask=has)
            tl.store(idx_ptr + slot0 + count, n0 + j, mask=has)
            count += has.to(tl.int32)
            s = tl.where(offs_t[None, :] == j[:, None], float("inf"), s)
            m, j = tl.min(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
        return count
    n_new = tl.sum((s < float("inf")).to(tl.int32), axis=1)
    for e in tl.static_range(E):
        m = tl.min(s, axis=1)
        j = tl.min(tl.where(s == m[:, None], offs_t[None, :], BLOCK_N), axis=1)
        has = n_new > e
        tl.store(val_ptr + slot0 + count, m, mask=has)
        tl.store(idx_ptr + slot0 + count, n0 + j, mask=has)
        count += has.to(tl.int32)
        s = tl.where(offs_t[None, :] == j[:, None], float("inf"), s)
    for e in range(E, tl.max(n_new, axis=0)):  # rare: a row with more than E candidates
        m = tl.min(s, axis=1)
        j = tl.min(tl.where(s == m[:, None], offs_t[None, :], BLOCK_N), axis=1)
        has = n_new > e
        tl.store(val_ptr + slot0 + count, m, mask=has)
        tl.store(idx_ptr + slot0 + count, n0 + j, mask=has)
        count += has.to(tl.int32)
        s = tl.where(offs_t[None, :] == j[:, None], float("inf"), s)
    return count


@triton.jit
def _write_top(buf_val, buf_idx, slot0, count, tau, out_val, out_idx, rows, r_ok, pid_s,
               n_splits, K: tl.constexpr, KP: tl.constexpr, CH: tl.constexpr,
               BLOCK_Q: tl.constexpr):
    """The split's top ``K`` of every row's buffer (compacted first where it holds more),
    padded with ``+inf`` to ``KP`` slots, into the dense ``(B, n_splits * KP)`` output."""
    if tl.max(count, axis=0) > K:
        count, tau = _compact(buf_val, buf_idx, slot0, count, tau, K, CH, BLOCK_Q)
    cols = tl.arange(0, KP)
    filled = cols[None, :] < count[:, None]
    v = tl.load(buf_val + slot0[:, None] + cols[None, :], mask=filled, other=float("inf"))
    i = tl.load(buf_idx + slot0[:, None] + cols[None, :], mask=filled, other=0)
    out = (rows[:, None] * n_splits + pid_s) * KP + cols[None, :]
    tl.store(out_val + out, v, mask=r_ok[:, None])
    tl.store(out_idx + out, i, mask=r_ok[:, None])


@triton.jit
def _knn_candidates_kernel(
    q_ptr, b_ptr, bias_ptr, tau_ptr, buf_val, buf_idx, out_val, out_idx, redo_ptr,
    B, M, rows_per_split, n_splits, stride_q, stride_b, stride_bias, scale,
    D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, CH: tl.constexpr,
    T: tl.constexpr, E: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    TMA: tl.constexpr, EPI: tl.constexpr, REDO: tl.constexpr,
):
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    if REDO:
        # only the (query tile, split) programs flagged in redo_ptr run (the others' outputs
        # are already written)
        if tl.load(redo_ptr + pid_q * n_splits + pid_s) == 0:
            return
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < B
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_N)
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    n_tiles = tl.cdiv(stop - start, BLOCK_N)
    KD: tl.constexpr = D // BLOCK_D
    # rows past B never accept a candidate
    tau = tl.load(tau_ptr + offs_q, mask=q_ok, other=float("-inf"))
    count = tl.zeros([BLOCK_Q], dtype=tl.int32)
    slot0 = (offs_q.to(tl.int64) * n_splits + pid_s) * C
    # 32-bit offsets from scalar bases (not 64-bit pointer tensors): fewer live registers
    q_off = offs_q[:, None] * stride_q + offs_d[None, :]
    b_off = offs_t[:, None] * stride_b + offs_d[None, :]
    for c0 in range(0, n_tiles, T):
        # room for T more tiles of candidates? (the reduction's barrier also orders the appends)
        if tl.max(count, axis=0) > C - T * BLOCK_N:
            count, tau = _compact(buf_val, buf_idx, slot0, count, tau, K, CH, BLOCK_Q)
        acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
        # one flat, software-pipelined loop over T tiles x D: the loads of the next tile are in
        # flight while the epilogue of this one runs
        for it in range(0, tl.minimum(T, n_tiles - c0) * KD):
            kd = it % KD
            n0 = start + (c0 + it // KD) * BLOCK_N
            if TMA:
                # tensor descriptors: rows past B or M read as zeros, rows of the next split
                # are masked by the epilogue
                a = q_ptr.load([pid_q * BLOCK_Q, kd * BLOCK_D])
                b = b_ptr.load([n0, kd * BLOCK_D])
            else:
                a = tl.load(q_ptr + (q_off + kd * BLOCK_D), mask=q_ok[:, None], other=0.0)
                b = tl.load(b_ptr + n0.to(tl.int64) * stride_b + (b_off + kd * BLOCK_D),
                            mask=(n0 + offs_t < stop)[:, None], other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
            if kd == KD - 1:
                count = _append_tile(acc, n0, stop, offs_t, bias_ptr, stride_bias, scale, buf_val,
                                     buf_idx, slot0, count, tau, E, HAS_BIAS, BLOCK_N,
                                     EPI)
                acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    _write_top(buf_val, buf_idx, slot0, count, tau, out_val, out_idx, offs_q, q_ok, pid_s,
               n_splits, K, KP, CH, BLOCK_Q)


@triton.jit
def _merge_halves_kernel(buf_val, buf_idx, cnt_ptr, out_val, out_idx, redo_ptr, B, n_splits,
                         K: tl.constexpr, KP: tl.constexpr, C: tl.constexpr, CH: tl.constexpr,
                         BLOCK_Q: tl.constexpr, TILE_Q: tl.constexpr):
    """Merge the two half buffers of every (query, split) into the split's top ``K``.

    For the warp-specialised kernel (:mod:`._gluon_kernels`): its consumers fill the halves
    ``[0, C/2)`` and ``[C/2, C)`` of a row's scratch buffer, counts in ``cnt_ptr``
    ``(B, n_splits, 2)``. Each half is compacted to its ``K`` best, half 1 copied behind half
    0, the row compacted again and written to the dense output. A pair where a half overflowed
    (count above ``C/2``) is flagged in ``redo_ptr`` (``(B / TILE_Q, n_splits)``, zeroed; the
    candidates kernel's query tiles of ``TILE_Q`` rows, a multiple of ``BLOCK_Q``) for the
    Triton kernel. A program merges ``BLOCK_Q`` rows: smaller blocks than the query tile spread
    the merges, and their compactions (every row of a block takes part while one needs it),
    over more programs.
    """
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    H: tl.constexpr = C // 2
    rows = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    r_ok = rows < B
    c_base = (rows * n_splits + pid_s) * 2
    n0 = tl.load(cnt_ptr + c_base, mask=r_ok, other=0)
    n1 = tl.load(cnt_ptr + c_base + 1, mask=r_ok, other=0)
    lost = tl.max(tl.maximum(n0, n1), axis=0) > H
    tl.atomic_max(redo_ptr + (pid_q * BLOCK_Q // TILE_Q) * n_splits + pid_s, lost.to(tl.int32))
    n0 = tl.minimum(n0, H)
    n1 = tl.minimum(n1, H)
    slot0 = (rows.to(tl.int64) * n_splits + pid_s) * C
    tau = tl.zeros([BLOCK_Q], dtype=tl.float32)
    if tl.max(n0, axis=0) > K:
        n0, tau = _compact(buf_val, buf_idx, slot0, n0, tau, K, CH, BLOCK_Q)
    if tl.max(n1, axis=0) > K:
        n1, tau = _compact(buf_val, buf_idx, slot0 + H, n1, tau, K, CH, BLOCK_Q)
    for c0 in range(0, tl.max(n1, axis=0), CH):
        cols = c0 + tl.arange(0, CH)
        mv = cols[None, :] < n1[:, None]
        v = tl.load(buf_val + slot0[:, None] + H + cols[None, :], mask=mv, other=float("inf"))
        i = tl.load(buf_idx + slot0[:, None] + H + cols[None, :], mask=mv, other=0)
        tl.store(buf_val + slot0[:, None] + n0[:, None] + cols[None, :], v, mask=mv)
        tl.store(buf_idx + slot0[:, None] + n0[:, None] + cols[None, :], i, mask=mv)
    # (the reduction's barrier in _write_top makes the copies visible to the compaction)
    _write_top(buf_val, buf_idx, slot0, n0 + n1, tau, out_val, out_idx, rows, r_ok, pid_s,
               n_splits, K, KP, CH, BLOCK_Q)


#: Rows per program of the merge of the halves, and its warps (on an H100, headline case: 16
#: rows and 4 warps 0.022-0.024 ms, 128 rows and 8 warps 0.073-0.079 ms).
MERGE_ROWS, MERGE_WARPS = 16, 4


def merge_halves(buf_val: torch.Tensor, buf_idx: torch.Tensor, counts: torch.Tensor,
                 values: torch.Tensor, indices: torch.Tensor, redo: torch.Tensor, n_query: int,
                 layout: CandidateLayout, keep: int, block_q: int) -> None:
    """Launch :func:`_merge_halves_kernel` (outputs into ``values``, ``indices``, ``redo``)."""
    rows = min(block_q, MERGE_ROWS)
    grid = (triton.cdiv(n_query, rows), layout.n_splits)
    _merge_halves_kernel[grid](buf_val, buf_idx, counts, values, indices, redo, n_query,
                               layout.n_splits, K=keep, KP=layout.out_slots, C=layout.capacity,
                               CH=32, BLOCK_Q=rows, TILE_Q=block_q, num_warps=MERGE_WARPS)


@triton.jit
def _finish_kernel(
    q_ptr, b_ptr, idx_ptr, dist_ptr, out_idx_ptr, n_sel, k, stride_q, stride_b,
    D: tl.constexpr, S: tl.constexpr, BLOCK_D: tl.constexpr, COSINE: tl.constexpr,
):
    """One query row: exact fp32 distances to its ``n_sel`` chosen rows, the ``k`` smallest.

    ``sqrt(sum((q - b)^2))`` (or ``1 - q.b`` for cosine) from the stored rows, then one sort
    of ``S`` (``n_sel`` padded to a power of two) keys packing the distance's order-preserving
    integer key above its position (ties by position, NaN last), so the sorted distances and
    their bank rows come out in one pass.
    """
    row = tl.program_id(0)
    offs = tl.arange(0, S)
    ok = offs < n_sel
    idx = tl.load(idx_ptr + row * n_sel + offs, mask=ok, other=0).to(tl.int64)
    acc = tl.zeros([S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q = tl.load(q_ptr + row.to(tl.int64) * stride_q + offs_d, mask=d_ok,
                    other=0.0).to(tl.float32)
        b = tl.load(b_ptr + idx[:, None] * stride_b + offs_d[None, :],
                    mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        if COSINE:
            acc += tl.sum(b * q[None, :], axis=1)
        else:
            diff = q[None, :] - b
            acc += tl.sum(diff * diff, axis=1)
    if COSINE:
        dist = 1.0 - acc
    else:
        dist = tl.sqrt(acc)
    key = _ordered_key(tl.where(dist == dist, dist, float("nan")))  # NaN: one positive key
    last = tl.full([S], -1, dtype=tl.int32).to(tl.uint32, bitcast=True)
    key = tl.where(ok, key, last)  # padding after everything, NaN included
    packed = tl.sort((key.to(tl.uint64) << 32) | offs.to(tl.uint64))
    pos = (packed & 0xFFFFFFFF).to(tl.int32)
    out = _key_to_float((packed >> 32).to(tl.uint32))
    first = offs < k
    tl.store(dist_ptr + row * k + offs, out.to(dist_ptr.dtype.element_ty), mask=first)
    chosen = tl.load(idx_ptr + row * n_sel + pos, mask=first, other=0)
    tl.store(out_idx_ptr + row * k + offs, chosen.to(tl.int64), mask=first)


@triton.jit
def _row_scores(val_ptr, bias_ptr, row_off, cols, ok, N, stride_c, stride_bias, scale,
                AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr):
    """One ``(R, CH)`` chunk of the rows' scores: ``scale * v + bias`` (AFFINE) or ``v``.

    Unused slots and NaN give ``+inf`` (NaN ranks last, as in ``torch.topk``).
    """
    v = tl.load(val_ptr + row_off[:, None] + cols[None, :] * stride_c, mask=ok,
                other=float("inf"))
    if AFFINE:
        v = (scale * v).to(tl.float32)  # inductor passes float arguments as fp64
        if HAS_BIAS:
            v += tl.load(bias_ptr + cols * stride_bias, mask=cols < N, other=0.0)[None, :]
    return tl.where(v == v, v, float("inf"))


@triton.jit
def _group_min_kernel(x_ptr, bias_ptr, out_ptr, B, n_keys, G, stride_xb, stride_xr,
                      stride_bias, scale, HAS_BIAS: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_B: tl.constexpr):
    """Group minima of a bank sample's scores: ``out[j, b]`` ``(n_keys, B)``.

    ``out[j, b] = min over g < G of scale * x[b, g * n_keys + j] + bias[g * n_keys + j]``
    (``x`` ``(B, G * n_keys)`` products, any strides; NaN counts as ``+inf``). A program owns
    ``BLOCK_K`` groups of ``BLOCK_B`` queries, so the ``G`` loads of a group spread over many
    programs (a selection program per query would read its row's ``G * n_keys`` scores alone).
    """
    j = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    b = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = (j < n_keys)[:, None] & (b < B)[None, :]
    low = tl.full([BLOCK_K, BLOCK_B], float("inf"), dtype=tl.float32)
    for g in tl.range(0, G, num_stages=3):
        r = g * n_keys + j
        x = tl.load(x_ptr + r.to(tl.int64)[:, None] * stride_xr
                    + b.to(tl.int64)[None, :] * stride_xb, mask=ok, other=0.0)
        s = (scale * x).to(tl.float32)  # inductor passes float arguments as fp64
        if HAS_BIAS:
            s += tl.load(bias_ptr + r * stride_bias, mask=j < n_keys, other=0.0)[:, None]
        low = tl.minimum(low, tl.where(s == s, s, float("inf")))
    tl.store(out_ptr + j.to(tl.int64)[:, None] * B + b[None, :], low, mask=ok)


@triton.jit
def _select_kernel(
    val_ptr, idx_ptr, bias_ptr, q_ptr, bmax_ptr, prev_ptr, tau_ptr, sel_ptr,
    B, N, stride_v, stride_c, stride_bias, stride_q, scale, margin_scale,
    K: tl.constexpr, R: tl.constexpr, CH: tl.constexpr, D: tl.constexpr,
    BLOCK_D: tl.constexpr, AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_BMAX: tl.constexpr, HAS_PREV: tl.constexpr, SELECT: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    """The ``K`` smallest of each row of ``(B, N)`` scores, without sorting.

    A program owns ``R`` rows. The ``K``-th smallest score is found by a 32-step bitwise search
    on the order-preserving integer keys of the floats (each step counts, in chunks of ``CH``
    from L1/L2, the keys below a trial key). Then either (SELECT) the indices ``idx[row, j]``
    of the ``K`` smallest scores (ties broken by position) go to ``sel`` ``(B, K)`` in
    position order, or the row's bound ``tau = kth + margin_scale |q| b_max`` goes to ``tau``
    ``(B,)`` (``+inf`` where not finite, then the minimum with ``prev``), where ``|q|`` is the
    query row's norm (``q`` ``(B, D)``) and ``b_max = sqrt(max(bmax, 0))`` (else 1).
    """
    rows = tl.program_id(0) * R + tl.arange(0, R)
    r_ok = rows < B
    row_off = rows.to(tl.int64) * stride_v
    if RESIDENT:
        # the whole row stays in registers (N <= CH): loaded once, then the 32 steps of the
        # search and the selection count over registers, with no reloads
        cols = tl.arange(0, CH)
        ok = r_ok[:, None] & (cols < N)[None, :]
        key = _ordered_key(_row_scores(val_ptr, bias_ptr, row_off, cols, ok, N, stride_c,
                                       stride_bias, scale, AFFINE, HAS_BIAS))
        t = tl.zeros([R], dtype=tl.uint32)
        bit = tl.full([R], _SIGN, dtype=tl.int32).to(tl.uint32, bitcast=True)
        for _ in range(32):
            trial = t | bit
            below = tl.sum(((key < trial[:, None]) & ok).to(tl.int32), axis=1)
            t = tl.where(below < K, trial, t)
            bit = bit >> 1
        if SELECT:
            n_less = tl.sum(((key < t[:, None]) & ok).to(tl.int32), axis=1)
            eq = (key == t[:, None]) & ok
            eq_rank = tl.cumsum(eq.to(tl.int32), axis=1)  # 1-based among ties
            keep = ((key < t[:, None]) & ok) | (eq & (eq_rank <= (K - n_less)[:, None]))
            pos = tl.cumsum(keep.to(tl.int32), axis=1) - 1
            i = tl.load(idx_ptr + row_off[:, None] + cols[None, :] * stride_c, mask=keep,
                        other=0)
            tl.store(sel_ptr + rows.to(tl.int64)[:, None] * K + pos, i, mask=keep)
    else:
        # t = the K-th smallest key: the largest t with #(key < t) < K, from the top bit down
        t = tl.zeros([R], dtype=tl.uint32)
        bit = tl.full([R], _SIGN, dtype=tl.int32).to(tl.uint32, bitcast=True)
        for _ in range(32):
            trial = t | bit
            below = tl.zeros([R], dtype=tl.int32)
            for c0 in range(0, N, CH):
                cols = c0 + tl.arange(0, CH)
                ok = r_ok[:, None] & (cols < N)[None, :]
                v = _row_scores(val_ptr, bias_ptr, row_off, cols, ok, N, stride_c, stride_bias,
                                scale, AFFINE, HAS_BIAS)
                below += tl.sum(((_ordered_key(v) < trial[:, None]) & ok).to(tl.int32), axis=1)
            t = tl.where(below < K, trial, t)
            bit = bit >> 1
        if SELECT:
            n_less = tl.zeros([R], dtype=tl.int32)
            for c0 in range(0, N, CH):
                cols = c0 + tl.arange(0, CH)
                ok = r_ok[:, None] & (cols < N)[None, :]
                v = _row_scores(val_ptr, bias_ptr, row_off, cols, ok, N, stride_c, stride_bias,
                                scale, AFFINE, HAS_BIAS)
                n_less += tl.sum(((_ordered_key(v) < t[:, None]) & ok).to(tl.int32), axis=1)
            n_kept = tl.zeros([R], dtype=tl.int32)
            ties = tl.zeros([R], dtype=tl.int32)
            for c0 in range(0, N, CH):
                cols = c0 + tl.arange(0, CH)
                ok = r_ok[:, None] & (cols < N)[None, :]
                v = _row_scores(val_ptr, bias_ptr, row_off, cols, ok, N, stride_c, stride_bias,
                                scale, AFFINE, HAS_BIAS)
                key = _ordered_key(v)
                eq = (key == t[:, None]) & ok
                eq_rank = ties[:, None] + tl.cumsum(eq.to(tl.int32), axis=1)  # 1-based among ties
                keep = ((key < t[:, None]) & ok) | (eq & (eq_rank <= (K - n_less)[:, None]))
                pos = n_kept[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
                i = tl.load(idx_ptr + row_off[:, None] + cols[None, :] * stride_c, mask=keep,
                            other=0)
                tl.store(sel_ptr + rows.to(tl.int64)[:, None] * K + pos, i, mask=keep)
                n_kept += tl.sum(keep.to(tl.int32), axis=1)
                ties += tl.sum(eq.to(tl.int32), axis=1)
    if not SELECT:
        sq = tl.zeros([R], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_q + offs_d[None, :],
                        mask=r_ok[:, None] & (offs_d < D)[None, :], other=0.0).to(tl.float32)
            sq += tl.sum(q * q, axis=1)
        q_norm = tl.sqrt(sq)
        if HAS_BMAX:
            q_norm = q_norm * tl.sqrt(tl.maximum(tl.load(bmax_ptr).to(tl.float32), 0.0))
        kth = _key_to_float(t)
        tau = kth + (margin_scale * (q_norm * 1.01 + 1e-30)).to(tl.float32)
        # a margin below half an ulp of kth (a zero or tiny query) leaves tau == kth, and the
        # candidates pass only below tau: the next float up, so that ties at kth pass
        tau = tl.where(tau > kth, tau, _key_to_float(t + 1))
        # an overflowed or NaN bound would reject real neighbours: fall back to no bound
        tau = tl.where((tau == tau) & (tl.abs(tau) < float("inf")), tau, float("inf"))
        if HAS_PREV:
            tau = tl.minimum(tau, tl.load(prev_ptr + rows, mask=r_ok, other=float("inf")))
        tl.store(tau_ptr + rows, tau, mask=r_ok)


class CandidateLayout(NamedTuple):
    """Sizes of the per-(query, split) candidate buffers of :func:`knn_candidates`."""

    #: Slots per (query, split) in the dense output (``keep`` padded to a power of two).
    out_slots: int
    #: Slots per (query, split) in the scratch buffer: room for two chunks of tiles.
    capacity: int
    #: Number of bank splits (programs per query tile).
    n_splits: int
    #: Bank rows per split (a whole number of tiles).
    rows_per_split: int


def candidate_layout(n_query: int, n_bank: int, keep: int, block_q: int, block_n: int,
                     chunk_tiles: int, splits_per_sm: int, n_sm: int) -> CandidateLayout:
    """The candidate buffers' sizes for these shapes (see :class:`CandidateLayout`)."""
    out_slots = max(16, triton.next_power_of_2(keep))
    # compaction runs when a row's fill exceeds capacity - chunk_tiles * block_n: a chunk of
    # tiles can then never overflow, whatever the data
    capacity = out_slots + 2 * chunk_tiles * block_n
    n_tiles = triton.cdiv(n_bank, block_n)
    n_qtiles = triton.cdiv(n_query, block_q)
    # about splits_per_sm programs per multiprocessor in one wave; the bank is split only as
    # far as that needs (B = 1 still fills the GPU), each split a whole number of tiles
    wanted = max(1, (splits_per_sm * n_sm) // n_qtiles)
    tiles_per_split = triton.cdiv(n_tiles, min(wanted, n_tiles))
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    return CandidateLayout(out_slots, capacity, n_splits, tiles_per_split * block_n)


def wave_sample_step(n_query: int, n_bank: int, step: int, block_q: int, block_n: int,
                     splits_per_sm: int, n_sm: int) -> int:
    """Row step of a bank sample of about every ``step``-th row, rounded to fill whole waves.

    The sample's tiles (``block_n`` rows) times the query tiles make a whole number of tiles
    per program when there are ``splits_per_sm`` programs per multiprocessor, one wave
    (:func:`candidate_layout` with the same ``splits_per_sm`` splits it that way): a wave of
    programs of 2 tiles, say, instead of one of 2 tiles and a second, mostly idle, one.
    """
    n_qtiles = triton.cdiv(n_query, block_q)
    slots = max(1, splits_per_sm * n_sm)
    tiles = triton.cdiv(triton.cdiv(n_bank, max(1, step)), block_n)
    per_program = max(1, round(tiles * n_qtiles / slots))
    tiles = max(1, per_program * slots // n_qtiles)
    return max(1, triton.cdiv(n_bank, tiles * block_n))


#: Longest rows that the selection kernel holds in registers (one load, then 32 steps over
#: registers, instead of reloading the row from L1/L2 at each step).
SELECT_RESIDENT_MAX = 16384

_LAUNCHERS: dict[tuple[int, int, int], Any] = {}


def _launcher(num_warps: int, num_stages: int, maxnreg: int) -> Any:
    """The candidates kernel with its launch options in a single-config ``triton.autotune``.

    ``maxnreg`` caps the registers per thread (0: no cap), so that two programs of 256 threads
    share a multiprocessor (at most 128 registers each) and one's epilogue overlaps the other's
    products.
    """
    key = (num_warps, num_stages, maxnreg)
    if key not in _LAUNCHERS:
        options: dict[str, Any] = dict(num_warps=num_warps, num_stages=num_stages)
        if maxnreg > 0:
            options["maxnreg"] = maxnreg
        _LAUNCHERS[key] = triton.autotune(configs=[triton.Config({}, **options)], key=[])(
            _knn_candidates_kernel
        )
    return _LAUNCHERS[key]


def _candidates_shape(query: torch.Tensor, bank: torch.Tensor, keep: int, block_q: int,
                      block_n: int, chunk_tiles: int, splits_per_sm: int, sample_step: int
                      ) -> tuple[CandidateLayout, tuple[int, int], int]:
    """The buffer layout, the ``(B, n_splits * out_slots)`` output shape and the row step.

    The row step is 1 (the whole bank) unless ``sample_step > 0``: then the search covers
    every ``step``-th bank row, ``step`` from :func:`wave_sample_step`.
    """
    n_sm = torch.cuda.get_device_properties(query.device).multi_processor_count
    n_bank = bank.shape[0]
    step = 1
    if sample_step > 0:
        step = wave_sample_step(query.shape[0], n_bank, sample_step, block_q, block_n,
                                splits_per_sm, n_sm)
        n_bank = triton.cdiv(n_bank, step)
    lay = candidate_layout(query.shape[0], n_bank, keep, block_q, block_n, chunk_tiles,
                           splits_per_sm, n_sm)
    return lay, (query.shape[0], lay.n_splits * lay.out_slots), step


def _tma_ready(x: torch.Tensor) -> bool:
    """Whether a 2-D tensor can back a tensor descriptor (16-byte aligned base and rows)."""
    item = x.element_size()
    return (x.stride(1) == 1 and x.data_ptr() % 16 == 0 and (x.stride(0) * item) % 16 == 0
            and x.shape[0] < 2**31)


def launch_candidates(query: torch.Tensor, bank: torch.Tensor, bias: torch.Tensor,
                      tau: torch.Tensor, scale: float, has_bias: bool, keep: int, block_q: int,
                      block_n: int, block_d: int, num_warps: int, num_stages: int,
                      splits_per_sm: int, precision: str, chunk_tiles: int, rounds: int,
                      maxnreg: int, sample_step: int, tma: bool, epilogue: int,
                      redo: torch.Tensor | None = None,
                      out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None
                      = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`knn_candidates`' launch; with ``redo`` only the flagged programs run.

    ``redo`` ``(n_query_tiles, n_splits)`` int32 (non-zero: run) and ``out`` (the scratch
    values and indices, then the outputs, as :func:`knn_candidates` allocates them) let
    another kernel hand over the (query tile, split) pairs it could not finish.
    """
    lay, shape, step = _candidates_shape(query, bank, keep, block_q, block_n, chunk_tiles,
                                         splits_per_sm, sample_step)
    if step > 1:
        bank = bank[::step]
        if has_bias:
            bias = bias[::step]
    n_query, dim = query.shape
    dev = query.device
    scratch = (n_query, lay.n_splits, lay.capacity)
    if out is None:
        out = (torch.empty(scratch, dtype=torch.float32, device=dev),
               torch.empty(scratch, dtype=torch.int32, device=dev),
               torch.empty(shape, dtype=torch.float32, device=dev),
               torch.empty(shape, dtype=torch.int32, device=dev))
    scratch_val, scratch_idx, values, indices = out
    grid = (triton.cdiv(n_query, block_q), lay.n_splits)
    q_in: Any = query
    b_in: Any = bank
    use_tma = tma and _tma_ready(query) and _tma_ready(bank)
    if use_tma:
        q_in = TensorDescriptor(query, list(query.shape), list(query.stride()),
                                [block_q, block_d])
        b_in = TensorDescriptor(bank, list(bank.shape), list(bank.stride()), [block_n, block_d])
    with torch.cuda.device(dev):
        _launcher(num_warps, num_stages, maxnreg)[grid](
            q_in, b_in, bias, tau, scratch_val, scratch_idx, values, indices,
            redo if redo is not None else tau,
            n_query, bank.shape[0], lay.rows_per_split, lay.n_splits, query.stride(0),
            bank.stride(0), bias.stride(0) if has_bias else 1, scale, D=dim, K=keep,
            KP=lay.out_slots, C=lay.capacity, CH=32,
            T=chunk_tiles, E=rounds, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
            HAS_BIAS=has_bias, PRECISION=precision, TMA=use_tma, EPI=epilogue,
            REDO=redo is not None,
        )
    return values, indices


# A plain custom op (opaque to inductor, one graph with dynamo): inductor re-emits the
# launches of a triton_op and would drop the register cap, so this op launches the kernel itself
@torch.library.custom_op("selectorch::knn_candidates", mutates_args=())
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
    chunk_tiles: int,
    rounds: int,
    maxnreg: int,
    sample_step: int,
    tma: bool,
    epilogue: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-split top-``keep`` candidates of every query; see the module docstring.

    ``query`` ``(B, D)``, ``bank`` ``(M, D)``, ``bias`` ``(M,)`` (any stride; unused unless
    ``has_bias``), ``tau`` ``(B,)`` fp32. With ``sample_step > 0`` only a strided sample of
    the bank is searched, about every ``sample_step``-th row (see :func:`wave_sample_step`),
    and the indices are the sample's rows. ``tma`` loads the tiles through tensor descriptors
    where both tensors allow it (16-byte aligned base and rows; else pointer loads), and
    ``epilogue`` picks the append code (1: argmin reductions, 0: minimum then column).

    Returns ``(values, indices)`` of shape ``(B, n_splits * out_slots)`` (fp32, int32): the
    scores ``bias + scale * q.b`` of each split's best candidates, ``+inf`` (index 0) in unused
    slots.
    """
    return launch_candidates(query, bank, bias, tau, scale, has_bias, keep, block_q, block_n,
                             block_d, num_warps, num_stages, splits_per_sm, precision,
                             chunk_tiles, rounds, maxnreg, sample_step, tma, epilogue)


@knn_candidates.register_fake
def _knn_candidates_fake(query, bank, bias, tau, scale, has_bias, keep, block_q, block_n,
                         block_d, num_warps, num_stages, splits_per_sm, precision, chunk_tiles,
                         rounds, maxnreg, sample_step, tma, epilogue):
    """Shapes and dtypes of :func:`knn_candidates`' outputs, for tracing."""
    _, shape, _ = _candidates_shape(query, bank, keep, block_q, block_n, chunk_tiles,
                                    splits_per_sm, sample_step)
    return (query.new_empty(shape, dtype=torch.float32),
            query.new_empty(shape, dtype=torch.int32))


@triton_op("selectorch::knn_finish", mutates_args=())
def knn_finish(
    query: torch.Tensor, bank: torch.Tensor, indices: torch.Tensor, k: int, cosine: bool,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest of each query's chosen rows, by exact fp32 distance, sorted.

    ``query`` ``(B, D)`` (any float dtype, read as fp32), ``bank`` ``(M, D)``, ``indices``
    ``(B, n_sel)`` int32 bank rows with ``k <= n_sel <= 128``. Returns the distances ``(B,
    k)`` in ``out_dtype``, ascending, and their bank rows ``(B, k)`` int64.
    """
    n_query, n_sel = indices.shape
    dim = query.shape[1]
    dist = torch.empty((n_query, k), dtype=out_dtype, device=query.device)
    rows = torch.empty((n_query, k), dtype=torch.int64, device=query.device)
    slots = max(16, triton.next_power_of_2(n_sel))
    block_d = min(max(16, 8192 // slots), triton.next_power_of_2(dim))
    wrap_triton(_finish_kernel)[(n_query,)](
        query, bank, indices, dist, rows, n_sel, k, query.stride(0), bank.stride(0),
        D=dim, S=slots, BLOCK_D=block_d, COSINE=cosine, num_warps=8,
    )
    return dist, rows


def _select_launch(values: torch.Tensor, indices: torch.Tensor, bias: torch.Tensor,
                   query: torch.Tensor, bias_max: torch.Tensor, prev: torch.Tensor,
                   tau: torch.Tensor, sel: torch.Tensor, scale: float, margin_scale: float,
                   keep: int, affine: bool, has_bias: bool, has_bmax: bool, has_prev: bool,
                   select: bool) -> None:
    n_query, n_cols = values.shape
    dim = 16 if select else query.shape[1]  # the query is read only for the bound
    resident = n_cols <= SELECT_RESIDENT_MAX
    chunk = triton.next_power_of_2(n_cols)
    if not resident:
        chunk = min(2048, chunk)
    # about 32 scores a thread when the row stays in registers
    warps = min(16, max(4, chunk // 1024)) if resident else 4
    wrap_triton(_select_kernel)[(n_query,)](
        values, indices, bias, query, bias_max, prev, tau, sel,
        n_query, n_cols, values.stride(0), values.stride(1), bias.stride(0) if has_bias else 1,
        query.stride(0),
        scale, margin_scale, K=keep, R=1, CH=chunk, D=dim,
        BLOCK_D=min(512, triton.next_power_of_2(dim)), AFFINE=affine, HAS_BIAS=has_bias,
        HAS_BMAX=has_bmax, HAS_PREV=has_prev, SELECT=select, RESIDENT=resident,
        num_warps=warps,
    )


@triton_op("selectorch::knn_threshold", mutates_args=())
def knn_threshold(
    scores: torch.Tensor,
    query: torch.Tensor,
    bias: torch.Tensor,
    bias_max: torch.Tensor,
    prev: torch.Tensor,
    scale: float,
    margin_scale: float,
    keep: int,
    affine: bool,
    has_bias: bool,
    has_bmax: bool,
    has_prev: bool,
) -> torch.Tensor:
    """Per-query upper bound ``(B,)`` on the ``keep``-th smallest score, from a sample's scores.

    ``scores`` ``(B, N)`` fp32 (any strides): the scores themselves, or
    (``affine``) products ``q.b`` that become ``scale * q.b + bias[j]`` (``bias`` ``(N,)``,
    any stride, when ``has_bias``). The bound is the ``keep``-th smallest score plus the
    margin ``margin_scale * |q| * b_max * 1.01`` (``query`` ``(B, D)``; ``b_max`` the square
    root of the 0-d ``bias_max`` when ``has_bmax``, else 1), ``+inf`` where not finite, and
    not above ``prev`` ``(B,)`` when ``has_prev``. NaN scores rank last. Tensors that a flag
    leaves unused may be any tensor (they are not read).
    """
    tau = torch.empty(scores.shape[0], dtype=torch.float32, device=scores.device)
    _select_launch(scores, scores, bias, query, bias_max, prev, tau, tau, scale, margin_scale,
                   keep, affine, has_bias, has_bmax, has_prev, False)
    return tau


@triton_op("selectorch::knn_group_minima", mutates_args=())
def knn_group_minima(products: torch.Tensor, bias: torch.Tensor, scale: float, has_bias: bool,
                     group: int) -> torch.Tensor:
    """Minima of ``group`` sample scores each: ``(n_keys, B)`` with ``n_keys = N // group``.

    ``products`` ``(B, N)`` fp32 ``q.b`` of ``N`` bank rows (any strides), ``bias`` ``(N,)``
    (any stride; read when ``has_bias``). Key ``j`` of query ``b`` is the smallest of the
    scores ``scale * products[b, r] + bias[r]`` over rows ``r = j, j + n_keys, ...`` (``group``
    rows; the last ``N mod group`` rows are left out). The ``K``-th smallest key is the score
    of ``K`` distinct rows each no larger than it, so :func:`knn_threshold` over the keys
    (``affine=False``) bounds the ``K``-th smallest score as over the scores themselves, from
    ``group`` times fewer keys. NaN scores count as ``+inf``.
    """
    n_query, n_cols = products.shape
    n_keys = n_cols // group
    out = torch.empty((n_keys, n_query), dtype=torch.float32, device=products.device)
    block_b = min(256, triton.next_power_of_2(n_query))
    block_k = max(1, 1024 // block_b)
    grid = (triton.cdiv(n_keys, block_k), triton.cdiv(n_query, block_b))
    wrap_triton(_group_min_kernel)[grid](
        products, bias, out, n_query, n_keys, group, products.stride(0), products.stride(1),
        bias.stride(0) if has_bias else 1, scale, HAS_BIAS=has_bias, BLOCK_K=block_k,
        BLOCK_B=block_b, num_warps=4,
    )
    return out


@triton_op("selectorch::knn_select", mutates_args=())
def knn_select(values: torch.Tensor, indices: torch.Tensor, keep: int) -> torch.Tensor:
    """``indices[b, j]`` of the ``keep`` smallest ``values[b, j]`` of every row, ``(B, keep)``.

    ``values`` ``(B, N)`` fp32 and ``indices`` ``(B, N)`` int32 with the same strides,
    ``N >= keep``.
    Ties at the ``keep``-th value go to the first positions; the output is in position order,
    not sorted. Replaces ``indices.gather(1, values.topk(keep, largest=False).indices)``.
    """
    sel = torch.empty((values.shape[0], keep), dtype=torch.int32, device=values.device)
    _select_launch(values, indices, values, values, values, values, values, sel, 1.0, 0.0,
                   keep, False, False, False, False, True)
    return sel
