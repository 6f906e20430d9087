"""Forward hooks on named layers, pooling of their outputs, and the :class:`Recorder`."""

from __future__ import annotations

from selectorch.recorder.layers import list_layers
from selectorch.recorder.pooling import POOLS, pool_features
from selectorch.recorder.recorder import Recorder

__all__ = ["POOLS", "Recorder", "list_layers", "pool_features"]
