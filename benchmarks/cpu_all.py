"""The CPU benchmark set of issue 9, one command: kNN vs faiss, the seapig scenario, fit memory.

    python benchmarks/cpu_all.py --setup    # once: the throwaway venv with seapig 0.3.0 + faiss
    python benchmarks/cpu_all.py            # all three, then one summary of ratios vs targets

Each benchmark runs as its own script (``cpu_knn.py``, ``seapig_scenario.py``,
``cpu_memory.py``), printing its own details; this script prints the machine, the versions and
one line per target at the end. Exit status 0 whether or not the targets are met.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_common as cc  # noqa: E402

HERE = Path(__file__).resolve().parent


def run(script: str, extra: list[str], out: Path) -> dict:
    cmd = [sys.executable, str(HERE / script), *extra, f"--json={out}"]
    print(f"$ python benchmarks/{script} {shlex.join(extra)}", flush=True)
    subprocess.run(cmd, check=True)
    print(flush=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--setup", action="store_true", help="create the peer venv, then stop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--knn-repeats", type=int, default=5)
    parser.add_argument("--seapig-repeats", type=int, default=2)
    parser.add_argument("--memory-repeats", type=int, default=3)
    args = parser.parse_args()
    if args.setup:
        cc.setup_peer_venv()
        print(f"peer venv ready: {cc.peer_python()} ({cc.versions()})")
        return
    if not cc.peer_python().exists():
        sys.exit(f"no peer venv at {cc.PEER_VENV}: run python benchmarks/cpu_all.py --setup")

    threads = [f"--threads={args.threads}"]
    with tempfile.TemporaryDirectory() as tmp:
        knn = run("cpu_knn.py", [*threads, f"--repeats={args.knn_repeats}"], Path(tmp, "k.json"))
        seapig = run(
            "seapig_scenario.py",
            [*threads, f"--repeats={args.seapig_repeats}"],
            Path(tmp, "s.json"),
        )
        mem = run(
            "cpu_memory.py", [*threads, f"--repeats={args.memory_repeats}"], Path(tmp, "m.json")
        )

    def met(flag: bool) -> str:
        return "met" if flag else "NOT met"

    print("command: python benchmarks/cpu_all.py " + shlex.join(sys.argv[1:]))
    print(f"machine: {cc.machine()}")
    print(f"versions: {cc.versions()}")
    print(f"threads: {args.threads} for every library (torch, faiss / OpenMP, BLAS)")
    cpu_user, cpu_raw = knn["cpu_time_ratio_user_over_faiss"], knn["cpu_time_ratio_raw_over_faiss"]
    print(
        f"1. exact kNN 50,000 x 512, 10,000 queries, k=5: selectorch / faiss IndexFlatL2 = "
        f"{knn['ratio_user_over_faiss']:.2f}x (KNNScore fit+score), "
        f"{knn['ratio_raw_over_faiss']:.2f}x (knn_search) wall; CPU time "
        f"{cpu_user:.2f}x / {cpu_raw:.2f}x; recall@5 vs faiss {knn['recall_raw_vs_faiss']:.4f}; "
        f"target <= 1.0x: {met(knn['met'])}"
    )
    print(
        f"2. seapig README scenario: seapig {seapig['seapig_s']:.1f} s / selectorch "
        f"{seapig['selectorch_s']:.2f} s = {seapig['speedup']:.1f}x faster; target >= 10x: "
        f"{met(seapig['met'])}"
    )
    print(
        f"3. SelectiveModel.fit over a loader: peak - baseline = {mem['extra_mb']:.0f} MiB = "
        f"{mem['ratio']:.2f}x (bank {mem['bank_mb']:.1f} MiB + batch {mem['batch_mb']:.2f} MiB); "
        f"target <= 1.2x: {met(mem['met'])}"
    )


if __name__ == "__main__":
    main()
