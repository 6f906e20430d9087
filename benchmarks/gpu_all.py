"""The GPU benchmark set of issue 9, one command: the kNN table, then end to end.

    python benchmarks/gpu_all.py            # on the GPU machine, from the repository root

Runs ``gpu_knn.py`` (exact kNN against the bank read and ``(q @ bank.T).topk(k)``, every size
of the issue) and ``gpu_e2e.py`` (compiled ``SelectiveModel`` against the compiled bare
ResNet-50), each in its own process and printing its own details, then repeats the lines that
state the issue's targets. Exit status 0 whether or not the targets are met; non-zero only when
a script fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str) -> list[str]:
    """Run one benchmark script, echoing its output; return its lines."""
    print(f"$ python benchmarks/{script}", flush=True)
    proc = subprocess.Popen(
        [sys.executable, str(HERE / script)], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    lines = []
    for line in proc.stdout or ():
        print(line, end="", flush=True)
        lines.append(line.rstrip("\n"))
    if proc.wait():
        sys.exit(f"benchmarks/{script} failed with exit status {proc.returncode}")
    print(flush=True)
    return lines


def main() -> None:
    knn = run("gpu_knn.py")
    e2e = run("gpu_e2e.py")
    print("command: python benchmarks/gpu_all.py")
    for line in e2e:
        if line.startswith("device:"):
            print(line)
    print("targets:")
    for line in knn:
        if line.startswith("headline:"):
            print("  " + line)
    for line in e2e:
        if line.startswith("| SelectiveModel"):
            print("  end to end " + line)


if __name__ == "__main__":
    main()
