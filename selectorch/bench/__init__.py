"""Benchmarking scores on one model: :func:`evaluate`, its :class:`BenchReport`, the default run.

``selectorch bench`` (see :mod:`selectorch.cli`) runs :func:`evaluate` on the embedded default
(:func:`default_setup`) or on the user's model and image folders.
"""

from __future__ import annotations

from selectorch.bench.default import (
    DEFAULT_OPTIONS,
    DEFAULT_SCORES,
    MULTI_LAYERS,
    BenchSetup,
    default_setup,
)
from selectorch.bench.evaluation import BenchError, Data, evaluate
from selectorch.bench.report import BenchReport, Column

__all__ = [
    "DEFAULT_OPTIONS",
    "DEFAULT_SCORES",
    "MULTI_LAYERS",
    "BenchError",
    "BenchReport",
    "BenchSetup",
    "Column",
    "Data",
    "default_setup",
    "evaluate",
]
