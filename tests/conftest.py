"""Shared fixtures: a fresh dynamo cache and a fixed seed for every test."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_state():
    torch._dynamo.reset()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests where no CUDA device exists (they run on the GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
