"""Scoring throughput of the exact kNN score with the bank split over GPUs (issue 7).

Run on a machine with 2 GPUs, from the repository root (NVLink multicast off):

    export NCCL_NVLS_ENABLE=0
    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_knn.py          # full table
    torchrun --standalone --nproc-per-node 2 benchmarks/distributed_knn.py --quick  # smaller

Rows of the table (rank 0 prints it, in markdown):

* ``1 GPU, whole bank``: ``KNNScore(k)`` on one GPU holding the whole bank, ``B`` queries a step;
* ``N GPUs, bank replicated``: every GPU holds the whole bank and scores its own ``B`` queries
  (plain data parallelism; possible only while the bank fits on one GPU);
* ``N GPUs, bank sharded``: ``KNNScore(k, shard=True)``: every GPU holds ``1/N`` of the bank and
  scores its own ``B`` queries; queries are all-gathered, each GPU searches its slice for all
  ``N * B`` queries, candidates come back by all-to-all and are merged;
* ``N GPUs, sharded, one stream``: the same ``B`` queries on every GPU (inside
  ``selectorch.distributed.replicated_inputs()``, as ``calibrate`` does): one stream of queries
  with ``1/N`` of the bank read per GPU.

Timings: CUDA-synchronised wall clock over ``--steps`` steps after ``--warmup`` steps, the
slowest rank's time per step. Data: rank-32 Gaussian embeddings plus isotropic noise, the same
on every rank (fixed seed). The sharded neighbours are checked against the whole-bank search on
rank 0 (indices equal, largest distance difference reported).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

import selectorch as st
from selectorch.distributed import replicated_inputs


def embeddings(rows: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """Rank-32 Gaussian rows plus noise, generated in blocks (same on every rank)."""
    g = torch.Generator(device=device).manual_seed(seed)
    basis = torch.randn(32, dim, generator=g, device=device) / 32**0.5
    out = torch.empty(rows, dim, device=device)
    for start in range(0, rows, 65536):
        stop = min(start + 65536, rows)
        z = torch.randn(stop - start, 32, generator=g, device=device)
        noise = torch.randn(stop - start, dim, generator=g, device=device)
        out[start:stop] = z @ basis + 0.1 * noise
    return out


def time_steps(step: Callable[[], object], warmup: int, steps: int) -> float:
    """Seconds per step on the slowest rank."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    elapsed = torch.tensor([(time.perf_counter() - start) / steps], device="cuda")
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=int, default=1_281_167, help="reference rows")
    parser.add_argument("--dim", type=int, default=2048, help="embedding width")
    parser.add_argument("--k", type=int, default=50, help="neighbours")
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024], help="B per GPU")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--compile", action="store_true", help="torch.compile the scores")
    parser.add_argument("--quick", action="store_true", help="a 200,000-row bank, B = 256")
    args = parser.parse_args()
    if args.quick:
        args.bank, args.batches = 200_000, [256]

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank)
    dist.init_process_group("nccl", device_id=device)
    rank, world = dist.get_rank(), dist.get_world_size()
    bank = embeddings(args.bank, args.dim, seed=0, device=device)

    def maybe_compile(score: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        return torch.compile(score, fullgraph=True) if args.compile else score

    rows: list[tuple[str, int, int, int, float]] = []  # setup, GPUs, rows/GPU, queries, s/step
    checks: list[str] = []
    with torch.no_grad():
        whole = st.scores.KNNScore(k=args.k).fit(bank)
        whole_fn = maybe_compile(whole)
        per_batch = {}
        for batch in args.batches:
            queries = embeddings(batch, args.dim, seed=1 + rank, device=device)
            per_batch[batch] = queries
            seconds = time_steps(lambda q=queries, f=whole_fn: f(q), args.warmup, args.steps)
            rows.append(("1 GPU, whole bank", 1, args.bank, batch, seconds))
            replicated = f"{world} GPUs, bank replicated"
            rows.append((replicated, world, args.bank, world * batch, seconds))
        reference = whole.knn_search(per_batch[args.batches[0]])
        del whole, whole_fn
        torch.cuda.empty_cache()

        sharded = st.scores.KNNScore(k=args.k, shard=True).fit(bank)
        del bank
        torch.cuda.empty_cache()
        sharded_fn = maybe_compile(sharded)
        local = sharded.bank_.shape[0]
        for batch in args.batches:
            queries = per_batch[batch]
            seconds = time_steps(lambda q=queries, f=sharded_fn: f(q), args.warmup, args.steps)
            rows.append((f"{world} GPUs, bank sharded", world, local, world * batch, seconds))
            with replicated_inputs():
                same = per_batch[batch] if rank == 0 else per_batch[batch].clone()
                dist.broadcast(same, src=0)
                seconds = time_steps(lambda q=same: sharded(q), args.warmup, args.steps)
            rows.append((f"{world} GPUs, sharded, one stream", world, local, batch, seconds))
        got = sharded.knn_search(per_batch[args.batches[0]])
        same_ids = torch.equal(got[1], reference[1])
        gap = (got[0] - reference[0]).abs().max().item()
        checks.append(
            f"rank {rank}: sharded neighbours {'equal' if same_ids else 'DIFFER FROM'} the "
            f"whole-bank search ({args.batches[0]} x {args.k}); largest distance difference "
            f"{gap:.3g}"
        )
    everyone: list[list[str] | None] = [None] * world
    dist.all_gather_object(everyone, checks)
    if rank == 0:
        report(args, world, rows, [line for part in everyone for line in part or []])
    dist.destroy_process_group()


def report(args: argparse.Namespace, world: int, rows: list, checks: list[str]) -> None:
    name = torch.cuda.get_device_name()
    print(
        f"kNN scoring, bank {args.bank:,} x {args.dim} float32, k={args.k}, {world} x {name}, "
        f"torch {torch.__version__}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, "
        f"{'compiled' if args.compile else 'eager'}, {platform.node()}\n"
    )
    print("| setup | GPUs | bank rows per GPU | queries per step | ms per step | queries/s "
          "| vs 1 GPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = {}

    def batch_of(row: tuple) -> int:  # queries each GPU receives per step
        setup, gpus, _, queries, _ = row
        return queries if "one stream" in setup else queries // gpus

    for setup, gpus, per_gpu, queries, seconds in sorted(rows, key=batch_of):
        rate = queries / seconds
        batch = batch_of((setup, gpus, per_gpu, queries, seconds))
        if gpus == 1:
            base[batch] = rate
        ratio = rate / base[batch] if batch in base else float("nan")
        print(f"| {setup} | {gpus} | {per_gpu:,} | {queries:,} | {seconds * 1e3:.2f} "
              f"| {rate:,.0f} | {ratio:.2f}x |")
    print()
    for line in checks:
        print(f"- {line}")


if __name__ == "__main__":
    main()
