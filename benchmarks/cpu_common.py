"""Shared helpers of the CPU benchmarks (issue 9): machine and versions, data, workers, medians.

The peers (faiss, seapig) live in a throwaway virtual environment that is never a dependency of
selectorch. ``python benchmarks/cpu_all.py --setup`` makes it: a venv at
``$SELECTORCH_PEER_VENV`` (default ``/tmp/seapig-venv``) whose ``.pth`` file adds this
repository's ``.venv`` site-packages after its own, so seapig and faiss run on the very same
torch, then ``pip install seapig==0.3.0`` (which brings ``faiss-cpu``).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PEER_VENV = Path(os.environ.get("SELECTORCH_PEER_VENV", "/tmp/seapig-venv"))
DATA_DIR = Path(os.environ.get("SELECTORCH_BENCH_DATA", "/tmp/selectorch-bench-data"))


def peer_python() -> Path:
    """The throwaway venv's interpreter (faiss-cpu and seapig 0.3.0 on this repository's torch)."""
    return PEER_VENV / "bin" / "python"


def setup_peer_venv() -> None:
    """Create the throwaway venv with seapig 0.3.0 and faiss-cpu (see the module docstring)."""
    if not peer_python().exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    site = subprocess.run(
        [str(peer_python()), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(site, "zz_selectorch_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(peer_python()), "-m", "pip", "install", "-q", "seapig==0.3.0", "faiss-cpu"],
        check=True,
    )


def machine() -> str:
    """CPU model and core count (from ``lscpu``), OS and Python."""
    model, cores = platform.processor() or "?", os.cpu_count()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"{model}, {cores} cores, {platform.system()} {platform.release()}, " + (
        f"Python {platform.python_version()}"
    )


def versions() -> str:
    """Versions of torch, numpy, selectorch, and of faiss / seapig in the peer venv."""
    import torch

    import selectorch

    peer = "peer venv missing (run benchmarks/cpu_all.py --setup)"
    if peer_python().exists():
        code = (
            "import importlib.metadata as m; "
            "print(f\"faiss-cpu {m.version('faiss-cpu')}, seapig {m.version('seapig')}\")"
        )
        res = subprocess.run([str(peer_python()), "-c", code], capture_output=True, text=True)
        peer = res.stdout.strip() or res.stderr.strip().splitlines()[-1]
    return (
        f"torch {torch.__version__}, numpy {np.__version__}, "
        f"selectorch {getattr(selectorch, '__version__', '?')}, {peer}"
    )


def thread_env(threads: int) -> dict[str, str]:
    """Environment that gives every OpenMP / BLAS runtime the same thread count."""
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env.setdefault("PYTHONPATH", str(ROOT))
    return env


def run_worker(python: Path | str, script: Path, args: list[str], threads: int) -> dict:
    """Run ``script --worker ...`` in a fresh process; return the JSON it prints last."""
    cmd = [str(python), str(script), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=thread_env(threads))
    if res.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def embeddings(n: int, dim: int, seed: int, basis_seed: int = 0) -> np.ndarray:
    """Rank-32 Gaussian embeddings plus isotropic noise (as ``benchmarks/gpu_knn.py``), float32.

    Rows of every call with the same ``basis_seed`` share one 32-dimensional subspace, so bank,
    calibration and query sets come from one distribution; neighbours are separated as in real
    features rather than all nearly equidistant as with isotropic noise alone.
    """
    basis = np.random.default_rng(basis_seed).standard_normal((32, dim), dtype=np.float32)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 32), dtype=np.float32) @ (basis / np.float32(32**0.5))
    x += np.float32(0.25) * rng.standard_normal((n, dim), dtype=np.float32)
    return x


def cached(name: str, n: int, dim: int, seed: int) -> Path:
    """``.npy`` file of :func:`embeddings` in :data:`DATA_DIR` (written once)."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    path = DATA_DIR / f"{name}_{n}x{dim}_s{seed}.npy"
    if not path.exists():
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, embeddings(n, dim, seed))
        tmp.replace(path)
    return path


def median(values: list[float]) -> float:
    return statistics.median(values)


def fmt_s(values: list[float]) -> str:
    """``median s (min-max, n=...)``."""
    return f"{median(values):.2f} s (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"


def recall(found: np.ndarray, ref: np.ndarray) -> float:
    """Fraction of ``ref``'s neighbours (``(N, k)`` indices) that ``found`` also lists."""
    hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, ref, strict=True))
    return hits / ref.size
