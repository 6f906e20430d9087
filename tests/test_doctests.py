"""Every docstring example in the package runs and prints what it shows."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest
import torch

import selectorch

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(selectorch.__path__, prefix="selectorch.")
    if not info.name.endswith(("cli", "__main__"))
)


#: Modules whose examples run a CUDA kernel: checked on the GPU machine.
CUDA_EXAMPLES = {"selectorch.search.triton_knn"}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    if name in CUDA_EXAMPLES and not torch.cuda.is_available():
        pytest.skip("examples need a CUDA device; run on the GPU machine")
    module = importlib.import_module(name)
    globs = {"torch": torch, "nn": torch.nn, "st": selectorch, "scores": selectorch.scores}
    globs.update(vars(module))
    torch.manual_seed(0)
    result = doctest.testmod(
        module,
        globs=globs,
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        verbose=False,
        report=False,
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
