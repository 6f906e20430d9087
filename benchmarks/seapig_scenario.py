"""The seapig README scenario at issue 9's size: seapig 0.3.0 vs selectorch, side by side.

Bank 50,000 x 512 float32, 10,000 calibration rows, 10,000 queries (rank-32 embeddings plus
noise, :func:`cpu_common.embeddings`), k = 5, ``stat="mean"``, coverage 0.90. Run from the
repository root (seapig lives in a throwaway venv: ``python benchmarks/cpu_all.py --setup``):

    python benchmarks/seapig_scenario.py                # 2 interleaved rounds, 2 threads

seapig (its README's precomputed-embeddings flow)::

    score = EuclideanScore(k=5, stat="mean"); score.fit(ref=bank, cal=cal)
    score.set_threshold(q=0.90); score.select(queries)

Above 10,000 reference rows seapig builds a faiss HNSW graph (M=48, efConstruction=192 for
512 dimensions) and searches it approximately. selectorch (standalone API, exact search)::

    KNNScore(k=5, stat="mean").fit(bank).calibrate(cal, coverage=0.90).select(queries)

Each round runs both in fresh processes, in alternating order, with the same thread count
(torch and faiss/OpenMP). Reported: medians of the total (fit + calibrate + select), the
median of the per-round ratios, and how far the two agree (selected masks, thresholds).
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
    import torch

    torch.set_num_threads(args.threads)
    bank, cal, queries = (torch.from_numpy(np.load(f)) for f in args.files.split(","))
    if args.worker == "seapig":  # imports are not timed
        import faiss
        from seapig.scores import EuclideanScore
        from seapig.utils.progress import disable

        disable()
        faiss.omp_set_num_threads(args.threads)
        t0 = time.perf_counter()
        score = EuclideanScore(k=args.k, stat="mean")
        score.fit(ref=bank, cal=cal)
        t1 = time.perf_counter()
        score.set_threshold(q=args.coverage)
        t2 = time.perf_counter()
        sel = score.select(queries)
        threshold = float(score.get_threshold())
    else:
        from selectorch.scores import KNNScore

        t0 = time.perf_counter()
        score = KNNScore(k=args.k, stat="mean").fit(bank)
        t1 = time.perf_counter()
        score.calibrate(cal, coverage=args.coverage)
        t2 = time.perf_counter()
        sel = score.select(queries)
        threshold = float(score.threshold_)
    t3 = time.perf_counter()
    if args.out:
        np.save(args.out + ".score.npy", sel["score"].float().numpy())
        np.save(args.out + ".selected.npy", sel["selected"].numpy())
    result = dict(fit=t1 - t0, calibrate=t2 - t1, select=t3 - t2, total=t3 - t0)
    result.update(threshold=threshold, kept=float(sel["selected"].float().mean()))
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bank", type=int, default=50_000)
    parser.add_argument("--cal", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--coverage", type=float, default=0.90)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", choices=("seapig", "selectorch"), help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    command = "python benchmarks/seapig_scenario.py " + shlex.join(sys.argv[1:])
    files = [
        cc.cached("bank", args.bank, args.dim, 1),
        cc.cached("cal", args.cal, args.dim, 3),
        cc.cached("query", args.queries, args.dim, 2),
    ]
    common = [
        "--files=" + ",".join(map(str, files)),
        f"--k={args.k}",
        f"--coverage={args.coverage}",
        f"--threads={args.threads}",
    ]
    out_dir = cc.DATA_DIR / "seapig_out"
    out_dir.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {"seapig": [], "selectorch": []}
    for r in range(args.repeats):
        order = ["seapig", "selectorch"] if r % 2 == 0 else ["selectorch", "seapig"]
        for name in order:
            python = cc.peer_python() if name == "seapig" else sys.executable
            extra = [f"--out={out_dir / name}"] if r == 0 else []
            res = cc.run_worker(python, SCRIPT, [f"--worker={name}", *common, *extra], args.threads)
            runs[name].append(res)
            print(f"round {r + 1} {name}: " + json.dumps(res), file=sys.stderr, flush=True)

    seapig_t = [r["total"] for r in runs["seapig"]]
    ours_t = [r["total"] for r in runs["selectorch"]]
    speedup = cc.median([s / o for s, o in zip(seapig_t, ours_t, strict=True)])
    sel_a = np.load(out_dir / "seapig.selected.npy")
    sel_b = np.load(out_dir / "selectorch.selected.npy")
    sc_a = np.load(out_dir / "seapig.score.npy")
    sc_b = np.load(out_dir / "selectorch.score.npy")
    figures = {
        "command": command,
        "machine": cc.machine(),
        "versions": cc.versions(),
        "threads": args.threads,
        "seapig_s": cc.median(seapig_t),
        "selectorch_s": cc.median(ours_t),
        "seapig_parts_s": {
            key: cc.median([r[key] for r in runs["seapig"]])
            for key in ("fit", "calibrate", "select")
        },
        "selectorch_parts_s": {
            key: cc.median([r[key] for r in runs["selectorch"]])
            for key in ("fit", "calibrate", "select")
        },
        "speedup": speedup,
        "kept_seapig": runs["seapig"][0]["kept"],
        "kept_selectorch": runs["selectorch"][0]["kept"],
        "same_decision": float((sel_a == sel_b).mean()),
        "seapig_scores_at_least_exact": float((sc_a >= sc_b - 1e-4 * np.abs(sc_b)).mean()),
        "met": speedup >= 10.0,
    }
    print(f"command: {command}")
    print(f"machine: {figures['machine']}")
    print(f"versions: {figures['versions']}")
    print(
        f"seapig README scenario: bank {args.bank:,} x {args.dim}, calibration {args.cal:,}, "
        f"{args.queries:,} queries, k={args.k}, stat=mean, coverage {args.coverage}, "
        f"{args.threads} threads, {args.repeats} interleaved rounds (medians)"
    )
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in figures["seapig_parts_s"].items())
    print(f"  seapig 0.3.0 fit+set_threshold+select: {cc.fmt_s(seapig_t)} [{parts}]")
    parts = ", ".join(f"{k} {v:.2f} s" for k, v in figures["selectorch_parts_s"].items())
    print(f"  selectorch fit+calibrate+select:       {cc.fmt_s(ours_t)} [{parts}]")
    print(f"  speedup seapig / selectorch:           {speedup:.1f}x (median of per-round ratios)")
    print(
        f"  kept: seapig {figures['kept_seapig']:.4f}, "
        f"selectorch {figures['kept_selectorch']:.4f}; "
        f"same decision on {figures['same_decision']:.4f} of the queries; seapig's (approximate) "
        f"score >= the exact one on {figures['seapig_scores_at_least_exact']:.4f}"
    )
    print(f"  target (>= 10x faster than seapig): {'met' if figures['met'] else 'not met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
