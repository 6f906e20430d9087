"""selectorch: selective prediction for any PyTorch model.

One forward pass returns the model's output, an uncertainty score per sample and whether the
prediction is kept, with thresholds calibrated on held-out data.
"""

from __future__ import annotations

import logging

from selectorch import distributed, functional, progress, scores
from selectorch._version import __version__
from selectorch.bench import BenchReport, evaluate
from selectorch.cache import CacheMismatchError, load_cache
from selectorch.embeddings_plot import plot_embedding_sets
from selectorch.exceptions import NotFittedError
from selectorch.memory import MemoryLimitError
from selectorch.nonfinite import NonFiniteRowsWarning, drop_nonfinite
from selectorch.persistence import PersistenceError
from selectorch.record import record
from selectorch.recorder import Recorder, list_layers
from selectorch.scores import create_score, list_scores
from selectorch.selective import SelectiveModel, SelectiveOutput

# the package logs under "selectorch"; it stays silent until the application configures logging
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "BenchReport",
    "CacheMismatchError",
    "MemoryLimitError",
    "NonFiniteRowsWarning",
    "NotFittedError",
    "PersistenceError",
    "Recorder",
    "SelectiveModel",
    "SelectiveOutput",
    "__version__",
    "create_score",
    "distributed",
    "drop_nonfinite",
    "evaluate",
    "functional",
    "list_layers",
    "list_scores",
    "load_cache",
    "plot_embedding_sets",
    "progress",
    "record",
    "scores",
]
