"""Real data from registry packages, and the numpy-only unpickler."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from selectorch.datasets import (
    MNIST_MEAN,
    MNIST_STD,
    animal_mnist,
    load_numpy_pickle,
    mnist5k,
    mnist_net,
    package_file,
)


def test_mnist5k_is_5000_balanced_normalised_digits():
    images, labels = mnist5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.float32
    assert torch.equal(labels.bincount(), torch.full((10,), 500))
    assert images.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD, abs=1e-5)


def test_mnist_net_is_pretrained():
    images, labels = mnist5k()
    with torch.no_grad():
        accuracy = (mnist_net()(images[::10]).argmax(1) == labels[::10]).float().mean()
    assert accuracy > 0.98


def test_animal_mnist_shape():
    assert animal_mnist().shape == (10000, 1, 28, 28)


def test_numpy_only_unpickler_reads_arrays(tmp_path):
    path = tmp_path / "ok.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(np.arange(6, dtype=np.uint8).reshape(2, 3), f)
    assert load_numpy_pickle(path).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_numpy_only_unpickler_refuses_other_globals(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.gz"
    with gzip.open(path, "wb") as f:
        pickle.dump(Exploit(), f)
    with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
        load_numpy_pickle(path)


def test_missing_package_says_how_to_install():
    with pytest.raises(FileNotFoundError, match="requirements-data.txt"):
        package_file("no_such_package_here", "x")
