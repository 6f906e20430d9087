"""selectorch: selective prediction for any PyTorch model.

One forward pass returns the model's output, an uncertainty score per sample and whether the
prediction is kept, with thresholds calibrated on held-out data.
"""

from __future__ import annotations

from selectorch import functional, scores
from selectorch._version import __version__
from selectorch.exceptions import NotFittedError
from selectorch.recorder import Recorder, list_layers
from selectorch.scores import create_score, list_scores
from selectorch.selective import SelectiveModel, SelectiveOutput

__all__ = [
    "NotFittedError",
    "Recorder",
    "SelectiveModel",
    "SelectiveOutput",
    "__version__",
    "create_score",
    "functional",
    "list_layers",
    "list_scores",
    "scores",
]
