"""Peak memory of ``SelectiveModel.fit`` over a DataLoader (issue 9), CPU, fresh process.

    python benchmarks/cpu_memory.py                       # 50,000 rows, 512 features, batch 256
    python benchmarks/cpu_memory.py --rows 100000 --batch 512

A small MLP (64 -> 512 -> ReLU -> 10) is recorded at its ReLU (``layer="1"``), so the kNN bank
is ``rows x 512`` float32 (102.4 MB for 50,000 rows). The loader's dataset makes each input
from its index on the fly, so the inputs never occupy memory beyond one batch.

Measured in a fresh process with ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the peak
resident set, a high-water mark):

- baseline: the peak after the imports, building the model, the ``SelectiveModel`` and the
  loader, and one warm-up forward pass of one batch (thread pools and allocator caches exist);
- peak: the peak after ``SelectiveModel(...).fit(loader, progress=False)``.

Reported: ``(peak - baseline) / (bank bytes + one batch's features)``; the target is <= 1.2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_common as cc  # noqa: E402

SCRIPT = Path(__file__).resolve()
IN_DIM, FEAT_DIM = 64, 512


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, Dataset

    import selectorch as st

    torch.set_num_threads(args.threads)

    class OnTheFly(Dataset):
        """Input ``i`` drawn from a generator seeded with ``i``: nothing stored."""

        def __len__(self) -> int:
            return args.rows

        def __getitem__(self, i: int) -> torch.Tensor:
            return torch.randn(IN_DIM, generator=torch.Generator().manual_seed(i))

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN_DIM, FEAT_DIM), nn.ReLU(), nn.Linear(FEAT_DIM, 10)).eval()
    sel = st.SelectiveModel(model, st.scores.KNNScore(k=5), layer="1")
    loader = DataLoader(OnTheFly(), batch_size=args.batch)
    with torch.no_grad():
        model(next(iter(loader)))  # warm-up: thread pools, allocator
    baseline = peak_mb()
    sel.fit(loader, progress=False)
    peak = peak_mb()
    bank = sel.score.bank_
    result = {
        "baseline_mb": baseline,
        "peak_mb": peak,
        "bank_mb": bank.numel() * bank.element_size() / 2**20,
        "batch_mb": args.batch * FEAT_DIM * bank.element_size() / 2**20,
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    command = "python benchmarks/cpu_memory.py " + shlex.join(sys.argv[1:])
    runs = []
    for _ in range(args.repeats):
        worker_args = [
            "--worker",
            f"--rows={args.rows}",
            f"--batch={args.batch}",
            f"--threads={args.threads}",
        ]
        try:
            runs.append(cc.run_worker(sys.executable, SCRIPT, worker_args, args.threads))
        except (RuntimeError, subprocess.SubprocessError) as err:
            sys.exit(str(err))
    extras = [r["peak_mb"] - r["baseline_mb"] for r in runs]
    extra = cc.median(extras)
    bank_mb, batch_mb = runs[0]["bank_mb"], runs[0]["batch_mb"]
    ratio = extra / (bank_mb + batch_mb)
    worst = max(extras) / (bank_mb + batch_mb)  # malloc's reuse of freed pages varies by run
    figures = {
        "command": command,
        "machine": cc.machine(),
        "versions": cc.versions(),
        "baseline_mb": cc.median([r["baseline_mb"] for r in runs]),
        "peak_mb": cc.median([r["peak_mb"] for r in runs]),
        "extra_mb": extra,
        "bank_mb": bank_mb,
        "batch_mb": batch_mb,
        "ratio": ratio,
        "worst_ratio": worst,
        "met": ratio <= 1.2,
    }
    print(f"command: {command}")
    print(f"machine: {figures['machine']}")
    print(f"versions: {figures['versions']}")
    print(
        f"SelectiveModel.fit over a DataLoader: {args.rows:,} rows x {FEAT_DIM} features "
        f"(float32), batch {args.batch}, median of {args.repeats} fresh processes"
    )
    print(
        f"  baseline {figures['baseline_mb']:.1f} MiB, peak {figures['peak_mb']:.1f} MiB: "
        f"fit adds {extra:.1f} MiB"
    )
    print(f"  bank {bank_mb:.1f} MiB + one batch {batch_mb:.2f} MiB")
    print(
        f"  ratio (peak - baseline) / (bank + batch): {ratio:.2f}x "
        f"(worst of {args.repeats}: {worst:.2f}x)"
    )
    print(f"  target (<= 1.2x): {'met' if figures['met'] else 'not met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
