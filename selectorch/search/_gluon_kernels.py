"""Warp-specialised Gluon version of the fused kNN candidates kernel (Hopper, bf16/fp16 banks).

This module imports Triton's experimental Gluon at the top: import it only through
:func:`selectorch.search.triton_knn._gluon`, which does so lazily (only on Hopper GPUs, for
half banks with at least 65 queries; ``_config=dict(ws=False)`` keeps the Triton kernel).

Same job and outputs as ``_knn_candidates_kernel`` in :mod:`._triton_kernels`: a program owns
``BLOCK_Q`` queries and one split of the bank and keeps, per query, the split's candidates
below the threshold ``tau`` in a scratch buffer, then writes the split's top ``K`` to the dense
output. The work is split over three partitions of one program so that the threshold epilogue
runs while the tensor cores work:

* a one-warp **producer** streams ``(BLOCK_Q, BLOCK_D)`` query and ``(BLOCK_N, BLOCK_D)`` bank
  tiles into a ring of ``STAGES`` shared-memory stages through TMA (mbarriers: ``ready`` when
  a stage has landed, ``empty`` when its consumer's product no longer reads it);
* two **consumer** warpgroups in ping-pong, each with its own ``(BLOCK_Q, BLOCK_N)`` fp32
  accumulator: consumer ``c`` takes the split's tiles ``c, c + 2, ...`` and starts a tile's
  products only once the other's products of the previous tile are done (``done``
  mbarriers), so while one runs its epilogue (threshold compare, appends) the other's
  ``wgmma`` products keep the tensor cores busy. Each consumer appends to its own half of the
  row's scratch buffer (fill counts in registers, no atomics), with the Triton kernel's argmin
  rounds. The consumers never compact (with the compaction in their loop ptxas spilled in
  the product loop: 2.67 instead of 2.49 ms): a half that fills flags its (query tile, split)
  pair, which the Triton kernel then redoes, so the outputs are exact whatever the data.

A small Triton kernel (``merge_halves`` in :mod:`._triton_kernels`) then merges the two halves
of every row into the split's top ``K`` and flags the pairs where a half overflowed. (Merging
in this kernel, after the partitions, made ptxas spill in the consumers' product loop.)
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from selectorch.search._triton_kernels import (
    CandidateLayout,
    _candidates_shape,
    _tma_ready,
    knn_candidates,
    merge_halves,
)
from selectorch.search._triton_kernels import launch_candidates as launch_triton


@gluon.jit
def _argmin_combine(v0, i0, v1, i1):
    """Smaller value, then smaller index (the first column of a row minimum)."""
    take0 = (v0 < v1) | ((v0 == v1) & (i0 < i1))
    return gl.where(take0, v0, v1), gl.where(take0, i0, i1)


@gluon.jit
def _row_argmin(s, cols):
    """Row minima of ``s`` and their first columns (``cols`` the columns, ``s``'s shape)."""
    return gl.reduce((s, cols), 1, _argmin_combine)


@gluon.jit
def _producer(q_desc, b_desc, a_bufs, b_bufs, ready, empty, q0, start, n_tiles,
              KD: gl.constexpr, STAGES: gl.constexpr):
    """One warp: TMA loads of every (tile, D-block) of the split, in the consumers' order."""
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_D: gl.constexpr = b_desc.block_type.shape[1]
    nbytes: gl.constexpr = q_desc.block_type.nbytes + b_desc.block_type.nbytes
    for t in range(n_tiles):
        n0 = start + t * BLOCK_N
        for kd in range(KD):
            g = t * KD + kd
            s = g % STAGES
            mbarrier.wait(empty.index(s), ((g // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), nbytes)
            tma.async_copy_global_to_shared(q_desc, [q0, kd * BLOCK_D], ready.index(s),
                                            a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [n0, kd * BLOCK_D], ready.index(s),
                                            b_bufs.index(s))


@gluon.jit
def _tile_product(a_bufs, b_bufs, ready, empty, done, t, CID: gl.constexpr,
                  KD: gl.constexpr, STAGES: gl.constexpr, acc_layout: gl.constexpr):
    """The ``(BLOCK_Q, BLOCK_N)`` product of tile ``t`` (one wgmma in flight at a time).

    The consumers' products run in tile order: tile ``t`` starts once the other consumer's
    products of tile ``t - 1`` are done (``done``), so every stage barrier a consumer waits on
    is at most one phase ahead of it (parity waits are exact) and one consumer's epilogue
    overlaps the other's products.
    """
    BLOCK_Q: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
    acc = gl.zeros([BLOCK_Q, BLOCK_N], gl.float32, acc_layout)
    mbarrier.wait(done.index(1 - CID), ((t - 1) // 2) & 1, pred=t > 0)
    g0 = t * KD
    for kd in range(KD):
        g = g0 + kd
        s = g % STAGES
        mbarrier.wait(ready.index(s), (g // STAGES) & 1)
        a = a_bufs.index(s)
        b = b_bufs.index(s)
        acc = warpgroup_mma(a, b.permute((1, 0)), acc, use_acc=kd > 0, is_async=True)
        acc, _, _ = warpgroup_mma_wait(num_outstanding=1, deps=(acc, a, b))
        # the product of the previous D-block is done: its stage is free
        mbarrier.arrive(empty.index((g + STAGES - 1) % STAGES), pred=kd > 0)
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
    mbarrier.arrive(empty.index((g0 + KD - 1) % STAGES))
    mbarrier.arrive(done.index(CID))
    return acc


@gluon.jit
def _consumer(a_bufs, b_bufs, ready, empty, done, bias_ptr, tau_ptr, buf_val, buf_idx, cnt_ptr,
              q0, B, pid_s, n_splits, start, stop, n_tiles, stride_bias, scale,
              CID: gl.constexpr, KD: gl.constexpr, STAGES: gl.constexpr, K: gl.constexpr,
              C: gl.constexpr, E: gl.constexpr, HAS_BIAS: gl.constexpr, MODE: gl.constexpr):
    """One consumer warpgroup: products and epilogues of the split's tiles ``CID, CID + 2, ...``.

    ``MODE`` 1 appends candidates (the real epilogue); ``MODE`` 0 only keeps a row minimum
    (the kernel's floor, for benchmarks), stored in slot 0 of the row's half buffer.
    """
    BLOCK_Q: gl.constexpr = a_bufs.type.shape[1]
    BLOCK_N: gl.constexpr = b_bufs.type.shape[1]
    H: gl.constexpr = C // 2
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    row_l: gl.constexpr = gl.SliceLayout(1, acc_layout)
    col_l: gl.constexpr = gl.SliceLayout(0, acc_layout)
    offs_q = q0 + gl.arange(0, BLOCK_Q, layout=row_l)
    q_ok = offs_q < B
    offs_t = gl.arange(0, BLOCK_N, layout=col_l)
    tau = gl.load(tau_ptr + offs_q, mask=q_ok, other=-float("inf"))
    count = gl.zeros([BLOCK_Q], gl.int32, row_l)
    slot0 = (offs_q.to(gl.int64) * n_splits + pid_s) * C + CID * H
    best = gl.full([BLOCK_Q], float("inf"), gl.float32, row_l)
    for t in range(CID, n_tiles, 2):
        acc = _tile_product(a_bufs, b_bufs, ready, empty, done, t, CID, KD, STAGES,
                            acc_layout)
        n0 = start + t * BLOCK_N
        offs_n = n0 + offs_t
        n_ok = offs_n < stop
        if HAS_BIAS:
            bias = gl.load(bias_ptr + offs_n * stride_bias, mask=n_ok, other=float("inf"))
        else:
            bias = gl.where(n_ok, 0.0, float("inf"))
        s = bias[None, :] + scale * acc
        if MODE == 0:
            best = gl.minimum(best, gl.min(s, axis=1))
        else:
            s = gl.where(s < tau[:, None], s, float("inf"))
            cols = gl.zeros([BLOCK_Q, BLOCK_N], gl.int32, acc_layout) + offs_t[None, :]
            m, j = _row_argmin(s, cols)
            for _ in gl.static_range(E):
                has = m < float("inf")
                gl.store(buf_val + slot0 + count, m, mask=has & (count < H))
                gl.store(buf_idx + slot0 + count, n0 + j, mask=has & (count < H))
                count += has.to(gl.int32)
                s = gl.where(cols == j[:, None], float("inf"), s)
                m, j = _row_argmin(s, cols)
            while gl.min(m, axis=0) < float("inf"):  # rare: a row with more than E candidates
                has = m < float("inf")
                gl.store(buf_val + slot0 + count, m, mask=has & (count < H))
                gl.store(buf_idx + slot0 + count, n0 + j, mask=has & (count < H))
                count += has.to(gl.int32)
                s = gl.where(cols == j[:, None], float("inf"), s)
                m, j = _row_argmin(s, cols)
    if MODE == 0:
        has = (best < float("inf")) & q_ok
        gl.store(buf_val + slot0, best, mask=has)
        gl.store(buf_idx + slot0, gl.zeros([BLOCK_Q], gl.int32, row_l), mask=has)
        count = has.to(gl.int32)
    gl.store(cnt_ptr + (offs_q * n_splits + pid_s) * 2 + CID, count, mask=q_ok)


@gluon.jit
def _consumer0(a_bufs, b_bufs, ready, empty, done, bias_ptr, tau_ptr, buf_val, buf_idx, cnt_ptr,
               q0, B, pid_s, n_splits, start, stop, n_tiles, stride_bias, scale,
               KD: gl.constexpr, STAGES: gl.constexpr, K: gl.constexpr, C: gl.constexpr,
               E: gl.constexpr, HAS_BIAS: gl.constexpr, MODE: gl.constexpr):
    _consumer(a_bufs, b_bufs, ready, empty, done, bias_ptr, tau_ptr, buf_val, buf_idx, cnt_ptr,
              q0, B, pid_s, n_splits, start, stop, n_tiles, stride_bias, scale,
              gl.constexpr(0), KD, STAGES, K, C, E, HAS_BIAS, MODE)


@gluon.jit
def _consumer1(a_bufs, b_bufs, ready, empty, done, bias_ptr, tau_ptr, buf_val, buf_idx, cnt_ptr,
               q0, B, pid_s, n_splits, start, stop, n_tiles, stride_bias, scale,
               KD: gl.constexpr, STAGES: gl.constexpr, K: gl.constexpr, C: gl.constexpr,
               E: gl.constexpr, HAS_BIAS: gl.constexpr, MODE: gl.constexpr):
    _consumer(a_bufs, b_bufs, ready, empty, done, bias_ptr, tau_ptr, buf_val, buf_idx, cnt_ptr,
              q0, B, pid_s, n_splits, start, stop, n_tiles, stride_bias, scale,
              gl.constexpr(1), KD, STAGES, K, C, E, HAS_BIAS, MODE)


@gluon.jit
def _knn_candidates_ws_kernel(
    q_desc, b_desc, bias_ptr, tau_ptr, buf_val, buf_idx, cnt_ptr,
    B, M, rows_per_split, n_splits, stride_bias, scale,
    D: gl.constexpr, K: gl.constexpr, C: gl.constexpr, E: gl.constexpr,
    STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, MODE: gl.constexpr, CONSUMER_REGS: gl.constexpr,
):
    BLOCK_Q: gl.constexpr = q_desc.block_type.shape[0]
    BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
    BLOCK_D: gl.constexpr = b_desc.block_type.shape[1]
    KD: gl.constexpr = D // BLOCK_D
    pid_q = gl.program_id(0)
    pid_s = gl.program_id(1)
    q0 = pid_q * BLOCK_Q
    start = pid_s * rows_per_split
    stop = gl.minimum(start + rows_per_split, M)
    n_tiles = gl.cdiv(stop - start, BLOCK_N)

    a_bufs = gl.allocate_shared_memory(q_desc.dtype, [STAGES] + q_desc.block_type.shape,
                                       q_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape,
                                       b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    done = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for st in gl.static_range(STAGES):
        mbarrier.init(ready.index(st), count=1)
        mbarrier.init(empty.index(st), count=1)
    for st in gl.static_range(2):
        mbarrier.init(done.index(st), count=1)
    fence_async_shared()

    gl.warp_specialize([
        (_consumer0, (a_bufs, b_bufs, ready, empty, done, bias_ptr, tau_ptr, buf_val, buf_idx,
                      cnt_ptr, q0, B, pid_s, n_splits, start, stop, n_tiles, stride_bias, scale,
                      KD, STAGES, K, C, E, HAS_BIAS, MODE)),
        (_consumer1, (a_bufs, b_bufs, ready, empty, done, bias_ptr, tau_ptr, buf_val, buf_idx,
                      cnt_ptr, q0, B, pid_s, n_splits, start, stop, n_tiles, stride_bias, scale,
                      KD, STAGES, K, C, E, HAS_BIAS, MODE)),
        (_producer, (q_desc, b_desc, a_bufs, b_bufs, ready, empty, q0, start, n_tiles,
                     KD, STAGES)),
    ], [4, 1], [CONSUMER_REGS, 24])


@functools.cache
def _smem_layout(rows: int, cols: int, bf16: bool) -> gl.NVMMASharedLayout:
    """The shared-memory layout of a ``(rows, cols)`` bf16 (else fp16) tile (cached)."""
    return gl.NVMMASharedLayout.get_default_for([rows, cols], gl.bfloat16 if bf16 else gl.float16)


def launch_candidates(query: torch.Tensor, bank: torch.Tensor, bias: torch.Tensor,
                      tau: torch.Tensor, scale: float, has_bias: bool, keep: int,
                      layout: CandidateLayout, *, block_q: int = 128, block_n: int = 128,
                      block_d: int = 64, stages: int = 6, rounds: int = 2,
                      consumer_regs: int = 224, maxnreg: int = 168, mode: int = 1
                      ) -> tuple[torch.Tensor, ...]:
    """Launch the warp-specialised kernel.

    ``layout`` is the Triton kernel's :class:`CandidateLayout` (its splits must be whole
    numbers of ``block_n`` rows, its capacity even). Returns ``(values, indices, counts,
    redo, buf_val, buf_idx)``: the outputs, each consumer's fill at its end ``(B, n_splits,
    2)`` (more than half the capacity: that half overflowed), the ``(query tiles, n_splits)``
    flags of the pairs whose outputs are incomplete (a half overflowed; the Triton kernel
    must redo them) and the scratch buffers. ``mode`` 0: the floor, only a row minimum per
    consumer, for benchmarks.
    """
    n_query, dim = query.shape
    dev = query.device
    half = bank.dtype == torch.bfloat16
    q_lay = _smem_layout(block_q, block_d, half)
    b_lay = _smem_layout(block_n, block_d, half)
    q_desc = TensorDescriptor(query, list(query.shape), list(query.stride()), [block_q, block_d],
                              q_lay)
    b_desc = TensorDescriptor(bank, list(bank.shape), list(bank.stride()), [block_n, block_d],
                              b_lay)
    lay = layout
    scratch = (n_query, lay.n_splits, lay.capacity)
    buf_val = torch.empty(scratch, dtype=torch.float32, device=dev)
    buf_idx = torch.empty(scratch, dtype=torch.int32, device=dev)
    counts = torch.empty((n_query, lay.n_splits, 2), dtype=torch.int32, device=dev)
    shape = (n_query, lay.n_splits * lay.out_slots)
    values = torch.empty(shape, dtype=torch.float32, device=dev)
    indices = torch.empty(shape, dtype=torch.int32, device=dev)
    grid = ((n_query + block_q - 1) // block_q, lay.n_splits)
    redo = torch.zeros(grid, dtype=torch.int32, device=dev)  # the merge's programs raise flags
    with torch.cuda.device(dev):
        _knn_candidates_ws_kernel[grid](
            q_desc, b_desc, bias, tau, buf_val, buf_idx, counts,
            n_query, bank.shape[0], lay.rows_per_split, lay.n_splits,
            bias.stride(0) if has_bias else 1, scale,
            D=dim, K=keep, C=lay.capacity, E=rounds, STAGES=stages,
            HAS_BIAS=has_bias, MODE=mode, CONSUMER_REGS=consumer_regs, num_warps=4,
            maxnreg=maxnreg,
        )
        merge_halves(buf_val, buf_idx, counts, values, indices, redo, n_query, lay, keep,
                     block_q)
    return values, indices, counts, redo, buf_val, buf_idx


def ws_ready(query: torch.Tensor, bank: torch.Tensor) -> bool:
    """Whether the warp-specialised kernel can serve these tensors (else the Triton kernel)."""
    return (bank.dtype in (torch.bfloat16, torch.float16) and query.dtype == bank.dtype
            and bank.shape[1] % 64 == 0 and _tma_ready(query) and _tma_ready(bank))


# An opaque custom op like the Triton kernel's (one graph with dynamo, launch options kept)
@torch.library.custom_op("selectorch::knn_candidates_ws", mutates_args=())
def knn_candidates_ws(
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
    ws_stages: int,
    ws_regs: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~selectorch.search._triton_kernels.knn_candidates` through the Gluon kernel.

    Same arguments (the first twenty) and outputs: the buffers' layout is the Triton
    kernel's for ``block_q`` x ``block_n`` tiles, each consumer streaming tiles of
    ``block_n // 2`` rows; ``ws_stages`` shared-memory stages, ``ws_regs`` registers per
    consumer thread. The consumers do not compact their buffers: the (query tile, split)
    pairs where one overflowed are done again by the Triton kernel (which does), so the
    outputs are exact whatever the data. Where :func:`ws_ready` rejects the tensors, or the
    shapes do not fit (``block_q != 128``, ``block_d != 64``), the Triton kernel runs
    instead.
    """
    args = (query, bank, bias, tau, scale, has_bias, keep, block_q, block_n, block_d, num_warps,
            num_stages, splits_per_sm, precision, chunk_tiles, rounds, maxnreg, sample_step, tma,
            epilogue)
    sub = block_n // 2
    lay, _, step = _candidates_shape(query, bank, keep, block_q, block_n, chunk_tiles,
                                     splits_per_sm, sample_step)
    if step > 1:
        bank = bank[::step]
        if has_bias:
            bias = bias[::step]
    fits = (block_q == 128 and block_d == 64 and sub in (64, 128) and ws_ready(query, bank))
    if not fits:
        return knn_candidates(*args)
    values, indices, _, redo, buf_val, buf_idx = launch_candidates(
        query, bank, bias, tau, scale, has_bias, keep, lay, block_q=block_q, block_n=sub,
        block_d=block_d, stages=ws_stages, rounds=rounds, consumer_regs=ws_regs)
    # the (query tile, split) pairs where a consumer's buffer overflowed (the consumers do not
    # compact; rare with a sample's threshold) run again through the Triton kernel, which
    # compacts; the other programs of that launch return at once
    return launch_triton(*args, redo=redo, out=(buf_val, buf_idx, values, indices))


@knn_candidates_ws.register_fake
def _knn_candidates_ws_fake(query, bank, bias, tau, scale, has_bias, keep, block_q, block_n,
                            block_d, num_warps, num_stages, splits_per_sm, precision,
                            chunk_tiles, rounds, maxnreg, sample_step, tma, epilogue, ws_stages,
                            ws_regs):
    """Shapes and dtypes of :func:`knn_candidates_ws`' outputs, for tracing."""
    _, shape, _ = _candidates_shape(query, bank, keep, block_q, block_n, chunk_tiles,
                                    splits_per_sm, sample_step)
    return (query.new_empty(shape, dtype=torch.float32),
            query.new_empty(shape, dtype=torch.int32))
