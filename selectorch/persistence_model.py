"""Save a SelectiveModel's score with how it is attached to its model; load it onto a model.

The directory is the one of :mod:`selectorch.persistence` (header, tensors, checksums), plus a
``selective`` entry: the layer, pooling and head names and the model's class and weights
checksum. Loading checks all of it against the model it is given, before the score is attached:
the model's class and weights, the layer's presence and, where the layer's type tells, its
width; with ``example_input`` (or else at the first forward) the recorded width is checked too.
The model's own weights are never saved or loaded here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from selectorch.data import module_device
from selectorch.fingerprint import describe_pool, model_fingerprint, qualified_name
from selectorch.persistence import (
    PersistenceError,
    check_files,
    read_header,
    rebuild_score,
    write_save,
)
from selectorch.recorder.layers import get_layer

__all__ = ["load_selective", "save_selective"]


def save_selective(sel: Any, path: str | os.PathLike[str]) -> Path:
    """Save a :class:`~selectorch.SelectiveModel`'s score and how it is attached to its model.

    The model's own weights are not saved (they are the user's); the header keeps the model's
    class and checksum so that :func:`load_selective` can check it gets the same model.
    """
    pool = sel._pool
    pools = (
        {k: describe_pool(v) for k, v in pool.items()}
        if isinstance(pool, Mapping)
        else describe_pool(pool)
    )
    fingerprint = model_fingerprint(sel.model)
    extra = {
        "kind": "selective_model",
        "selective": {
            "layer": sel.layer if isinstance(sel.layer, (str, type(None))) else list(sel.layer),
            "head": sel.head,
            "pool": pools,
            "model": {"class": fingerprint["class"], "checksum": fingerprint["checksum"]},
        },
    }
    return write_save(path, sel.score, extra)


def _static_width(module: nn.Module, pool: Any) -> int | None:
    """Features per sample that ``module`` gives after ``pool``, when its type tells."""
    if not isinstance(pool, str):
        return None
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if pool in ("auto", "avg") else None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features if pool in ("auto", "avg") else None
    if pool not in ("auto", "cls", "mean", "none"):
        return None
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    if isinstance(module, nn.LayerNorm) and module.normalized_shape:
        return module.normalized_shape[-1]
    return None


def _check_model(path: Path, saved: dict[str, Any], model: nn.Module) -> None:
    model_info = saved.get("model", {})
    if model_info.get("class") != qualified_name(model):
        raise PersistenceError(
            f"'{path}' was fitted on a {model_info.get('class')}, got a {qualified_name(model)}. "
            "Pass the model it was fitted on."
        )
    if model_info.get("checksum") != model_fingerprint(model)["checksum"]:
        raise PersistenceError(
            f"'{path}' was fitted on a {model_info.get('class')} with other weights (or another "
            "dtype): its reference embeddings would not match this model's. Pass the model it "
            "was fitted on, or check_model=False if the weights are known to be equivalent."
        )


def load_selective(
    cls: type,
    path: str | os.PathLike[str],
    model: nn.Module,
    *,
    map_location: torch.device | str | None = None,
    pool: Any = None,
    check_model: bool = True,
    example_input: Any = None,
) -> Any:
    """Load a SelectiveModel save onto ``model``; see :meth:`SelectiveModel.load`."""
    path = Path(path)
    header = read_header(path)
    if header.get("kind") != "selective_model" or not isinstance(header.get("selective"), dict):
        raise PersistenceError(
            f"'{path}' holds a score saved alone (Score.save); load it with "
            "selectorch.scores.Score.load and wrap it with SelectiveModel(model, score, layer=...)."
        )
    saved = header["selective"]
    if check_model:
        _check_model(path, saved, model)
    saved_pool = saved.get("pool", "auto")
    if pool is None:
        if isinstance(saved_pool, str) and saved_pool.startswith("callable:"):
            raise PersistenceError(
                f"'{path}' was fitted with the pooling {saved_pool[9:]}, a callable that is not "
                "saved: pass pool=... with the same callable."
            )
        pool = saved_pool
    described = (
        {k: describe_pool(v) for k, v in pool.items()}
        if isinstance(pool, Mapping)
        else describe_pool(pool)
    )
    if described != saved_pool:
        raise PersistenceError(
            f"'{path}' was fitted with pool={saved_pool!r}, got pool={described!r}: the "
            "embeddings would differ."
        )
    layer = saved.get("layer")
    names = [layer] if isinstance(layer, str) else list(layer or [])
    for name in names:
        try:
            get_layer(model, name)
        except ValueError as err:
            raise PersistenceError(f"'{path}' was fitted on layer {name!r}: {err}") from err
    check_files(path, header)
    device = torch.device(map_location) if map_location is not None else module_device(model)
    score = rebuild_score(path, header, device, None)
    dim = score._expected_dim()
    if isinstance(layer, str) and dim is not None:
        width = _static_width(get_layer(model, layer), pool)
        if width is not None and width != dim:
            raise PersistenceError(
                f"'{path}' holds a state fitted on {dim} features per sample, but layer "
                f"{layer!r} ({type(get_layer(model, layer)).__name__}) gives {width}."
            )
    sel = cls(model, score, layer=layer, pool=pool, head=saved.get("head"))
    if example_input is not None:
        sel.check_features(example_input)
    return sel
