"""GPU benchmark of the exact kNN search (issue 9): fused Triton kernel vs reading the bank once
and vs ``(q @ bank.T).topk(k)``, every ratio measured side by side in one run.

Run on the GPU machine, from the repository root:

    python benchmarks/gpu_knn.py            # the full table (markdown on stdout)
    python benchmarks/gpu_knn.py --quick    # the headline case only
    python benchmarks/gpu_knn.py --sweep    # kernel options, floor and parts, headline case

Timings are medians of ``triton.testing.do_bench`` (CUDA events, warm-up included, L2 flushed
between repetitions). "read" is the faster of ``bank.sum(dtype=torch.float32)`` and a Triton
kernel that only loads the bank. Data: rank-32 Gaussian embeddings plus isotropic noise (so that
neighbours are separated as in real features); recall@k is measured on up to 256 queries
against exact fp32 search on the fp32 bank.
"""

from __future__ import annotations

import argparse
import gc
import platform
import sys
import time

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from selectorch.search import fused_knn_search

HEADLINE = (256, 1_281_167, 2048, torch.bfloat16, 50)


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0).to(tl.int64) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid.to(tl.int64) * BLOCK
    while start < n:
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        start += step
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _floor_kernel(q_ptr, b_ptr, out_ptr, B, M, rows_per_split, n_splits, stride_q, stride_b,
                  D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """The fused kernel's streaming product with a trivial epilogue (row minimum): its floor."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < B
    offs_d = tl.arange(0, BLOCK_D)
    offs_t = tl.arange(0, BLOCK_N)
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    n_tiles = tl.cdiv(stop - start, BLOCK_N)
    KD: tl.constexpr = D // BLOCK_D
    q_rows = q_ptr + offs_q.to(tl.int64)[:, None] * stride_q + offs_d[None, :]
    acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    best = tl.full([BLOCK_Q], float("inf"), tl.float32)
    for it in range(0, n_tiles * KD):
        tile = it // KD
        kd = it % KD
        offs_n = start + tile * BLOCK_N + offs_t
        n_ok = offs_n < stop
        a = tl.load(q_rows + kd * BLOCK_D, mask=q_ok[:, None], other=0.0)
        b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_b + kd * BLOCK_D
                    + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc)
        if kd == KD - 1:
            best = tl.minimum(best, tl.min(acc, axis=1))
            acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    tl.store(out_ptr + offs_q * n_splits + pid_s, best, mask=q_ok)


@triton.jit
def _floor_tma_kernel(q_desc, b_desc, out_ptr, B, M, rows_per_split, n_splits,
                      D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_D: tl.constexpr):
    """The floor with the tiles loaded through tensor descriptors (TMA), as the kernel does."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    start = pid_s * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    n_tiles = tl.cdiv(stop - start, BLOCK_N)
    KD: tl.constexpr = D // BLOCK_D
    acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    best = tl.full([BLOCK_Q], float("inf"), tl.float32)
    for it in range(0, n_tiles * KD):
        kd = it % KD
        a = q_desc.load([pid_q * BLOCK_Q, kd * BLOCK_D])
        b = b_desc.load([start + (it // KD) * BLOCK_N, kd * BLOCK_D])
        acc = tl.dot(a, b.T, acc)
        if kd == KD - 1:
            best = tl.minimum(best, tl.min(acc, axis=1))
            acc = tl.zeros([BLOCK_Q, BLOCK_N], dtype=tl.float32)
    tl.store(out_ptr + offs_q * n_splits + pid_s, best, mask=offs_q < B)


def floor_run(query, bank, block_q=128, block_n=128, block_d=64, num_warps=8, num_stages=3,
              splits_per_sm=2, tma=False):
    from selectorch.search._triton_kernels import candidate_layout

    n_sm = torch.cuda.get_device_properties(bank.device).multi_processor_count
    lay = candidate_layout(query.shape[0], bank.shape[0], 50, block_q, block_n, 4,
                           splits_per_sm, n_sm)
    n_splits, rps = lay.n_splits, lay.rows_per_split
    out = torch.empty(query.shape[0], n_splits, device=bank.device)
    grid = (triton.cdiv(query.shape[0], block_q), n_splits)
    if tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        q_desc = TensorDescriptor(query, list(query.shape), list(query.stride()),
                                  [block_q, block_d])
        b_desc = TensorDescriptor(bank, list(bank.shape), list(bank.stride()), [block_n, block_d])
        _floor_tma_kernel[grid](q_desc, b_desc, out, query.shape[0], bank.shape[0], rps,
                                n_splits, D=bank.shape[1], BLOCK_Q=block_q, BLOCK_N=block_n,
                                BLOCK_D=block_d, num_warps=num_warps, num_stages=num_stages)
        return out
    _floor_kernel[grid](query, bank, out, query.shape[0], bank.shape[0], rps, n_splits,
                        query.stride(0), bank.stride(0), D=bank.shape[1], BLOCK_Q=block_q,
                        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
                        num_stages=num_stages)
    return out


def triton_read(x: torch.Tensor) -> torch.Tensor:
    n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count
    grid = 8 * n_sm
    out = torch.empty(grid, device=x.device, dtype=torch.float32)
    _read_kernel[(grid,)](x, out, x.numel(), BLOCK=4096, num_warps=8)
    return out


def make_data(n_query: int, n_bank: int, dim: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    basis = torch.randn(32, dim, device="cuda", generator=g) / 32**0.5
    bank = torch.empty(n_bank, dim, device="cuda")
    for s in range(0, n_bank, 1 << 17):
        e = min(s + (1 << 17), n_bank)
        bank[s:e] = torch.randn(e - s, 32, device="cuda", generator=g) @ basis
        bank[s:e] += 0.25 * torch.randn(e - s, dim, device="cuda", generator=g)
    query = torch.randn(n_query, 32, device="cuda", generator=g) @ basis
    query += 0.25 * torch.randn(n_query, dim, device="cuda", generator=g)
    return query, bank


def exact_fp32_indices(query: torch.Tensor, bank32: torch.Tensor, k: int) -> torch.Tensor:
    """Exact top-k of fp32 euclidean distances in float64 re-ranking of fp32 candidates."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        norms = bank32.pow(2).sum(1)
        out = []
        for s in range(0, query.shape[0], 64):
            q = query[s : s + 64]
            d = norms - 2 * (q @ bank32.T)
            cand = d.topk(4 * k, dim=1, largest=False).indices
            exact = (q.double()[:, None] - bank32[cand].double()).pow(2).sum(-1)
            out.append(cand.gather(1, exact.topk(k, dim=1, largest=False).indices))
        return torch.cat(out)
    finally:
        torch.set_float32_matmul_precision(old)


def recall(found: torch.Tensor, ref: torch.Tensor) -> float:
    n, k = ref.shape
    hits = (found[:n, :, None] == ref[:, None, :]).any(-1).sum().item()
    return hits / (n * k)


def bench(fn, rep_ms: float = 300.0) -> float:
    return do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def run_case(n_query, n_bank, dim, dtype, k, *, with_torch=True, rep_ms=300.0, config=None):
    query32, bank32 = make_data(n_query, n_bank, dim)
    bank = bank32.to(dtype)
    query = query32.to(dtype)
    norms = torch.linalg.vector_norm(bank, dim=1, dtype=torch.float32).square()
    row = dict(B=n_query, M=n_bank, D=dim, dtype=str(dtype).replace("torch.", ""), k=k)
    row["read_sum"] = bench(lambda: bank.sum(dtype=torch.float32), rep_ms)
    row["read_triton"] = bench(lambda: triton_read(bank), rep_ms)
    row["read"] = min(row["read_sum"], row["read_triton"])

    def fused():
        return fused_knn_search(query, bank, k, bank_sq_norms=norms, _config=config)

    _, idx = fused()
    torch.cuda.synchronize()
    row["fused"] = bench(fused, rep_ms)
    if with_torch:
        row["torch"] = bench(lambda: (query @ bank.T).topk(k, dim=1), rep_ms)
    n_check = min(n_query, 256)
    ref = exact_fp32_indices(query32[:n_check], bank32, k)
    row["recall"] = recall(idx[:n_check], ref)
    if with_torch and dtype != torch.float32:
        # the plain reduced-precision product ranks by -q.b + |b|^2/2 (euclidean order)
        s = norms - 2 * (query[:n_check] @ bank.T).float()
        row["recall_torch"] = recall(s.topk(k, dim=1, largest=False).indices, ref)
    return row


def fmt(rows) -> str:
    lines = [
        "| B | bank M x D | dtype | k | read ms | torch mm+topk ms | fused ms | fused / read "
        "| torch / fused | recall@k fused | recall@k torch, same dtype |",
        "|" + "---|" * 11,
    ]
    for r in rows:
        t = r.get("torch")
        torch_ms = f"{t:.3f}" if t else "-"
        speedup = f"{t / r['fused']:.1f}x" if t else "-"
        rt = f"{r['recall_torch']:.4f}" if "recall_torch" in r else "-"
        lines.append(
            f"| {r['B']} | {r['M']:,} x {r['D']} | {r['dtype']} | {r['k']} | {r['read']:.3f} "
            f"| {torch_ms} | {r['fused']:.3f} | {r['fused'] / r['read']:.2f}x | {speedup} "
            f"| {r['recall']:.4f} | {rt} |"
        )
    return "\n".join(lines)


def header() -> str:
    p = torch.cuda.get_device_properties(0)
    return (f"device: {p.name}, {p.multi_processor_count} SMs, "
            f"{p.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, triton "
            f"{triton.__version__}, python {platform.python_version()}; "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
            f"command: python {' '.join(sys.argv)}")


SWEEP = [
    dict(),
    # the threshold and splits of 2026-11-23 04:53 (a sparse sample refined by the kernel)
    dict(sample_step=1024, sample_group=1, splits_per_sm=2),
    dict(splits_per_sm=2),
    dict(sample_group=8),
    dict(sample_step=16, sample_group=64),
    dict(tma=False, epilogue=0, num_stages=3, refine_tma=False),  # the kernel of 2026-11-22
    dict(tma=False),
    dict(epilogue=0),
    dict(num_stages=3),
    dict(refine_tma=False, refine_stages=3),
    dict(refine_stages=3),
    dict(refine_step=48),
    dict(sample_step=512),
    dict(rounds=3),
    dict(chunk_tiles=4),
    dict(),
]
FLOOR_SWEEP = [
    dict(block_q=128, block_n=256, block_d=64, num_warps=8, num_stages=3, splits_per_sm=1),
    dict(block_q=128, block_n=256, block_d=64, num_warps=8, num_stages=3, splits_per_sm=1,
         tma=True),
    dict(block_q=128, block_n=256, block_d=64, num_warps=8, num_stages=4, splits_per_sm=1,
         tma=True),
]


def parts(query, bank, norms, k) -> None:
    """Time the steps of the default search separately (sample bound, kernel, merge, re-rank)."""
    from selectorch.search import triton_knn as tk

    ops = tk._kernels()
    cfg = tk._default_config(query.shape[0], bank.shape[1], bank.dtype)
    n_sel = tk._n_selected(k, bank.shape[0])
    q = query.float().to(bank.dtype)
    t_sample = bench(lambda: tk._threshold(q, bank, norms, -2.0, False, n_sel, "tf32", cfg))
    tau = tk._threshold(q, bank, norms, -2.0, False, n_sel, "tf32", cfg)

    def kernel():  # the default's candidates pass (the Gluon kernel on Hopper)
        return tk._candidates(q, bank, norms, tau, -2.0, True, n_sel, "tf32", cfg)

    t_kernel = bench(kernel)
    values, cand = kernel()
    t_merge = bench(lambda: ops.knn_select(values, cand, n_sel))
    t_topk = bench(lambda: cand.gather(1, values.topk(n_sel, dim=1, largest=False,
                                                      sorted=False).indices))
    chosen = ops.knn_select(values, cand, n_sel)
    qf = query.float()

    def rerank():
        return ops.knn_finish(qf, bank, chosen, k, False, torch.float32)

    t_rerank = bench(rerank)
    passing = (values < float("inf")).sum(1).float().mean().item()
    print(f"parts of the default search: threshold (samples) {t_sample:.3f} ms, candidates kernel "
          f"{t_kernel:.3f} ms, merge over {tuple(values.shape)}: knn_select {t_merge:.3f} ms "
          f"(topk + gather {t_topk:.3f} ms), exact re-rank {t_rerank:.3f} ms; candidates kept "
          f"per query {passing:.0f}", flush=True)


def sweep(configs=None) -> None:
    n_query, n_bank, dim, dtype, k = HEADLINE
    query32, bank32 = make_data(n_query, n_bank, dim)
    bank, query = bank32.to(dtype), query32.to(dtype)
    ref_exact = exact_fp32_indices(query32, bank32, k)
    del bank32
    norms = torch.linalg.vector_norm(bank, dim=1, dtype=torch.float32).square()
    read = min(bench(lambda: bank.sum(dtype=torch.float32)), bench(lambda: triton_read(bank)))
    print(f"read {read:.3f} ms")
    mm_topk = bench(lambda: (query @ bank.T).topk(k, dim=1))
    print(f"torch mm + topk {mm_topk:.3f} ms", flush=True)
    for fcfg in FLOOR_SWEEP:
        try:
            t = bench(lambda fcfg=fcfg: floor_run(query, bank, **fcfg))
            print(f"floor (product + row-min only) {fcfg}: {t:.3f} ms = {t / read:.2f}x read",
                  flush=True)
        except Exception as err:
            print(f"floor {fcfg}: FAILED {type(err).__name__}: {str(err)[:200]}", flush=True)
    parts(query, bank, norms, k)
    ref = None
    for cfg in configs or SWEEP:
        try:
            t0 = time.perf_counter()
            d, i = fused_knn_search(query, bank, k, bank_sq_norms=norms, _config=cfg)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            if ref is None:
                ref = i
            same = (i == ref).float().mean().item()
            t = bench(lambda cfg=cfg: fused_knn_search(query, bank, k, bank_sq_norms=norms,
                                                       _config=cfg))
            print(f"{cfg}: {t:.3f} ms = {t / read:.2f}x read, torch/fused "
                  f"{mm_topk / t:.2f}x; same-as-first {same:.4f}, recall "
                  f"{recall(i, ref_exact):.4f}; first call {first:.1f} s", flush=True)
        except Exception as err:  # report and go on with the next configuration
            print(f"{cfg}: FAILED {type(err).__name__}: {str(err)[:300]}", flush=True)
    from selectorch.search import _triton_kernels as tk

    for dev_cache in getattr(tk._knn_candidates_kernel, "device_caches", {}).values():
        for key, kern in dev_cache[0].items():
            print("compiled:", getattr(kern, "n_regs", "?"), "regs,",
                  getattr(kern, "n_spills", "?"), "spills,",
                  getattr(kern.metadata, "shared", "?"), "smem,", str(key)[:200])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="headline case only")
    parser.add_argument("--sweep", action="store_true",
                        help="kernel options, floor and parts of one search, headline case")
    args = parser.parse_args()
    print(header(), flush=True)
    if args.sweep:
        sweep()
        return
    cases = [HEADLINE]
    if not args.quick:
        cases += [(1, 1_281_167, 2048, torch.bfloat16, 50)]
        for n_bank in (50_000, 1_281_167):
            for dtype in (torch.bfloat16, torch.float32):
                for n_query in (1, 4096):
                    cases.append((n_query, n_bank, 512, dtype, 50))
    rows = []
    for case in cases:
        rows.append(run_case(*case))
        gc.collect()
        torch.cuda.empty_cache()
        print(rows[-1], flush=True)
    print()
    print(fmt(rows))
    h = rows[0]
    print(f"\nheadline: fused {h['fused']:.3f} ms = {h['fused'] / h['read']:.2f}x the bank read "
          f"(target <= 1.5x), {h['torch'] / h['fused']:.1f}x faster than torch mm+topk "
          f"(target >= 5x), recall@{h['k']} {h['recall']:.4f} (target >= 0.99)")


if __name__ == "__main__":
    main()
