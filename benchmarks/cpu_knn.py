"""CPU benchmark of the exact kNN search (issue 9): selectorch vs faiss ``IndexFlatL2``.

Bank 50,000 x 512 float32, 10,000 queries, k = 5, the same thread count for both (default 2).
Run from the repository root (the peer venv with faiss: ``python benchmarks/cpu_all.py --setup``):

    python benchmarks/cpu_knn.py                 # 5 interleaved rounds, 2 threads
    python benchmarks/cpu_knn.py --repeats 3 --threads 1

Each round runs faiss and selectorch in fresh processes, one after the other, in alternating
order; each process warms up on 64 queries, then times one full search. Timed for selectorch:
the user path ``KNNScore(k=5).fit(bank)`` then ``.score(queries)`` (fit centres the bank and
stores its norms; score searches 4,096 queries per batch), and the raw
``selectorch.functional.knn_search(queries, bank, 5)``. Timed for faiss: ``IndexFlatL2``, ``add``
and ``search``. Reported: medians over rounds and the median of the per-round ratios (the
machine is shared, so single timings are noisy), and the same for the process CPU time (all
threads: less sensitive to other processes taking the cores, though OpenMP spinning counts).
The target is judged on wall time. Recall@5: selectorch's neighbours against
faiss', and both against float64 exact search on the first 500 queries.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_common as cc  # noqa: E402

SCRIPT = Path(__file__).resolve()


def worker(args: argparse.Namespace) -> None:
    bank = np.load(args.bank_file)
    queries = np.load(args.query_file)
    result: dict = {}
    if args.worker == "faiss":
        import faiss

        faiss.omp_set_num_threads(args.threads)
        warm = faiss.IndexFlatL2(bank.shape[1])
        warm.add(bank)
        warm.search(queries[:64], args.k)
        del warm
        t0, c0 = time.perf_counter(), time.process_time()
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
        _, found = index.search(queries, args.k)
        result["total"] = time.perf_counter() - t0
        result["cpu"] = time.process_time() - c0
        result["version"] = faiss.__version__
    else:
        import torch

        from selectorch.functional.knn import CPU_BLOCKED_MIN_ROWS as blocked_min
        from selectorch.functional.knn import knn_search
        from selectorch.scores import KNNScore

        torch.set_num_threads(args.threads)
        bank_t, queries_t = torch.from_numpy(bank), torch.from_numpy(queries)
        KNNScore(k=args.k).fit(bank_t).score(queries_t[:64])  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        score = KNNScore(k=args.k).fit(bank_t)
        t1 = time.perf_counter()
        score.score(queries_t)
        t2, c2 = time.perf_counter(), time.process_time()
        _, raw = knn_search(queries_t, bank_t, args.k)
        t3, c3 = time.perf_counter(), time.process_time()
        result.update(fit=t1 - t0, score=t2 - t1, total=t2 - t0, raw=t3 - t2)
        result.update(cpu=c2 - c0, raw_cpu=c3 - c2)
        found = raw.numpy()
        if args.with_plain:  # the plain chunk loop: the path before issue 9, still compiled
            import selectorch.functional.knn as knn_module

            knn_module.CPU_BLOCKED_MIN_ROWS = 1 << 62
            t4, c4 = time.perf_counter(), time.process_time()
            score.score(queries_t)
            result.update(plain=time.perf_counter() - t4, plain_cpu=time.process_time() - c4)
            knn_module.CPU_BLOCKED_MIN_ROWS = blocked_min
        if args.out:  # the user path's neighbours too (not timed)
            np.save(args.out + ".user.npy", score.knn_search(queries_t)[1].numpy())
    if args.out:
        np.save(args.out + ".npy", found)
    print(json.dumps(result))


def exact_float64(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    import torch

    q, b = torch.from_numpy(queries).double(), torch.from_numpy(bank).double()
    d = torch.cdist(q, b)
    return d.topk(k, dim=1, largest=False).indices.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--with-plain",
        action="store_true",
        help="also time KNNScore.score on the plain chunk loop (the path before the blocked CPU "
        "search; torch.compile still traces it)",
    )
    parser.add_argument("--worker", choices=("faiss", "selectorch"), help=argparse.SUPPRESS)
    parser.add_argument("--bank-file", help=argparse.SUPPRESS)
    parser.add_argument("--query-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    command = "python benchmarks/cpu_knn.py " + shlex.join(sys.argv[1:])
    bank_file = cc.cached("bank", args.bank, args.dim, 1)
    query_file = cc.cached("query", args.queries, args.dim, 2)
    common = [
        f"--bank-file={bank_file}",
        f"--query-file={query_file}",
        f"--k={args.k}",
        f"--threads={args.threads}",
    ]
    if args.with_plain:
        common.append("--with-plain")
    out_dir = cc.DATA_DIR / "cpu_knn_out"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"faiss": [], "selectorch": []}
    for r in range(args.repeats):
        order = ["faiss", "selectorch"] if r % 2 == 0 else ["selectorch", "faiss"]
        for name in order:
            python = cc.peer_python() if name == "faiss" else sys.executable
            extra = [f"--out={out_dir / name}"] if r == 0 else []
            res = cc.run_worker(python, SCRIPT, [f"--worker={name}", *common, *extra], args.threads)
            runs[name].append(res)
            print(f"round {r + 1} {name}: " + json.dumps(res), file=sys.stderr, flush=True)

    faiss_t = [r["total"] for r in runs["faiss"]]
    user_t = [r["total"] for r in runs["selectorch"]]
    raw_t = [r["raw"] for r in runs["selectorch"]]
    ratio_user = cc.median([u / f for u, f in zip(user_t, faiss_t, strict=True)])
    ratio_raw = cc.median([u / f for u, f in zip(raw_t, faiss_t, strict=True)])
    faiss_c = [r["cpu"] for r in runs["faiss"]]
    user_c = [r["cpu"] for r in runs["selectorch"]]
    raw_c = [r["raw_cpu"] for r in runs["selectorch"]]
    cpu_ratio_user = cc.median([u / f for u, f in zip(user_c, faiss_c, strict=True)])
    cpu_ratio_raw = cc.median([u / f for u, f in zip(raw_c, faiss_c, strict=True)])

    bank, queries = np.load(bank_file), np.load(query_file)
    faiss_i = np.load(out_dir / "faiss.npy")
    raw_i = np.load(out_dir / "selectorch.npy")
    user_i = np.load(out_dir / "selectorch.user.npy")
    n_exact = min(500, args.queries)
    truth = exact_float64(bank, queries[:n_exact], args.k)
    figures = {
        "command": command,
        "machine": cc.machine(),
        "versions": cc.versions(),
        "threads": args.threads,
        "faiss_s": cc.median(faiss_t),
        "selectorch_user_s": cc.median(user_t),
        "selectorch_fit_s": cc.median([r["fit"] for r in runs["selectorch"]]),
        "selectorch_score_s": cc.median([r["score"] for r in runs["selectorch"]]),
        "selectorch_raw_s": cc.median(raw_t),
        "ratio_user_over_faiss": ratio_user,
        "ratio_raw_over_faiss": ratio_raw,
        "faiss_cpu_s": cc.median(faiss_c),
        "selectorch_user_cpu_s": cc.median(user_c),
        "selectorch_raw_cpu_s": cc.median(raw_c),
        "cpu_time_ratio_user_over_faiss": cpu_ratio_user,
        "cpu_time_ratio_raw_over_faiss": cpu_ratio_raw,
        "recall_raw_vs_faiss": cc.recall(raw_i, faiss_i),
        "recall_user_vs_faiss": cc.recall(user_i, faiss_i),
        "recall_raw_vs_float64": cc.recall(raw_i[:n_exact], truth),
        "recall_faiss_vs_float64": cc.recall(faiss_i[:n_exact], truth),
        "met": max(ratio_user, ratio_raw) <= 1.0,
    }
    print(f"command: {command}")
    print(f"machine: {figures['machine']}")
    print(f"versions: {figures['versions']}")
    print(
        f"exact kNN, bank {args.bank:,} x {args.dim} float32, {args.queries:,} queries, "
        f"k={args.k}, {args.threads} threads, {args.repeats} interleaved rounds (medians)"
    )
    print(f"  faiss IndexFlatL2 add+search:        {cc.fmt_s(faiss_t)}")
    print(f"  selectorch KNNScore fit+score:       {cc.fmt_s(user_t)}")
    print(f"  selectorch functional.knn_search:    {cc.fmt_s(raw_t)}")
    print(f"  ratio selectorch user / faiss:       {ratio_user:.3f}x (median of per-round ratios)")
    print(f"  ratio selectorch raw / faiss:        {ratio_raw:.3f}x")
    if args.with_plain:
        plain_t = [r["plain"] for r in runs["selectorch"]]
        plain_ratio = cc.median([p / f for p, f in zip(plain_t, faiss_t, strict=True)])
        figures_plain = {"selectorch_plain_score_s": cc.median(plain_t), "ratio_plain": plain_ratio}
        print(
            f"  plain chunk loop (before), score:    {cc.fmt_s(plain_t)} = {plain_ratio:.3f}x "
            f"faiss; blocked score is {cc.median(plain_t) / figures['selectorch_score_s']:.2f}x "
            "faster"
        )
        figures.update(figures_plain)
    print(
        f"  process CPU seconds (all threads), medians: faiss {cc.median(faiss_c):.2f}, "
        f"user {cc.median(user_c):.2f} ({cpu_ratio_user:.3f}x), "
        f"raw {cc.median(raw_c):.2f} ({cpu_ratio_raw:.3f}x)"
    )
    print(
        f"  recall@{args.k} vs faiss: raw {figures['recall_raw_vs_faiss']:.4f}, user "
        f"{figures['recall_user_vs_faiss']:.4f}; vs float64 exact ({n_exact} queries): "
        f"selectorch {figures['recall_raw_vs_float64']:.4f}, "
        f"faiss {figures['recall_faiss_vs_float64']:.4f}"
    )
    print(f"  target (selectorch no slower than faiss): {'met' if figures['met'] else 'not met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
