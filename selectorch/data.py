"""Turning what users pass to ``fit``/``calibrate`` into model calls and labels."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from selectorch._checks import check_rows

#: Keys of a dict batch that hold the model's single positional input.
INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")
#: Keys of a dict batch that hold labels (never passed to the model).
LABEL_KEYS = ("label", "labels", "target", "targets", "y")


@dataclass
class Batch:
    """One batch split into the model's arguments and the labels."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels: torch.Tensor | None = None


def split_batch(batch: Any) -> Batch:
    """Split a batch as DataLoaders yield them.

    * a tensor: the model's input, no labels;
    * a tuple or list ``(x, y, ...)``: ``x`` is the input, ``y`` the labels, the rest ignored;
    * a dict: the input under one of :data:`INPUT_KEYS` (``"image"``, ``"input"``, ...) passed
      positionally, and every other non-label key passed as a keyword argument (Hugging Face
      style: ``input_ids``, ``attention_mask``, ``pixel_mask``, ...); nothing is dropped. Labels
      (tensors under one of :data:`LABEL_KEYS`) are never passed to the model.

    Raises:
        TypeError: The batch is of another type, or a tuple is empty.
    """
    if isinstance(batch, torch.Tensor):
        return Batch((batch,))
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in LABEL_KEYS if k in batch), None)
        labels = labels if isinstance(labels, torch.Tensor) else None
        kwargs = {k: v for k, v in batch.items() if k not in LABEL_KEYS}
        for key in INPUT_KEYS:
            if key in kwargs:
                x = kwargs.pop(key)
                return Batch((x,), kwargs, labels)
        return Batch((), kwargs, labels)
    if isinstance(batch, (tuple, list)) and batch:
        labels = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return Batch((batch[0],), labels=labels)
    raise TypeError(
        "Expected each batch to be a tensor, an (x, y, ...) tuple or a dict with an input key "
        f"{INPUT_KEYS} or keyword arguments, got {type(batch).__name__}."
    )


def to_device(obj: Any, device: torch.device) -> Any:
    """Move every tensor in a nested tuple/list/dict to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, Mapping):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def module_device(model: nn.Module) -> torch.device:
    """Device of the first parameter or buffer of ``model`` (CPU when it has none)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def iter_batches(
    data: torch.Tensor | Iterable[Any],
    y: torch.Tensor | None = None,
    *,
    batch_size: int,
) -> Iterator[Batch]:
    """Yield :class:`Batch` es from a tensor (split in ``batch_size`` rows) or an iterable.

    Args:
        data: A ``(N, ...)`` tensor of inputs, or a DataLoader / iterable of batches.
        y: Optional ``(N,)`` labels, only with a tensor ``data``.
        batch_size: Rows per batch when ``data`` is a tensor.

    Raises:
        ValueError: ``y`` is given with a DataLoader, or its length differs from ``data``'s.
    """
    if isinstance(data, torch.Tensor):
        if y is not None:
            check_rows("y", y, data.shape[0], "data")
        for start in range(0, data.shape[0], batch_size):
            labels = None if y is None else y[start : start + batch_size]
            yield Batch((data[start : start + batch_size],), labels=labels)
        return
    if y is not None:
        raise ValueError(
            "Argument `y` is only used with a tensor `data`; a DataLoader brings its own labels "
            "as (x, y) batches or a 'label' key."
        )
    for batch in data:
        yield split_batch(batch)
